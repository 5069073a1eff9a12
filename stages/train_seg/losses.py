"""The segmenter's losses and label updates: plain cross entropy, AE-PSL, DSRG and SEC.

Label maps are ``(B, H, W)`` (or ``(H, W)`` for one image) with class 0 = background, 1..C = the
dataset's classes and 255 = unlabelled, which every loss ignores. Score maps have ``C + 1`` channels,
background first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

IGNORE_INDEX = 255
# Floor under probabilities before a log, so a zero probability costs a finite loss (SEC clips alike).
_EPS = 1e-5
# 8-connectivity: diagonal neighbours touch (DSRG grows regions over the 8-neighbourhood).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _mean_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of −log p(label) over the labelled pixels of the whole batch; 0 (with grad) if there are none.

    ``log_probs (B, K, H, W)``, ``labels (B, H, W)`` long with 255 = ignored.
    """
    labels = labels.long()
    total = F.nll_loss(log_probs, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def seg_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of ``logits (B, K, H, W)`` against ``labels (B, H, W)``, ignoring 255.

    Averaged over the labelled pixels of the batch (DeepLab's loss); a batch with no labelled pixel
    gives 0 rather than NaN.
    """
    return _mean_nll(F.log_softmax(logits, dim=1), labels)


def _check_scores(seg_probs: torch.Tensor, cls_scores: torch.Tensor) -> None:
    if seg_probs.dim() != 4 or cls_scores.dim() != 2 or seg_probs.shape[1] != cls_scores.shape[1] + 1:
        raise ValueError(
            f"expected seg_probs (B, C+1, H, W) and cls_scores (B, C), "
            f"got {tuple(seg_probs.shape)} and {tuple(cls_scores.shape)}"
        )


@torch.no_grad()
def psl_online_label(
    seg_probs: torch.Tensor, cls_scores: torch.Tensor, image_labels: torch.Tensor
) -> torch.Tensor:
    """AE-PSL's online label Ŝ (Wei et al., CVPR 2017): argmax over channels of ``[1, v] ⊗ f``.

    ``seg_probs (B, C+1, H, W)`` softmax f; ``cls_scores (B, C)`` sigmoid scores v of the
    classification branch; ``image_labels (B, C)`` multi-hot. Background keeps weight 1; each class's
    map is scaled by its score; only background and the image's own classes compete. Returns
    ``(B, H, W)`` long, no gradient; ties go to the lower index (background first).
    """
    _check_scores(seg_probs, cls_scores)
    ones = seg_probs.new_ones(seg_probs.shape[0], 1)
    weights = torch.cat([ones, cls_scores.to(seg_probs.dtype)], dim=1)[:, :, None, None]
    allowed = torch.cat([ones.bool(), image_labels > 0.5], dim=1)[:, :, None, None]
    # Probabilities are ≥ 0, so −1 never beats the always-allowed background.
    return (seg_probs * weights).masked_fill(~allowed, -1.0).argmax(dim=1)


def psl_loss(
    log_probs: torch.Tensor, seeds_or_pseudo: torch.Tensor, online_label: torch.Tensor
) -> torch.Tensor:
    """AE-PSL's segmentation loss J(f, S) + J(f, Ŝ) (Wei et al., CVPR 2017).

    J is the mean of −log f over a label map's labelled pixels. ``log_probs (B, C+1, H, W)``;
    ``seeds_or_pseudo (B, H, W)`` the mined labels S with 255; ``online_label (B, H, W)`` Ŝ from
    :func:`psl_online_label` (255 allowed too).
    """
    return _mean_nll(log_probs, seeds_or_pseudo) + _mean_nll(log_probs, online_label)


def psl_test_filter(seg_probs: torch.Tensor, cls_scores: torch.Tensor, thr: float = 0.1) -> torch.Tensor:
    """AE-PSL's test-time filter: zero the maps of classes the classifier scores below ``thr``.

    ``seg_probs (B, C+1, H, W)``, ``cls_scores (B, C)`` sigmoid. Background is always kept; the result is
    not renormalised (an argmax does not need it). 0.1 is the paper's threshold.
    """
    _check_scores(seg_probs, cls_scores)
    ones = torch.ones(seg_probs.shape[0], 1, dtype=torch.bool, device=seg_probs.device)
    keep = torch.cat([ones, cls_scores >= thr], dim=1)[:, :, None, None]
    return seg_probs * keep


def region_grow(
    probs: np.ndarray,
    seeds: np.ndarray,
    image_classes: Sequence[int],
    fg_thr: float = 0.85,
    bg_thr: float = 0.99,
) -> np.ndarray:
    """DSRG's seeded region growing (Huang et al., CVPR 2018), from the original seeds each call.

    ``probs (C+1, H, W)`` the (CRF-refined) softmax; ``seeds (H, W)`` uint8 with 255 = unlabelled;
    ``image_classes`` the image's classes in 1..C. An unlabelled pixel is a candidate for class c when c
    is its argmax among background and the image's classes and p_c > ``fg_thr`` (c ≥ 1) or > ``bg_thr``
    (c = 0), the paper's 0.85 / 0.99. Returns uint8 ``(H, W)``: the seeds, plus candidates reached.

    Growing pixel by pixel until nothing changes is computed exactly, in one step per class: each pixel
    is a candidate for at most one class, so the region of c can only spread through c's seeds and c's
    candidates, and it reaches precisely the candidates lying in an 8-connected component of
    (seeds of c ∪ candidates of c) that contains a seed of c. Other candidates stay 255.
    """
    if probs.ndim != 3 or seeds.shape != probs.shape[1:]:
        raise ValueError(f"expected probs (C+1, H, W) and seeds (H, W), got {probs.shape} and {seeds.shape}")
    if any(not 1 <= c < probs.shape[0] for c in image_classes):
        raise ValueError(f"image classes {list(image_classes)} must lie in 1..{probs.shape[0] - 1}")
    classes = [0, *sorted({int(c) for c in image_classes})]
    competing = probs[classes]
    winner = np.asarray(classes)[competing.argmax(axis=0)]
    winning_prob = competing.max(axis=0)
    unlabelled = seeds == IGNORE_INDEX
    grown = seeds.astype(np.uint8, copy=True)
    for c in classes:
        thr = bg_thr if c == 0 else fg_thr
        candidates = unlabelled & (winner == c) & (winning_prob > thr)
        components, _ = ndimage.label(candidates | (seeds == c), structure=_EIGHT_CONNECTED)
        seeded = np.unique(components[seeds == c])
        reached = candidates & np.isin(components, seeded[seeded > 0])
        grown[reached] = c
    return grown


def balanced_seed_loss(log_probs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """DSRG's balanced seeding loss (Huang et al., CVPR 2018).

    Mean of −log p(seed class) over the background seeds plus the same mean over the foreground seeds,
    each pooled over the batch, so the many background seeds do not drown the objects. ``log_probs
    (B, C+1, H, W)``, ``seeds (B, H, W)`` with 255 = unlabelled. A term with no seed contributes 0.
    """
    seeds = seeds.long()
    ignore = torch.full_like(seeds, IGNORE_INDEX)
    background = torch.where(seeds == 0, seeds, ignore)
    foreground = torch.where(seeds == 0, ignore, seeds)
    return _mean_nll(log_probs, background) + _mean_nll(log_probs, foreground)


def constrain_loss(probs: torch.Tensor, crf_probs: torch.Tensor) -> torch.Tensor:
    """SEC's constrain-to-boundary loss KL(CRF(p) ‖ p) (Kolesnikov & Lampert, ECCV 2016), used by DSRG.

    ``probs (B, C+1, H, W)`` the segmenter's softmax; ``crf_probs`` the same shape, its dense-CRF
    refinement, a constant target (no gradient flows into it). Σ over channels, mean over pixels and
    images.
    """
    target = crf_probs.detach()
    log_ratio = torch.log(target.clamp_min(_EPS)) - torch.log(probs.clamp_min(_EPS))
    return (target * log_ratio).sum(dim=1).mean()


def global_weighted_rank_pooling(scores: torch.Tensor, decay: float) -> torch.Tensor:
    """SEC's global weighted rank pooling (Kolesnikov & Lampert, ECCV 2016).

    ``scores (B, K, H, W)`` → ``(B, K)``: the j-th largest value of each map weighted by ``decay ** j``,
    normalised by the sum of the weights. ``decay`` 0 is max pooling, 1 average pooling.
    """
    ranked = scores.flatten(2).sort(dim=2, descending=True).values
    ranks = torch.arange(ranked.shape[2], device=scores.device, dtype=scores.dtype)
    weights = torch.full_like(ranks, decay).pow(ranks)
    return (ranked * weights).sum(dim=2) / weights.sum()


def expand_loss(
    probs: torch.Tensor, image_labels: torch.Tensor, decay_fg: float = 0.996, decay_bg: float = 0.999
) -> torch.Tensor:
    """SEC's expand loss (Kolesnikov & Lampert, ECCV 2016).

    ``probs (B, C+1, H, W)`` softmax; ``image_labels (B, C)`` multi-hot. Per image:
    −mean over present classes of log GWRP(p_c; ``decay_fg``) − mean over absent classes of
    log(1 − max p_c) (the paper's d− = 0, max pooling) − log GWRP(p_0; ``decay_bg``), background being
    in every image; averaged over the batch. Decays 0.996 / 0.999 are the paper's.
    """
    if probs.dim() != 4 or image_labels.shape != (probs.shape[0], probs.shape[1] - 1):
        raise ValueError(
            f"expected probs (B, C+1, H, W) and image_labels (B, C), "
            f"got {tuple(probs.shape)} and {tuple(image_labels.shape)}"
        )
    present = (image_labels > 0.5).to(probs.dtype)
    absent = 1.0 - present
    pooled_present = global_weighted_rank_pooling(probs[:, 1:], decay_fg)
    pooled_absent = probs[:, 1:].flatten(2).amax(dim=2)
    pooled_background = global_weighted_rank_pooling(probs[:, :1], decay_bg)[:, 0]
    loss_present = _masked_mean(-torch.log(pooled_present.clamp_min(_EPS)), present)
    loss_absent = _masked_mean(-torch.log((1 - pooled_absent).clamp_min(_EPS)), absent)
    loss_background = -torch.log(pooled_background.clamp_min(_EPS))
    return (loss_present + loss_absent + loss_background).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values (B, C)`` where ``mask (B, C)`` is 1; 0 for a row with no such entry."""
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
