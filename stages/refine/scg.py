"""Self-correlation map generation, SCG (Pan et al., "Unveiling the Potential of Structure Preserving
for Weakly Supervised Object Localization", CVPR 2021), as RecurSeed (Jo et al.) uses it to refine CAMs.

A pixel's map over the image is its column of the high-order self-correlation (HSC) of backbone
features: pixels of one object correlate with each other, directly (first order) or through a common
neighbour in feature space (second order). Cost is (hw)²: run it at stride 16, never at stride 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Thresholds of the SCG paper: first order keeps cosine ≥ 0.5; second order keeps entries ≥ 0.1/(hw),
# a tenth of what a column spread uniformly over the hw pixels would hold.
FIRST_ORDER_THR = 0.5
SECOND_ORDER_FACTOR = 0.1
# CAM thresholds of RecurSeed for foreground and background seeds.
SCG_FG_THR = 0.30
SCG_BG_THR = 0.05

_EPS = 1e-5


def _max_normalise_columns(matrix: Tensor) -> Tensor:
    return matrix / (matrix.amax(dim=0, keepdim=True) + _EPS)


def _sum_normalise_columns(matrix: Tensor) -> Tensor:
    return matrix / (matrix.sum(dim=0, keepdim=True) + _EPS)


def _zero_diagonal(matrix: Tensor) -> Tensor:
    return matrix * (1.0 - torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device))


def _min_max(x: Tensor, dim: int | None = None) -> Tensor:
    """Min-max normalise to [0, 1] (over `dim`, or all of x); a constant input becomes 0."""
    if dim is None:
        low, high = x.min(), x.max()
    else:
        low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    return (x - low) / (high - low + _EPS)


def _stage_correlation(features: Tensor) -> Tensor:
    """HSC of one stage's (C, h, w) features: (hw, hw), symmetric in its first order, columns max 1."""
    flat = F.normalize(features.flatten(1), dim=0)
    first = torch.relu(flat.T @ flat)
    first = torch.where(first < FIRST_ORDER_THR, torch.zeros_like(first), first)

    # Second order as a two-step walk: column-stochastic, so the 0.1/(hw) threshold is relative to a
    # uniform column. The diagonal is dropped so a pixel does not count as its own common neighbour.
    n_pixels = first.shape[0]
    walk = _sum_normalise_columns(_zero_diagonal(first))
    second = walk @ walk
    second = torch.where(second < SECOND_ORDER_FACTOR / n_pixels, torch.zeros_like(second), second)

    # Both orders are max-normalised per column before the max, so neither dominates by scale alone.
    hsc = torch.maximum(_max_normalise_columns(first), _max_normalise_columns(second))
    return _max_normalise_columns(hsc)


def high_order_self_correlation(features: Sequence[Tensor]) -> Tensor:
    """High-order self-correlation of one image, summed over backbone stages (SCG, Pan et al. 2021).

    Per stage: first order S1 = ReLU(cosine similarity), entries < 0.5 zeroed; second order
    S2 = P·P with P = S1 without its diagonal, column-sum normalised, entries < 0.1/(hw) zeroed;
    HSC = max(S1, S2) after max-normalising the columns of each, max-normalised again per column.
    Max (not sum) normalisation keeps every column's strongest correlation at 1, so each stage
    weighs the same in the sum.

    Args:
        features: per stage a (C_i, h, w) map, all on one (h, w) grid; RecurSeed uses the last two
            stages at stride 16.

    Returns:
        (hw, hw) HSC; column j is pixel j's correlation with every pixel (row-major flattening).
    """
    if not features:
        raise ValueError("high_order_self_correlation needs the features of at least one stage")
    grid = features[0].shape[-2:]
    for stage in features:
        if stage.ndim != 3 or stage.shape[-2:] != grid:
            raise ValueError(
                f"every stage must be (C, h, w) on one grid {tuple(grid)}, got shape {tuple(stage.shape)}"
            )
    return torch.stack([_stage_correlation(stage.float()) for stage in features]).sum(dim=0)


def _seed_map(hsc: Tensor, seeds: Tensor) -> Tensor:
    """Min-max-normalised sum of the seeds' HSC columns (each min-max normalised); zeros without seeds."""
    if not seeds.any():
        return torch.zeros(hsc.shape[0], dtype=hsc.dtype, device=hsc.device)
    columns = _min_max(hsc[:, seeds], dim=0)
    return _min_max(columns.sum(dim=1))


def scg_refine(
    cams: Tensor,
    hsc: Tensor,
    fg_thr: float = SCG_FG_THR,
    bg_thr: float = SCG_BG_THR,
) -> Tensor:
    """Refine CAMs with SCG: each class's map becomes what its confident pixels correlate with.

    Foreground seeds of class c: CAM_c ≥ `fg_thr`; background seeds: pixels where every class CAM is
    ≤ `bg_thr` (one background map shared by the classes). Object map O_c and background map B are the
    min-max-normalised sums of their seeds' HSC columns, each column min-max normalised first.
    SCG_c = min-max(ReLU(O_c − B)). The background channel is min-max(ReLU(B − max_c O_c)), the mirror
    of the classes: background where the background seeds correlate more than any object does.
    A class without foreground seeds, or an image without background seeds, gets a zero map.

    Args:
        cams: (K, h, w) class CAMs in [0, 1] at the HSC's grid (stride 16; the caller downsamples).
        hsc: (hw, hw) from `high_order_self_correlation`.

    Returns:
        (K+1, h, w) in [0, 1], background channel first.
    """
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, h, w), got shape {tuple(cams.shape)}")
    n_classes, height, width = cams.shape
    n_pixels = height * width
    if hsc.shape != (n_pixels, n_pixels):
        raise ValueError(
            f"hsc must be ({n_pixels}, {n_pixels}) for cams of {height}x{width}, got {tuple(hsc.shape)}"
        )
    flat = cams.flatten(1).to(hsc.dtype)
    background = _seed_map(hsc, (flat <= bg_thr).all(dim=0))
    if n_classes == 0:
        return _min_max(background).reshape(1, height, width)
    objects = torch.stack([_seed_map(hsc, flat[c] >= fg_thr) for c in range(n_classes)])
    scg = torch.stack([_min_max(torch.relu(obj - background)) for obj in objects])
    bg_channel = _min_max(torch.relu(background - objects.amax(dim=0)))
    return torch.cat([bg_channel[None], scg]).reshape(n_classes + 1, height, width)
