"""What one adversarial-erasing round stores per image, and how the next round reads it back.

A round artifact ``RUN/cams_r{t}.h5`` (kind ``scores``, stage ``mine-ae``) holds for every image:

- ``scores``: float16 (K, h, w) CAM of round t's classifier on the image I_t it saw, stride 4, the
  image's K labelled classes (attr ``classes``);
- ``mined``: bool (K, H, W), R_t,c = `mined_region` of each class's CAM at full image size;
- ``union``: bool (K, H, W), F_c so far = R_1,c ∪ ... ∪ R_t,c; its OR over classes is what I_{t+1} loses;
- ``low``: bool (H, W), where every class's CAM of every round so far is low (`low_cam_mask`);
- ``logits``: float32 (C,), the classifier's image-level logits on I_t (its loss and F1 on erased images).

Erased images are never written: `MaskEraser` rebuilds I_{t+1} = erase(image, OR_c union) on the fly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stages.common.artifacts import upsample_scores
from stages.common.errors import ArtifactError
from stages.mine_ae.erasing import erase, low_cam_mask, mined_region


def round_path(run_dir: Path, t: int) -> Path:
    return Path(run_dir) / f"cams_r{t}.h5"


class RoundReader:
    """Reads per-image masks of one round's artifact (complete or partial); safe to pickle into
    DataLoader workers: each process opens its own HDF5 handle on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._h5: h5py.File | None = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid() or not self._h5.id.valid:
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise ArtifactError(
                    f"{self.path}: cannot read the previous round's masks; rerun mine-ae"
                ) from exc
            self._pid = os.getpid()
        return self._h5

    def _record(self, image_id: str, name: str) -> np.ndarray:
        dset = self._file().get(f"images/{image_id}/{name}")
        if dset is None:
            raise ArtifactError(
                f"{self.path}: no {name!r} record for image {image_id!r}; the round was made for other "
                "images: rerun mine-ae with --force"
            )
        return dset[()]

    def union(self, image_id: str) -> np.ndarray:
        """bool (K, H, W): F_c through this round, one channel per labelled class."""
        return self._record(image_id, "union").astype(bool)

    def mined(self, image_id: str) -> np.ndarray:
        """bool (K, H, W): R_t,c of this round alone."""
        return self._record(image_id, "mined").astype(bool)

    def low(self, image_id: str) -> np.ndarray:
        """bool (H, W): low CAM in every round so far."""
        return self._record(image_id, "low").astype(bool)

    def logits(self, image_id: str) -> np.ndarray:
        return self._record(image_id, "logits").astype(np.float32)

    def scores(self, image_id: str) -> np.ndarray:
        return self._record(image_id, "scores").astype(np.float32)

    def erase_mask(self, image_id: str) -> np.ndarray:
        """bool (H, W): every pixel mined in any round so far, for any class."""
        union = self.union(image_id)
        return union.any(axis=0) if union.shape[0] else np.zeros(union.shape[1:], dtype=bool)

    def close(self) -> None:
        if self._h5 is not None and self._h5.id.valid:
            self._h5.close()
        self._h5 = None


class MaskEraser:
    """The erase hook of round t+1: image -> image with every region mined through round t filled by the
    dataset mean pixel (AE-PSL). Picklable (DataLoader workers)."""

    def __init__(self, previous: Path, mean_pixel: np.ndarray) -> None:
        self.reader = RoundReader(previous)
        self.mean_pixel = np.asarray(mean_pixel, dtype=np.float32)

    def __call__(self, image_id: str, image: np.ndarray) -> np.ndarray:
        mask = self.reader.erase_mask(image_id)
        if mask.shape != image.shape[:2]:
            raise ArtifactError(
                f"{self.reader.path}: masks of image {image_id!r} are {mask.shape}, the image is "
                f"{image.shape[:2]}; the dataset changed since: rerun mine-ae with --force"
            )
        return erase(image, mask, self.mean_pixel)


def round_records(
    cams: np.ndarray,
    size: tuple[int, int],
    previous: tuple[np.ndarray, np.ndarray] | None,
    *,
    top_fraction: float,
    erase_thr: float | None,
    low_cam_thr: float,
) -> dict[str, np.ndarray]:
    """The masks round t stores for one image (see the module docstring).

    Args:
        cams: float32 (K, h, w) this round's normalised CAM at its stride.
        size: (H, W) of the image.
        previous: (union (K, H, W), low (H, W)) of round t-1, or None in round 1.

    Returns:
        ``{"mined", "union", "low"}`` bool arrays at full image size.
    """
    full = upsample_scores(cams, size)
    # Pixels erased before this round hold the mean pixel, not image content: what this round's CAM says
    # there is spill-over from their surroundings, so they are neither mined again (which would only make
    # two classes claim them) nor counted in the top fraction.
    visible = None if previous is None else ~previous[0].any(axis=0)
    mined = np.zeros((cams.shape[0], *size), dtype=bool)
    for k, channel in enumerate(full):
        if visible is not None:
            channel = np.where(visible, channel, 0.0)
        mined[k] = mined_region(channel, top_fraction=top_fraction, threshold=erase_thr)
    low = low_cam_mask([full], low_cam_thr)
    if previous is None:
        return {"mined": mined, "union": mined.copy(), "low": low}
    union, low_before = previous
    return {"mined": mined, "union": union | mined, "low": low_before & low}


def fuse_scores(per_round: list[np.ndarray], mined: list[np.ndarray] | None = None) -> np.ndarray:
    """Fused CAM of the kept rounds: round 1's CAM, raised to each later round's CAM on what it mined.

    Args:
        per_round: each round's max-normalised CAM, float (K, h, w), round 1 first.
        mined: each round's R_t,c as bool (K, H, W) at image size (round 1's entry is not used); None
            fuses the whole maps.

    Round t >= 2 sees an image whose best evidence is gone, and its normalised map peaks at 1 on whatever
    is left, context included: the whole map's max over rounds labelled two thirds of the toy images'
    background as objects (CAM mIoU 47.1 for round 1 alone, 31.8 fused). Its CAM counts where it mined,
    so the fused map covers F_c = ∪_t R_t,c and elsewhere keeps round 1's scores. Mined masks are
    taken to the score grid by max pooling (a cell holding a mined pixel counts). float32 (K, h, w).
    """
    if not per_round:
        raise ValueError("fuse_scores needs at least one round")
    fused = np.asarray(per_round[0], dtype=np.float32).copy()
    for t, scores in enumerate(per_round[1:], start=1):
        scores = np.asarray(scores, dtype=np.float32)
        if mined is not None:
            scores = scores * _to_grid(mined[t], scores.shape[-2:])
        fused = np.maximum(fused, scores)
    return fused


def _to_grid(mask: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """bool (K, H, W) -> float32 (K, h, w): 1 where a cell of the grid holds a True pixel."""
    import torch
    import torch.nn.functional as F

    if mask.shape[0] == 0:
        return np.zeros((0, *grid), dtype=np.float32)
    pooled = F.adaptive_max_pool2d(torch.from_numpy(mask.astype(np.float32))[None], tuple(grid))[0]
    return pooled.numpy()


def classifier_quality(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Multilabel soft-margin loss and micro F1 (fraction) of logits (N, C) against 0/1 targets (N, C)."""
    import torch
    import torch.nn.functional as F

    from stages.common.metrics import multilabel_scores

    if len(logits) == 0:
        return {"loss": float("nan"), "f1": 0.0}
    loss = F.multilabel_soft_margin_loss(
        torch.from_numpy(logits), torch.from_numpy(targets.astype(np.float32))
    )
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return {"loss": float(loss), "f1": multilabel_scores(probs, targets)["f1"] / 100.0}


def class_dict(classes: tuple[int, ...], masks: np.ndarray) -> Mapping[int, np.ndarray]:
    """{class id: (H, W) bool} from per-class channels (K, H, W)."""
    return {int(c): masks[k] for k, c in enumerate(classes)}
