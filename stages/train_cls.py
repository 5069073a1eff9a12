"""train-cls: the CAM classifier (IRN's recipe, METHODS.md §1) -> ``cls.h5``, resumable epoch by epoch.

`train_classifier` is the reusable entry point: mine-ae calls it to train fresh classifiers on erased
images (``erase`` hook, ``ids`` subset, ``extra_inputs`` for what the erasing depends on). `run` is the
stage: the dataset's training split into ``RUN/cls.h5``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.artifacts import Provenance, fingerprint_of, load_model, model_status, open_artifact
from stages.common.augment import regional_dropout_masks, scale_grid_sizes
from stages.common.classifier_data import ClassificationSamples, TrainAugment
from stages.common.cls_methods import ClassifierObjective, ComplementaryNet, build_classifier, puzzle_alpha
from stages.common.context import RunOptions, config_record, default_train_split
from stages.common.datasets.base import Dataset
from stages.common.distributed import (
    all_reduce_sum,
    init_if_launched,
    is_main,
    local_device,
    rank_and_world,
    wrap_ddp,
)
from stages.common.errors import ConfigError
from stages.common.metrics import multilabel_scores
from stages.common.networks import CamNet, load_backbone_state, load_backbone_weights
from stages.common.progress import track
from stages.common.shards import stage_lock
from stages.common.summary import Summary
from stages.common.training import (
    CheckpointedTraining,
    backward_and_step,
    check_finite,
    loader_generator,
    set_poly_lr,
    worker_init,
)

SMALL_IMAGES = 200  # median long side (px) below which the small-image (toy) recipe applies
MOMENTUM = 0.9  # IRN's SGD momentum, really passed as momentum (a known pitfall of reference code)
# Small-image recipe from scratch (no ImageNet weights, trainable BN): measured on the 200-image toy set.
SMALL_ARCH, SMALL_EPOCHS, SCRATCH_LR = "resnet10", 12, 0.1


@dataclass
class TrainClsConfig:
    """Options of `wsss train-cls`. None = auto, resolved from the dataset by `resolve_config`.

    VOC values are IRN's (Ahn et al., CVPR 2019); images with a median long side below 200 px get the
    small-image recipe (resnet10, 12 epochs, crops of the image size; see `resolve_config`).
    """

    arch: str | None = None  # resnet50 (IRN); small images: resnet10
    output_stride: int = 16  # IRN; 8 optional
    epochs: int | None = None  # 5 (IRN); small images: 10
    batch_size: int = 16  # IRN
    lr: float | None = None  # backbone lr: 0.1 (IRN; also from scratch)
    head_lr_mult: float | None = (
        None  # head (and new layers) lr multiplier: 10 with --weights (IRN's 0.1 / 1.0), else 1
    )
    weight_decay: float = 1e-4  # IRN
    crop_size: int | None = None  # long side rounded up to x32 (VOC: 512, IRN); small: ~0.6x long side
    resize_long: tuple[int, int] | None = (
        None  # 0.64-1.28x long side (VOC: 320-640, IRN); small: 0.75-1x crop
    )
    frozen_bn: bool | None = None  # frozen iff --weights given: BN cannot be frozen from scratch
    weights: Path | None = None  # torchvision-format ImageNet ResNet weights
    puzzle: bool = False  # Puzzle-CAM loss
    puzzle_alpha: float = 4.0  # Puzzle-CAM's final reconstruction weight
    hide_and_seek: bool = False  # Hide-and-Seek on training crops
    complementary: bool = False  # complementary-regions network (WACV 2021)
    fusion_weight: float = 1.0  # weight of the complementary attention fusion loss
    dropout_grid: int = 4  # complementary views: grid x grid regional dropout cells
    split: str | None = None  # training split; None = train_aug when present, else train
    val_split: str | None = None  # None = "val" when present (and not the training split); "none" = skip

    @property
    def method(self) -> str:
        return "puzzle" if self.puzzle else "complementary" if self.complementary else "plain"


def median_long_side(dataset: Dataset, ids: list[str], sample: int = 64) -> int:
    """Median of max(H, W) over up to ``sample`` evenly spaced images (headers only)."""
    picks = sorted({round(i) for i in np.linspace(0, len(ids) - 1, min(sample, len(ids)))})
    return int(statistics.median(max(dataset.image_size(ids[i])) for i in picks))


def resolve_config(cfg: TrainClsConfig, dataset: Dataset) -> TrainClsConfig:
    """Fill every None (auto) field from the dataset; fields already set are kept (idempotent).

    VOC-size images (median long side >= 200 px) get IRN's recipe. Smaller images get the small-image
    recipe, chosen for CPU compute and measured on the toy data: resnet10 (torchvision's ResNet with one
    block per stage), 12 epochs, crop = the median long side rounded to 32, long side 0.8-1.1x the
    median (shrinking small images erases the few pixels their class cue holds). From scratch (no
    --weights) BN trains and the head's lr is not multiplied: every layer is new.
    """
    split = cfg.split or default_train_split(dataset)
    long_side = median_long_side(dataset, dataset.ids(split))
    small = long_side < SMALL_IMAGES
    with_weights = cfg.weights is not None
    if small:
        crop = cfg.crop_size or max(32, round(long_side / 32) * 32)
        resize_long = (round(0.8 * long_side), round(1.1 * long_side))
    else:
        crop = cfg.crop_size or max(32, -(-long_side // 32) * 32)
        resize_long = (round(0.64 * long_side), round(1.28 * long_side))
    val_split = cfg.val_split
    if val_split is None:
        val_split = "val" if "val" in dataset.split_names() and split != "val" else "none"
    return dataclasses.replace(
        cfg,
        split=split,
        val_split=val_split,
        arch=cfg.arch or (SMALL_ARCH if small else "resnet50"),
        epochs=cfg.epochs or (SMALL_EPOCHS if small else 5),
        lr=cfg.lr if cfg.lr is not None else (0.1 if with_weights else SCRATCH_LR),
        head_lr_mult=cfg.head_lr_mult if cfg.head_lr_mult is not None else (10.0 if with_weights else 1.0),
        crop_size=crop,
        resize_long=tuple(cfg.resize_long) if cfg.resize_long else resize_long,
        frozen_bn=cfg.frozen_bn if cfg.frozen_bn is not None else with_weights,
    )


def check_config(cfg: TrainClsConfig, dataset: Dataset) -> None:
    """Refuse contradictory or impossible options with one line each."""
    if cfg.puzzle and cfg.complementary:
        raise ConfigError("--puzzle and --complementary are separate methods; pick one")
    if cfg.frozen_bn and cfg.weights is None:
        raise ConfigError("--frozen-bn without --weights: frozen random BatchNorm cannot train; drop one")
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise ConfigError(f"--weights {cfg.weights}: no such file; pass a torchvision ResNet .pth file")
    if cfg.val_split not in ("none", *dataset.split_names()):
        raise ConfigError(
            f"--val-split {cfg.val_split}: not a split of this dataset ({dataset.split_names()})"
        )
    low, high = cfg.resize_long  # type: ignore[misc]
    if not 0 < low <= high or cfg.crop_size <= 0 or cfg.epochs <= 0 or cfg.batch_size <= 0:  # type: ignore[operator]
        raise ConfigError("sizes, epochs and batch size must be positive, and resize-long LOW <= HIGH")


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _provenance(
    opts: RunOptions,
    cfg: TrainClsConfig,
    dataset: Dataset,
    stage: str,
    ids: list[str] | None,
    extra_inputs: dict[str, dict] | None,
) -> Provenance:
    """The model's identity: resolved config + seed (+ the ids when a subset), inputs, dataset split."""
    record = config_record(cfg, opts)
    inputs = dict(extra_inputs or {})
    if cfg.weights is not None:  # by content, so moving the file does not invalidate the model
        record["weights"] = Path(cfg.weights).name
        inputs["weights"] = {"path": str(cfg.weights), "fingerprint": _file_fingerprint(Path(cfg.weights))}
    if ids is not None:
        record["ids"] = fingerprint_of(sorted(ids))
    return Provenance(
        kind="model", stage=stage, config=record, inputs=inputs, dataset=dataset.describe(cfg.split)
    )


def build_network(cfg: TrainClsConfig, num_classes: int) -> CamNet:
    """A fresh classifier of the configured kind (weights loaded when given)."""
    kind = ComplementaryNet if cfg.complementary else CamNet
    net = kind(num_classes, arch=cfg.arch, output_stride=cfg.output_stride, frozen_bn=bool(cfg.frozen_bn))
    if cfg.weights is not None:
        load_backbone_weights(net, Path(cfg.weights))
    return net


def copy_backbone(net: torch.nn.Module, source: Path, dataset_description: dict) -> None:
    """Start ``net``'s backbone (a CamNet's, or a segmenter's ResNet body) from the backbone of the
    classifier artifact ``source``; every other layer stays as it is."""
    trained = load_classifier(source, dataset_description, "cpu")
    load_backbone_state(
        net,
        trained.backbone.state_dict(),
        f"{source}: the backbone of this {trained.arch} classifier",
        "start from a classifier of the same --arch",
    )


def make_optimizer(net: CamNet, cfg: TrainClsConfig) -> torch.optim.SGD:
    """SGD, momentum 0.9 (really), backbone at lr and new layers at lr x head_lr_mult, weight decay 1e-4."""
    groups = net.param_groups(cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=MOMENTUM, weight_decay=cfg.weight_decay)


def load_classifier(path: Path, dataset_description: dict, device: torch.device | str) -> CamNet:
    """The eval-mode network of a complete model artifact made for this dataset (refusals as load_model)."""
    model = load_model(path, dataset=dataset_description)
    net = build_classifier(model.arch)
    net.load_state_dict(model.state_dict)
    return net.to(device).eval()


def train_classifier(
    opts: RunOptions,
    cfg: TrainClsConfig,
    out: Path,
    *,
    stage: str = "train-cls",
    ids: list[str] | None = None,
    erase: Callable[[str, np.ndarray], np.ndarray] | None = None,
    extra_inputs: dict[str, dict] | None = None,
    init_backbone: Path | None = None,
) -> Summary:
    """Train (or resume, or find up to date) a classifier on ``ids`` (default: the config's split) -> ``out``.

    ``erase(image_id, uint8 (H, W, 3)) -> image`` edits training images before augmentation (validation
    images are never erased); ``extra_inputs`` are provenance refs of what the erasing depends on.
    ``init_backbone`` is a classifier model artifact of the same architecture whose backbone (not its
    head) starts the new network, in place of the recipe's ImageNet weights or random init. The
    caller holds the run lock. Figures: loss, train_f1 (on the training crops), val_mAP and val_f1.
    """
    started = time.perf_counter()
    dataset = opts.dataset
    cfg = resolve_config(cfg, dataset)
    check_config(cfg, dataset)
    train_ids = list(ids) if ids is not None else dataset.ids(cfg.split)
    if len(train_ids) < cfg.batch_size:
        raise ConfigError(
            f"only {len(train_ids)} training images for --batch-size {cfg.batch_size}; lower it"
        )
    inputs = dict(extra_inputs or {})
    if init_backbone is not None:
        with open_artifact(init_backbone, kind="model", dataset=dataset.describe(cfg.split)) as art:
            inputs["init_backbone"] = art.ref()
    provenance = _provenance(opts, cfg, dataset, stage, ids, inputs)
    out = Path(out)
    if model_status(out, provenance, force=opts.force):
        history = load_model(out).meta.get("history", [])
        return Summary(
            stage,
            status="up to date",
            artifacts=[out],
            figures=_figures(history),
            notes=[f"{out.name} is up to date (--force retrains)"],
        )

    device = local_device(opts.torch_device())
    init_if_launched(device)
    opts.seed_everything()
    net = build_network(cfg, dataset.num_classes)
    if init_backbone is not None:
        copy_backbone(net, init_backbone, dataset.describe(cfg.split))
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(net, cfg)
    amp = opts.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    training = CheckpointedTraining(
        out, provenance, net, optimizer, net.arch_spec(), force=opts.force, scaler=scaler
    )
    objective = wrap_ddp(ClassifierObjective(net, cfg.method, cfg.fusion_weight), device)

    mean_pixel = tuple(float(v) for v in dataset.mean_pixel(cfg.split))
    hide = scale_grid_sizes(cfg.crop_size) if cfg.hide_and_seek else None
    augment = TrainAugment(tuple(cfg.resize_long), cfg.crop_size, mean_pixel, hide_grid_sizes=hide)
    samples = ClassificationSamples(dataset, train_ids, train_augment=augment, seed=opts.seed, erase=erase)
    val = None
    if cfg.val_split != "none" and is_main():
        val = ClassificationSamples(
            dataset, dataset.ids(cfg.val_split), eval_size=cfg.crop_size, mean_pixel=mean_pixel
        )
    workers = opts.workers if opts.workers > 0 or device.type != "cuda" else opts.num_workers
    loop = _Loop(opts, cfg, device, amp, workers, out)
    for epoch in training.epochs(cfg.epochs):
        loss, train_f1 = loop.train_epoch(objective, optimizer, scaler, training, samples, epoch)
        figures = {"loss": loss, "train_f1": train_f1}
        if val is not None:
            figures.update(loop.validate(net, val))
        training.end_epoch(figures)
    training.finish(meta={"mean_pixel": list(mean_pixel), "method": cfg.method})
    seconds = time.perf_counter() - started
    ran = cfg.epochs - training.resumed_from
    return Summary(
        stage,
        status="resumed" if training.resumed_from else "made",
        artifacts=[out],
        seconds=seconds,
        images=ran * len(train_ids),
        figures=_figures(training.history),
        tables={"epochs": [dict(row) for row in training.history]},
        notes=[_describe(cfg, len(train_ids))]
        + ([f"resumed after epoch {training.resumed_from}"] if training.resumed_from else []),
    )


def _figures(history: list[dict[str, Any]]) -> dict[str, Any]:
    if not history:
        return {}
    last = history[-1]
    return {"epochs": int(last["epoch"]), **{k: round(float(v), 4) for k, v in last.items() if k != "epoch"}}


def _describe(cfg: TrainClsConfig, images: int) -> str:
    return (
        f"{cfg.method} {cfg.arch} OS{cfg.output_stride} on {images} {cfg.split} images: {cfg.epochs} epochs, "
        f"batch {cfg.batch_size}, lr {cfg.lr}/{cfg.lr * cfg.head_lr_mult}, crop {cfg.crop_size}, "
        f"long side {cfg.resize_long[0]}-{cfg.resize_long[1]}, BN {'frozen' if cfg.frozen_bn else 'trained'}"
        f"{', hide-and-seek' if cfg.hide_and_seek else ''}"
    )


@dataclass
class _Loop:
    """One epoch of training and one validation pass; holds what every epoch shares."""

    opts: RunOptions
    cfg: TrainClsConfig
    device: torch.device
    amp: bool
    workers: int
    out: Path

    def _loader(
        self, data: torch.utils.data.Dataset, batch: int, order: list[int] | None
    ) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            data,
            batch_size=batch,
            sampler=order,
            drop_last=order is not None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_init,
        )

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def train_epoch(
        self,
        objective: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        training: CheckpointedTraining,
        samples: ClassificationSamples,
        epoch: int,
    ) -> tuple[float, float]:
        """Shuffle (seed, epoch), shard per rank, step with poly lr; returns (mean loss, train F1 in %)."""
        rank, world = rank_and_world()
        per_rank = self.cfg.batch_size // world
        if per_rank < 1:
            raise ConfigError(f"--batch-size {self.cfg.batch_size} is smaller than the {world} processes")
        order = torch.randperm(len(samples), generator=loader_generator(self.opts.seed, epoch)).tolist()
        order = order[rank::world][: len(order) // world]  # every rank the same number of batches
        steps_per_epoch = len(order) // per_rank
        total_steps = steps_per_epoch * self.cfg.epochs
        samples.set_epoch(epoch)
        objective.train()
        losses, probs, targets = [], [], []
        loader = self._loader(samples, per_rank, order)
        for x, y, _ in track(
            loader, total=steps_per_epoch, description=f"epoch {epoch + 1}", quiet=self.opts.quiet
        ):
            x, y = self._to_device(x), y.to(self.device, non_blocking=True)
            set_poly_lr(optimizer, training.step, total_steps)
            masks = None
            if self.cfg.complementary:
                generator = torch.Generator().manual_seed(
                    (self.opts.seed * 1_000_003 + training.step) * 64 + rank
                )
                masks = regional_dropout_masks(
                    x.shape[0], x.shape[2], x.shape[3], generator, self.cfg.dropout_grid
                )
                masks = masks.to(self.device)
            alpha = puzzle_alpha(training.step, total_steps, self.cfg.puzzle_alpha)
            with torch.autocast(self.device.type, enabled=self.amp):
                loss, logits = objective(x, y, alpha, masks)
            check_finite(loss, self.out, epoch, training.step)
            backward_and_step(loss, optimizer, scaler)
            training.step += 1
            losses.append(float(loss.detach()))
            probs.append(torch.sigmoid(logits.detach().float()).cpu())
            targets.append(y.cpu())
        f1 = multilabel_scores(torch.cat(probs).numpy(), torch.cat(targets).numpy())["f1"]  # this rank's
        # Under torchrun the recorded loss is every rank's mean, not rank 0's half (identity in one process).
        sums = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=self.device)
        totals = all_reduce_sum(sums)
        return float(totals[0] / totals[1]), f1

    def validate(self, net: CamNet, val: ClassificationSamples) -> dict[str, float]:
        """Image-label mAP and F1 (%) of the eval-mode network on the validation views."""
        net.eval()
        probs = []
        with torch.no_grad():
            for x, _, _ in self._loader(val, self.cfg.batch_size, None):
                with torch.autocast(self.device.type, enabled=self.amp):
                    probs.append(torch.sigmoid(net(self._to_device(x)).float()).cpu())
        net.train()
        scores = multilabel_scores(torch.cat(probs).numpy(), val.targets())
        return {"val_mAP": scores["mAP"], "val_f1": scores["f1"]}


def run(opts: RunOptions, cfg: TrainClsConfig) -> Summary:
    """`wsss train-cls`: the dataset's training split -> ``RUN/cls.h5``."""
    with stage_lock(opts, "train-cls"):
        return train_classifier(opts, resolve_config(cfg, opts.dataset), opts.path("cls.h5"))
