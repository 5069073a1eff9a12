"""Training augmentations shared by the classifier and the segmenter.

Numpy functions take images as (H, W, 3) uint8 RGB and labels as (H, W) uint8 (255 = ignore), and an
explicit `np.random.Generator`, so that a run is reproduced by its seed; none modifies its inputs.
Functions that take an optional `label` move it exactly as the image (same flip, same box, same
size) and return `(image, label)` with `label` None when none was given. The torch functions at the
end (Puzzle-CAM tiles, complementary masks) work on batches `(B, C, H, W)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IGNORE = 255

# Hide-and-Seek (Singh & Lee ICCV 2017): grid cell sizes for 224-pixel training crops; 0 = no hiding.
HIDE_AND_SEEK_GRID_SIZES = (0, 16, 32, 44, 56)
HIDE_AND_SEEK_REFERENCE_CROP = 224


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")


def _check_label(image: np.ndarray, label: np.ndarray | None) -> None:
    if label is not None and label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} does not match image {image.shape[:2]}")


def _resize(
    image: np.ndarray, label: np.ndarray | None, height: int, width: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Bilinear for the image, nearest for the label (no label value is invented at class borders)."""
    _check_image(image)
    _check_label(image, label)
    size = (max(1, width), max(1, height))  # PIL wants (width, height)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    if label is None:
        return resized, None
    return resized, np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))


def random_resize_long(
    image: np.ndarray, rng: np.random.Generator, low: int, high: int, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize so the long side is a random integer in [low, high] (both inclusive), keeping the
    aspect ratio (IRN's classifier recipe: 320-640 for VOC).

    Args:
        image: (H, W, 3) uint8. label: optional (H, W) uint8.

    Returns:
        image (H', W', 3), label (H', W') or None, with max(H', W') drawn from [low, high].
    """
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high for the long side, got {low}, {high}")
    long_side = int(rng.integers(low, high + 1))
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    return _resize(image, label, round(h * scale), round(w * scale))


def random_scale(
    image: np.ndarray, rng: np.random.Generator, low: float, high: float, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize both sides by one factor drawn uniformly from [low, high] (DeepLab: 0.5-1.5).

    Returns:
        image (round(s·H), round(s·W), 3), label of the same (H', W') or None.
    """
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high for the scale, got {low}, {high}")
    scale = float(rng.uniform(low, high))
    h, w = image.shape[:2]
    return _resize(image, label, round(h * scale), round(w * scale))


def random_flip(
    image: np.ndarray, rng: np.random.Generator, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Horizontal flip with probability 0.5. Returns contiguous copies (ready for torch.from_numpy)."""
    _check_label(image, label)
    if rng.random() < 0.5:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    return np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.3,
    contrast: float = 0.3,
    saturation: float = 0.3,
) -> np.ndarray:
    """Brightness, contrast and saturation jitter in a random order, torchvision's definitions; the
    0.3 defaults are PSA's (Ahn & Kwak CVPR 2018). Each factor is drawn from [1 - x, 1 + x].

    Args:
        image: (H, W, 3) uint8 RGB.

    Returns:
        (H, W, 3) uint8, a new array.
    """
    _check_image(image)
    out = image.astype(np.float32)
    for op in rng.permutation(3):
        strength = (brightness, contrast, saturation)[op]
        if strength <= 0:
            continue
        factor = float(rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
        if op == 0:
            reference: np.ndarray | float = 0.0
        elif op == 1:
            reference = float(_grey(out).mean())
        else:
            reference = _grey(out)[..., None]
        out = np.clip(reference + factor * (out - reference), 0.0, 255.0)
    return np.rint(out).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W) luma, ITU-R BT.601 weights as torchvision uses them."""
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def random_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int | tuple[int, int],
    label: np.ndarray | None = None,
    fill: int | Sequence[int] = 0,
    label_fill: int = IGNORE,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int]]:
    """A random (h, w) window; a side smaller than the window is padded instead, the image placed at
    a random offset inside it (IRN's crop: 512 for the classifier, padded).

    Args:
        image: (H, W, 3) uint8. size: crop side, or (height, width).
        label: optional (H, W) uint8. fill: image padding, one value or one per channel.
        label_fill: label padding (255: the loss ignores padding).

    Returns:
        image (h, w, 3), label (h, w) or None, and box = (top, left, bottom, right): where the image's
        pixels lie in the crop (bottom and right exclusive); outside it is padding.
    """
    _check_image(image)
    _check_label(image, label)
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    if crop_h <= 0 or crop_w <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    h, w = image.shape[:2]
    # Per axis: where the window starts in the image (crop) or the image starts in the window (pad).
    src_top, dst_top, rows = _place(h, crop_h, rng)
    src_left, dst_left, cols = _place(w, crop_w, rng)
    box = (dst_top, dst_left, dst_top + rows, dst_left + cols)
    out = np.empty((crop_h, crop_w, 3), dtype=np.uint8)
    out[...] = np.asarray(fill, dtype=np.uint8)
    out[box[0] : box[2], box[1] : box[3]] = image[src_top : src_top + rows, src_left : src_left + cols]
    if label is None:
        return out, None, box
    out_label = np.full((crop_h, crop_w), label_fill, dtype=label.dtype)
    out_label[box[0] : box[2], box[1] : box[3]] = label[src_top : src_top + rows, src_left : src_left + cols]
    return out, out_label, box


def _place(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(source start, destination start, extent) along one axis."""
    if length >= crop:
        return int(rng.integers(0, length - crop + 1)), 0, crop
    return 0, int(rng.integers(0, crop - length + 1)), length


def hide_and_seek(
    image: np.ndarray,
    rng: np.random.Generator,
    grid_sizes: Sequence[int] = HIDE_AND_SEEK_GRID_SIZES,
    p: float = 0.5,
    *,
    mean_pixel: np.ndarray,
) -> np.ndarray:
    """Hide random grid cells of a training image (Singh & Lee ICCV 2017, Hide-and-Seek).

    One cell size s is drawn uniformly from `grid_sizes` (0 = keep the whole image); the image is cut
    into s×s cells from its top-left corner (the last row and column of cells may be smaller) and
    each cell is hidden with probability p (paper: 0.5) by filling it with the dataset mean, which
    keeps the first layer's activation statistics the same at test time, when nothing is hidden.

    Args:
        image: (H, W, 3) uint8. mean_pixel: (3,) RGB dataset mean in 0..255 (rounded).
        grid_sizes: the paper's sizes for 224 crops; see `scale_grid_sizes` for other crops.

    Returns:
        (H, W, 3) uint8, a new array.
    """
    _check_image(image)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"hiding probability must be in [0, 1], got {p}")
    if len(grid_sizes) == 0 or min(grid_sizes) < 0:
        raise ValueError(f"grid sizes must be a non-empty list of sizes >= 0, got {tuple(grid_sizes)}")
    mean = np.asarray(mean_pixel, dtype=np.float64).reshape(-1)
    if mean.shape != (3,):
        raise ValueError(f"mean_pixel must have 3 values (RGB), got shape {np.shape(mean_pixel)}")
    out = image.copy()
    cell = int(grid_sizes[int(rng.integers(len(grid_sizes)))])
    if cell == 0:
        return out
    h, w = image.shape[:2]
    cells_h, cells_w = -(-h // cell), -(-w // cell)
    hidden = rng.random((cells_h, cells_w)) < p
    # Cell index of every pixel, then one lookup: no Python loop over cells.
    pixel_hidden = hidden[np.arange(h)[:, None] // cell, np.arange(w)[None, :] // cell]
    out[pixel_hidden] = np.clip(np.rint(mean), 0, 255).astype(np.uint8)
    return out


def scale_grid_sizes(
    crop_size: int,
    reference: int = HIDE_AND_SEEK_REFERENCE_CROP,
    grid_sizes: Sequence[int] = HIDE_AND_SEEK_GRID_SIZES,
) -> tuple[int, ...]:
    """Hide-and-Seek's cell sizes scaled from the paper's 224 crops to `crop_size`, so a cell hides
    the same share of the crop. Sizes round to the nearest integer; 0 stays 0, others stay >= 1.
    Equal sizes after rounding are kept (the draw stays uniform over the paper's five choices).
    """
    if crop_size <= 0 or reference <= 0:
        raise ValueError(f"crop size and reference must be positive, got {crop_size}, {reference}")
    return tuple(0 if s == 0 else max(1, round(s * crop_size / reference)) for s in grid_sizes)


def puzzle_tiles(x: torch.Tensor) -> torch.Tensor:
    """Cut every image of a batch into 2×2 tiles (Puzzle-CAM, Jo & Yu ICIP 2021).

    Args:
        x: (B, C, H, W).

    Returns:
        (4B, C, ceil(H/2), ceil(W/2)), ordered tile-major: top-left tiles of all B images, then
        top-right, bottom-left, bottom-right. An odd H or W is first zero-padded by one row or column
        at the bottom or right, so nothing is lost: `puzzle_stitch(puzzle_tiles(x))[..., :H, :W] == x`.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    x = F.pad(x, (0, w % 2, 0, h % 2))
    top, bottom = x.chunk(2, dim=2)
    return torch.cat([*top.chunk(2, dim=3), *bottom.chunk(2, dim=3)], dim=0)


def puzzle_stitch(t: torch.Tensor) -> torch.Tensor:
    """Put 2×2 tiles back into whole maps: the inverse of `puzzle_tiles`.

    Args:
        t: (4B, K, h, w), tile-major as `puzzle_tiles` orders them (e.g. the tiles' class maps).

    Returns:
        (B, K, 2h, 2w).
    """
    if t.ndim != 4 or t.shape[0] % 4 != 0:
        raise ValueError(f"t must be (4B, K, h, w), got shape {tuple(t.shape)}")
    top_left, top_right, bottom_left, bottom_right = t.chunk(4, dim=0)
    top = torch.cat([top_left, top_right], dim=3)
    bottom = torch.cat([bottom_left, bottom_right], dim=3)
    return torch.cat([top, bottom], dim=2)


def regional_dropout_masks(
    batch: int,
    h: int,
    w: int,
    generator: torch.Generator | None = None,
    grid: int = 4,
    p: float = 0.5,
) -> torch.Tensor:
    """Masks that split each image into two complementary views ("Where to Look?: Mining
    Complementary Image Regions for Weakly Supervised Object Localization", WACV 2021).

    Each image is cut into grid×grid cells (cell borders at floor(i·grid/h) so any h, w works) and a
    cell is kept in view M with probability p; view 1 - M shows exactly the rest. A draw that keeps
    all or no cells would leave one view blank, so one random cell of it is flipped.

    Args:
        batch, h, w: the output size. generator: CPU torch.Generator for reproducible masks.

    Returns:
        (B, 1, h, w) float32 of 0 and 1, on the CPU: use x * M and x * (1 - M).
    """
    if batch <= 0 or h <= 0 or w <= 0 or grid <= 0:
        raise ValueError(f"batch, h, w and grid must be positive, got {batch}, {h}, {w}, {grid}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"keep probability must be in [0, 1], got {p}")
    cells = (torch.rand(batch, grid * grid, generator=generator) < p).float()
    if grid > 1:
        kept = cells.sum(dim=1)
        blank = (kept == 0) | (kept == grid * grid)
        flip = torch.randint(grid * grid, (batch,), generator=generator)
        rows = torch.nonzero(blank).flatten()
        cells[rows, flip[rows]] = 1.0 - cells[rows, flip[rows]]
    cells = cells.view(batch, 1, grid, grid)
    row_cell = torch.arange(h) * grid // h
    col_cell = torch.arange(w) * grid // w
    return cells[:, :, row_cell[:, None], col_cell[None, :]]
