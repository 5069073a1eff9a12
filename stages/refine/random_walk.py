"""Random walk on learnt affinities: AffinityNet/PSA (Ahn & Kwak, CVPR 2018) with IRNet's defaults
(Ahn, Cho & Kwak, CVPR 2019).

Confident labels from CAMs teach an affinity head which neighbouring pixels belong together; the
affinities define a sparse transition matrix; CAMs propagated by the walk fill their objects and stop
at boundaries. Pairs are laid out as (P, h, w): entry [p, y, x] is the pair of pixel (y, x) and its
partner (y + dy_p, x + dx_p) for the p-th offset of `neighbour_offsets`; pairs whose partner falls
outside the grid are invalid (affinity 0, never a target).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.common.densecrf import CrfParams, crf_labels, label_crf

# IRN: pairs within radius 10 at stride 4 (5 at stride 8) for training, radius 5 for the walk.
TRAIN_RADIUS_STRIDE4 = 10
TRAIN_RADIUS_STRIDE8 = 5
WALK_RADIUS = 5
WALK_BETA = 10  # IRN; PSA uses 8
WALK_STEPS = 256  # IRN: 2**8, its exp_times=8
WALK_BG_SCORE = 0.25  # IRN's sem_seg_bg_thres
CONF_FG_THR = 0.30  # IRN's conf_fg_thres
CONF_BG_THR = 0.05  # IRN's conf_bg_thres
# IRN's label CRF: PSA's Gaussian kernel, a tighter bilateral kernel than PSA's map CRF.
LABEL_CRF = CrfParams(bilateral_sxy=50, bilateral_srgb=5)
LABEL_CRF_GT_PROB = 0.7

_EPS = 1e-5


def neighbour_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) of the half-plane pairs with dy² + dx² < radius² (PSA/IRN's path index).

    Half-plane (dy > 0, or dy = 0 and dx > 0): each unordered pair appears once. radius 5 gives 34
    offsets, radius 10 gives 152.
    """
    if radius < 2:
        raise ValueError(f"radius must be at least 2 to have any pair, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [
        (dy, dx)
        for dy in range(1, radius)
        for dx in range(-radius + 1, radius)
        if dy * dy + dx * dx < radius**2
    ]
    return offsets


def _partner(x: Tensor, dy: int, dx: int, fill: float | int) -> Tensor:
    """x at (y + dy, x + dx) for every (y, x) of x's last two dims, `fill` outside the grid (dy ≥ 0)."""
    height, width = x.shape[-2:]
    out = torch.full_like(x, fill)
    if dy >= height or abs(dx) >= width:
        return out
    left, right = max(0, -dx), width - max(0, dx)
    out[..., : height - dy, left:right] = x[..., dy:, left + dx : right + dx]
    return out


def _valid_pairs(height: int, width: int, offsets: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """(P, h, w) bool: the partner of (y, x) lies inside the grid."""
    inside = torch.ones(height, width, dtype=torch.bool, device=device)
    return torch.stack([_partner(inside, dy, dx, False) for dy, dx in offsets])


class AffinityTargets(NamedTuple):
    """Per-pair training targets, each (..., P, h, w) bool, PSA's split of the positives."""

    bg_pos: Tensor  # both pixels background
    fg_pos: Tensor  # both pixels of one foreground class
    neg: Tensor  # different labels, neither 255


def affinity_targets(labels: Tensor, radius: int) -> AffinityTargets:
    """Affinity targets from confident labels at the affinity grid's stride.

    Args:
        labels: (h, w) or (B, h, w) integer labels; 0 background, 255 unsure (ignored).
        radius: pairs with dy² + dx² < radius² (10 at stride 4, 5 at stride 8; IRN).

    Returns:
        `AffinityTargets`, each (P, h, w) or (B, P, h, w); a pair with an unsure pixel or a partner
        outside the grid is in none of the three.
    """
    if labels.ndim not in (2, 3) or labels.dtype.is_floating_point:
        raise ValueError(
            f"labels must be integer (h, w) or (B, h, w), got {labels.dtype} {tuple(labels.shape)}"
        )
    labels = labels.long()
    offsets = neighbour_offsets(radius)
    here = labels.unsqueeze(-3)
    there = torch.stack([_partner(labels, dy, dx, 255) for dy, dx in offsets], dim=-3)
    known = (here != 255) & (there != 255)
    same = known & (here == there)
    return AffinityTargets(bg_pos=same & (here == 0), fg_pos=same & (here != 0), neg=known & (here != there))


def affinity_loss(aff: Tensor, targets: AffinityTargets) -> Tensor:
    """PSA's affinity loss: bg-bg/4 + fg-fg/4 + negatives/2, each a mean over its own pairs.

    Positives pull affinity to 1 (−log a), negatives push it to 0 (−log(1 − a)). A group without
    pairs contributes 0.

    Args:
        aff: (..., P, h, w) affinities in [0, 1] from `pair_affinity`.
        targets: from `affinity_targets`, same shape as `aff`.

    Returns:
        Scalar loss.
    """
    for mask in targets:
        if mask.shape != aff.shape:
            raise ValueError(f"targets must match aff's shape {tuple(aff.shape)}, got {tuple(mask.shape)}")

    def masked_mean(loss: Tensor, mask: Tensor) -> Tensor:
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    bg = masked_mean(-torch.log(aff + _EPS), targets.bg_pos)
    fg = masked_mean(-torch.log(aff + _EPS), targets.fg_pos)
    neg = masked_mean(-torch.log(1.0 + _EPS - aff), targets.neg)
    return bg / 4 + fg / 4 + neg / 2


class AffinityHead(nn.Module):
    """Affinity embedding on a frozen classifier's ResNet stages (AffinityNet, Ahn & Kwak 2018).

    Each stage is projected by a 1×1 conv + GroupNorm + ReLU, resized to one grid, concatenated and
    mapped by a 1×1 conv to `embed_dim` (448, PSA). The grid is layer1's (stride 4) or layer2's
    (stride 8). The backbone is not trained here: run it under `torch.no_grad()`.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        embed_dim: int = 448,
        stride: int = 4,
        widths: Sequence[int] = (32, 64, 128, 256),
    ) -> None:
        super().__init__()
        if len(in_channels) != 4 or len(widths) != 4:
            raise ValueError(f"AffinityHead takes the 4 ResNet stages, got channels {list(in_channels)}")
        if stride not in (4, 8):
            raise ValueError(f"stride must be 4 (layer1's grid) or 8 (layer2's grid), got {stride}")
        self.stride = stride
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, w, 1, bias=False), nn.GroupNorm(4, w), nn.ReLU(inplace=True))
            for c, w in zip(in_channels, widths, strict=True)
        )
        self.embed = nn.Conv2d(sum(widths), embed_dim, 1, bias=False)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """(B, c_i, h_i, w_i) for layer1..layer4 -> (B, embed_dim, h, w) at the head's stride."""
        if len(features) != len(self.projections):
            raise ValueError(f"AffinityHead takes {len(self.projections)} stages, got {len(features)}")
        size = features[0 if self.stride == 4 else 1].shape[-2:]
        projected = []
        for project, stage in zip(self.projections, features, strict=True):
            x = project(stage)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        return self.embed(torch.cat(projected, dim=1))


def pair_affinity(embedding: Tensor, radius: int) -> Tensor:
    """a_ij = exp(−mean_d |e_i − e_j|) for every pair within `radius` (PSA).

    Args:
        embedding: (B, D, h, w) from `AffinityHead`.

    Returns:
        (B, P, h, w) in (0, 1], P = len(neighbour_offsets(radius)); 0 where the partner is outside.
    """
    if embedding.ndim != 4:
        raise ValueError(f"embedding must be (B, D, h, w), got shape {tuple(embedding.shape)}")
    offsets = neighbour_offsets(radius)
    distances = torch.stack(
        [(embedding - _partner(embedding, dy, dx, 0.0)).abs().mean(dim=1) for dy, dx in offsets], dim=1
    )
    valid = _valid_pairs(*embedding.shape[-2:], offsets, embedding.device)
    return torch.exp(-distances) * valid


def transition_matrix(
    aff_pairs: Tensor, offsets: Sequence[tuple[int, int]], beta: float = WALK_BETA
) -> Tensor:
    """Sparse row-stochastic T = D⁻¹A^β of the walk (IRN: β = 10, radius 5; PSA: β = 8).

    A holds each valid pair in both directions and a self-loop of 1 for every pixel, so it is
    symmetric; D is its row sums. Never dense: N·(2P + 1) stored entries for N = hw pixels.

    Args:
        aff_pairs: (P, h, w) affinities in [0, 1], one image, laid out as `neighbour_offsets`.
        offsets: the P offsets of `aff_pairs`.

    Returns:
        (N, N) coalesced sparse COO tensor, rows and columns in row-major pixel order.
    """
    if aff_pairs.ndim != 3 or aff_pairs.shape[0] != len(offsets):
        raise ValueError(
            f"aff_pairs must be (P, h, w) with P = {len(offsets)} offsets, got shape {tuple(aff_pairs.shape)}"
        )
    _, height, width = aff_pairs.shape
    n_pixels = height * width
    index = torch.arange(n_pixels, device=aff_pairs.device).reshape(height, width)
    valid = _valid_pairs(height, width, offsets, aff_pairs.device)
    sources = index.expand(len(offsets), height, width)[valid]
    targets = torch.stack([_partner(index, dy, dx, -1) for dy, dx in offsets])[valid]
    values = aff_pairs[valid].clamp(min=0.0) ** beta

    self_loops = torch.arange(n_pixels, device=aff_pairs.device)
    rows = torch.cat([sources, targets, self_loops])
    cols = torch.cat([targets, sources, self_loops])
    values = torch.cat([values, values, torch.ones(n_pixels, dtype=values.dtype, device=values.device)])
    degree = torch.zeros(n_pixels, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    matrix = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values / degree[rows], (n_pixels, n_pixels), check_invariants=True
    )
    return matrix.coalesce()


def seeds_with_background(cams: Tensor, bg_score: float = WALK_BG_SCORE) -> Tensor:
    """(K, h, w) CAMs -> (K+1, h, w) walk seeds with a constant background channel first (IRN: 0.25).

    A row-stochastic walk leaves a constant unchanged, so walking this channel equals IRN's
    "background 0.25 after the walk".
    """
    background = torch.full_like(cams[:1], bg_score)
    return torch.cat([background, cams])


def random_walk(transition: Tensor, seeds: Tensor, steps: int = WALK_STEPS) -> Tensor:
    """Propagate seeds by `steps` sparse products X ← T X (IRN: 256 steps).

    After the walk the class channels (1..K) are divided by their common maximum over classes and
    pixels, as IRN does (one global max, not one per class, so a weak class stays weaker than a
    strong one against the background score); the background channel 0 is returned as walked.

    Args:
        transition: (N, N) sparse row-stochastic matrix from `transition_matrix` (COO is converted to
            CSR here; CSR is used as is).
        seeds: (K+1, h, w) with hw = N, background channel first (see `seeds_with_background`).

    Returns:
        (K+1, h, w) walked scores; argmax over channels gives the labels.
    """
    if seeds.ndim != 3:
        raise ValueError(f"seeds must be (K+1, h, w), got shape {tuple(seeds.shape)}")
    n_channels, height, width = seeds.shape
    if transition.shape != (height * width, height * width):
        raise ValueError(
            f"transition is {tuple(transition.shape)} but the seeds have "
            f"{height}x{width} = {height * width} pixels"
        )
    if transition.layout == torch.sparse_coo:
        # CSR products are ~10x faster than COO on CPU (VOC size at stride 4: 0.6 s against 7 s).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            transition = transition.to_sparse_csr()
    walked = seeds.reshape(n_channels, -1).T.contiguous().to(transition.dtype)
    for _ in range(steps):
        walked = transition @ walked
    walked = walked.T.reshape(n_channels, height, width)
    classes = walked[1:] / (walked[1:].max() + _EPS) if n_channels > 1 else walked[1:]
    return torch.cat([walked[:1], classes])


def confident_labels(
    cams: np.ndarray,
    classes: Sequence[int],
    image: np.ndarray,
    fg_thr: float = CONF_FG_THR,
    bg_thr: float = CONF_BG_THR,
    crf_params: CrfParams = LABEL_CRF,
    gt_prob: float = LABEL_CRF_GT_PROB,
) -> np.ndarray:
    """Confident labels from CAMs for affinity training, PSA/IRN's two-threshold scheme.

    Foreground map: the argmax class where its CAM ≥ `fg_thr`, background elsewhere; background map:
    background where every CAM ≤ `bg_thr`, the argmax class elsewhere. Each is smoothed by a label
    CRF. A pixel is its class where the foreground map says a class, background where both maps say
    background, and 255 where they disagree (the foreground map says background, the other a class).

    Args:
        cams: (K, h, w) class CAMs in [0, 1], one per labelled class of the image.
        classes: the K class ids (1..254) of the CAM channels; background is 0.
        image: (h, w, 3) uint8 RGB at the CAMs' size.

    Returns:
        (h, w) uint8 labels: 0 background, class ids, 255 unsure.
    """
    if cams.ndim != 3 or cams.shape[0] != len(classes):
        raise ValueError(f"cams must be (K, h, w) with K = {len(classes)} classes, got shape {cams.shape}")
    if any(not 1 <= c <= 254 for c in classes):
        raise ValueError(f"class ids must be in 1..254 (0 is background, 255 unsure), got {list(classes)}")
    if not classes:
        return np.zeros(cams.shape[1:], dtype=np.uint8)
    keys = np.array([0, *classes], dtype=np.uint8)
    strongest = cams.max(axis=0)
    winner = cams.argmax(axis=0) + 1
    fg_draft = np.where(strongest >= fg_thr, winner, 0)
    bg_draft = np.where(strongest <= bg_thr, 0, winner)
    n_labels = len(keys)
    fg = crf_labels(label_crf(image, fg_draft, n_labels, gt_prob, crf_params))
    bg = crf_labels(label_crf(image, bg_draft, n_labels, gt_prob, crf_params))
    labels = keys[fg]
    labels[(fg == 0) & (bg != 0)] = 255
    return labels
