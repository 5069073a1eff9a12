"""Adversarial erasing and seeds, on small hand-built arrays whose expected values are written out."""

from __future__ import annotations

import numpy as np
import pytest

from stages.common.errors import ConfigError
from stages.mine_ae.erasing import (
    erase,
    low_cam_mask,
    merge_saliency_components,
    mined_region,
    seeds_from_mined,
    seeds_with_saliency,
    union_masks,
)

U = 255  # in doubt


def test_erase_fills_exactly_the_mined_pixels_with_the_rounded_mean() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    before = image.copy()
    mask = rng.random((6, 7)) < 0.4
    erased = erase(image, mask, np.array([123.6, 116.4, 103.5]))
    assert erased.dtype == np.uint8 and erased.shape == image.shape
    # rint rounds half to even: 103.5 -> 104.
    assert (erased[mask] == [124, 116, 104]).all()
    assert erased[~mask].tobytes() == image[~mask].tobytes()
    assert image.tobytes() == before.tobytes()


def test_erase_refuses_a_mask_of_another_size() -> None:
    with pytest.raises(ValueError, match="mask shape"):
        erase(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), bool), np.zeros(3))


def test_top_fraction_mines_the_top_20_percent_of_the_positive_pixels_of_a_ramp() -> None:
    # 50 zeros then 50 increasing positive values: 20% of 50 positives = the last 10 pixels.
    cam = np.concatenate([np.zeros(50), np.linspace(0.02, 1.0, 50)]).reshape(10, 10)
    expected = np.zeros(100, bool)
    expected[90:] = True
    mined = mined_region(cam)
    assert mined.sum() == 10
    assert (mined == expected.reshape(10, 10)).all()


def test_pixels_tied_at_the_cut_are_all_mined() -> None:
    # Five positive pixels of equal value: k = round(0.2 * 5) = 1, but the five are tied.
    cam = np.array([[0.0, 0.5, 0.5], [0.5, 0.5, 0.5]])
    assert (mined_region(cam) == (cam > 0)).all()


def test_a_fixed_threshold_replaces_the_top_fraction() -> None:
    cam = np.array([[0.1, 0.49, 0.5], [0.7, 1.0, 0.0]])
    assert (mined_region(cam, threshold=0.5) == [[False, False, True], [True, True, False]]).all()


def test_a_cam_without_positive_pixels_mines_nothing() -> None:
    assert not mined_region(np.zeros((3, 3))).any()


@pytest.mark.parametrize(
    "kwargs", [{"top_fraction": None}, {"top_fraction": 0.0}, {"threshold": 1.5}, {"top_fraction": 2.0}]
)
def test_mined_region_refuses_a_missing_or_out_of_range_rule(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        mined_region(np.ones((2, 2)), **kwargs)


def test_union_of_masks() -> None:
    a = np.array([[1, 0, 0], [0, 0, 0]], bool)
    b = np.array([[0, 0, 1], [0, 0, 0]], bool)
    c = np.array([[1, 0, 0], [0, 1, 0]], bool)
    assert (union_masks([a, b, c]) == np.array([[1, 0, 1], [0, 1, 0]], bool)).all()
    with pytest.raises(ValueError):
        union_masks([])
    with pytest.raises(ValueError, match="differ"):
        union_masks([a, np.zeros((3, 2), bool)])


def test_seeds_from_mined_class_conflict_background_and_doubt() -> None:
    f1 = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    f2 = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    f5 = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
    low = np.array([[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 0, 0]], bool)
    expected = np.array(
        [
            [1, U, 2, 0],  # class 1 alone, classes 1 and 2 clash, 2 alone; low CAM and unclaimed
            [0, U, U, 5],  # not low and unclaimed: doubt; a class wins over a low CAM
            [0, 0, U, U],
        ],
        np.uint8,
    )
    seeds = seeds_from_mined({1: f1, 2: f2, 5: f5}, low)
    assert seeds.dtype == np.uint8
    assert (seeds == expected).all()


def test_seeds_from_mined_refuses_class_zero() -> None:
    with pytest.raises(ValueError, match="class ids"):
        seeds_from_mined({0: np.ones((2, 2), bool)}, np.zeros((2, 2), bool))


def test_seeds_with_saliency() -> None:
    f1 = np.array([[1, 1, 0], [1, 0, 0]], bool)
    f2 = np.array([[0, 1, 0], [0, 0, 0]], bool)
    saliency = np.array([[0.9, 0.9, 0.01], [0.05, 0.06, 0.5]])
    expected = np.array(
        [
            [1, U, 0],  # class 1 salient; clash; unclaimed and not salient
            [U, U, U],  # class 1 but saliency < 0.06; 0.06 is not background; salient, unclaimed
        ],
        np.uint8,
    )
    assert (seeds_with_saliency({1: f1, 2: f2}, saliency) == expected).all()


def test_merge_saliency_components_one_seed_two_seeds_and_none() -> None:
    S, m = 1.0, 0.3
    saliency = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
            [S, S, S, 0, S, S, S, S, S],  # A (left) and B (right, one row)
            [S, S, S, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, S, 0, 0, 0, 0, 0],  # joins A by a diagonal: 8-connectivity
            [S, S, 0, 0, 0, 0, 0, 0, 0],  # C: no class seed
            [S, S, 0, 0, 0, m, 0, 0, 0],  # a mid-saliency pixel
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    seeds = np.full(saliency.shape, U, np.uint8)
    seeds[1, 0] = 1  # A's one seed
    seeds[1, 4], seeds[1, 7] = 2, 3  # B: two classes
    seeds[4, 0] = 0  # a background seed carries no class: C stays in doubt
    seeds[5, 5] = 2  # a seed in the mid band: doubt all the same
    seeds[6, 8] = 1  # a seed where saliency says background
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
            # B: columns 4-5 are nearer the class-2 seed (col 4), columns 6-8 the class-3 seed (col 7)
            [1, 1, 1, 0, 2, 2, 3, 3, 3],
            [1, 1, 1, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0, 0, 0],
            [U, U, 0, 0, 0, 0, 0, 0, 0],
            [U, U, 0, 0, 0, U, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        np.uint8,
    )
    merged = merge_saliency_components(seeds, saliency)
    assert merged.dtype == np.uint8
    assert (merged == expected).all()


def test_merge_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        merge_saliency_components(np.zeros((3, 3), np.uint8), np.zeros((3, 4)))


def test_low_cam_mask_needs_every_class_of_every_round_low() -> None:
    round1 = np.array(
        [
            [[1.0, 0.04, 0.0], [0.2, 0.0, 0.0]],
            [[0.0, 0.00, 0.0], [0.0, 0.0, 0.0]],  # a class map with no response: low everywhere
        ]
    )
    # Max 0.5, so the cut is 0.025: 0.03 is not low, 0.02 is.
    round2 = np.array([[[0.0, 0.0, 0.03], [0.0, 0.02, 0.5]]])
    expected = np.array([[0, 1, 0], [0, 1, 0]], bool)
    assert (low_cam_mask([round1, round2]) == expected).all()
    assert low_cam_mask([np.zeros((0, 2, 2))]).all()
    with pytest.raises(ValueError):
        low_cam_mask([round1, np.zeros((1, 3, 3))])
