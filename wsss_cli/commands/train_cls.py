"""`wsss train-cls`: train the CAM classifier -> RUN/cls.h5."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsss_cli.common import (
    AmpOpt,
    DataOpt,
    DeviceOpt,
    ForceOpt,
    QuietOpt,
    RunOpt,
    SeedOpt,
    WorkersOpt,
    run_stage,
)


def register(app: typer.Typer) -> None:
    app.command("train-cls")(train_cls)


def train_cls(
    arch: Annotated[
        str | None,
        typer.Option(help="resnet10/18/34/50/101. Auto: resnet50 (IRN); resnet10 for images under 200 px."),
    ] = None,
    output_stride: Annotated[int | None, typer.Option(help="16 (IRN) or 8.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Auto: 5 (IRN); 12 for images under 200 px.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step over all processes (IRN: 16).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Backbone lr, poly decay 0.9. Auto: 0.1 (IRN)."),
    ] = None,
    head_lr_mult: Annotated[
        float | None,
        typer.Option(
            help="Head (and new layers) lr = lr x this. Auto: 10 with --weights (IRN), 1 from scratch."
        ),
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="SGD weight decay (IRN: 1e-4); momentum is 0.9.")
    ] = None,
    crop_size: Annotated[
        int | None,
        typer.Option(
            help="Training crop. Auto: median long side rounded up to x32 (VOC 512); "
            "small images: the median long side rounded to x32."
        ),
    ] = None,
    resize_long: Annotated[
        tuple[int, int] | None,
        typer.Option(
            help="Random long side LOW HIGH. Auto: 0.64-1.28x the median long side (VOC 320 640); "
            "small images: 0.8-1.1x the median long side."
        ),
    ] = None,
    frozen_bn: Annotated[
        bool | None,
        typer.Option(
            "--frozen-bn/--no-frozen-bn",
            help="Freeze BatchNorm. Auto: frozen iff --weights is given (random BN cannot be frozen).",
        ),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="torchvision-format ImageNet ResNet weights (.pth); segmentation weights are refused."
        ),
    ] = None,
    puzzle: Annotated[
        bool | None,
        typer.Option(
            "--puzzle/--no-puzzle", help="Puzzle-CAM loss (2x2 tiles, alpha 0->4 over the first half)."
        ),
    ] = None,
    puzzle_alpha: Annotated[
        float | None, typer.Option(help="Puzzle-CAM's final reconstruction weight (paper: 4).")
    ] = None,
    fusion_weight: Annotated[
        float | None, typer.Option(help="--complementary: weight of the attention fusion loss (1).")
    ] = None,
    dropout_grid: Annotated[
        int | None, typer.Option(help="--complementary: grid x grid regional dropout cells (4).")
    ] = None,
    hide_and_seek: Annotated[
        bool | None,
        typer.Option(
            "--hide-and-seek/--no-hide-and-seek",
            help="Hide-and-Seek on training crops (grid scaled to the crop; never at test).",
        ),
    ] = None,
    complementary: Annotated[
        bool | None,
        typer.Option(
            "--complementary/--no-complementary",
            help="Complementary image regions network (WACV 2021), multi-label.",
        ),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Training split. Auto: train_aug when present, else train.")
    ] = None,
    val_split: Annotated[
        str | None, typer.Option(help="Split for the per-epoch mAP/F1. Auto: val when present; 'none' skips.")
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
    """Train the CAM classifier (IRN's recipe; defaults scale with the dataset's image size) -> RUN/cls.h5.

    Resumes from the last finished epoch after an interruption. Loader workers: --workers N; with the
    default 0, CUDA runs use all cores and CPU runs load in the main process (the cores are busy
    training).
    """
    from stages.train_cls import TrainClsConfig
    from stages.train_cls import run as run_train_cls

    def flags() -> dict[str, Any]:
        return dict(
            arch=arch,
            output_stride=output_stride,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            head_lr_mult=head_lr_mult,
            weight_decay=weight_decay,
            crop_size=crop_size,
            resize_long=resize_long,
            frozen_bn=frozen_bn,
            weights=weights,
            puzzle=puzzle,
            puzzle_alpha=puzzle_alpha,
            fusion_weight=fusion_weight,
            dropout_grid=dropout_grid,
            hide_and_seek=hide_and_seek,
            complementary=complementary,
            split=split,
            val_split=val_split,
        )

    run_stage(
        run_train_cls,
        TrainClsConfig,
        "train-cls",
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
