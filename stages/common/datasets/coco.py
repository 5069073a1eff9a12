"""MS COCO 2014 layout: instance annotations as image labels, and as masks for evaluation.

Layout read::

    annotations/instances_train2014.json, annotations/instances_val2014.json
    train2014/<file_name>, val2014/<file_name>

Splits ``train`` and ``val``; ids are file stems (``COCO_val2014_000000000042``). The 80 categories,
sorted by their COCO id, become classes 1..80. Every image of the JSON is listed, including the few with
no annotation (their labels are empty).

Masks are painted from the instances: largest first, so a smaller instance lying on a larger one (a cup
on a table) stays visible where they overlap; equal areas keep the JSON's order, the later on top.
``iscrowd`` regions become 255 (void) where no single instance was painted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from stages.common.datasets.base import VOID, Dataset
from stages.common.errors import DatasetError

SPLIT_DIRS = {"train": "train2014", "val": "val2014"}


@dataclass
class _ImageRecord:
    split: str
    file_name: str
    height: int
    width: int
    annotations: list[dict] = field(default_factory=list)


class CocoDataset(Dataset):
    """A COCO 2014 folder (see the module docstring). Each JSON is parsed once, on first use."""

    name = "coco"

    def __init__(self, root: Path) -> None:
        root = Path(root)
        self._json_paths = {
            split: root / "annotations" / f"instances_{folder}.json"
            for split, folder in SPLIT_DIRS.items()
            if (root / "annotations" / f"instances_{folder}.json").is_file()
        }
        if not self._json_paths:
            raise DatasetError(
                f"{root}: no annotations/instances_train2014.json or instances_val2014.json; give the "
                "folder holding annotations/, train2014/ and val2014/"
            )
        self._records: dict[str, _ImageRecord] = {}
        self._loaded: dict[str, list[str]] = {}
        self._category_ids: list[int] | None = None
        # The smaller val JSON is enough to learn the category list.
        first = "val" if "val" in self._json_paths else "train"
        names = self._load(first)
        super().__init__(root, names)

    def split_names(self) -> list[str]:
        return sorted(self._json_paths)

    def _load(self, split: str) -> tuple[str, ...]:
        """Parse a split's JSON into per-image records; returns its class names (background first)."""
        path = self._json_paths[split]
        try:
            content = json.loads(path.read_text())
            categories = sorted(content["categories"], key=lambda c: c["id"])
            images = content["images"]
            annotations = content.get("annotations", [])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: not a COCO instances file ({exc}); re-download it") from exc
        category_ids = [c["id"] for c in categories]
        if self._category_ids is not None and category_ids != self._category_ids:
            raise DatasetError(f"{path}: its categories differ from the other split's; use one COCO release")
        self._category_ids = category_ids
        known_categories = set(category_ids)
        by_coco_id: dict[int, _ImageRecord] = {}
        ids: list[str] = []
        for entry in images:
            stem = Path(entry["file_name"]).stem
            record = _ImageRecord(split, entry["file_name"], int(entry["height"]), int(entry["width"]))
            by_coco_id[entry["id"]] = record
            self._records[stem] = record
            ids.append(stem)
        for ann in annotations:
            record = by_coco_id.get(ann["image_id"])
            if record is None:
                raise DatasetError(
                    f"{path}: annotation {ann.get('id')} names unknown image {ann['image_id']}"
                )
            if ann.get("category_id") not in known_categories:
                raise DatasetError(
                    f"{path}: annotation {ann.get('id')} has category {ann.get('category_id')} missing from "
                    "its categories list; re-download the file"
                )
            record.annotations.append(ann)
        self._loaded[split] = sorted(ids)
        self._class_of = {cat_id: i + 1 for i, cat_id in enumerate(category_ids)}
        return ("background", *(str(c["name"]) for c in categories))

    def _split_ids(self, split: str) -> list[str]:
        if split not in self._loaded:
            self._load(split)
        folder = self.root / SPLIT_DIRS[split]
        present = set(os.listdir(folder)) if folder.is_dir() else set()
        for image_id in self._loaded[split]:
            if self._records[image_id].file_name not in present:
                raise DatasetError(
                    f"{self._json_paths[split]}: lists {image_id!r} but {self._image_path(image_id)} does "
                    "not exist; copy the image in"
                )
        return list(self._loaded[split])

    def _record(self, image_id: str) -> _ImageRecord:
        if image_id not in self._records:
            for split in self._json_paths:
                if split not in self._loaded:
                    self._load(split)
        if image_id not in self._records:
            files = ", ".join(str(p) for p in self._json_paths.values())
            raise DatasetError(f"{self.root}: no image {image_id!r} in {files}")
        return self._records[image_id]

    def labels(self, image_id: str) -> tuple[int, ...]:
        return tuple(sorted({self._class_of[a["category_id"]] for a in self._record(image_id).annotations}))

    def _image_path(self, image_id: str) -> Path:
        record = self._record(image_id)
        return self.root / SPLIT_DIRS[record.split] / record.file_name

    def _mask_source(self, image_id: str) -> Path | None:
        return self._json_paths[self._record(image_id).split]

    def _expected_mask_path(self, image_id: str) -> Path:
        return self._json_paths[self._record(image_id).split]

    def _read_mask(self, path: Path, image_id: str) -> np.ndarray:
        record = self._record(image_id)
        try:
            return paint_instances(record.height, record.width, record.annotations, self._class_of)
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: bad segmentation for image {image_id!r} ({exc})") from exc


def paint_instances(height: int, width: int, annotations: list[dict], class_of: dict[int, int]) -> np.ndarray:
    """uint8 (H, W) class map from COCO instances: largest painted first, crowds void where still free."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    crowd = np.zeros((height, width), dtype=bool)
    instances: list[tuple[int, int, np.ndarray]] = []
    for ann in annotations:
        region = instance_mask(ann["segmentation"], height, width)
        if ann.get("iscrowd", 0):
            crowd |= region
        else:
            instances.append((int(region.sum()), class_of[ann["category_id"]], region))
    # sorted() is stable, so equal areas keep the JSON order and the later one ends on top.
    for _, cls, region in sorted(instances, key=lambda item: -item[0]):
        canvas[region] = cls
    canvas[crowd & (canvas == 0)] = VOID
    return canvas


def instance_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """bool (H, W) region of one COCO ``segmentation``: polygons, uncompressed or compressed RLE."""
    if isinstance(segmentation, list):
        return _polygons_mask(segmentation, height, width)
    size = [int(v) for v in segmentation["size"]]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image's {[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, (str, bytes)):
        counts = decode_rle_string(counts.decode() if isinstance(counts, bytes) else counts)
    return rle_to_mask([int(c) for c in counts], height, width)


def _polygons_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) >= 6:
            draw.polygon([float(v) for v in polygon], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def rle_to_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """Expand run lengths (alternating 0-runs and 1-runs, first a 0-run, column-major) to a bool mask."""
    if sum(counts) != height * width or min(counts, default=0) < 0:
        raise ValueError(f"RLE runs cover {sum(counts)} pixels, not {height}x{width}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((height, width), order="F")


def decode_rle_string(text: str) -> list[int]:
    """Run lengths from COCO's compact RLE string.

    Each run is stored in 5-bit groups, least significant first, one character per group (value + 48);
    bit 0x20 says another group follows, and bit 0x10 of the last group is the sign. From the fourth run
    on, the stored number is the difference to the run two places earlier (same colour).
    """
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value = 0
        shift = 0
        while True:
            if pos >= len(text):
                raise ValueError("compressed RLE ends inside a number")
            group = ord(text[pos]) - 48
            pos += 1
            value |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:
                    value -= 1 << shift
                break
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
