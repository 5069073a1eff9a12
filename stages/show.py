"""`wsss show`: PNG sheets that let a person see what each stage did to the same images.

One sheet per split: a row per image, a column per view — image | ground truth | CAM heat map | seeds |
refined | pseudo | prediction — in the VOC palette (cream = 255, unsure/void) with a class legend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stages.common.artifacts import Artifact, check_dataset, open_artifact
from stages.common.context import RunOptions
from stages.common.datasets import Dataset, voc_palette
from stages.common.errors import ArtifactError, ConfigError
from stages.common.summary import Summary

CELL = 128  # pixels per view; images are letterboxed into a CELL x CELL square
HEADER = 18
LABEL_VIEWS = ("seeds", "pseudo", "pred")
# The artifacts a sheet shows by default, in pipeline order, with their column titles.
DEFAULT_VIEWS: tuple[tuple[str, str], ...] = (
    ("cams.h5", "CAM"),
    ("seeds.h5", "seeds"),
    ("refined.h5", "refined"),
    ("pseudo.h5", "pseudo"),
    ("pred_val.h5", "prediction"),
)


@dataclass
class ShowConfig:
    """Options of `wsss show`."""

    artifacts: tuple[Path, ...] = ()  # empty = every default artifact present in the run directory
    images: int = 6
    out: Path | None = None  # None = RUN/show


def palette_array() -> np.ndarray:
    """The VOC palette as a (256, 3) uint8 array."""
    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def colourise(labels: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> RGB (H, W, 3) in the VOC palette (255 cream)."""
    return palette_array()[labels]


def heat_map(image: np.ndarray, cam: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] map (H, W) over the image with a blue -> green -> red ramp."""
    cam = np.clip(cam, 0.0, 1.0)
    ramp = np.stack(
        [
            np.clip(1.5 - np.abs(4 * cam - 3), 0, 1),
            np.clip(1.5 - np.abs(4 * cam - 2), 0, 1),
            np.clip(1.5 - np.abs(4 * cam - 1), 0, 1),
        ],
        axis=-1,
    )
    return (image * (1 - weight) + ramp * 255 * weight).astype(np.uint8)


def letterbox(rgb: np.ndarray, size: int = CELL) -> Image.Image:
    """Fit an RGB array into a size x size white square, keeping the aspect ratio."""
    picture = Image.fromarray(rgb)
    scale = size / max(picture.size)
    resized = picture.resize(
        (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.NEAREST
    )
    cell = Image.new("RGB", (size, size), "white")
    cell.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return cell


def render_view(art: Artifact, image_id: str, image: np.ndarray) -> np.ndarray:
    """What one artifact says about one image, as RGB at the image's size."""
    size = image.shape[:2]
    if "labels" in art.h5[f"images/{image_id}"]:
        return colourise(art.labels(image_id))
    scores, classes = art.scores_full(image_id, size)
    if 0 in classes:  # with background: the argmax is a label map
        return colourise(np.asarray(classes, dtype=np.uint8)[scores.argmax(0)])
    return heat_map(image, scores.max(0) if len(scores) else np.zeros(size, np.float32))


def legend(class_names: Sequence[str], width: int) -> Image.Image:
    """Swatches of every class colour with its name, wrapped to ``width``."""
    colours = palette_array()
    entries = [(name, tuple(int(c) for c in colours[i])) for i, name in enumerate(class_names)]
    entries.append(("unsure/void", tuple(int(c) for c in colours[255])))
    per_row = max(1, width // 130)
    rows = (len(entries) + per_row - 1) // per_row
    canvas = Image.new("RGB", (width, rows * 18 + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (name, colour) in enumerate(entries):
        x, y = (index % per_row) * 130 + 4, (index // per_row) * 18 + 4
        draw.rectangle([x, y, x + 12, y + 12], fill=colour, outline="black")
        draw.text((x + 16, y), name, fill="black")
    return canvas


def sheet(dataset: Dataset, ids: Sequence[str], views: Sequence[tuple[str, Artifact]]) -> Image.Image:
    """Rows of image | ground truth (when there is one) | each view, with titles and a legend."""
    has_gt = all(_has_mask(dataset, image_id) for image_id in ids)
    titles = ["image"] + (["ground truth"] if has_gt else []) + [title for title, _ in views]
    width = CELL * len(titles)
    key = legend(dataset.class_names, width)
    canvas = Image.new("RGB", (width, HEADER + CELL * len(ids) + key.height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((column * CELL + 4, 3), title, fill="black")
    for row, image_id in enumerate(ids):
        image = dataset.image(image_id)
        cells = [image] + ([colourise(dataset.mask(image_id))] if has_gt else [])
        cells += [render_view(art, image_id, image) for _, art in views]
        for column, rgb in enumerate(cells):
            canvas.paste(letterbox(rgb), (column * CELL, HEADER + row * CELL))
        draw.text((2, HEADER + row * CELL + 2), image_id, fill="white", stroke_width=1, stroke_fill="black")
    canvas.paste(key, (0, HEADER + CELL * len(ids)))
    return canvas


def _has_mask(dataset: Dataset, image_id: str) -> bool:
    try:
        dataset.mask(image_id)
    except Exception:  # noqa: BLE001 - a missing or broken mask only drops the column
        return False
    return True


def run(opts: RunOptions, cfg: ShowConfig) -> Summary:
    """Write one sheet per split the chosen artifacts cover (``RUN/show/sheet_<split>.png``)."""
    dataset = opts.dataset
    if cfg.images < 1:
        raise ConfigError(f"--images {cfg.images}: show at least one image")
    named = [(p, p.stem) for p in cfg.artifacts] or [
        (opts.path(name), title) for name, title in DEFAULT_VIEWS if opts.path(name).exists()
    ]
    if not named:
        raise ArtifactError(f"{opts.run_dir}: no artifacts to show yet; run `wsss demo` or the stages first")
    by_split: dict[str, list[tuple[str, Artifact]]] = {}
    opened: list[Artifact] = []
    try:
        for path, title in named:
            art = open_artifact(path, kind=("scores", "labels"))
            opened.append(art)
            split = str(art.dataset.get("split"))
            check_dataset(path, art.dataset, dataset.describe(split))
            by_split.setdefault(split, []).append((title, art))
        out_dir = cfg.out or opts.path("show")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for split, views in by_split.items():
            common = set(views[0][1].ids())
            for _, art in views[1:]:
                common &= set(art.ids())
            ids = sorted(common)[: cfg.images]
            if not ids:
                continue
            target = out_dir / f"sheet_{split}.png"
            tmp = target.with_suffix(".tmp.png")
            sheet(dataset, ids, views).save(tmp)
            tmp.replace(target)
            written.append(target)
    finally:
        for art in opened:
            art.close()
    return Summary(
        "show",
        artifacts=written,
        images=cfg.images * len(written),
        notes=[f"{len(by_split)} split(s): " + ", ".join(by_split)],
    )
