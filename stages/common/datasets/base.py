"""What every dataset format shares: the reading contract, image decoding, mask checks, fingerprints.

A format subclass says where things are (split ids, image and mask files, annotation labels); this base
turns that into arrays with the guarantees the stages rely on: images are uint8 RGB, masks are uint8 with
0 = background, 1..C = classes, 255 = void, and anything else is a `DatasetError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

from stages.common.errors import DatasetError

VOID = 255
"""Mask value for pixels no one should be scored on (object boundaries, crowds, unsure regions)."""


def _too_large(path: Path, exc: Exception) -> DatasetError:
    """PIL refuses images past ``Image.MAX_IMAGE_PIXELS`` x 2 (decompression-bomb guard)."""
    return DatasetError(
        f"{path}: image too large to decode safely ({exc}); shrink it or remove its id from the split"
    )


# Modes PIL opens 16/32-bit single-channel files as; converting them with PIL clips at 255 instead of
# scaling, which would turn a 16-bit photo white.
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file into a uint8 (H, W, 3) RGB array.

    Grayscale, palette, CMYK and RGBA (alpha dropped) are converted by PIL; 16-bit grayscale is scaled
    down to 8 bits. EXIF orientation is deliberately ignored: masks are drawn on the stored pixel grid.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _WIDE_GRAY_MODES:
                return _wide_gray_to_rgb(np.asarray(img))
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: image file not found; copy it back or remove its id from the split"
        ) from None
    except Image.DecompressionBombError as exc:
        raise _too_large(path, exc) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"{path}: cannot decode image ({exc}); re-copy the file or remove its id from the split"
        ) from exc


def _wide_gray_to_rgb(values: np.ndarray) -> np.ndarray:
    """Scale a 16-bit (or wider) grayscale array to uint8 and repeat it into three channels."""
    values = values.astype(np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header alone, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise DatasetError(
            f"{path}: image file not found; copy it back or remove its id from the split"
        ) from None
    except Image.DecompressionBombError as exc:
        raise _too_large(path, exc) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"{path}: cannot read image header ({exc}); re-copy the file or remove its id from the split"
        ) from exc
    return height, width


def read_label_png(path: Path) -> np.ndarray:
    """Class indices stored in a PNG: palette PNGs give their index array, grayscale PNGs their values."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L", *_WIDE_GRAY_MODES):
                raise DatasetError(
                    f"{path}: mask is a {img.mode} image; save it as a palette (mode P) or grayscale PNG "
                    "whose values are class indices"
                )
            return np.asarray(img).copy()
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask file not found") from None
    except Image.DecompressionBombError as exc:
        raise _too_large(path, exc) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot decode mask ({exc}); re-copy the file") from exc


def class_indices(mask: np.ndarray) -> tuple[int, ...]:
    """Sorted object classes present in a mask (neither background nor void)."""
    present = np.unique(mask)
    return tuple(int(v) for v in present if v != 0 and v != VOID)


def read_class_names(path: Path) -> tuple[str, ...]:
    """A classes.txt: one name per line, background first; blank lines ignored."""
    try:
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read class list ({exc})") from exc
    if len(names) < 2:
        raise DatasetError(f"{path}: needs background and at least one class, one name per line")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: a class name appears twice; keep one line per class")
    return names


def read_id_list(path: Path) -> list[str]:
    """Ids of a split file: the first word of every non-blank line (VOC's Main/ files add a flag)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read split file ({exc})") from exc
    return [line.split()[0] for line in lines if line.strip()]


class Dataset(ABC):
    """Images with image-level labels (and, for evaluation, masks) in one on-disk format.

    A format subclass sets ``name``, passes ``root`` and ``class_names`` (background first) and says
    where things are; masks that are not PNG files come in through an overridden ``_read_mask``.
    """

    name: str
    root: Path
    class_names: tuple[str, ...]

    def __init__(self, root: Path, class_names: tuple[str, ...]) -> None:
        self.root = root
        self.class_names = class_names
        self._index_of = {n: i for i, n in enumerate(class_names)}
        self._ids_cache: dict[str, list[str]] = {}

    @property
    def num_classes(self) -> int:
        """C: object classes, background excluded."""
        return len(self.class_names) - 1

    # --- what a format provides -------------------------------------------------------------------

    @abstractmethod
    def split_names(self) -> list[str]:
        """Splits this copy of the dataset offers, e.g. ["train", "train_aug", "val"]."""

    @abstractmethod
    def _split_ids(self, split: str) -> list[str]:
        """Ids of a known split, each checked to have an image (DatasetError naming the list otherwise)."""

    @abstractmethod
    def labels(self, image_id: str) -> tuple[int, ...]:
        """Sorted class indices 1..C present in the image, from the annotations (never the masks)."""

    @abstractmethod
    def _image_path(self, image_id: str) -> Path:
        """The image file of an id."""

    @abstractmethod
    def _mask_source(self, image_id: str) -> Path | None:
        """The file holding the image's mask, or None when it has none."""

    @abstractmethod
    def _expected_mask_path(self, image_id: str) -> Path:
        """Where a missing mask was looked for, for the error message."""

    def _read_mask(self, path: Path, image_id: str) -> np.ndarray:
        """Raw class indices of a mask file, unchecked; PNG by default."""
        return read_label_png(path)

    # --- the contract, shared ---------------------------------------------------------------------

    def ids(self, split: str) -> list[str]:
        """Image ids of a split, in a stable order. Unknown or empty splits are a DatasetError."""
        if split not in self._ids_cache:
            known = self.split_names()
            if split not in known:
                offered = ", ".join(known) if known else "none"
                raise DatasetError(
                    f"{self.root}: no split {split!r} in this {self.name} dataset (known splits: {offered})"
                )
            ids = self._split_ids(split)
            if not ids:
                raise DatasetError(f"{self.root}: split {split!r} lists no images; add ids or pick a split")
            self._ids_cache[split] = ids
        return list(self._ids_cache[split])

    def image(self, image_id: str) -> np.ndarray:
        """uint8 (H, W, 3) RGB pixels."""
        return read_rgb(self._image_path(image_id))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) from the file header only."""
        return read_image_size(self._image_path(image_id))

    def has_masks(self, split: str) -> bool:
        """True when every image of the split has a mask, so the split can be scored."""
        return all(self._mask_source(i) is not None for i in self.ids(split))

    def mask(self, image_id: str) -> np.ndarray:
        """uint8 (H, W): 0 background, 1..C classes, 255 void; checked against the image and class list."""
        path = self._mask_source(image_id)
        if path is None:
            raise DatasetError(
                f"{self._expected_mask_path(image_id)}: mask not found; add it or evaluate on a split "
                "with masks"
            )
        raw = self._read_mask(path, image_id)
        return self._checked_mask(raw, path, image_id)

    def _checked_mask(self, raw: np.ndarray, source: Path, image_id: str) -> np.ndarray:
        if raw.ndim != 2:
            raise DatasetError(f"{source}: mask has shape {raw.shape}; expected one class index per pixel")
        size = self.image_size(image_id)
        if raw.shape != size:
            raise DatasetError(
                f"{source}: mask is {raw.shape[0]}x{raw.shape[1]} but its image is {size[0]}x{size[1]} "
                "(HxW); redraw the mask at the image's size"
            )
        values = np.unique(raw)
        bad = [int(v) for v in values if not (0 <= v <= self.num_classes or v == VOID)]
        if bad:
            raise DatasetError(
                f"{source}: mask holds values {bad[:5]} outside 0..{self.num_classes} and 255 (void); "
                "fix the mask or the class list"
            )
        return raw.astype(np.uint8, copy=False)

    def mean_pixel(self, split: str = "train", max_images: int = 200) -> np.ndarray:
        """float32 (3,) RGB mean in 0..255 over all pixels of up to ``max_images`` evenly spaced images."""
        ids = self.ids(split)
        if len(ids) > max_images:
            picks = np.linspace(0, len(ids) - 1, max_images).round().astype(int)
            ids = [ids[i] for i in np.unique(picks)]
        total = np.zeros(3, dtype=np.float64)
        count = 0
        for image_id in ids:
            pixels = self.image(image_id)
            total += pixels.reshape(-1, 3).sum(axis=0, dtype=np.float64)
            count += pixels.shape[0] * pixels.shape[1]
        return (total / count).astype(np.float32)

    def fingerprint(self, split: str) -> str:
        """16 hex chars of sha256 over the class names, the split's ids and their labels.

        Two copies of a dataset with the same content fingerprint alike wherever they are stored.
        """
        content = {
            "class_names": list(self.class_names),
            "images": [[i, list(self.labels(i))] for i in self.ids(split)],
        }
        blob = json.dumps(content, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self, split: str) -> dict:
        """JSON-able identity of a split, as stored in every artifact's ``dataset`` attribute."""
        return {
            "name": self.name,
            "root": str(self.root),
            "split": split,
            "class_names": list(self.class_names),
            "num_images": len(self.ids(split)),
            "fingerprint": self.fingerprint(split),
        }

    def _class_index(self, name: str) -> int | None:
        """Index of a class name, or None when it is not in the class list."""
        return self._index_of.get(name)
