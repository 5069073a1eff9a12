"""Image-classification samples for training CAM classifiers: augmented, normalised crops + multi-hot labels.

Used by train-cls and by mine-ae (which retrains classifiers on erased images through the ``erase`` hook).
Every sample draws its augmentation from its own generator seeded by ``(seed, epoch, index)``, so a sample
is the same whichever loader worker makes it and whether or not the run was resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stages.common import augment
from stages.common.cam import normalise_image
from stages.common.datasets.base import Dataset

EraseHook = Callable[[str, np.ndarray], np.ndarray]
"""``(image_id, uint8 (H, W, 3)) -> uint8 (H, W, 3)``: applied to the raw image before augmentation."""


def multi_hot(classes: Sequence[int], num_classes: int) -> np.ndarray:
    """Float32 (C,) target with 1 at ``c - 1`` for each class index c in 1..C (channel 0 = class 1)."""
    target = np.zeros(num_classes, dtype=np.float32)
    for c in classes:
        if not 1 <= c <= num_classes:
            raise ValueError(f"class index {c} outside 1..{num_classes}")
        target[c - 1] = 1.0
    return target


@dataclass(frozen=True)
class TrainAugment:
    """IRN's classifier augmentation: random long side, flip, colour jitter, padded random crop.

    ``hide_grid_sizes`` switches Hide-and-Seek on (training only; the sizes already scaled to the crop).
    ``mean_pixel`` (RGB 0..255) fills crop padding and hidden cells, so both look "empty" to the network.
    """

    resize_long: tuple[int, int]
    crop_size: int
    mean_pixel: tuple[float, float, float]
    jitter: float = 0.3  # PSA's brightness/contrast/saturation strength
    hide_grid_sizes: tuple[int, ...] | None = None

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (crop, crop, 3)."""
        low, high = self.resize_long
        image, _ = augment.random_resize_long(image, rng, low, high)
        image, _ = augment.random_flip(image, rng)
        image = augment.color_jitter(image, rng, self.jitter, self.jitter, self.jitter)
        fill = [int(round(v)) for v in self.mean_pixel]
        image, _, _ = augment.random_crop(image, rng, self.crop_size, fill=fill)
        if self.hide_grid_sizes is not None:
            image = augment.hide_and_seek(
                image, rng, self.hide_grid_sizes, mean_pixel=np.asarray(self.mean_pixel)
            )
        return image


def eval_view(image: np.ndarray, size: int, mean_pixel: Sequence[float]) -> np.ndarray:
    """Deterministic test view: long side resized to ``size``, padded bottom/right with the mean to a
    ``size``×``size`` square so images of any shape batch together. Never hides or flips.

    Returns uint8 (size, size, 3).
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL: (width, height)
    resized = np.asarray(Image.fromarray(image).resize(new_size, Image.BILINEAR))
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[...] = np.asarray([int(round(v)) for v in mean_pixel], dtype=np.uint8)
    out[: resized.shape[0], : resized.shape[1]] = resized
    return out


class ClassificationSamples(torch.utils.data.Dataset):
    """``ids`` of a dataset as (image (3, S, S) float32 normalised, target (C,) float32, index) samples.

    With ``train_augment`` the samples are augmented training crops; without, deterministic test views
    of side ``eval_size``. ``erase`` (mine-ae) edits each raw image before anything else. Call
    ``set_epoch`` before each epoch: the augmentation of sample i in epoch e depends on (seed, e, i) only.
    """

    def __init__(
        self,
        dataset: Dataset,
        ids: Sequence[str],
        *,
        train_augment: TrainAugment | None = None,
        eval_size: int = 0,
        mean_pixel: Sequence[float] = (0.0, 0.0, 0.0),
        seed: int = 0,
        erase: EraseHook | None = None,
    ) -> None:
        if train_augment is None and eval_size <= 0:
            raise ValueError("give either train_augment or a positive eval_size")
        self.dataset = dataset
        self.ids = list(ids)
        self.train_augment = train_augment
        self.eval_size = eval_size
        self.mean_pixel = tuple(float(v) for v in mean_pixel)
        self.seed = seed
        self.erase = erase
        self.epoch = 0
        self.num_classes = dataset.num_classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def targets(self) -> np.ndarray:
        """(N, C) multi-hot labels of every sample, in order."""
        return np.stack([multi_hot(self.dataset.labels(i), self.num_classes) for i in self.ids])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        image_id = self.ids[index]
        image = self.dataset.image(image_id)
        if self.erase is not None:
            image = self.erase(image_id, image)
        if self.train_augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image = self.train_augment(image, rng)
        else:
            image = eval_view(image, self.eval_size, self.mean_pixel)
        target = multi_hot(self.dataset.labels(image_id), self.num_classes)
        return normalise_image(image), torch.from_numpy(target), index
