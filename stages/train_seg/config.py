"""train-seg's options and how their defaults are resolved: the papers' VOC recipe or the toy recipe.

A field left None is resolved from the training images' size (median long side < 256 px: the toy recipe,
a ResNet-10 DeepLab-v2 started from the run's classifier, which trains on a CPU in minutes; else the
papers' VOC recipe); the resolved value is what the model artifact stores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.artifacts import open_artifact
from stages.common.context import RunOptions, default_train_split
from stages.common.datasets.base import Dataset
from stages.common.errors import ArtifactError, ConfigError
from stages.train_seg.predict import PREDICT_SCALES

LOSSES = ("ce", "psl", "dsrg")
INITS = ("auto", "scratch", "cls")
# Median long side (px) below which a dataset gets the toy recipe.
SMALL_IMAGE_SIDE = 256

# name: (VOC value from the papers, toy value). VOC: DeepLab-v2 on ResNet-101 at stride 16 (METHODS §5),
# lr 2.5e-4 ×10 head, batch 10, crop 321, ~20k iterations of batch 10 on train_aug ≈ 20 epochs; DSRG
# grows and CRFs at its 41×41 output (stride 8 of a 321 crop). Toy: DeepLab-v2 on the toy classifier's
# ResNet-10, started from cls.h5's backbone (--init auto), a larger lr and no ×10 for the head, crops that
# fit 64-128 px images. Measured on the toy data (ce on pseudo labels of train mIoU 50.5, val mIoU without
# CRF): a half-width ResNet-10 from scratch, OS8, 16 epochs 18.3; ResNet-10 from cls.h5, OS8, 16 epochs
# 32.1, 40 epochs 47.1 (213 s); OS16, 40 epochs 48.6 (113 s), 60 epochs 49.5; ×10 head 19.0 at 16 epochs.
RECIPES: dict[str, tuple[Any, Any]] = {
    "arch": ("deeplabv2_resnet101", "deeplabv2_resnet10"),
    "output_stride": (16, 16),
    "epochs": (20, 40),
    "batch_size": (10, 8),
    "lr": (2.5e-4, 0.02),
    "head_lr_mult": (10.0, 1.0),
    "crop_size": (321, 96),
    "dsrg_stride": (8, 2),
    # DeepLab's test scales; the toy's 64-128 px images skip 0.5 (too few pixels) and 2.0 (time).
    "scales": (PREDICT_SCALES, (1.0, 1.5)),
}
# Options that change only the prediction, not the model: kept out of the model's fingerprint.
PREDICTION_FIELDS = ("eval_split", "predict", "crf", "scales")


@dataclass
class TrainSegConfig:
    """Options of ``wsss train-seg``; None = resolved from the dataset (see ``RECIPES``)."""

    loss: str = "ce"  # ce | psl | dsrg
    labels: str | None = None  # seeds | pseudo | gt | FILE; None = seeds for dsrg, else pseudo
    split: str | None = None  # None = the training split (train_aug when present)
    arch: str | None = None
    output_stride: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    head_lr_mult: float | None = None  # ×10 head is DeepLab-v2's; use 1.0 for deeplabv3 (0.007 all layers)
    crop_size: int | None = None
    weight_decay: float = 5e-4  # DeepLab
    momentum: float = 0.9  # DeepLab (really momentum: the reference code's slot mix-up is not repeated)
    weights: Path | None = None  # torchvision ImageNet ResNet weights for the backbone
    # scratch | cls (RUN/cls.h5's backbone, same ResNet) | auto: cls when no --weights and cls.h5 has the
    # segmenter's ResNet, else scratch. With no ImageNet weights, the classifier is the only network the
    # run has already trained on these images, as ImageNet weights start both networks in the papers.
    init: str = "auto"
    psl_rounds: int = 1  # 2 = PSL++
    expand: bool = False  # dsrg: add SEC's expand loss
    dsrg_stride: int | None = None  # dsrg: CRF and growing at 1/stride of the crop
    eval_split: str = "val"
    predict: bool = True
    crf: bool = True
    scales: tuple[float, ...] | None = None


def _is_small(dataset: Dataset, split: str) -> bool:
    ids = dataset.ids(split)
    picks = [ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, min(20, len(ids))).round().astype(int))]
    return float(np.median([max(dataset.image_size(i)) for i in picks])) < SMALL_IMAGE_SIDE


def resolve(cfg: TrainSegConfig, dataset: Dataset) -> TrainSegConfig:
    """The config with every None filled in from the dataset's recipe (the values the artifact stores)."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"--loss {cfg.loss}: unknown loss; choose one of {', '.join(LOSSES)}")
    if cfg.psl_rounds < 1 or (cfg.psl_rounds > 1 and cfg.loss != "psl"):
        raise ConfigError(
            f"--psl-rounds {cfg.psl_rounds}: needs --loss psl and a value of 1 (PSL) or 2 (PSL++)"
        )
    if cfg.expand and cfg.loss != "dsrg":
        raise ConfigError("--expand adds SEC's expand loss to --loss dsrg; pass --loss dsrg too")
    split = cfg.split or default_train_split(dataset)
    toy = _is_small(dataset, split)
    filled = {name: values[1 if toy else 0] for name, values in RECIPES.items() if getattr(cfg, name) is None}
    resolved = replace(cfg, split=split, **filled)
    if resolved.labels is None:
        # DSRG grows into the seeds' unlabelled pixels; ce and PSL learn from the refined pseudo labels
        # (on the toy data PSL scored val 51.0 on pseudo labels, 43.1 on seeds).
        resolved.labels = "seeds" if cfg.loss == "dsrg" else "pseudo"
    if cfg.arch is not None and cfg.arch.startswith("deeplabv3"):
        # DeepLab-v3 (Chen et al. 2017) trains every layer at one rate, 0.007 over ImageNet weights.
        if cfg.head_lr_mult is None:
            resolved.head_lr_mult = 1.0
        if cfg.lr is None and not toy:
            resolved.lr = 0.007
    if cfg.init not in INITS:
        raise ConfigError(f"--init {cfg.init}: use {', '.join(INITS)}")
    if cfg.init == "cls" and cfg.weights is not None:
        raise ConfigError("--init cls and --weights both start the backbone; pass one of them")
    if resolved.weights is not None and resolved.arch.split("_")[1] in ("tiny", "resnet10"):
        raise ConfigError(
            f"--weights {resolved.weights}: torchvision has no ImageNet weights for {resolved.arch}'s toy "
            "ResNet; "
            "pick --arch deeplabv2_resnet18 or a ResNet-50/101 arch"
        )
    return resolved


def resolve_init(cfg: TrainSegConfig, opts: RunOptions) -> tuple[TrainSegConfig, Path | None]:
    """The config with ``init`` resolved to scratch or cls, and the classifier to start from (or None)."""
    assert cfg.arch is not None
    path = opts.path("cls.h5")
    body = cfg.arch.split("_")[1]
    if cfg.init == "scratch" or (cfg.init == "auto" and cfg.weights is not None):
        return replace(cfg, init="scratch"), None
    if not path.exists():
        if cfg.init == "auto":
            return replace(cfg, init="scratch"), None
        raise ArtifactError(
            f"{path}: --init cls needs the classifier; run `wsss train-cls` or pass --init scratch"
        )
    with open_artifact(path, kind="model") as art:
        cls_arch = art.config.get("arch")
    if cls_arch != body:
        if cfg.init == "auto":
            return replace(cfg, init="scratch"), None
        raise ConfigError(
            f"{path}: --init cls needs a segmenter on the classifier's {cls_arch}, not {cfg.arch}; "
            f"pass --arch deeplabv2_{cls_arch} or --init scratch"
        )
    return replace(cfg, init="cls"), path
