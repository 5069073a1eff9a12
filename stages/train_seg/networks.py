"""The segmenters train-seg can fit: DeepLab heads on a dilated torchvision ResNet.

Every model is a :class:`Segmenter`: a ResNet body (``conv1`` … ``layer4``, the keys of a torchvision
ResNet without ``fc``, so ImageNet weights load into :func:`backbone_of`) and a dense head. Its forward
returns the logits upsampled to the input size and the body's last features, on which the AE-PSL
classification branch (:class:`ClassificationBranch`) sits. Nothing here downloads weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet, resnet50, resnet101
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from stages.common.errors import ConfigError

# Channels of layer4 of ResNet-50/101 (bottleneck expansion 4 × 512).
RESNET_OUT_CHANNELS = 2048


class ResNetBody(nn.Module):
    """A torchvision ResNet without ``avgpool`` and ``fc``: ``(B, 3, H, W)`` → ``(B, 2048, h, w)``.

    The attribute names are the ResNet's own, so the state dict keys are ``conv1.*``, ``bn1.*``,
    ``layer1.*`` … ``layer4.*`` and an ImageNet checkpoint loads with its ``fc.*`` entries dropped.
    """

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class Segmenter(nn.Module):
    """A ResNet body and a dense head; the logits come back at the input's resolution.

    ``forward(images (B, 3, H, W))`` returns ``{"out": logits (B, K, H, W), "features": (B, 2048, h, w)}``
    with ``h = ceil(H / output_stride)`` and ``K`` classes including background.
    """

    def __init__(self, body: ResNetBody, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(images)
        logits = F.interpolate(
            self.head(features), size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        return {"out": logits, "features": features}


class DeepLabV2ASPP(nn.Module):
    """DeepLab-v2 ASPP (Chen et al., TPAMI 2017): parallel 3×3 convolutions to class scores, summed.

    Rates (6, 12, 18, 24) are the paper's ASPP-L, chosen for output stride 8; they are kept at stride 16
    (as the public WSSS ports do) rather than halved. Weights start as N(0, 0.01), biases 0, as in the
    paper's prototxt. ``(B, C_in, h, w)`` → ``(B, num_classes, h, w)``.
    """

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, kernel_size=3, padding=rate, dilation=rate) for rate in rates
        )
        for branch in self.branches:
            nn.init.normal_(branch.weight, mean=0.0, std=0.01)
            nn.init.zeros_(branch.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(features) for branch in self.branches]).sum(dim=0)


def largefov_head(in_channels: int, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """DeepLab-LargeFOV head (Chen et al., ICLR 2015): fc6 3×3 dilation 12 → fc7 1×1 → fc8 1×1.

    1024 channels in fc6/fc7 and dropout 0.5 after each are the paper's; fc8 starts as N(0, 0.01).
    ``(B, C_in, h, w)`` → ``(B, num_classes, h, w)``.
    """
    fc8 = nn.Conv2d(1024, num_classes, kernel_size=1)
    nn.init.normal_(fc8.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc8.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, 1024, kernel_size=3, padding=12, dilation=12),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Conv2d(1024, 1024, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        fc8,
    )


def _deeplabv3_head(num_classes: int, output_stride: int) -> nn.Module:
    # Chen et al. 2017 ("Rethinking atrous convolution"): ASPP rates (6, 12, 18) at stride 16,
    # doubled at stride 8 so the field of view in pixels stays the same.
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    return DeepLabHead(RESNET_OUT_CHANNELS, num_classes, atrous_rates=rates)


def _deeplabv2_head(num_classes: int, output_stride: int) -> nn.Module:
    return DeepLabV2ASPP(RESNET_OUT_CHANNELS, num_classes)


def _largefov_head(num_classes: int, output_stride: int) -> nn.Module:
    return largefov_head(RESNET_OUT_CHANNELS, num_classes)


_RESNETS: dict[str, Callable[..., ResNet]] = {"resnet50": resnet50, "resnet101": resnet101}
_HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "deeplabv3": _deeplabv3_head,
    "deeplabv2": _deeplabv2_head,
    "largefov": _largefov_head,
}
ARCHS: tuple[str, ...] = (
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv2_resnet50",
    "deeplabv2_resnet101",
    "largefov_resnet50",
)
OUTPUT_STRIDES: tuple[int, ...] = (8, 16)


def build_segmenter(arch: str, num_classes: int, output_stride: int = 16) -> Segmenter:
    """A randomly initialised segmenter; load ImageNet weights into :func:`backbone_of` afterwards.

    ``num_classes`` counts background (21 for VOC). Output stride 16 is the default of METHODS §5;
    stride 8 dilates layer3 as well (DeepLab's original setting, 4× the memory of layer3/4).
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown segmenter architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"output stride {output_stride} is not supported; use 8 or 16")
    if num_classes < 2:
        raise ConfigError(f"a segmenter needs background and at least one class, got {num_classes}")
    head_name, resnet_name = arch.split("_")
    # Dilating instead of striding keeps the resolution: layer4 always, layer3 too at stride 8.
    resnet = _RESNETS[resnet_name](
        weights=None, replace_stride_with_dilation=[False, output_stride == 8, True]
    )
    return Segmenter(ResNetBody(resnet), _HEADS[head_name](num_classes, output_stride))


def backbone_of(model: nn.Module) -> ResNetBody:
    """The ResNet body of a :func:`build_segmenter` model, keyed like a torchvision ResNet minus ``fc``."""
    if not isinstance(model, Segmenter):
        raise TypeError(f"expected a model from build_segmenter, got {type(model).__name__}")
    return model.body


def param_groups(
    model: nn.Module, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 5e-4
) -> list[dict]:
    """SGD parameter groups: the backbone at ``lr``, everything else at ``lr × head_lr_mult``.

    ×10 on the head and weight decay 5e-4 are DeepLab-v2's (Chen et al., TPAMI 2017); DeepLab-v3 trains
    all layers at one rate, so pass ``head_lr_mult=1.0`` there. Modules attached to the model beyond its
    body (e.g. a :class:`ClassificationBranch` added with ``add_module``) count as head. Frozen
    parameters are left out. Each group carries a ``"name"`` (``"backbone"`` or ``"head"``).
    """
    body_ids = {id(p) for p in backbone_of(model).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {
            "name": "backbone",
            "params": [p for p in trainable if id(p) in body_ids],
            "lr": lr,
            "weight_decay": weight_decay,
        },
        {
            "name": "head",
            "params": [p for p in trainable if id(p) not in body_ids],
            "lr": lr * head_lr_mult,
            "weight_decay": weight_decay,
        },
    ]


class ClassificationBranch(nn.Module):
    """AE-PSL's image-level classifier on the segmenter's features (Wei et al., CVPR 2017).

    Global average pooling then a linear layer: ``(B, in_channels, h, w)`` → logits ``(B, num_classes)``,
    ``num_classes`` without background; apply a sigmoid for the scores v of ``losses.psl_online_label``.
    """

    def __init__(self, in_channels: int = RESNET_OUT_CHANNELS, num_classes: int = 20) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean(dim=(2, 3)))
