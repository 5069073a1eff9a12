"""Segmenter inference: rebuild a trained segmenter, multi-scale + flip prediction, optional dense CRF,
``pred_<split>.h5`` written image by image (resumable), and its evaluation with and without CRF.

``pred_<split>.h5`` is a ``labels`` artifact: per image ``labels`` (uint8 (H, W), argmax of the averaged
softmax, no CRF) and, with ``crf`` on, an extra ``labels_crf`` record (the same after DeepLab's dense CRF).
The C+1 softmax maps are not stored: at full size they would be (C+1)·H·W float16 per image (~8 MB for a
VOC image), larger than every other artifact of the run, and no later stage reads them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from stages.common.artifacts import (
    ModelArtifact,
    Provenance,
    load_model,
)
from stages.common.cam import normalise_image
from stages.common.context import RunOptions, config_record
from stages.common.densecrf import CrfParams, dense_crf
from stages.common.errors import ConfigError
from stages.common.networks import build_resnet
from stages.common.progress import track
from stages.common.shards import begin_sharded
from stages.common.summary import Summary
from stages.train_seg import networks as segnets
from stages.train_seg.losses import psl_test_filter

# DeepLab's test-time scales (Chen et al., TPAMI 2017), each with its horizontal flip.
PREDICT_SCALES = (0.5, 1.0, 1.5, 2.0)
# AE-PSL (Wei et al., CVPR 2017): at test, classes the classification branch scores below this are dropped.
PSL_TEST_THRESHOLD = 0.1

# Segmenters small enough for CPU: ResNet-18 (512 channels) and a half-width ResNet-10 ("tiny", 256
# channels, one BasicBlock per stage) for the toy data, where ResNet-18 runs ~2 s per batch of 8 crops.
# ResNet-10 (one BasicBlock per stage, 512 channels) is the toy classifier's network, so a segmenter on it
# can start from cls.h5's backbone (train-seg --init cls).
SMALL_BODIES = {"resnet18": 512, "resnet10": 512, "tiny": 256}
TINY_WIDTHS = (32, 64, 128, 256)
# DeepLab-v2 (Chen et al., TPAMI 2017): ASPP-L rates for its 321×321 training crops.
ASPP_RATES = (6, 12, 18, 24)
DEEPLAB_CROP = 321
ARCHS = (
    *segnets.ARCHS,
    "deeplabv2_resnet18",
    "largefov_resnet18",
    "deeplabv2_resnet10",
    "largefov_resnet10",
    "deeplabv2_tiny",
    "largefov_tiny",
)


class _TinyResNet(nn.Module):
    """A half-width ResNet-10 with the attribute names of a torchvision ResNet (for ``ResNetBody``)."""

    def __init__(self, output_stride: int) -> None:
        super().__init__()
        w = TINY_WIDTHS
        self.conv1 = nn.Conv2d(3, w[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        # Stages 2..4 halve the resolution unless the output stride asks to dilate them instead.
        strided = {16: (True, True, False), 8: (True, False, False)}[output_stride]
        dilation, inplanes = 1, w[0]
        for index, planes in enumerate(w):
            stride = 2 if index > 0 and strided[index - 1] else 1
            if index > 0 and not strided[index - 1]:
                dilation *= 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            block = BasicBlock(inplanes, planes, stride, downsample)
            for conv in (block.conv1, block.conv2):
                conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
            setattr(self, f"layer{index + 1}", nn.Sequential(block))
            inplanes = planes


def arch_record(
    name: str,
    num_classes: int,
    output_stride: int,
    psl_branch: bool,
    frozen_bn: bool,
    crop_size: int = DEEPLAB_CROP,
) -> dict[str, Any]:
    """What rebuilds a segmenter: stored as the model artifact's ``arch``.

    The small bodies' DeepLab-v2 ASPP rates are the paper's (6, 12, 18, 24), chosen for 321 crops, scaled
    to ``crop_size`` so the branches see the same share of a crop (on a 96 crop at stride 8 the paper's
    rate 24 would sample nothing but padding). ResNet-50/101 keep the builder's rates.
    """
    if name not in ARCHS:
        raise ConfigError(f"unknown segmenter architecture {name!r}; choose one of {', '.join(ARCHS)}")
    rates = tuple(max(1, round(r * crop_size / DEEPLAB_CROP)) for r in ASPP_RATES)
    return {
        "name": name,
        "num_classes": num_classes,
        "output_stride": output_stride,
        "psl_branch": psl_branch,
        "frozen_bn": frozen_bn,
        "aspp_rates": list(rates),
    }


def build_model(arch: dict[str, Any]) -> segnets.Segmenter:
    """A randomly initialised segmenter from an :func:`arch_record` (``num_classes`` counts background).

    ResNet-50/101 come from ``stages.train_seg.networks.build_segmenter``; the ResNet-18 and tiny bodies
    are built here on the same ``Segmenter``/``ResNetBody`` classes, so ``backbone_of`` and
    ``param_groups`` work alike. With ``psl_branch`` a :class:`ClassificationBranch` is attached as
    ``model.classifier`` (AE-PSL).
    """
    name, k, stride = arch["name"], int(arch["num_classes"]), int(arch["output_stride"])
    head_name, body_name = name.split("_")
    if body_name in SMALL_BODIES:
        if stride not in segnets.OUTPUT_STRIDES:
            raise ConfigError(f"output stride {stride} is not supported; use 8 or 16")
        resnet = _TinyResNet(stride) if body_name == "tiny" else build_resnet(body_name, stride)
        channels = SMALL_BODIES[body_name]
        if head_name == "deeplabv2":
            rates = tuple(int(r) for r in arch.get("aspp_rates", ASPP_RATES))
            head: nn.Module = segnets.DeepLabV2ASPP(channels, k, rates)
        else:
            head = segnets.largefov_head(channels, k)
        model = segnets.Segmenter(segnets.ResNetBody(resnet), head)  # type: ignore[arg-type]
    else:
        model = segnets.build_segmenter(name, k, stride)
        channels = segnets.RESNET_OUT_CHANNELS
    if arch.get("frozen_bn"):
        from stages.common.networks import freeze_batchnorm

        freeze_batchnorm(segnets.backbone_of(model))
    if arch.get("psl_branch"):
        model.add_module("classifier", segnets.ClassificationBranch(channels, k - 1))
    return model


def load_segmenter(path: Path, described: dict[str, Any]) -> tuple[segnets.Segmenter, ModelArtifact]:
    """A trained segmenter from its model artifact (refused if made for another dataset)."""
    artifact = load_model(path, dataset=described)
    if artifact.provenance.stage != "train-seg":
        raise ConfigError(
            f"{path}: made by {artifact.provenance.stage}, not train-seg; pass a segmenter model"
        )
    model = build_model(artifact.arch)
    model.load_state_dict(artifact.state_dict)
    return model, artifact


@torch.no_grad()
def multiscale_probs(
    model: segnets.Segmenter,
    image: np.ndarray,
    scales: Sequence[float] = PREDICT_SCALES,
    flip: bool = True,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax averaged over scales (and flips) at the image's size, and the averaged class scores.

    ``image`` uint8 (H, W, 3). Returns ``probs`` float32 (C+1, H, W) on the CPU and, when the model has
    a PSL classification branch, its sigmoid scores (C,) averaged over the same views, else None.
    The model must be in eval mode.
    """
    device = next(model.parameters()).device
    height, width = image.shape[:2]
    x = normalise_image(image)[None].to(device)
    total: torch.Tensor | None = None
    cls_total: torch.Tensor | None = None
    views = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        batch = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if flip:
            batch = torch.cat([batch, batch.flip(-1)])
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            result = model(batch)
        probs = result["out"].float().softmax(dim=1)
        if flip:
            probs = torch.stack([probs[0], probs[1].flip(-1)])
        probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False).sum(dim=0)
        total = probs if total is None else total + probs
        classifier = getattr(model, "classifier", None)
        if classifier is not None:
            scores = torch.sigmoid(classifier(result["features"].float())).sum(dim=0)
            cls_total = scores if cls_total is None else cls_total + scores
        views += batch.shape[0]
    assert total is not None
    probs = (total / views).cpu()
    return probs, None if cls_total is None else (cls_total / views).cpu()


def restrict_to_classes(probs: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Zero every channel of ``probs (C+1, H, W)`` but background and ``classes`` (1..C), renormalised.

    Used on training images, whose labels are known (PSL++ retrains on such predictions).
    """
    keep = torch.zeros(probs.shape[0], dtype=torch.bool)
    keep[0] = True
    keep[list(classes)] = True
    kept = probs * keep[:, None, None]
    return kept / kept.sum(dim=0, keepdim=True).clamp_min(1e-8)


@dataclass
class PredictConfig:
    """Options of prediction (``wsss predict``, and the prediction ``train-seg`` runs after training)."""

    model: Path | None = None  # None = RUN/seg.h5
    split: str = "val"
    out: Path | None = None  # None = RUN/pred_<split>.h5
    scales: tuple[float, ...] = PREDICT_SCALES  # DeepLab's
    flip: bool = True
    crf: bool = True  # DeepLab's CRF (CrfParams.deeplab()) as an extra labels_crf record
    psl_threshold: float = PSL_TEST_THRESHOLD  # AE-PSL; used only by models with a PSL branch
    image_labels: bool = False  # restrict to each image's annotated classes (training images: PSL++)


def predict(opts: RunOptions, cfg: PredictConfig) -> Summary:
    """Write ``pred_<split>.h5`` from a trained segmenter (resumes image by image) and evaluate it."""
    start = time.time()
    dataset = opts.dataset
    described = dataset.describe(cfg.split)
    model_path = Path(cfg.model or opts.path("seg.h5"))
    out = Path(cfg.out or opts.path(f"pred_{cfg.split}.h5"))
    if not cfg.scales or any(s <= 0 for s in cfg.scales):
        raise ConfigError(f"--scales {cfg.scales}: give one or more positive scales, e.g. 0.5,1,1.5,2")
    model, artifact = load_segmenter(model_path, described)
    device = opts.torch_device()
    model.to(device).eval()
    # The model is an input (path and fingerprint in `inputs`) and `out` is this file: absolute paths in
    # the fingerprint would make a moved or copied run directory's predictions look stale.
    record = {k: v for k, v in config_record(cfg, opts).items() if k not in ("model", "out")}
    record["crf_params"] = vars(CrfParams.deeplab()) if cfg.crf else None
    provenance = Provenance(
        kind="labels",
        stage="train-seg",
        config=record,
        inputs={"model": artifact.provenance.ref(model_path)},
        dataset=described,
    )
    ids = dataset.ids(cfg.split)
    status = begin_sharded(out, provenance, ids, opts)
    summary = Summary("predict", artifacts=[status.path], images=len(status.ids))
    if status.up_to_date:
        summary.status = "up to date"
    else:
        assert status.writer is not None
        summary.status = "resumed" if status.resumed else "made"
        if status.note:
            summary.notes.append(status.note)
        with status.writer as writer:
            todo = status.ids
            what = f"predict {cfg.split}"
            for image_id in track(todo, total=len(todo), description=what, quiet=opts.quiet):
                if writer.done(image_id):
                    continue
                image = dataset.image(image_id)
                labels, labels_crf = _predict_one(model, image, dataset.labels(image_id), cfg, opts.amp)
                extra = {"labels_crf": labels_crf} if labels_crf is not None else None
                writer.write_image(image_id, labels=labels, extra=extra)
            writer.finish()
        status.complete()
    summary.seconds = time.time() - start
    if dataset.has_masks(cfg.split) and opts.shard is None:  # a shard is scored once merged
        rows = evaluate_predictions(out, opts, cfg.split)
        summary.tables[f"{cfg.split} mIoU"] = rows
        for row in rows:
            summary.figures[f"mIoU {row['labels']}"] = row["mIoU"]
    return summary


def _predict_one(
    model: segnets.Segmenter, image: np.ndarray, classes: Sequence[int], cfg: PredictConfig, amp: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels, labels after CRF or None) of one image, both uint8 (H, W)."""
    probs, cls_scores = multiscale_probs(model, image, cfg.scales, cfg.flip, amp)
    if cls_scores is not None:
        probs = psl_test_filter(probs[None], cls_scores[None], cfg.psl_threshold)[0]
        probs = probs / probs.sum(dim=0, keepdim=True).clamp_min(1e-8)
    if cfg.image_labels:
        probs = restrict_to_classes(probs, classes)
    labels = probs.argmax(dim=0).numpy().astype(np.uint8)
    if not cfg.crf:
        return labels, None
    refined = dense_crf(image, probs.numpy(), CrfParams.deeplab())
    return labels, refined.argmax(axis=0).astype(np.uint8)


def evaluate_predictions(path: Path, opts: RunOptions, split: str) -> list[dict[str, Any]]:
    """mIoU of a ``pred_<split>.h5`` against the dataset's masks, without and with CRF (one row each).

    Scored by ``stages.evaluate.evaluate_artifact`` (the same figures as ``wsss eval``).
    """
    from stages.evaluate import evaluate_artifact

    result = evaluate_artifact(path, opts.dataset, split=split)
    rows = [_row("no CRF", result)]
    if result.get("with_crf"):
        rows.append(_row("CRF", result["with_crf"]))
    return rows


def _row(what: str, figures: dict[str, Any]) -> dict[str, Any]:
    return {"labels": what, "mIoU": figures["miou"], "pixel acc": figures["pixel_accuracy"]}
