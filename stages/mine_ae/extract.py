"""Streaming CAM extraction of one classifier over a list of images, with an optional erase hook.

One image at a time (its scales and flips batched together), so memory stays flat whatever the number
of images; each image's maps go straight into an `ArtifactWriter` (skipping images a resumed writer
already holds) or, without a writer, are returned in a dict (tests, small lists).

CAM: Zhou et al. CVPR 2016 with IRN's multi-scale + flip recipe (`stages.common.cam.multiscale_cam`);
Grad-CAM: Selvaraju et al. ICCV 2017 (`stages.common.cam.grad_cam`, one scale, no flip).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.common.artifacts import ArtifactWriter
from stages.common.cam import CAM_SCALES, CAM_STRIDE, grad_cam, multiscale_cam, normalise_image
from stages.common.errors import ConfigError
from stages.common.progress import track

CAM_METHODS = ("cam", "gradcam")

# (image_id, uint8 (H, W, 3)) -> uint8 (H, W, 3): what the classifier sees instead of the stored image.
EraseFn = Callable[[str, np.ndarray], np.ndarray]
# (image_id, uint8 (H, W, 3) as seen, cams float32 (K, h, w), logits float32 (C,)) -> extra datasets
ExtrasFn = Callable[[str, np.ndarray, np.ndarray, np.ndarray], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class CamRecipe:
    """How CAMs are computed; IRN's defaults (scales 1.0, 0.5, 1.5, 2.0 with flips, stride 4)."""

    method: str = "cam"
    scales: tuple[float, ...] = CAM_SCALES
    flip: bool = True
    gradcam_layer: str = "layer4"
    stride: int = CAM_STRIDE
    amp: bool = False

    def __post_init__(self) -> None:
        if self.method not in CAM_METHODS:
            raise ConfigError(f"--cam {self.method}: unknown CAM method; use one of {', '.join(CAM_METHODS)}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(
                f"--scales {list(self.scales)}: need at least one positive scale, e.g. 1.0,0.5,1.5,2.0"
            )


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The classifier on `device` in eval mode; channels_last on CUDA, where convolutions run faster so."""
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def image_cam(
    model: nn.Module, image: np.ndarray, classes: Sequence[int], recipe: CamRecipe
) -> tuple[np.ndarray, np.ndarray]:
    """CAM and image-level logits of one image.

    Args:
        model: an eval-mode CamNet-like classifier (`cam`, `forward`, `num_classes`, `backbone`).
        image: uint8 (H, W, 3) RGB, as the classifier should see it (already erased, if erasing).
        classes: the image's labelled classes, 1..C (dataset indices; channel c-1 of the classifier).

    Returns:
        cams float32 (K, ceil(H/stride), ceil(W/stride)), each channel divided by its max (+1e-5), and
        logits float32 (C,) of the whole image at scale 1 (for the classifier's loss and F1 on it).
    """
    x = normalise_image(image)
    channels = [int(c) - 1 for c in classes]
    if recipe.method == "gradcam":
        cams = grad_cam(model, x, channels, layer=recipe.gradcam_layer, stride=recipe.stride)
    else:
        cams = multiscale_cam(model, x, channels, recipe.scales, recipe.flip, recipe.stride, recipe.amp)
    device = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=recipe.amp):
        logits = model(x.unsqueeze(0).to(device))[0]
    return cams.float().cpu().numpy(), logits.float().cpu().numpy()


def extract_cams(
    model: nn.Module,
    read_image: Callable[[str], np.ndarray],
    items: Sequence[tuple[str, Sequence[int]]],
    recipe: CamRecipe,
    *,
    erase: EraseFn | None = None,
    extras: ExtrasFn | None = None,
    writer: ArtifactWriter | None = None,
    description: str = "cam",
    quiet: bool = True,
) -> dict[str, dict[str, Any]]:
    """CAMs of `items` ((image_id, classes 1..C) pairs) by one classifier, one image at a time.

    With `writer`, each image's record (scores, their classes and stride, and the `extras` datasets) is
    written as soon as it is computed, images the writer already holds are skipped, and an empty dict
    is returned. Without, every record is returned as ``{image_id: {"scores", "logits", **extras}}``.
    `erase` turns the stored image into the one the classifier sees (adversarial erasing), on the fly.
    """
    results: dict[str, dict[str, Any]] = {}
    todo = [(i, c) for i, c in items if writer is None or not writer.done(i)]
    for image_id, classes in track(todo, total=len(todo), description=description, quiet=quiet):
        image = read_image(image_id)
        if erase is not None:
            image = erase(image_id, image)
        cams, logits = image_cam(model, image, classes, recipe)
        extra = dict(extras(image_id, image, cams, logits)) if extras is not None else {}
        if writer is not None:
            writer.write_image(
                image_id, scores=cams, classes=tuple(classes), stride=recipe.stride, extra=extra
            )
        else:
            results[image_id] = {"scores": cams, "logits": logits, **extra}
    return results
