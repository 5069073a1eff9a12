"""Pixel-adaptive mask refinement, PAMR (Araslanov & Roth, "Single-Stage Semantic Segmentation from
Image Labels", CVPR 2020): masks diffuse over a fixed local graph whose weights come from the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Both defaults are the paper's.
PAMR_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
PAMR_ITERATIONS = 10

# κ divides by 0.1·σ_i (paper); the epsilon keeps flat image regions finite.
_SIGMA_SCALE = 0.1
_EPS = 1e-8


def neighbour_shifts(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The 8 neighbours (dy, dx) of a pixel at each dilation, dilation by dilation: 8·len(dilations)."""
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    return [(d * dy, d * dx) for d in dilations for dy, dx in ring]


def gather_neighbours(x: Tensor, shifts: Sequence[tuple[int, int]]) -> Tensor:
    """Values at each pixel's shifted neighbours, replicate padding at the border.

    Args:
        x: (B, C, H, W).
        shifts: (dy, dx) offsets; the neighbour of (y, x) is (clamp(y+dy), clamp(x+dx)).

    Returns:
        (B, C, S, H, W) with S = len(shifts).
    """
    height, width = x.shape[-2:]
    pad = max(max(abs(dy), abs(dx)) for dy, dx in shifts)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return torch.stack(
        [padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width] for dy, dx in shifts],
        dim=2,
    )


def pamr_affinity(image: Tensor, dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """Weights α_ij of each pixel's sampled neighbours, summing to 1 over the neighbours.

    κ_ij = −|I_i − I_j| / (0.1·σ_i) per channel, averaged over channels, softmax over j. σ_i is the
    population standard deviation, per channel, of the pixel and its 8·len(dilations) neighbours.

    Args:
        image: (B, 3, H, W) float, any consistent intensity scale (κ is scale-free).

    Returns:
        (B, S, H, W) with S = 8·len(dilations).
    """
    shifts = neighbour_shifts(dilations)
    neighbours = gather_neighbours(image, shifts)
    centre = image.unsqueeze(2)
    sigma = torch.cat([centre, neighbours], dim=2).std(dim=2, keepdim=True, correction=0)
    kappa = -(centre - neighbours).abs() / (_SIGMA_SCALE * sigma + _EPS)
    return torch.softmax(kappa.mean(dim=1), dim=1)


def pamr(
    image: Tensor,
    masks: Tensor,
    dilations: Sequence[int] = PAMR_DILATIONS,
    iterations: int = PAMR_ITERATIONS,
) -> Tensor:
    """Refine masks by PAMR: `iterations` times, m_i ← Σ_j α_ij m_j over the sampled neighbours.

    Cost and memory are linear in pixels: 8·len(dilations) neighbours per pixel.

    Args:
        image: (B, 3, H_img, W_img) float. When its size differs from the masks', it is resized here
            to the masks' size (bilinear, antialiased), as the paper computes affinities at the mask
            resolution.
        masks: (B, K, H, W) float scores (CAMs, probabilities); any K.
        dilations: neighbourhood dilations, (1, 2, 4, 8, 12, 24) in the paper.
        iterations: propagation steps, 10 in the paper.

    Returns:
        (B, K, H, W) refined masks, same dtype as `masks`. Each step is a convex combination, so
        values stay within the input's range.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got shape {tuple(image.shape)}")
    if masks.ndim != 4 or masks.shape[0] != image.shape[0]:
        raise ValueError(
            f"masks must be (B, K, H, W) with the image's batch size {image.shape[0]}, "
            f"got shape {tuple(masks.shape)}"
        )
    if not dilations or iterations < 0:
        raise ValueError(f"need at least one dilation and iterations >= 0, got {dilations}, {iterations}")
    size = masks.shape[-2:]
    if image.shape[-2:] != size:
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    alpha = pamr_affinity(image.to(masks.dtype), dilations).unsqueeze(1)
    shifts = neighbour_shifts(dilations)
    for _ in range(iterations):
        masks = (gather_neighbours(masks, shifts) * alpha).sum(dim=2)
    return masks
