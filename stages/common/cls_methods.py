"""Classifier training methods beyond plain CAM: Puzzle-CAM's loss and the complementary-regions network.

- Puzzle-CAM (Jo & Yu, ICIP 2021): the CAM of a whole image should equal the stitched CAMs of its 2×2
  tiles; the loss adds the tiles' classification and an L1 reconstruction term.
- "Where to Look?: Mining Complementary Image Regions for Weakly Supervised Object Localization"
  (Babar & Das, WACV 2021): two complementary views of each image (regional dropout and its inverse) run
  through one backbone into two heads, with a channel-wise assisted attention module between the two
  branches, a spatial self-attention module, and a fusion loss tying the two branches' attention maps.
  Made multi-label here: one map per labelled class, multilabel soft-margin classification.
Hide-and-Seek lives in the data pipeline (`classifier_data.TrainAugment`), since it edits input pixels.

`ClassifierObjective` wraps a network and its method's loss in one module, so DistributedDataParallel can
wrap the whole computation (tiles and both views included) and synchronise every gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages.common.augment import puzzle_stitch, puzzle_tiles
from stages.common.errors import ConfigError
from stages.common.networks import CamNet

METHODS = ("plain", "puzzle", "complementary")
PUZZLE_ALPHA = 4.0  # Puzzle-CAM's final reconstruction weight
ATTENTION_REDUCTION = 8  # query/key channels = D / 8, as in DANet's position attention


def puzzle_alpha(step: int, total_steps: int, alpha_max: float = PUZZLE_ALPHA) -> float:
    """Reconstruction weight at ``step``: 0 -> ``alpha_max`` over the first half, then flat (Puzzle-CAM)."""
    half = max(total_steps, 1) / 2.0
    return alpha_max * min(1.0, step / half)


def labelled_l1(a: Tensor, b: Tensor, targets: Tensor) -> Tensor:
    """Mean |a - b| over the labelled classes' maps only: a, b (B, C, h, w), targets (B, C) of 0/1.

    An image's other channels carry no localisation claim, so they are left out of the mean.
    """
    weight = targets[:, :, None, None].to(a.dtype)
    count = weight.sum() * a.shape[2] * a.shape[3]
    return (weight * (a - b).abs()).sum() / count.clamp_min(1.0)


def puzzle_loss(net: CamNet, x: Tensor, targets: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Puzzle-CAM objective on a batch x (B, 3, H, W) with multi-hot targets (B, C).

    loss = MLSM(GAP full maps) + MLSM(GAP stitched tile maps) + alpha * L1(ReLU full, ReLU stitched) on
    the image's classes. When H/2 is not a multiple of the output stride the stitched maps are resized
    to the full maps' grid. Returns (loss, full-image logits (B, C)).
    """
    full = net.class_maps(net.forward_features(x)[-1])
    stitched = puzzle_stitch(net.class_maps(net.forward_features(puzzle_tiles(x))[-1]))
    if stitched.shape[-2:] != full.shape[-2:]:
        stitched = F.interpolate(stitched, size=full.shape[-2:], mode="bilinear", align_corners=False)
    logits, tile_logits = full.mean(dim=(2, 3)), stitched.mean(dim=(2, 3))
    loss = F.multilabel_soft_margin_loss(logits, targets) + F.multilabel_soft_margin_loss(
        tile_logits, targets
    )
    loss = loss + alpha * labelled_l1(F.relu(full), F.relu(stitched), targets)
    return loss, logits


# ---------------------------------------------------------------------------------------------------------
# Complementary image regions (WACV 2021)


class ChannelAssistedAttention(nn.Module):
    """Channel-wise assisted attention between two branches' features fa, fb (B, D, h, w).

    Channel affinity S = fa · fbᵀ over positions (B, D, D), scaled by 1/sqrt(h·w); each branch's channels
    attend to the other's: fa' = fa + γ_a·softmax(S)·fb, fb' = fb + γ_b·softmax(Sᵀ)·fa. γ start at 0
    (DANet's choice), so training starts from the plain network and learns how much to borrow.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma_a = nn.Parameter(torch.zeros(1))
        self.gamma_b = nn.Parameter(torch.zeros(1))

    def forward(self, fa: Tensor, fb: Tensor) -> tuple[Tensor, Tensor]:
        if fa.shape != fb.shape:
            raise ValueError(f"branch features differ in shape: {tuple(fa.shape)} vs {tuple(fb.shape)}")
        b, d, h, w = fa.shape
        a_flat, b_flat = fa.reshape(b, d, h * w), fb.reshape(b, d, h * w)
        affinity = torch.bmm(a_flat, b_flat.transpose(1, 2)) / math.sqrt(h * w)
        from_b = torch.bmm(affinity.softmax(dim=-1), b_flat).view(b, d, h, w)
        from_a = torch.bmm(affinity.transpose(1, 2).softmax(dim=-1), a_flat).view(b, d, h, w)
        return fa + self.gamma_a * from_b, fb + self.gamma_b * from_a


class SpatialSelfAttention(nn.Module):
    """Position self-attention on (B, D, h, w): every position gathers values from all positions weighted
    by softmax(qᵀk / sqrt(d')), q and k 1×1 projections to d' = D/8; output f + γ·attended, γ from 0."""

    def __init__(self, channels: int, reduction: int = ATTENTION_REDUCTION) -> None:
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, f: Tensor) -> Tensor:
        b, d, h, w = f.shape
        q = self.query(f).flatten(2)  # (B, d', N)
        k = self.key(f).flatten(2)
        v = self.value(f).flatten(2)  # (B, D, N)
        attention = (torch.bmm(q.transpose(1, 2), k) / math.sqrt(q.shape[1])).softmax(dim=-1)  # (B, N, N)
        attended = torch.bmm(v, attention.transpose(1, 2)).view(b, d, h, w)
        return f + self.gamma * attended


def normalised_attention(maps: Tensor) -> Tensor:
    """ReLU class maps (B, C, h, w) each divided by its spatial max (+1e-5): attention maps in [0, 1)."""
    maps = F.relu(maps)
    return maps / (maps.flatten(2).amax(dim=2)[:, :, None, None] + 1e-5)


class ComplementaryNet(CamNet):
    """Two parallel class heads on one ResNet backbone, linked by channel-wise assisted attention and a
    shared spatial self-attention (WACV 2021, made multi-label).

    Training sees two complementary views (`complementary_loss`). At inference both branches see the
    same image: `class_maps` is the mean of the two heads' maps, so `cam`, `forward` (GAP of the fused
    maps) and Grad-CAM work as for `CamNet`. Shapes as `CamNet`.
    """

    def __init__(
        self, num_classes: int, arch: str = "resnet50", output_stride: int = 16, frozen_bn: bool = True
    ) -> None:
        super().__init__(num_classes, arch, output_stride, frozen_bn)
        self.head_b = nn.Conv2d(self.feature_dim, num_classes, kernel_size=1, bias=False)
        self.assisted = ChannelAssistedAttention()
        self.spatial = SpatialSelfAttention(self.feature_dim)

    def branch_maps(self, fa: Tensor, fb: Tensor) -> tuple[Tensor, Tensor]:
        """Class maps (B, C, h, w) of branch a and branch b from their layer4 features."""
        fa, fb = self.assisted(fa, fb)
        return self.head(self.spatial(fa)), self.head_b(self.spatial(fb))

    def class_maps(self, features_last: Tensor) -> Tensor:
        """Fused raw class maps (B, C, h, w): the mean of both heads with both branches on one image."""
        maps_a, maps_b = self.branch_maps(features_last, features_last)
        return (maps_a + maps_b) / 2

    def forward(self, x: Tensor) -> Tensor:
        """Image logits (B, C): GAP of the fused class maps; no pooling shortcut (attention is non-linear)."""
        return self.class_maps(self.forward_features(x)[-1]).mean(dim=(2, 3))

    def arch_spec(self) -> dict[str, Any]:
        return {"type": "complementary", **super().arch_spec()}

    def param_groups(
        self, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 1e-4
    ) -> list[dict[str, Any]]:
        """Backbone at ``lr``; both heads and the attention modules (new layers) at ``lr * head_lr_mult``."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        new = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        return [
            {"params": backbone, "lr": lr, "weight_decay": weight_decay},
            {"params": new, "lr": lr * head_lr_mult, "weight_decay": weight_decay},
        ]


def complementary_loss(
    net: ComplementaryNet, x: Tensor, targets: Tensor, masks: Tensor, fusion_weight: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Objective of the complementary-regions network on x (B, 3, H, W), targets (B, C), masks (B, 1, H, W).

    View a = x·M and view b = x·(1 − M) (hidden pixels become 0, the normalised mean) run as one backbone
    batch; each branch is classified (MLSM); the fusion loss is the labelled-class L1 between the two
    branches' normalised attention maps, so each branch must also find the parts only the other saw.
    Returns (loss, logits (B, C) = mean of the branches' logits).
    """
    views = torch.cat([x * masks, x * (1.0 - masks)])
    fa, fb = net.forward_features(views)[-1].chunk(2)
    maps_a, maps_b = net.branch_maps(fa, fb)
    logits_a, logits_b = maps_a.mean(dim=(2, 3)), maps_b.mean(dim=(2, 3))
    fusion = labelled_l1(normalised_attention(maps_a), normalised_attention(maps_b), targets)
    loss = (
        F.multilabel_soft_margin_loss(logits_a, targets)
        + F.multilabel_soft_margin_loss(logits_b, targets)
        + fusion_weight * fusion
    )
    return loss, (logits_a + logits_b) / 2


class ClassifierObjective(nn.Module):
    """The network plus its training method's loss, as one module for DDP: ``forward`` -> (loss, logits).

    ``alpha`` is Puzzle-CAM's current reconstruction weight; ``masks`` the complementary views' masks.
    """

    def __init__(self, net: CamNet, method: str = "plain", fusion_weight: float = 1.0) -> None:
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"unknown classifier method {method!r}; one of {', '.join(METHODS)}")
        if method == "complementary" and not isinstance(net, ComplementaryNet):
            raise ConfigError(
                "the complementary method needs a ComplementaryNet (build it with type 'complementary')"
            )
        self.net = net
        self.method = method
        self.fusion_weight = fusion_weight

    def forward(
        self, x: Tensor, targets: Tensor, alpha: float = 0.0, masks: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self.method == "puzzle":
            return puzzle_loss(self.net, x, targets, alpha)
        if self.method == "complementary":
            if masks is None:
                raise ValueError("the complementary method needs the views' masks")
            assert isinstance(self.net, ComplementaryNet)
            return complementary_loss(self.net, x, targets, masks, self.fusion_weight)
        logits = self.net(x)
        return F.multilabel_soft_margin_loss(logits, targets), logits


def build_classifier(arch_spec: dict[str, Any]) -> CamNet:
    """Rebuild a classifier from its stored ``arch`` (``net.arch_spec()``): CamNet or ComplementaryNet."""
    spec = dict(arch_spec)
    kind = spec.pop("type", "camnet")
    try:
        if kind == "complementary":
            return ComplementaryNet(**spec)
        if kind == "camnet":
            return CamNet(**spec)
    except TypeError as exc:
        raise ConfigError(
            f"classifier arch {arch_spec} cannot be rebuilt ({exc}); retrain it with --force"
        ) from exc
    raise ConfigError(f"unknown classifier type {kind!r} in arch {arch_spec}; retrain it with this wsss")
