"""Augmentations: label alignment (pixel coordinates encoded in the image), determinism by seed,
Hide-and-Seek cells, Puzzle-CAM tiles and complementary masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.common.augment import (
    color_jitter,
    hide_and_seek,
    puzzle_stitch,
    puzzle_tiles,
    random_crop,
    random_flip,
    random_resize_long,
    random_scale,
    regional_dropout_masks,
    scale_grid_sizes,
)

H, W = 11, 13


def coordinate_pair() -> tuple[np.ndarray, np.ndarray]:
    """Image channels hold (row, column, 7); the label holds row * W + column (max 142 < 255)."""
    rows, cols = np.mgrid[0:H, 0:W]
    image = np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)
    return image, (rows * W + cols).astype(np.uint8)


def label_of(image: np.ndarray) -> np.ndarray:
    return image[..., 0].astype(np.int64) * W + image[..., 1]


def test_crop_inside_the_image_keeps_label_alignment() -> None:
    image, label = coordinate_pair()
    crop, crop_label, box = random_crop(image, np.random.default_rng(1), (5, 6), label)
    assert crop.shape == (5, 6, 3) and crop_label.shape == (5, 6)
    assert box == (0, 0, 5, 6)
    assert (crop_label == label_of(crop)).all()


def test_crop_larger_than_the_image_pads_and_the_box_says_where() -> None:
    image, label = coordinate_pair()
    crop, crop_label, (top, left, bottom, right) = random_crop(
        image, np.random.default_rng(2), 16, label, fill=(1, 2, 3)
    )
    assert (bottom - top, right - left) == (H, W)
    inside = np.zeros((16, 16), bool)
    inside[top:bottom, left:right] = True
    assert (crop[top:bottom, left:right] == image).all()
    assert (crop_label[inside] == label_of(crop)[inside]).all()
    assert (crop[~inside] == [1, 2, 3]).all() and (crop_label[~inside] == 255).all()


def test_flip_moves_image_and_label_together_and_happens_about_half_the_time() -> None:
    image, label = coordinate_pair()
    flipped = 0
    for seed in range(8):
        out, out_label = random_flip(image, np.random.default_rng(seed), label)
        assert (out_label == label_of(out)).all()
        assert out.flags["C_CONTIGUOUS"]
        flipped += int(out[0, 0, 1] == W - 1)
    assert 0 < flipped < 8


def test_resize_long_side_and_label_shape() -> None:
    image, label = coordinate_pair()
    out, out_label = random_resize_long(image, np.random.default_rng(0), 26, 26, label)
    assert out.shape == (22, 26, 3) and out_label.shape == (22, 26)
    out, out_label = random_resize_long(image, np.random.default_rng(0), 8, 20, label)
    assert 8 <= max(out.shape[:2]) <= 20 and out_label.shape == out.shape[:2]
    # Nearest neighbour: no label value appears that was not there.
    assert set(np.unique(out_label)) <= set(np.unique(label))


def test_scale_keeps_the_label_on_the_image_grid() -> None:
    image, label = coordinate_pair()
    out, out_label = random_scale(image, np.random.default_rng(0), 0.5, 1.5, label)
    assert out_label.shape == out.shape[:2]
    assert set(np.unique(out_label)) <= set(np.unique(label))
    out, _ = random_scale(image, np.random.default_rng(0), 2.0, 2.0)
    assert out.shape == (22, 26, 3)


def pipeline(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image, label = coordinate_pair()
    image, label = random_resize_long(image, rng, 10, 20, label)
    image, label = random_flip(image, rng, label)
    image = color_jitter(image, rng)
    image, label, _ = random_crop(image, rng, 9, label)
    return image, label


def test_same_seed_same_augmentation() -> None:
    a, b = pipeline(3), pipeline(3)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert any(pipeline(s)[0].tobytes() != a[0].tobytes() for s in (4, 5))


def test_color_jitter_of_zero_strength_is_the_identity() -> None:
    image = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    same = color_jitter(image, np.random.default_rng(0), brightness=0, contrast=0, saturation=0)
    assert same.tobytes() == image.tobytes()
    jittered = color_jitter(image, np.random.default_rng(0))
    assert jittered.dtype == np.uint8 and jittered.shape == image.shape


MEAN = np.array([200.4, 210.0, 220.0])


def test_hide_and_seek_hides_whole_cells_with_the_mean_only() -> None:
    # Values 0..99 never equal the mean (200, 210, 220), so a hidden pixel is recognisable.
    image = np.random.default_rng(0).integers(0, 100, (10, 10, 3), dtype=np.uint8)
    out = hide_and_seek(image, np.random.default_rng(1), grid_sizes=(4,), p=0.5, mean_pixel=MEAN)
    changed = (out != image).any(axis=-1)
    assert (out[changed] == [200, 210, 220]).all()
    assert (out[~changed] == image[~changed]).all()
    # Cells of 4 from the top-left corner; the last row and column of cells are 2 wide.
    for top in (0, 4, 8):
        for left in (0, 4, 8):
            cell = changed[top : top + 4, left : left + 4]
            assert cell.all() or not cell.any()
    assert 0 < changed.sum() < 100


def test_hide_and_seek_with_size_zero_or_p_zero_hides_nothing_and_p_one_everything() -> None:
    image = np.random.default_rng(0).integers(0, 100, (6, 6, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    assert (hide_and_seek(image, rng, grid_sizes=(0,), mean_pixel=MEAN) == image).all()
    assert (hide_and_seek(image, rng, grid_sizes=(2,), p=0.0, mean_pixel=MEAN) == image).all()
    assert (hide_and_seek(image, rng, grid_sizes=(5,), p=1.0, mean_pixel=MEAN) == [200, 210, 220]).all()


def test_grid_sizes_scale_with_the_crop() -> None:
    assert scale_grid_sizes(224) == (0, 16, 32, 44, 56)
    assert scale_grid_sizes(112) == (0, 8, 16, 22, 28)
    # 16*8/224 = 0.57 -> 1, 32*8/224 = 1.14 -> 1, 44*8/224 = 1.57 -> 2, 56*8/224 = 2.
    assert scale_grid_sizes(8) == (0, 1, 1, 2, 2)


def test_puzzle_stitch_of_tiles_is_the_identity() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    tiles = puzzle_tiles(x)
    assert tiles.shape == (8, 3, 2, 3)
    # Tile-major: the top-right tiles of both images come after the top-left ones.
    assert torch.equal(tiles[2:4], x[:, :, :2, 3:])
    assert torch.equal(puzzle_stitch(tiles), x)


def test_puzzle_pads_odd_sizes_and_loses_nothing() -> None:
    x = torch.randn(1, 2, 5, 7)
    tiles = puzzle_tiles(x)
    assert tiles.shape == (4, 2, 3, 4)
    stitched = puzzle_stitch(tiles)
    assert stitched.shape == (1, 2, 6, 8)
    assert torch.equal(stitched[..., :5, :7], x)
    assert (stitched[..., 5, :] == 0).all() and (stitched[..., :, 7] == 0).all()
    with pytest.raises(ValueError):
        puzzle_stitch(torch.zeros(3, 1, 2, 2))


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_regional_dropout_masks_are_complementary_cell_masks(p: float) -> None:
    masks = regional_dropout_masks(6, 10, 9, torch.Generator().manual_seed(0), grid=3, p=p)
    assert masks.shape == (6, 1, 10, 9) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    per_image = masks.flatten(1).sum(dim=1)
    # Neither view is ever blank, even at p = 0 or 1.
    assert (per_image > 0).all() and (per_image < 90).all()
    # Constant over each cell: rows 0-3, 4-6, 7-9 (floor(i*3/10)), columns 0-2, 3-5, 6-8.
    for rows in (slice(0, 4), slice(4, 7), slice(7, 10)):
        for cols in (slice(0, 3), slice(3, 6), slice(6, 9)):
            cell = masks[:, :, rows, cols].flatten(1)
            assert (cell == cell[:, :1]).all()


def test_regional_dropout_masks_reproducible_by_generator_seed() -> None:
    a = regional_dropout_masks(4, 8, 8, torch.Generator().manual_seed(7))
    b = regional_dropout_masks(4, 8, 8, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
