"""The classifier every CAM method starts from: a torchvision ResNet body and a 1×1 class head.

The network follows IRN (Ahn et al., CVPR 2019, `net/resnet50_cam.py`): ResNet at output stride 16,
BatchNorm frozen, a bias-free 1×1 convolution as the classifier, logits = global average pool of the
class maps, so the class activation map (Zhou et al., CVPR 2016) is the head applied densely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.ops import FrozenBatchNorm2d

from stages.common.errors import ConfigError

# resnet10 (one BasicBlock per stage, torchvision's ResNet class) is the small-image recipe's network:
# toy-sized data trains from scratch on a CPU in seconds with it; ImageNet weights exist only for the rest.
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
OUTPUT_STRIDES = (8, 16, 32)

# Keys that only torchvision's segmentation models have: their weights were trained on pixel masks.
_SEGMENTATION_PREFIXES = ("backbone.", "classifier.", "aux_classifier.")


def build_resnet(arch: str = "resnet50", output_stride: int = 16) -> ResNet:
    """A randomly initialised torchvision ResNet whose last stages trade stride for dilation.

    Output stride 16 (IRN's default) makes layer4 stride 1 with dilation 2; 8 does the same to layer3
    (dilation 2) and layer4 (dilation 4); 32 is the plain ImageNet network. Weights are never
    downloaded: pass a local file to `load_backbone_weights`. `fc` is kept (torchvision state-dict
    compatibility) but no wsss network calls it.

    torchvision's BasicBlock (resnet18/34) refuses dilation, so for those the same change is made by
    hand after construction: the first block of a dilated stage gets stride 1 in `conv1` (which keeps
    the previous dilation) and in its downsample; every later 3×3 convolution of the stage uses the
    stage's dilation. As for torchvision's Bottleneck stages, the dilated output sampled at every
    other pixel equals the strided network's output. Parameter shapes are unchanged, so ImageNet
    weights still load.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"output stride {output_stride} is not supported; choose one of "
            f"{', '.join(map(str, OUTPUT_STRIDES))}"
        )
    # Which of layer2, layer3, layer4 lose their stride: the last one for 16, the last two for 8.
    dilate = [False, output_stride == 8, output_stride <= 16]
    if arch == "resnet10":
        net = ResNet(BasicBlock, [1, 1, 1, 1])
        _dilate_basic_stages(net, dilate)
        return net
    builder = getattr(models, arch)
    if arch in ("resnet18", "resnet34"):
        net = builder(weights=None)
        _dilate_basic_stages(net, dilate)
        return net
    return builder(weights=None, replace_stride_with_dilation=dilate)


def _dilate_basic_stages(net: ResNet, dilate: list[bool]) -> None:
    """Give a BasicBlock ResNet the strides and dilations `replace_stride_with_dilation` would."""
    dilation = 1
    for layer, wanted in zip((net.layer2, net.layer3, net.layer4), dilate, strict=True):
        if not wanted:
            continue
        previous, dilation = dilation, dilation * 2
        for index, block in enumerate(layer):
            assert isinstance(block, BasicBlock)
            if index == 0:
                block.conv1.stride = (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
            # À trous equivalence: the convolution that had the stride keeps the previous dilation,
            # every 3×3 after it (in BasicBlock already the first block's conv2) takes the new one,
            # so the output at every other pixel equals the strided network's output.
            for position, conv in enumerate((block.conv1, block.conv2)):
                rate = previous if index == 0 and position == 0 else dilation
                # A 3×3 kernel keeps the spatial size with padding equal to its dilation.
                conv.dilation = (rate, rate)
                conv.padding = (rate, rate)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d below `module` by a FrozenBatchNorm2d holding the same statistics.

    Frozen BN normalises with the stored running mean/var and affine weight/bias, which are buffers:
    `.train()` cannot make it update statistics and optimisers never see them. This is IRN's and
    DeepLab's choice for batches of ~16 crops, too small for reliable batch statistics. Returns the
    module (a new one when `module` itself is a BatchNorm2d); children are replaced in place.
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None and module.running_var is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load a torchvision-format ImageNet ResNet state dict from a local file into `model`.

    `model` is a ResNet from `build_resnet` or any module with such a ResNet as `.backbone` (CamNet).
    `fc.*` is ignored (ImageNet's 1000 classes); every other key must match by name and shape, else a
    ConfigError names the file. Weights of torchvision segmentation models are refused: they were
    trained on pixel masks, and starting from them would leak mask supervision into a result reported
    as weakly supervised.
    """
    target = getattr(model, "backbone", model)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist; pass a torchvision ResNet .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a tensor archive
        raise ConfigError(f"cannot read weights file {path}: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} is not a state dict of tensors (torchvision format)")
    if "head.weight" in state:
        raise ConfigError(
            f"weights file {path} holds a whole wsss classifier, not ImageNet backbone weights; "
            "pass a torchvision ResNet .pth file"
        )
    if any(str(key).startswith(_SEGMENTATION_PREFIXES) for key in state):
        raise ConfigError(
            f"weights file {path} holds a segmentation model (backbone./classifier. keys): it was "
            "trained on pixel masks, which would leak mask supervision into a weakly-supervised "
            "result; use ImageNet classification weights"
        )
    # fc.* is ImageNet's classifier; FrozenBatchNorm2d has no step counter, which carries no weights.
    load_backbone_state(
        target,
        state,
        f"weights file {path}",
        "check that --arch matches the architecture the weights were trained with",
    )


def load_backbone_state(model: nn.Module, state: dict[str, Tensor], source: str, fix: str) -> None:
    """Load a ResNet state dict into `model` (or its `.backbone`), checking every key but `fc.*`.

    `fc.*` is dropped on both sides (ImageNet's classes; a segmenter's body has none). A missing,
    unexpected or reshaped key raises a ConfigError "`source` does not fit this network: ...; `fix`".
    """
    target = getattr(model, "backbone", model)
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    expected = {k: v for k, v in target.state_dict().items() if not k.startswith("fc.")}
    expected_names = {k for k in expected if not k.endswith("num_batches_tracked")}
    given_names = {k for k in state if not k.endswith("num_batches_tracked")}
    missing = sorted(expected_names - given_names)
    unexpected = sorted(given_names - expected_names)
    wrong_shape = sorted(k for k in given_names & expected_names if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [
            f"{len(names)} {what} (e.g. {names[0]})"
            for what, names in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys of another shape", wrong_shape),
            )
            if names
        ]
        raise ConfigError(f"{source} does not fit this network: {', '.join(problems)}; {fix}")
    # strict=False only because fc.* was dropped on purpose; every other key was checked above.
    target.load_state_dict(state, strict=False)


class CamNet(nn.Module):
    """ResNet body + bias-free 1×1 class head; its dense head output is the class activation map.

    Shapes: input (B, 3, H, W) normalised; features of layer4 (B, D, H/s, W/s) with s the output
    stride (layers 1..3 at strides 4, 8, 16 or less when dilated); class maps (B, C, H/s, W/s);
    logits (B, C). C counts foreground classes only (no background channel).
    """

    def __init__(
        self, num_classes: int, arch: str = "resnet50", output_stride: int = 16, frozen_bn: bool = True
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"a classifier needs at least one class, got num_classes={num_classes}")
        self.num_classes = num_classes
        self.arch = arch
        self.output_stride = output_stride
        self.frozen_bn = frozen_bn
        self.backbone = build_resnet(arch, output_stride)
        self.feature_dim: int = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()  # ImageNet's classifier has no role here; saves 2M parameters
        if frozen_bn:
            freeze_batchnorm(self.backbone)
        self.head = nn.Conv2d(self.feature_dim, num_classes, kernel_size=1, bias=False)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Outputs of layer1..layer4 for x (B, 3, H, W): four tensors (B, D_i, h_i, w_i)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        features = []
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            x = layer(x)
            features.append(x)
        return features

    def class_maps(self, features_last: Tensor) -> Tensor:
        """The head applied at every position of (B, D, h, w): raw class maps (B, C, h, w), no ReLU."""
        return self.head(features_last)

    def forward(self, x: Tensor) -> Tensor:
        """Image-level logits (B, C): the head on globally average-pooled layer4 features.

        Equal to the spatial mean of `class_maps` (the head is linear), at a fraction of the cost.
        """
        pooled = F.adaptive_avg_pool2d(self.forward_features(x)[-1], 1)
        return self.head(pooled).flatten(1)

    def cam(self, x: Tensor) -> Tensor:
        """Class activation maps ReLU(class maps) (B, C, H/s, W/s), unnormalised."""
        return F.relu(self.class_maps(self.forward_features(x)[-1]))

    def arch_spec(self) -> dict[str, Any]:
        """JSON-able keyword arguments that rebuild this network: `CamNet(**net.arch_spec())`."""
        return {
            "num_classes": self.num_classes,
            "arch": self.arch,
            "output_stride": self.output_stride,
            "frozen_bn": self.frozen_bn,
        }

    def param_groups(
        self, lr: float, head_lr_mult: float = 10.0, weight_decay: float = 1e-4
    ) -> list[dict[str, Any]]:
        """SGD parameter groups: trainable backbone parameters at `lr`, new layers at `lr * head_lr_mult`.

        IRN's recipe (lr 0.1 backbone / 1.0 head, i.e. ×10, weight decay 1e-4 on both groups).
        Frozen parameters are left out so the optimiser state stays small.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        # Everything outside the backbone is new (the head, and whatever a subclass adds).
        in_backbone = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in in_backbone]
        return [
            {"params": backbone, "lr": lr, "weight_decay": weight_decay},
            {"params": head, "lr": lr * head_lr_mult, "weight_decay": weight_decay},
        ]
