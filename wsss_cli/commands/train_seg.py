"""``wsss train-seg`` (train a segmenter on weak labels, predict and score) and ``wsss predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from stages.common.errors import ConfigError
from wsss_cli.common import (
    AmpOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    QuietOpt,
    RunOpt,
    SeedOpt,
    ShardOpt,
    WorkersOpt,
    run_stage,
)

_AUTO = "Default: auto from the image size (VOC recipe / toy recipe)"


def parse_scales(text: str | None) -> tuple[float, ...] | None:
    """``"0.5,1,1.5,2"`` -> (0.5, 1.0, 1.5, 2.0); None stays None (the default)."""
    if text is None:
        return None
    try:
        scales = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"--scales {text}: expected numbers separated by commas, e.g. 0.5,1,1.5,2") from exc
    if not scales or any(s <= 0 for s in scales):
        raise ConfigError(f"--scales {text}: give one or more positive scales, e.g. 0.5,1,1.5,2")
    return scales


def train_seg(
    loss: Annotated[
        str | None,
        typer.Option("--loss", help="ce (cross entropy), psl (AE-PSL) or dsrg (DSRG). Default ce."),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            help="Training labels: pseudo (RUN/pseudo.h5), seeds (RUN/seeds.h5), gt (the masks: the fully "
            "supervised bound, written to seg_gt.h5) or a labels .h5 file. Default: seeds for dsrg, "
            "pseudo for ce and psl.",
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option("--split", help="Training split. Default: train_aug when present, else train."),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            help="deeplabv3_resnet50/101, deeplabv2_resnet50/101/18/10, largefov_resnet50/18/10, deeplabv2_tiny. "
            f"{_AUTO}: deeplabv2_resnet101 / deeplabv2_resnet10.",
        ),
    ] = None,
    output_stride: Annotated[
        int | None, typer.Option("--output-stride", help=f"8 or 16. {_AUTO}: 16 / 16.")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help=f"{_AUTO}: 20 / 40.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help=f"Per process. {_AUTO}: 10 / 8.")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help=f"Backbone learning rate (poly 0.9). {_AUTO}: 2.5e-4 / 0.02.")
    ] = None,
    head_lr_mult: Annotated[
        float | None,
        typer.Option(
            "--head-lr-mult",
            help=f"Head lr = lr × this. {_AUTO}: 10 (DeepLab-v2) / 1 (measured: 10 fails on the toy data); 1 for deeplabv3.",
        ),
    ] = None,
    crop_size: Annotated[int | None, typer.Option("--crop-size", help=f"{_AUTO}: 321 / 96.")] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="torchvision ImageNet ResNet weights (.pth) for the backbone; segmentation-trained weights "
            "are refused. BatchNorm is frozen over them (DeepLab).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Backbone start without --weights: cls (RUN/cls.h5's backbone, same ResNet), scratch, or "
            "auto (cls when cls.h5 has the segmenter's ResNet, else scratch).",
        ),
    ] = None,
    psl_rounds: Annotated[
        int | None,
        typer.Option("--psl-rounds", help="With --loss psl: 2 = PSL++ (retrain on own predictions)."),
    ] = None,
    expand: Annotated[
        bool | None, typer.Option("--expand/--no-expand", help="With --loss dsrg: add SEC's expand loss.")
    ] = None,
    dsrg_stride: Annotated[
        int | None,
        typer.Option(
            "--dsrg-stride", help=f"DSRG's CRF and region growing at 1/stride of a crop. {_AUTO}: 8 / 2."
        ),
    ] = None,
    eval_split: Annotated[
        str | None,
        typer.Option("--eval-split", help="Split to predict and score after training. Default val."),
    ] = None,
    predict: Annotated[
        bool | None,
        typer.Option("--predict/--no-predict", help="Predict --eval-split after training (default on)."),
    ] = None,
    crf: Annotated[
        bool | None,
        typer.Option(
            "--crf/--no-crf", help="Also store DeepLab-CRF labels (labels_crf) and score both (default on)."
        ),
    ] = None,
    scales: Annotated[
        str | None,
        typer.Option("--scales", help=f"Test scales, each with its flip. {_AUTO}: 0.5,1,1.5,2 / 1,1.5."),
    ] = None,
    run: RunOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    seed: SeedOpt = None,
    amp: AmpOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a DeepLab segmenter on weak labels (seg.h5), then predict and score --eval-split (pred_val.h5).

    A killed training resumes from its last epoch; a killed prediction from its last image.
    """
    from stages.train_seg.stage import TrainSegConfig
    from stages.train_seg.stage import run as run_train_seg

    def flags() -> dict[str, Any]:
        return {
            "loss": loss,
            "labels": labels,
            "split": split,
            "arch": arch,
            "output_stride": output_stride,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "head_lr_mult": head_lr_mult,
            "crop_size": crop_size,
            "weights": weights,
            "init": init,
            "psl_rounds": psl_rounds,
            "expand": expand,
            "dsrg_stride": dsrg_stride,
            "eval_split": eval_split,
            "predict": predict,
            "crf": crf,
            "scales": parse_scales(scales),
        }

    run_stage(
        run_train_seg,
        TrainSegConfig,
        "train-seg",
        flags,
        run=run,
        data=data,
        device=device,
        workers=workers,
        seed=seed,
        force=force,
        quiet=quiet,
        amp=amp,
    )


def predict_command(
    model: Annotated[
        Path | None, typer.Option("--model", help="A train-seg model artifact. Default RUN/seg.h5.")
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="Split to predict. Default val.")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output artifact. Default RUN/pred_<split>.h5.")
    ] = None,
    scales: Annotated[
        str | None,
        typer.Option("--scales", help="Test scales, each with its flip. Default 0.5,1,1.5,2 (DeepLab)."),
    ] = None,
    crf: Annotated[
        bool | None, typer.Option("--crf/--no-crf", help="Also store DeepLab-CRF labels (default on).")
    ] = None,
    image_labels: Annotated[
        bool | None,
        typer.Option(
            "--image-labels/--no-image-labels",
            help="Keep only each image's annotated classes (for training images; default off).",
        ),
    ] = None,
    run: RunOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    amp: AmpOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
) -> None:
    """Predict a split with a trained segmenter (pred_<split>.h5, resumable) and score it when masks exist."""
    from stages.train_seg.predict import PredictConfig, predict

    def flags() -> dict[str, Any]:
        return {
            "model": model,
            "split": split,
            "out": out,
            "scales": parse_scales(scales),
            "crf": crf,
            "image_labels": image_labels,
        }

    run_stage(
        predict,
        PredictConfig,
        "predict",
        flags,
        run=run,
        data=data,
        device=device,
        seed=seed,
        force=force,
        quiet=quiet,
        amp=amp,
        shard=shard,
    )


def register(app: typer.Typer) -> None:
    app.command("train-seg")(train_seg)
    app.command("predict")(predict_command)
