"""A plain folder of images with a labels CSV: the format for bringing your own data.

Layout read::

    images/<id>.jpg|.jpeg|.png
    labels.csv              header ``image_id,classes``; classes separated by ``;`` or spaces
    classes.txt             optional: one name per line, background first
                            (else: background + the sorted class names of labels.csv)
    masks/<id>.png          optional, for evaluation: palette or grayscale class indices, 255 void
    splits/<split>.txt      optional: one id per line; else a single split ``train`` of every CSV row

Only images with a row in labels.csv belong to the dataset; other files in images/ are ignored.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from stages.common.datasets.base import Dataset, read_class_names, read_id_list
from stages.common.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderDataset(Dataset):
    """Images plus labels.csv (see the module docstring)."""

    name = "folder"

    def __init__(self, root: Path) -> None:
        root = Path(root)
        self._csv = root / "labels.csv"
        if not (root / "images").is_dir() or not self._csv.is_file():
            raise DatasetError(
                f"{root}: a folder dataset needs images/ and labels.csv (header image_id,classes) inside"
            )
        self._images = _image_files(root / "images")
        rows = _read_label_rows(self._csv)
        classes_file = root / "classes.txt"
        if classes_file.is_file():
            names = read_class_names(classes_file)
        else:
            found = {n for _, _, row_names in rows for n in row_names} - {"background"}
            names = ("background", *sorted(found))
        super().__init__(root, names)
        self._labels: dict[str, tuple[int, ...]] = {}
        for line, image_id, row_names in rows:
            indices = set()
            for class_name in row_names:
                index = self._class_index(class_name)
                if index is None:
                    raise DatasetError(
                        f"{self._csv}: line {line}: unknown class {class_name!r}; add it to "
                        f"{classes_file} or fix the row"
                    )
                indices.add(index)
            indices.discard(0)
            self._labels[image_id] = tuple(sorted(indices))

    def split_names(self) -> list[str]:
        split_dir = self.root / "splits"
        names = sorted(p.stem for p in split_dir.glob("*.txt")) if split_dir.is_dir() else []
        return names or ["train"]

    def _split_ids(self, split: str) -> list[str]:
        split_file = self.root / "splits" / f"{split}.txt"
        if split_file.is_file():
            source, ids = split_file, read_id_list(split_file)
        else:
            source, ids = self._csv, list(self._labels)
        for image_id in ids:
            if image_id not in self._labels:
                raise DatasetError(f"{source}: lists {image_id!r} but {self._csv} has no row for it; add one")
            if image_id not in self._images:
                raise DatasetError(
                    f"{source}: lists {image_id!r} but images/ has no {image_id}.jpg/.jpeg/.png; copy the "
                    "image in or remove the id"
                )
        return list(dict.fromkeys(ids))

    def labels(self, image_id: str) -> tuple[int, ...]:
        if image_id not in self._labels:
            raise DatasetError(f"{self._csv}: no row for image {image_id!r}; add one")
        return self._labels[image_id]

    def _image_path(self, image_id: str) -> Path:
        if image_id not in self._images:
            raise DatasetError(f"{self.root / 'images'}: no image file for {image_id!r}")
        return self._images[image_id]

    def _mask_source(self, image_id: str) -> Path | None:
        path = self._expected_mask_path(image_id)
        return path if path.is_file() else None

    def _expected_mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{image_id}.png"


def _image_files(folder: Path) -> dict[str, Path]:
    """id -> image file; two files with one stem (a.jpg and a.png) are ambiguous and refused."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise DatasetError(f"{path}: same id as {files[path.stem].name}; rename or remove one of them")
        files[path.stem] = path
    return files


def _read_label_rows(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, image id, class names) of every row of labels.csv."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"image_id", "classes"} <= set(reader.fieldnames):
                raise DatasetError(f"{path}: first line must be the header image_id,classes")
            rows: list[tuple[int, str, list[str]]] = []
            seen: set[str] = set()
            for row in reader:
                image_id = (row["image_id"] or "").strip()
                if not image_id:
                    continue
                if image_id in seen:
                    raise DatasetError(
                        f"{path}: line {reader.line_num}: {image_id!r} has a second row; merge them"
                    )
                seen.add(image_id)
                names = [n for n in re.split(r"[;\s]+", row["classes"] or "") if n]
                rows.append((reader.line_num, image_id, names))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read labels ({exc})") from exc
    return rows
