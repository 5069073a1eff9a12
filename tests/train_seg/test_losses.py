"""Losses and label updates of train-seg on constructed inputs, expected values derived by hand."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.train_seg.losses import (
    balanced_seed_loss,
    constrain_loss,
    expand_loss,
    global_weighted_rank_pooling,
    psl_loss,
    psl_online_label,
    psl_test_filter,
    region_grow,
    seg_cross_entropy,
)

LN2 = math.log(2.0)


def _labels_with_ignored() -> torch.Tensor:
    return torch.tensor([[[0, 1, 255, 2], [255, 255, 1, 0], [2, 255, 0, 1]]])


LOSSES_ON_LOGITS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "seg_cross_entropy": seg_cross_entropy,
    "balanced_seed_loss": lambda logits, labels: balanced_seed_loss(F.log_softmax(logits, 1), labels),
    "psl_loss": lambda logits, labels: psl_loss(F.log_softmax(logits, 1), labels, labels.flip(-1)),
}


@pytest.mark.parametrize("name", LOSSES_ON_LOGITS)
def test_losses_ignore_255_pixels(name: str) -> None:
    loss_fn = LOSSES_ON_LOGITS[name]
    # psl_loss also reads the mirrored map, so ignore where either map is 255.
    labels = _labels_with_ignored()
    ignored = (labels == 255) | (labels.flip(-1) == 255)
    labels = labels.masked_fill(ignored, 255)
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 3, 4, requires_grad=True)
    loss = loss_fn(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)

    changed = (logits.detach() + 50.0 * torch.randn(1, 3, 3, 4) * ignored[:, None]).requires_grad_()
    changed_loss = loss_fn(changed, labels)
    (changed_grad,) = torch.autograd.grad(changed_loss, changed)

    torch.testing.assert_close(changed_loss, loss)
    torch.testing.assert_close(changed_grad, grad)
    assert (grad * ignored[:, None]).abs().sum() == 0


def test_seg_cross_entropy_matches_torch_and_survives_all_ignored() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 3, 4, requires_grad=True)
    labels = _labels_with_ignored()
    torch.testing.assert_close(
        seg_cross_entropy(logits, labels), F.cross_entropy(logits, labels, ignore_index=255)
    )

    nothing = seg_cross_entropy(logits, torch.full_like(labels, 255))
    assert nothing.item() == 0.0
    nothing.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_psl_online_label_hand_derived() -> None:
    # Three classes; image 0 has classes {1, 2}, image 1 only {3}; v = (0.9, 0.2, 0.99) for both.
    # Weighted scores [1, v] ⊗ f on the 1×5 strip, channels (bg, 1, 2, 3), "x" = not in the image:
    #   image 0:  p0 (.30, .54, .010, x) → 1    p1 (.46, .45, .008, x) → 0 (plain argmax: 1)
    #             p2 (.30, .09, .120, x) → 0 (plain argmax: 2)    p3 (.20, .09, .020, x) → 0 (plain: 3)
    #             p4 (.05, .045, .180, x) → 2
    #   image 1:  p0 (.30, x, x, .0495) → 0    p1 (.46, x, x, 0) → 0    p2 (.30, x, x, 0) → 0
    #             p3 (.20, x, x, .594) → 3     p4 (.05, x, x, 0) → 0
    strip = torch.tensor(
        [
            [0.30, 0.60, 0.05, 0.05],
            [0.46, 0.50, 0.04, 0.00],
            [0.30, 0.10, 0.60, 0.00],
            [0.20, 0.10, 0.10, 0.60],
            [0.05, 0.05, 0.90, 0.00],
        ]
    ).T[:, None, :]  # (4, 1, 5)
    seg_probs = torch.stack([strip, strip])
    cls_scores = torch.tensor([[0.9, 0.2, 0.99], [0.9, 0.2, 0.99]])
    image_labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])

    online = psl_online_label(seg_probs, cls_scores, image_labels)

    assert online.dtype == torch.long
    assert online.tolist() == [[[1, 0, 0, 0, 2]], [[0, 0, 0, 3, 0]]]


def test_psl_loss_is_sum_of_two_mean_nlls() -> None:
    # Two pixels with p = (0.5, 0.25, 0.25) and (0.25, 0.5, 0.25).
    # S = (1, 255): J = −log .25 = 2 ln2.   Ŝ = (0, 1): J = (−log .5 − log .5) / 2 = ln2.   Sum 3 ln2.
    probs = torch.tensor([[0.5, 0.25], [0.25, 0.5], [0.25, 0.25]])[None, :, None, :]
    loss = psl_loss(probs.log(), torch.tensor([[[1, 255]]]), torch.tensor([[[0, 1]]]))
    assert loss.item() == pytest.approx(3 * LN2)


def test_psl_test_filter_drops_low_scoring_classes_keeps_background() -> None:
    seg_probs = torch.full((1, 4, 2, 2), 0.25)
    filtered = psl_test_filter(seg_probs, torch.tensor([[0.5, 0.05, 0.1]]))
    assert filtered[0, :, 0, 0].tolist() == [0.25, 0.25, 0.0, 0.25]
    with pytest.raises(ValueError, match="cls_scores"):
        psl_test_filter(seg_probs, torch.tensor([[0.5, 0.05]]))


def _region_grow_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 6×8 scene, channels (bg, 1, 2), image classes {1, 2}, and the growth expected by hand.

    Class-1 seed at (1,1): (1,2) joins (4-neighbour), (2,3) joins through its diagonal to (1,2);
    (1,4) is class 1's argmax at 0.80 < 0.85, a gap that keeps (1,5) out; the blob (4,6),(4,7) is above
    threshold but touches no seed. Class-2 seed at (0,7): (1,6) joins; its neighbour (1,5) is a class-1
    candidate and does not take 2. Background seed at (5,0): (4,0) and (4,1) at 0.995 join; (3,0) at
    0.98 < 0.99 does not. Every other pixel is (0.5, 0.3, 0.2): no class passes its threshold.
    """
    probs = np.empty((3, 6, 8), dtype=np.float32)
    probs[:] = np.array([0.5, 0.3, 0.2])[:, None, None]
    for pixel in [(1, 2), (2, 3), (1, 5), (4, 6), (4, 7)]:
        probs[(slice(None), *pixel)] = (0.05, 0.90, 0.05)
    probs[:, 1, 4] = (0.10, 0.80, 0.10)
    probs[:, 1, 6] = (0.04, 0.06, 0.90)
    probs[:, 4, 0] = probs[:, 4, 1] = (0.995, 0.003, 0.002)
    probs[:, 3, 0] = (0.98, 0.01, 0.01)
    seeds = np.full((6, 8), 255, dtype=np.uint8)
    seeds[1, 1], seeds[0, 7], seeds[5, 0] = 1, 2, 0
    expected = seeds.copy()
    expected[1, 2] = expected[2, 3] = 1
    expected[1, 6] = 2
    expected[4, 0] = expected[4, 1] = 0
    return probs, seeds, expected


def test_region_grow_takes_exactly_connected_candidates_touching_a_seed() -> None:
    probs, seeds, expected = _region_grow_scene()
    grown = region_grow(probs, seeds, [1, 2])
    assert grown.dtype == np.uint8
    np.testing.assert_array_equal(grown, expected)
    np.testing.assert_array_equal(seeds, _region_grow_scene()[1])  # the seeds are not modified


def _grow_pixel_by_pixel(probs: np.ndarray, seeds: np.ndarray, classes: list[int]) -> np.ndarray:
    """The definition, literally: sweep until no unlabelled pixel joins an 8-neighbouring region."""
    competing = [0, *classes]
    labels = seeds.copy()
    height, width = seeds.shape
    changed = True
    while changed:
        changed = False
        for r in range(height):
            for c in range(width):
                if labels[r, c] != 255:
                    continue
                k = competing[int(np.argmax(probs[competing, r, c]))]
                if probs[k, r, c] <= (0.99 if k == 0 else 0.85):
                    continue
                if (labels[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] == k).any():
                    labels[r, c] = k
                    changed = True
    return labels


@pytest.mark.parametrize("seed", range(4))
def test_region_grow_equals_pixel_by_pixel_growth(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = 6.0 * rng.standard_normal((4, 10, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=0)
    seeds = np.where(rng.random((10, 10)) < 0.1, rng.integers(0, 3, (10, 10)), 255).astype(np.uint8)
    np.testing.assert_array_equal(
        region_grow(probs, seeds, [1, 2]), _grow_pixel_by_pixel(probs, seeds, [1, 2])
    )


def test_region_grow_rejects_classes_outside_the_map() -> None:
    probs, seeds, _ = _region_grow_scene()
    with pytest.raises(ValueError, match="image classes"):
        region_grow(probs, seeds, [3])


def test_balanced_seed_loss_hand_value() -> None:
    # Seeds (0, 0, 1, 255); p(bg) = .5 and .25 at the background seeds, p(1) = .5 at the object seed.
    # Background mean (ln2 + 2 ln2) / 2 = 1.5 ln2, foreground mean ln2: total 2.5 ln2 (unbalanced: 2 ln2).
    probs = torch.tensor([[0.5, 0.25, 0.5, 0.1], [0.5, 0.75, 0.5, 0.9]])[None, :, None, :]
    loss = balanced_seed_loss(probs.log(), torch.tensor([[[0, 0, 1, 255]]]))
    assert loss.item() == pytest.approx(2.5 * LN2)


def test_constrain_loss_hand_value() -> None:
    # Pixel 0: p = (.5, .5), CRF (1, 0): KL = 1·ln(1/.5) = ln2.  Pixel 1: p = CRF: 0.  Mean ln2 / 2.
    probs = torch.tensor([[0.5, 0.3], [0.5, 0.7]])[None, :, None, :].requires_grad_()
    crf = torch.tensor([[1.0, 0.3], [0.0, 0.7]])[None, :, None, :]
    loss = constrain_loss(probs, crf)
    assert loss.item() == pytest.approx(LN2 / 2)
    loss.backward()
    assert torch.isfinite(probs.grad).all()


def test_global_weighted_rank_pooling_hand_value() -> None:
    # Values sorted (.4, .3, .2, .1), weights .5^j = (1, .5, .25, .125), Z = 1.875:
    # (.4 + .15 + .05 + .0125) / 1.875 = .6125 / 1.875.  Decay 0 is the max, decay 1 the mean.
    scores = torch.tensor([[0.1, 0.4], [0.2, 0.3]])[None, None]
    assert global_weighted_rank_pooling(scores, 0.5).item() == pytest.approx(0.6125 / 1.875)
    assert global_weighted_rank_pooling(scores, 0.0).item() == pytest.approx(0.4)
    assert global_weighted_rank_pooling(scores, 1.0).item() == pytest.approx(0.25)


def test_expand_loss_hand_value() -> None:
    # Four pixels (bg, 1, 2): (.2,.6,.2) (.4,.4,.2) (.6,.3,.1) (.8,.1,.1); class 1 present, 2 absent.
    # Decay .5 (Z = 1.875): GWRP(p1) = (.6 + .2 + .075 + .0125) / 1.875 = .8875 / 1.875;
    # absent class 2 by its max .2 → −log .8; GWRP(bg) = (.8 + .3 + .1 + .025) / 1.875 = 1.225 / 1.875.
    probs = torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.6, 0.4, 0.3, 0.1], [0.2, 0.2, 0.1, 0.1]])
    probs = probs.reshape(1, 3, 2, 2)
    loss = expand_loss(probs, torch.tensor([[1.0, 0.0]]), decay_fg=0.5, decay_bg=0.5)
    expected = -math.log(0.8875 / 1.875) - math.log(0.8) - math.log(1.225 / 1.875)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
