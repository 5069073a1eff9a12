"""``wsss train-seg``: train a DeepLab segmenter on weak labels, then predict and score a split.

Losses (METHODS.md §5): ``ce`` (cross entropy ignoring 255, on ``pseudo.h5`` by default), ``psl`` (AE-PSL,
Wei et al. CVPR 2017: online labels from a classification branch; ``psl_rounds=2`` is PSL++) and ``dsrg``
(Huang et al. CVPR 2018: seeds grown every iteration on the CRF-refined softmax, balanced seed loss +
constrain loss; ``expand`` adds SEC's expand loss). ``labels="gt"`` trains on the masks: the fully
supervised bound, written to ``seg_gt.h5`` / ``pred_<split>_gt.h5``.

Defaults scale with the dataset (``stages.train_seg.config``): the toy recipe for small images, the papers'
VOC recipe otherwise.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.common.artifacts import Provenance, model_status, open_artifact
from stages.common.context import RunOptions, config_record
from stages.common.datasets.base import Dataset
from stages.common.densecrf import CrfParams, dense_crf
from stages.common.distributed import (
    init_if_launched,
    local_device,
    rank_and_world,
    wrap_ddp,
)
from stages.common.metrics import ConfusionAccumulator
from stages.common.networks import load_backbone_weights
from stages.common.progress import track
from stages.common.shards import stage_lock
from stages.common.summary import Summary
from stages.common.training import (
    CheckpointedTraining,
    backward_and_step,
    check_finite,
    loader_generator,
    set_poly_lr,
)
from stages.train_seg import losses
from stages.train_seg.config import PREDICTION_FIELDS, TrainSegConfig, resolve, resolve_init
from stages.train_seg.data import ArtifactLabels, LabelSource, MaskLabels, SegAugment, SegmentationSamples
from stages.train_seg.networks import backbone_of, param_groups
from stages.train_seg.predict import (
    PredictConfig,
    arch_record,
    build_model,
    predict,
)


def label_source(cfg: TrainSegConfig, opts: RunOptions, split: str) -> LabelSource:
    """``gt`` -> the masks; ``seeds``/``pseudo`` -> RUN/<name>.h5; anything else is a file path."""
    dataset = opts.dataset
    if cfg.labels == "gt":
        return MaskLabels(dataset, split)
    path = opts.path(f"{cfg.labels}.h5") if cfg.labels in ("seeds", "pseudo") else Path(str(cfg.labels))
    return ArtifactLabels(path, dataset.describe(split))


def run(opts: RunOptions, cfg: TrainSegConfig) -> Summary:
    """Train (resuming a killed run), then predict ``cfg.eval_split`` and score it with and without CRF."""
    start = time.time()
    dataset = opts.dataset
    cfg = resolve(cfg, opts.dataset)
    assert cfg.split is not None
    suffix = "_gt" if cfg.labels == "gt" else ""
    summary = Summary("train-seg", notes=[_recipe_note(cfg)])
    with stage_lock(opts, "train-seg"):
        labels = label_source(cfg, opts, cfg.split)
        for round_index in range(1, cfg.psl_rounds + 1):
            last = round_index == cfg.psl_rounds
            model_path = opts.path(f"seg{suffix}.h5" if last else f"seg_psl_r{round_index}.h5")
            round_summary = train(opts, cfg, labels, model_path, round_index)
            summary.tables.setdefault("training", []).extend(round_summary.tables["training"])
            summary.figures.update(round_summary.figures)
            summary.artifacts.append(model_path)
            summary.notes.extend(round_summary.notes)
            if not last:  # PSL++: the next round learns from this model's own train-split predictions
                pred = predict(
                    opts,
                    PredictConfig(
                        model=model_path,
                        split=cfg.split,
                        crf=False,
                        scales=cfg.scales,
                        image_labels=True,
                        out=opts.path(f"pred_{cfg.split}_r{round_index}.h5"),
                    ),
                )
                summary.artifacts.append(pred.artifacts[0])
                labels = ArtifactLabels(pred.artifacts[0], dataset.describe(cfg.split))
        if cfg.predict:
            out = opts.path(f"pred_{cfg.eval_split}{suffix}.h5")
            pred = predict(
                opts,
                PredictConfig(
                    model=model_path, split=cfg.eval_split, out=out, scales=cfg.scales, crf=cfg.crf
                ),
            )
            summary.artifacts.append(out)
            summary.tables.update(pred.tables)
            summary.figures.update(pred.figures)
            summary.figures["predict s"] = round(pred.seconds, 1)
    summary.seconds = time.time() - start
    return summary


def backbone_from_classifier(model: torch.nn.Module, path: Path, described: dict[str, Any]) -> None:
    """Copy the backbone of the classifier artifact at ``path`` into the segmenter's ResNet body."""
    from stages.train_cls import copy_backbone

    copy_backbone(backbone_of(model), path, described)


def _recipe_note(cfg: TrainSegConfig) -> str:
    return (
        f"{cfg.loss} on {cfg.labels} labels: {cfg.arch} OS{cfg.output_stride}, {cfg.epochs} epochs of "
        f"batch {cfg.batch_size}, crop {cfg.crop_size}, lr {cfg.lr} (×{cfg.head_lr_mult} head)"
    )


def train(
    opts: RunOptions, cfg: TrainSegConfig, labels: LabelSource, path: Path, round_index: int
) -> Summary:
    """One training of the segmenter into ``path`` (resumable, up to date when already made)."""
    start = time.time()
    dataset = opts.dataset
    assert cfg.split is not None and cfg.arch is not None and cfg.output_stride is not None
    described = dataset.describe(cfg.split)
    cfg, init_from = resolve_init(cfg, opts)
    record = {k: v for k, v in config_record(cfg, opts).items() if k not in PREDICTION_FIELDS}
    record["round"] = round_index
    inputs = {"labels": labels.fingerprint_ref} if isinstance(labels, ArtifactLabels) else {}
    if init_from is not None:
        with open_artifact(init_from, kind="model", dataset=described) as art:
            inputs["init"] = art.ref()
    provenance = Provenance(kind="model", stage="train-seg", config=record, inputs=inputs, dataset=described)
    summary = Summary("train-seg", artifacts=[path])
    summary.tables["training"] = []
    if model_status(path, provenance, force=opts.force):
        summary.status = "up to date"
        summary.notes.append(f"{path.name} is up to date")
        return summary
    ids = dataset.ids(cfg.split)
    labels.check(ids)
    if dataset.has_masks(cfg.split) and not isinstance(labels, MaskLabels):
        summary.figures[f"labels {cfg.split} mIoU"] = labels_miou(labels, dataset, ids)
    device = local_device(opts.torch_device())
    distributed = init_if_launched(device)
    opts.seed_everything()
    assert cfg.crop_size is not None and cfg.batch_size is not None and cfg.epochs is not None
    arch = arch_record(
        cfg.arch,
        dataset.num_classes + 1,
        cfg.output_stride,
        psl_branch=cfg.loss == "psl",
        frozen_bn=cfg.weights is not None,  # DeepLab freezes BN over ImageNet weights; from scratch it learns
        crop_size=cfg.crop_size,
    )
    model = build_model(arch)
    if cfg.weights is not None:
        load_backbone_weights(backbone_of(model), cfg.weights)
    if init_from is not None:
        backbone_from_classifier(model, init_from, described)
    model.to(device)
    if device.type == "cuda":  # convolutions run faster in channels_last on CUDA; the same maths
        model.to(memory_format=torch.channels_last)
    assert cfg.lr is not None and cfg.head_lr_mult is not None
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.lr, cfg.head_lr_mult, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum
    )
    amp = opts.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    training = CheckpointedTraining(path, provenance, model, optimizer, arch, force=opts.force, scaler=scaler)
    if training.resumed_from:
        summary.status = "resumed"
        summary.notes.append(f"resumed {path.name} after epoch {training.resumed_from}")
    samples = SegmentationSamples(
        dataset, ids, labels, SegAugment(cfg.crop_size, tuple(dataset.mean_pixel(cfg.split))), seed=opts.seed
    )
    steps_per_epoch = _steps_per_epoch(len(ids), cfg.batch_size)
    net = wrap_ddp(_TrainingView(model), device) if distributed else _TrainingView(model)
    step_loss = _StepLoss(cfg, device)
    for epoch in training.epochs(cfg.epochs):
        model.train()
        samples.set_epoch(epoch)
        total, count = 0.0, 0
        for images, target_labels, targets, raw, _ in track(
            _loader(samples, cfg, opts, epoch, device),
            total=steps_per_epoch,
            description=f"train-seg epoch {epoch + 1}/{cfg.epochs}",
            quiet=opts.quiet,
        ):
            set_poly_lr(optimizer, training.step, cfg.epochs * steps_per_epoch)
            with torch.autocast(device.type, enabled=amp):
                result = net(images.to(device, non_blocking=True))
            target_labels = target_labels.to(device, non_blocking=True)
            loss = step_loss(result, target_labels, targets.to(device, non_blocking=True), raw)
            check_finite(loss, path, epoch, training.step)
            backward_and_step(loss, optimizer, scaler)
            training.step += 1
            total, count = total + float(loss.detach()), count + 1
        training.end_epoch({"loss": total / max(count, 1)})
        summary.tables["training"].append(
            {"round": round_index, "epoch": epoch + 1, "loss": total / max(count, 1)}
        )
    training.finish(meta={"labels": labels.name})
    summary.figures["train s"] = round(time.time() - start, 1)
    return summary


def _steps_per_epoch(n: int, batch_size: int) -> int:
    world = rank_and_world()[1]
    per_rank, batch = n // world, max(1, batch_size // world)
    return max(1, per_rank // batch) if per_rank >= batch else 1


def _loader(
    samples: SegmentationSamples, cfg: TrainSegConfig, opts: RunOptions, epoch: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """This epoch's batches: the shuffle depends on (seed, epoch) only, so a resumed run repeats it.

    On the CPU the loader runs in the main process: the network already uses every core. A split smaller
    than a batch gives one short batch instead of none. Under torchrun rank r takes order[r::world] of the
    same shuffle (disjoint, equal counts, never padded with repeats) in batches of batch_size / world, so
    step i of all ranks together sees the single process's batch i.
    """
    rank, world = rank_and_world()
    assert cfg.batch_size is not None
    order = torch.randperm(len(samples), generator=loader_generator(opts.seed, epoch)).tolist()
    order = order[rank::world][: len(order) // world]
    batch = max(1, cfg.batch_size // world)
    return torch.utils.data.DataLoader(
        samples,
        batch_size=batch,
        sampler=order,
        drop_last=len(order) >= batch,  # BatchNorm in training mode needs more than one crop
        num_workers=opts.num_workers if device.type == "cuda" else 0,
        pin_memory=device.type == "cuda",
    )


class _TrainingView(nn.Module):
    """The segmenter plus its PSL branch in one forward, so DDP sees every parameter used."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        result = dict(self.model(images))
        classifier = getattr(self.model, "classifier", None)
        if classifier is not None:
            result["cls"] = classifier(result["features"])
        return result


class _StepLoss:
    """The loss of one batch for ``cfg.loss``; DSRG's CRF and region growing run here, on the CPU."""

    def __init__(self, cfg: TrainSegConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        stride = cfg.dsrg_stride or 1
        # SEC's constrain CRF (Kolesnikov & Lampert 2016, used by DSRG): the PSA/SEC kernels with their
        # spatial widths divided by the map's downscaling (SEC's scale_factor).
        base = CrfParams()
        self.crf_params = replace(
            base, gaussian_sxy=base.gaussian_sxy / stride, bilateral_sxy=base.bilateral_sxy / stride
        )

    def __call__(
        self, result: dict[str, torch.Tensor], labels: torch.Tensor, targets: torch.Tensor, raw: torch.Tensor
    ) -> torch.Tensor:
        logits = result["out"].float()
        if self.cfg.loss == "ce":
            return losses.seg_cross_entropy(logits, labels)
        if self.cfg.loss == "psl":
            log_probs = F.log_softmax(logits, dim=1)
            online = losses.psl_online_label(
                log_probs.exp().detach(), torch.sigmoid(result["cls"].float()).detach(), targets
            )
            cls_loss = F.multilabel_soft_margin_loss(result["cls"].float(), targets)
            return losses.psl_loss(log_probs, labels, online) + cls_loss
        return self._dsrg(logits, labels, targets, raw)

    def _dsrg(
        self, logits: torch.Tensor, seeds: torch.Tensor, targets: torch.Tensor, raw: torch.Tensor
    ) -> torch.Tensor:
        stride = self.cfg.dsrg_stride or 1
        size = (-(-logits.shape[2] // stride), -(-logits.shape[3] // stride))
        small = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        log_probs = F.log_softmax(small, dim=1)
        probs = log_probs.exp()
        pixels = F.interpolate(
            raw.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False
        )
        pixels = pixels.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        small_seeds = (
            F.interpolate(seeds[:, None].float(), size=size, mode="nearest")[:, 0].byte().cpu().numpy()
        )
        detached = probs.detach().cpu().numpy()
        refined, grown = [], []
        for b in range(logits.shape[0]):
            crf = dense_crf(np.ascontiguousarray(pixels[b]), detached[b], self.crf_params)
            classes = [int(c) + 1 for c in torch.nonzero(targets[b] > 0.5).flatten()]
            refined.append(crf)
            grown.append(losses.region_grow(crf, small_seeds[b], classes))
        crf_probs = torch.from_numpy(np.stack(refined)).to(self.device)
        grown_labels = torch.from_numpy(np.stack(grown).astype(np.int64)).to(self.device)
        loss = losses.balanced_seed_loss(log_probs, grown_labels) + losses.constrain_loss(probs, crf_probs)
        if self.cfg.expand:
            loss = loss + losses.expand_loss(probs, targets)
        return loss


def labels_miou(labels: LabelSource, dataset: Dataset, ids: list[str], most: int = 500) -> float:
    """mIoU of the training labels against the masks (255 counted as background), as a reference.

    At most ``most`` evenly spaced images (all of the toy's; 500 of VOC's 10,582 keep it to seconds).
    """
    acc = ConfusionAccumulator(dataset.num_classes + 1)
    picks = np.unique(np.linspace(0, len(ids) - 1, min(most, len(ids))).round().astype(int))
    for image_id in (ids[i] for i in picks):
        acc.update(labels.label(image_id), dataset.mask(image_id))
    return float(acc.summary(dataset.class_names)["miou"])
