"""A small synthetic dataset in the VOC layout that is hard in the ways real WSSS data is hard.

- Every object is a large body plus a small "head" (about 12% of its area). Bodies share one
  brown-grey colour across classes; the head's colour and pattern give the class away at a glance, while
  the body carries only a weak class-specific stripe (like fur or hull texture: the same mean colour,
  a low-contrast orientation of its own). A classifier therefore looks at heads and its CAM under-covers
  the bodies; once heads are erased, the faint body cue is what a retrained classifier can still find,
  which is what adversarial erasing relies on (and what refinement and the CRF must fill in otherwise).
- Backgrounds correlate with classes: boats sit on water and planes on sky most of the time, so a CAM
  can leak onto the context texture.
- 1-3 objects per image, later ones occluding earlier ones (each keeps at least half its area and half
  its head visible), some cut by the image border; image sizes vary in both directions.
- Masks are VOC palette PNGs with a 255 void band of 1-2 px on object boundaries, XML annotations list
  every visible object with its box.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stages.common.datasets.base import VOID
from stages.common.datasets.voc import VocDataset, voc_palette

TOY_CLASSES: tuple[str, ...] = ("background", "boat", "plane", "car", "dog", "bird")

# Bumped whenever the same seed draws other images, so a cached folder of an older generator is remade.
# 2: body stripe amplitude 12 -> 24.
TOY_GENERATOR = 2
TOY_SETTINGS = "toy.json"

TEXTURES = ("water", "sky", "grass", "sand", "road")

# Context bias: the share of images whose first object is of this class that get this texture.
_PREFERRED_TEXTURE = {1: ("water", 0.85), 2: ("sky", 0.85)}

# Class-specific head colours; their patterns (below) differ too, so two cues give the class away.
_HEAD_COLOURS = {
    1: (215, 40, 40),
    2: (240, 205, 30),
    3: (215, 60, 205),
    4: (40, 200, 215),
    5: (245, 130, 30),
}
_BODY_COLOUR = (125, 105, 90)
# Amplitude of the class-specific body stripe; heads differ by ~100+ per channel. At 12 the body held no cue a
# classifier could learn: retrained on head-erased images it fitted its own training set at F1 0.5, so
# erasing rounds could only mine context. A real object's body is still class evidence (fur, hull), so 24.
_BODY_STRIPE = 24.0
_HEAD_AREA_RATIO = 0.13  # head disc area / body ellipse area; ends near 12% of the object's pixels


@dataclass
class ToyObject:
    """One object as finally visible in its image (after occlusion)."""

    class_index: int
    region: np.ndarray  # bool (H, W): visible pixels of body and head
    head: np.ndarray  # bool (H, W): visible pixels of the head alone
    full_area: int  # pixels of body and head before any occlusion
    full_head_area: int


@dataclass
class ToyScene:
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # uint8 (H, W): 0 background, classes, 255 void boundary band
    objects: list[ToyObject]
    texture: str


class ToyDataset(VocDataset):
    """A folder made by `make_toy`, read as VOC under the name ``toy``."""

    name = "toy"


def make_toy(
    out: Path,
    seed: int = 0,
    n_train: int = 200,
    n_val: int = 60,
    min_size: int = 64,
    max_size: int = 128,
) -> Path:
    """Write a toy dataset in the VOC layout (plus classes.txt) into ``out``; the same seed, the same files.

    Image heights and widths are drawn independently from [min_size, max_size]. Returns ``out``.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for split, count in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for image_id in ids:
            height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            scene = render_scene(rng, height, width)
            Image.fromarray(scene.image).save(out / "JPEGImages" / f"{image_id}.jpg", quality=95)
            mask = Image.fromarray(scene.mask)
            mask.putpalette(palette)
            mask.save(out / "SegmentationClass" / f"{image_id}.png")
            (out / "Annotations" / f"{image_id}.xml").write_text(_annotation_xml(image_id, scene))
        (out / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    (out / "classes.txt").write_text("".join(n + "\n" for n in TOY_CLASSES))
    settings = toy_settings(seed, n_train, n_val, min_size, max_size)
    (out / TOY_SETTINGS).write_text(json.dumps(settings, sort_keys=True) + "\n")
    return out


def toy_settings(
    seed: int = 0, n_train: int = 200, n_val: int = 60, min_size: int = 64, max_size: int = 128
) -> dict:
    """What a toy folder was made with, the generator's version included (``TOY_SETTINGS`` in the folder)."""
    return {
        "generator": TOY_GENERATOR,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "min_size": min_size,
        "max_size": max_size,
    }


def is_current_toy(folder: Path, **settings: int) -> bool:
    """True when ``folder`` holds a complete toy dataset made by this generator (and with the given
    ``make_toy`` settings, those not given being free)."""
    record = Path(folder) / TOY_SETTINGS
    try:
        made = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    wanted = {"generator": TOY_GENERATOR, **settings}
    return isinstance(made, dict) and all(made.get(k) == v for k, v in wanted.items())


def ensure_toy(cache_dir: Path, **settings: int) -> Path:
    """``cache_dir/toy_data``, generated on first use with ``make_toy``'s ``settings`` (default: its own),
    and again when the folder was made by an older generator or with other settings.

    Generation happens in a hidden sibling folder renamed into place at the end, so a killed run never
    leaves a half dataset, and two processes racing both end up reading one complete copy.
    """
    final = Path(cache_dir) / "toy_data"
    if is_current_toy(final, **settings):
        return final
    if final.is_dir():  # an older generator's images or other settings: moved aside, then replaced
        stale = Path(tempfile.mkdtemp(prefix=".toy_data.old.", dir=final.parent))
        try:
            os.rename(final, stale / "toy_data")
        except FileNotFoundError:  # a racing process moved it first
            pass
        shutil.rmtree(stale, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toy_data.", dir=final.parent))
    try:
        make_toy(staging, **settings)
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not final.is_dir():
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def render_scene(rng: np.random.Generator, height: int, width: int) -> ToyScene:
    """Draw one image: background texture, 1-3 occluding objects, and its void-banded mask."""
    classes = [int(c) for c in rng.integers(1, len(TOY_CLASSES), size=int(rng.integers(1, 4)))]
    texture = _pick_texture(rng, classes[0])
    image = _background(rng, texture, height, width)
    labels = np.zeros((height, width), dtype=np.uint8)
    objects: list[ToyObject] = []
    for class_index in classes:
        placed = _place_object(rng, height, width, objects)
        if placed is None:
            continue
        body, head, shading = placed
        region = body | head
        for earlier in objects:
            earlier.region &= ~region
            earlier.head &= ~region
        _paint_body(rng, image, body, shading, class_index)
        _paint_head(rng, image, head, class_index)
        labels[region] = class_index
        objects.append(ToyObject(class_index, region, head.copy(), int(region.sum()), int(head.sum())))
    image += rng.normal(0.0, 4.0, size=image.shape)
    mask = _with_void_band(labels, width=int(rng.integers(1, 3)))
    kept = [o for o in objects if np.any(o.region & (mask != VOID))]
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return ToyScene(pixels, mask, kept, texture)


def _pick_texture(rng: np.random.Generator, first_class: int) -> str:
    if first_class in _PREFERRED_TEXTURE:
        texture, share = _PREFERRED_TEXTURE[first_class]
        if rng.random() < share:
            return texture
    return TEXTURES[int(rng.integers(len(TEXTURES)))]


def _place_object(
    rng: np.random.Generator, height: int, width: int, earlier: list[ToyObject]
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(body, head, shading) of a new object leaving every earlier one half visible, or None."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    short = min(height, width)
    for _ in range(10):
        # Objects cover a VOC-like share of the image (a third of its short side and more).
        major = rng.uniform(0.28, 0.46) * short
        minor = major * rng.uniform(0.5, 0.72)
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        angle = rng.uniform(0.0, 2.0 * np.pi)
        # Coordinates along (u) and across (v) the object's major axis.
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        radius2 = (u / major) ** 2 + (v / minor) ** 2
        body = radius2 <= 1.0
        head_radius = np.sqrt(_HEAD_AREA_RATIO * major * minor)
        head = (u - 0.8 * major) ** 2 + v**2 <= head_radius**2
        region = body | head
        if head.sum() < 4:
            continue
        if all(_still_visible(o, region) for o in earlier):
            shading = 0.8 + 0.2 * np.clip(1.0 - radius2, 0.0, 1.0)
            return body, head, shading
    return None


def _still_visible(obj: ToyObject, cover: np.ndarray) -> bool:
    return bool(
        (obj.region & ~cover).sum() >= 0.5 * obj.full_area
        and (obj.head & ~cover).sum() >= 0.5 * obj.full_head_area
    )


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """float32 (H, W) in [0, 1]: uniform noise on a coarse grid of ``cell`` px, bilinearly enlarged."""
    coarse = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def _background(rng: np.random.Generator, texture: str, height: int, width: int) -> np.ndarray:
    """float64 (H, W, 3) RGB background of the named texture."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    grain = rng.normal(0.0, 1.0, size=(height, width))
    blotch = _smooth_noise(rng, height, width, cell=12)
    if texture == "water":
        period = rng.uniform(6.0, 10.0)
        waves = np.sin(2 * np.pi * (yy / period + 0.4 * blotch + 0.05 * np.sin(xx / 7.0)))
        shade = 18.0 * waves + 6.0 * grain
        base = np.array([40.0, 95.0, 155.0])
    elif texture == "sky":
        top, bottom = np.array([110.0, 165.0, 230.0]), np.array([185.0, 212.0, 240.0])
        ramp = (yy / max(height - 1, 1))[:, :, None]
        clouds = np.clip((blotch - 0.6) * 4.0, 0.0, 1.0)[:, :, None]
        sky = top + (bottom - top) * ramp
        return sky * (1 - clouds) + 245.0 * clouds + 3.0 * grain[:, :, None]
    elif texture == "grass":
        shade = 30.0 * (blotch - 0.5) + 18.0 * grain
        base = np.array([65.0, 130.0, 50.0])
    elif texture == "sand":
        shade = 20.0 * (blotch - 0.5) + 12.0 * grain
        base = np.array([200.0, 180.0, 135.0])
    else:
        lane = (np.abs(xx - width / 2) < 1.5) & ((yy // 8) % 2 == 0)
        shade = 12.0 * (blotch - 0.5) + 10.0 * grain + 120.0 * lane
        base = np.array([100.0, 100.0, 106.0])
    return base + shade[:, :, None]


def _paint_body(
    rng: np.random.Generator, image: np.ndarray, body: np.ndarray, shading: np.ndarray, class_index: int
) -> None:
    """The shared body look: one colour family, jittered per object, mottled and shaded to the rim, with a
    faint zero-mean stripe whose orientation is the class's own (the weak, non-discriminative-looking cue)."""
    height, width = body.shape
    colour = np.array(_BODY_COLOUR) + rng.normal(0.0, 10.0) + rng.normal(0.0, 5.0, size=3)
    mottle = 24.0 * (_smooth_noise(rng, height, width, cell=5) - 0.5)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = np.pi * (class_index - 1) / (len(TOY_CLASSES) - 1)
    stripe = _BODY_STRIPE * np.sin(
        2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / 5.0 + rng.uniform(0, 6.3)
    )
    pixels = (colour + mottle[:, :, None] + stripe[:, :, None]) * shading[:, :, None]
    image[body] = pixels[body]


def _paint_head(rng: np.random.Generator, image: np.ndarray, head: np.ndarray, class_index: int) -> None:
    """The discriminative part: the class's own colour under the class's own pattern."""
    height, width = head.shape
    yy, xx = np.mgrid[0:height, 0:width]
    patterns = {
        1: np.ones((height, width)),
        2: 0.65 + 0.35 * ((yy // 2) % 2),
        3: 0.65 + 0.35 * (((yy // 2) + (xx // 2)) % 2),
        4: 0.65 + 0.35 * ~((yy % 3 == 0) & (xx % 3 == 0)),
        5: 0.65 + 0.35 * (((yy + xx) // 2) % 2),
    }
    colour = np.array(_HEAD_COLOURS[class_index]) + rng.normal(0.0, 8.0, size=3)
    pixels = colour * patterns[class_index][:, :, None]
    image[head] = pixels[head]


def _with_void_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Labels with boundary pixels set to 255: object pixels touching another label, and for
    ``width`` 2 also the background pixels touching an object (VOC draws its band on both sides)."""
    padded = np.pad(labels, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    neighbours = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    differs = np.zeros(labels.shape, dtype=bool)
    touches_object = np.zeros(labels.shape, dtype=bool)
    for other in neighbours:
        differs |= other != centre
        touches_object |= other > 0
    band = differs & (labels > 0)
    if width >= 2:
        band |= differs & (labels == 0) & touches_object
    mask = labels.copy()
    mask[band] = VOID
    return mask


def _annotation_xml(image_id: str, scene: ToyScene) -> str:
    """A VOC-style annotation: image size and one <object> with a 1-based box per visible object."""
    height, width = scene.mask.shape
    objects = []
    for obj in scene.objects:
        rows, cols = np.nonzero(obj.region)
        objects.append(
            "  <object>\n"
            f"    <name>{TOY_CLASSES[obj.class_index]}</name>\n"
            "    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
            f"    <bndbox><xmin>{cols.min() + 1}</xmin><ymin>{rows.min() + 1}</ymin>"
            f"<xmax>{cols.max() + 1}</xmax><ymax>{rows.max() + 1}</ymax></bndbox>\n"
            "  </object>\n"
        )
    return (
        "<annotation>\n"
        f"  <folder>toy</folder>\n  <filename>{image_id}.jpg</filename>\n"
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n"
        "  <segmented>1</segmented>\n" + "".join(objects) + "</annotation>\n"
    )
