"""Training samples for the segmenter: images, a label map per image, and DeepLab's augmentation.

Labels come from a ``labels`` artifact (``pseudo.h5``, ``seeds.h5``, a PSL++ prediction) or from the
dataset's own masks (``--labels gt``, the fully supervised bound). Augmentation is DeepLab's (Chen et al.,
TPAMI 2017): random scale 0.5-1.5, horizontal flip, random crop padded with the mean pixel (labels padded
with 255, so the loss ignores padding).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stages.common import augment
from stages.common.artifacts import Artifact, open_artifact
from stages.common.cam import normalise_image
from stages.common.classifier_data import multi_hot
from stages.common.datasets.base import Dataset
from stages.common.errors import ArtifactError, DatasetError


class LabelSource:
    """Where a training image's label map comes from: ``label(image_id) -> uint8 (H, W)``, 255 = ignore."""

    name: str = ""

    def label(self, image_id: str) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} does not provide labels")

    def check(self, ids: Sequence[str]) -> None:
        """Refuse, before training starts, a source that cannot label every one of ``ids``."""


class MaskLabels(LabelSource):
    """The dataset's ground-truth masks (``--labels gt``): the fully supervised bound."""

    name = "gt"

    def __init__(self, dataset: Dataset, split: str) -> None:
        self.dataset = dataset
        self.split = split

    def check(self, ids: Sequence[str]) -> None:
        if not self.dataset.has_masks(self.split):
            raise DatasetError(
                f"{self.dataset.root}: split {self.split!r} has no masks for every image, so --labels gt "
                "cannot train on it; pick a split with masks or use --labels pseudo"
            )

    def label(self, image_id: str) -> np.ndarray:
        return self.dataset.mask(image_id)


class ArtifactLabels(LabelSource):
    """A ``labels`` artifact, opened lazily once per process (safe in forked loader workers)."""

    def __init__(self, path: Path, described: dict) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.described = described
        self._art: Artifact | None = None
        self._pid = -1
        # Validate now, in the parent: a wrong kind or dataset fails before any training.
        with open_artifact(self.path, kind="labels", dataset=described) as art:
            self.fingerprint_ref = art.ref()
            self.stage = art.stage
            self._ids = set(art.ids())

    def _open(self) -> Artifact:
        if self._art is None or self._pid != os.getpid():
            self._art = open_artifact(self.path, kind="labels", dataset=self.described)
            self._pid = os.getpid()
        return self._art

    def check(self, ids: Sequence[str]) -> None:
        missing = [i for i in ids if i not in self._ids]
        if missing:
            raise ArtifactError(
                f"{self.path}: has no labels for {len(missing)} of the {len(ids)} training images "
                f"(e.g. {missing[0]!r}); rerun the stage that made it on this split"
            )

    def label(self, image_id: str) -> np.ndarray:
        return self._open().labels(image_id)

    def __getstate__(self) -> dict:
        # An open h5py file cannot cross a process boundary (spawned loader workers): reopen there.
        state = dict(self.__dict__)
        state["_art"] = None
        state["_pid"] = -1
        return state


@dataclass(frozen=True)
class SegAugment:
    """DeepLab's training augmentation: random scale, flip, crop ``crop_size`` padded with the mean."""

    crop_size: int
    mean_pixel: tuple[float, float, float]
    scale_range: tuple[float, float] = (0.5, 1.5)  # DeepLab-v2's random scaling

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (H, W, 3) and (H, W) -> uint8 (S, S, 3) and (S, S), S = ``crop_size``."""
        low, high = self.scale_range
        image, scaled = augment.random_scale(image, rng, low, high, label=label)
        image, flipped = augment.random_flip(image, rng, label=scaled)
        fill = [int(round(v)) for v in self.mean_pixel]
        image, cropped, _ = augment.random_crop(image, rng, self.crop_size, label=flipped, fill=fill)
        assert cropped is not None
        return image, cropped


class SegmentationSamples(torch.utils.data.Dataset):
    """Training samples ``(image, label, target, raw, index)`` of ``ids``.

    ``image`` float32 (3, S, S) normalised; ``label`` int64 (S, S) with 255 = ignore; ``target`` float32
    (C,) multi-hot image labels from the annotations; ``raw`` uint8 (S, S, 3) the augmented crop as
    pixels (DSRG's CRF needs them). The augmentation of sample i in epoch e depends on (seed, e, i) only,
    so a resumed run sees the same crops as an uninterrupted one; call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        dataset: Dataset,
        ids: Sequence[str],
        labels: LabelSource,
        augmentation: SegAugment,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.ids = list(ids)
        self.labels = labels
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        image_id = self.ids[index]
        image = self.dataset.image(image_id)
        label = self.labels.label(image_id)
        if label.shape != image.shape[:2]:
            raise ArtifactError(
                f"{self.labels.name}: labels of {image_id!r} are {label.shape}, its image is "
                f"{image.shape[:2]}; the labels were made for another copy of the dataset"
            )
        rng = np.random.default_rng([self.seed, self.epoch, index])
        crop, crop_label = self.augmentation(image, label, rng)
        target = multi_hot(self.dataset.labels(image_id), self.dataset.num_classes)
        return (
            normalise_image(crop),
            torch.from_numpy(crop_label.astype(np.int64)),
            torch.from_numpy(target),
            torch.from_numpy(crop),
            index,
        )
