"""Class activation maps at inference: multi-scale + flip CAM, Grad-CAM, and image normalisation.

CAM: Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016; the multi-scale
recipe (scales 1.0, 0.5, 1.5, 2.0, each with its flip, summed at stride 4, each class divided by its
max) is IRN's (Ahn et al., CVPR 2019, `step/make_cam.py`). Grad-CAM: Selvaraju et al., ICCV 2017.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stages.common.networks import CamNet

# ImageNet statistics, the ones torchvision's pretrained ResNets were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CAM_SCALES = (1.0, 0.5, 1.5, 2.0)  # IRN's make_cam scales
CAM_STRIDE = 4  # IRN stores CAMs at a quarter of the image size
_EPS = 1e-5  # IRN's max-normalisation epsilon: an all-zero map stays zero instead of dividing by 0


def normalise_image(image: np.ndarray) -> Tensor:
    """uint8 RGB (H, W, 3) → float32 (3, H, W) standardised with the ImageNet mean and std."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {image.dtype} {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalise_image(image: Tensor) -> np.ndarray:
    """Inverse of `normalise_image`, for display: (3, H, W) float → uint8 (H, W, 3), clipped."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
    x = image.detach().float().cpu()
    x = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    x = (x * 255.0).round().clamp_(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def cam_grid(height: int, width: int, stride: int = CAM_STRIDE) -> tuple[int, int]:
    """Size of a map stored at `stride`: the image size divided by the stride, rounded up."""
    return math.ceil(height / stride), math.ceil(width / stride)


def multiscale_cam(
    model: CamNet,
    image: Tensor,
    class_indices: Sequence[int],
    scales: Sequence[float] = CAM_SCALES,
    flip: bool = True,
    stride: int = CAM_STRIDE,
    amp: bool = False,
) -> Tensor:
    """Multi-scale, flip-augmented CAM of one image: (K, ceil(H/stride), ceil(W/stride)) float32.

    `image` (3, H, W) is normalised (see `normalise_image`); `class_indices` are the K classifier
    channels (0-based, foreground only) to keep, usually the image's labels. Per scale the image and
    its mirror run as one batch; ReLU class maps are resized bilinearly to the output grid, the mirror
    flipped back, all summed; each channel is then divided by its max + 1e-5, so values lie in [0, 1).
    The model must be in eval mode; the result lives on the model's device.
    """
    return batched_multiscale_cam(model, [image], [list(class_indices)], scales, flip, stride, amp)[0]


def batched_multiscale_cam(
    model: CamNet,
    images: Sequence[Tensor],
    class_indices: Sequence[Sequence[int]],
    scales: Sequence[float] = CAM_SCALES,
    flip: bool = True,
    stride: int = CAM_STRIDE,
    amp: bool = False,
) -> list[Tensor]:
    """`multiscale_cam` for several images at once; returns one (K_i, h_i, w_i) map per image.

    Images of the same size share forward passes; images of different sizes are run in separate
    groups rather than padded, because zero padding changes the maps near the border and the result
    must not depend on which images happen to share a batch.
    """
    _check_inputs(model, images, class_indices, scales, stride)
    device = next(model.parameters()).device
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault((image.shape[1], image.shape[2]), []).append(index)
    results: list[Tensor] = [torch.empty(0)] * len(images)
    with torch.no_grad():
        for (height, width), members in groups.items():
            batch = torch.stack([images[i] for i in members]).to(device=device, dtype=torch.float32)
            # Only the channels some member of the group asked for are resized and summed.
            wanted = sorted({c for i in members for c in class_indices[i]})
            summed = _summed_cams(model, batch, wanted, scales, flip, cam_grid(height, width, stride), amp)
            for row, i in enumerate(members):
                channels = [wanted.index(c) for c in class_indices[i]]
                results[i] = _max_normalise(summed[row, channels])
    return results


def _check_inputs(
    model: CamNet,
    images: Sequence[Tensor],
    class_indices: Sequence[Sequence[int]],
    scales: Sequence[float],
    stride: int,
) -> None:
    if model.training:
        raise ValueError("CAM inference needs the model in eval mode: call model.eval() first")
    if len(images) != len(class_indices):
        raise ValueError(f"got {len(images)} images but {len(class_indices)} lists of class indices")
    if not scales or any(s <= 0 for s in scales) or stride < 1:
        raise ValueError(f"scales must be positive and non-empty and stride ≥ 1, got {scales}, {stride}")
    for image, classes in zip(images, class_indices, strict=True):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a normalised (3, H, W) image, got shape {tuple(image.shape)}")
        bad = [c for c in classes if not 0 <= c < model.num_classes]
        if bad:
            raise ValueError(f"class indices {bad} outside the classifier's 0..{model.num_classes - 1}")


def _summed_cams(
    model: CamNet,
    batch: Tensor,
    channels: list[int],
    scales: Sequence[float],
    flip: bool,
    grid: tuple[int, int],
    amp: bool,
) -> Tensor:
    """Σ over scales (and flips) of ReLU class maps resized to `grid`: (N, len(channels), *grid)."""
    n, _, height, width = batch.shape
    total = batch.new_zeros((n, len(channels), *grid))
    if not channels:
        return total
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = batch if size == (height, width) else _resize(batch, size)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        with torch.autocast(device_type=x.device.type, enabled=amp):
            maps = model.cam(x)[:, channels]
        maps = _resize(maps.float(), grid)
        total += maps[:n]
        if flip:
            total += maps[n:].flip(-1)
    return total


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _max_normalise(maps: Tensor) -> Tensor:
    """Divide each channel of (K, h, w) by its max + 1e-5 (IRN)."""
    peak = maps.flatten(1).amax(dim=1) if maps.numel() else maps.new_zeros(maps.shape[0])
    return maps / (peak.view(-1, 1, 1) + _EPS)


def grad_cam(
    model: CamNet,
    image: Tensor,
    class_indices: Sequence[int],
    layer: str = "layer4",
    stride: int = CAM_STRIDE,
) -> Tensor:
    """Grad-CAM of one image at a backbone layer: (K, ceil(H/stride), ceil(W/stride)) float32.

    For class c: w_k = spatial mean of d logit_c / d F_k, with F the output of `layer` (a submodule
    name of `model.backbone`, e.g. "layer3" or "layer4.1"); map = ReLU(Σ_k w_k F_k), resized
    bilinearly to the stride grid and divided by its max + 1e-5. At layer4 of a CamNet this equals
    the single-scale CAM (the GAP head makes each w_k proportional to the head weight).
    """
    _check_inputs(model, [image], [class_indices], [1.0], stride)
    try:
        target = model.backbone.get_submodule(layer)
    except AttributeError as error:
        raise ValueError(
            f"no layer {layer!r} in the backbone; try layer1, layer2, layer3 or layer4"
        ) from error
    device = next(model.parameters()).device
    captured: list[Tensor] = []
    hook = target.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.enable_grad():
            # The input requires grad so the graph exists even when every parameter is frozen.
            x = image.to(device=device, dtype=torch.float32).unsqueeze(0).requires_grad_(True)
            logits = model(x)[0]
            features = captured[-1]
            maps = []
            for c in class_indices:
                (grad,) = torch.autograd.grad(logits[c], features, retain_graph=True)
                weights = grad[0].mean(dim=(1, 2))
                maps.append(F.relu(torch.einsum("k,khw->hw", weights, features[0].detach())))
    finally:
        hook.remove()
    grid = cam_grid(image.shape[1], image.shape[2], stride)
    if not maps:
        return torch.zeros((0, *grid), device=device)
    return _max_normalise(_resize(torch.stack(maps).unsqueeze(0), grid)[0])
