"""`wsss refine`: CAMs -> probabilities with a background channel (PAMR, SCG, RS, random walk)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsss_cli.common import (
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

HELP = """Refine class activation maps into probabilities with a background channel (refined.h5).

Methods: [bold]rs[/bold] (default) = SCG then PAMR, the refinement RecurSeed (Jo et al.) applies; RecurSeed's
joint classifier/decoder training that recurses SCG->PAMR every epoch was never published and is NOT
reproduced here. [bold]pamr[/bold] = PAMR (Araslanov & Roth 2020) on the CAMs plus a background channel.
[bold]scg[/bold] = self-correlation maps (Pan et al. 2021) from the classifier's last two stages at stride 16.
[bold]rw[/bold] = AffinityNet/IRN random walk: trains an affinity head on confident CAM labels (aff.h5,
resumable) on the frozen classifier, then walks 256 sparse steps.

Defaults scale with the dataset: on small images (median longer side < 256 px, the toy data) --scg-scale
is 2, and the affinity head uses stride 4, 64-d, 64 px crops, 3 epochs; on VOC-size images the
papers' values (scale 1; PSA: stride 8, 448-d, 448 px crops, 8 epochs). Resolved values are stored in
the artifact.
"""
HELP = "\n\n".join(" ".join(p.split()) for p in HELP.split("\n\n"))


def register(app: typer.Typer) -> None:
    @app.command("refine", help=HELP)
    def refine(
        method: Annotated[
            str | None, typer.Option("--method", help="rs, pamr, scg or rw (default rs).")
        ] = None,
        cams: Annotated[
            Path | None, typer.Option("--cams", help="Class score maps (default RUN/cams.h5).")
        ] = None,
        classifier: Annotated[
            Path | None, typer.Option("--classifier", help="Classifier for scg/rs/rw (default RUN/cls.h5).")
        ] = None,
        affinity: Annotated[
            Path | None,
            typer.Option("--affinity", help="Affinity head for rw, trained if missing (RUN/aff.h5)."),
        ] = None,
        out: Annotated[
            Path | None, typer.Option("--out", help="Output artifact (default RUN/refined.h5).")
        ] = None,
        split: Annotated[
            str | None, typer.Option("--split", help="Split (default: the training split).")
        ] = None,
        bg: Annotated[
            float | None,
            typer.Option("--bg", help="Constant background score for pamr/rw (default 0.25, IRN)."),
        ] = None,
        bg_power: Annotated[
            float | None,
            typer.Option("--bg-power", help="pamr: background = (1 - max CAM)^POWER (PSA's alpha)."),
        ] = None,
        pamr_stride: Annotated[
            int | None,
            typer.Option("--pamr-stride", help="Grid PAMR runs and stores at (default: the CAMs', 4)."),
        ] = None,
        pamr_iterations: Annotated[
            int | None, typer.Option("--pamr-iterations", help="PAMR steps (10).")
        ] = None,
        pamr_dilations: Annotated[
            str | None, typer.Option("--pamr-dilations", help="Comma-separated dilations (1,2,4,8,12,24).")
        ] = None,
        scg_fg: Annotated[
            float | None, typer.Option("--scg-fg", help="SCG foreground seeds: CAM >= (0.30).")
        ] = None,
        scg_bg: Annotated[
            float | None, typer.Option("--scg-bg", help="SCG background seeds: CAM <= (0.05).")
        ] = None,
        scg_scale: Annotated[
            float | None,
            typer.Option("--scg-scale", help="Image scale for SCG features (auto: 1 VOC, 2 toy)."),
        ] = None,
        walk_radius: Annotated[
            int | None, typer.Option("--walk-radius", help="rw: pair radius (5, IRN).")
        ] = None,
        walk_beta: Annotated[
            float | None, typer.Option("--walk-beta", help="rw: A^beta (10 IRN, 8 PSA).")
        ] = None,
        walk_steps: Annotated[
            int | None,
            typer.Option("--walk-steps", help="rw: sparse products (IRN: 256; 16 on small images)."),
        ] = None,
        conf_fg: Annotated[
            float | None, typer.Option("--conf-fg", help="rw: confident fg, CAM >= (0.30).")
        ] = None,
        conf_bg: Annotated[
            float | None, typer.Option("--conf-bg", help="rw: confident bg, CAMs <= (0.05).")
        ] = None,
        aff_stride: Annotated[
            int | None, typer.Option("--aff-stride", help="rw: affinity grid, 4 or 8 (auto).")
        ] = None,
        aff_embed_dim: Annotated[
            int | None, typer.Option("--aff-embed-dim", help="rw: embedding (auto).")
        ] = None,
        aff_epochs: Annotated[
            int | None, typer.Option("--aff-epochs", help="rw: training epochs (auto).")
        ] = None,
        aff_batch_size: Annotated[int | None, typer.Option("--aff-batch-size", help="rw: batch (8).")] = None,
        aff_crop: Annotated[
            int | None, typer.Option("--aff-crop", help="rw: crop side, multiple of 16 (auto).")
        ] = None,
        aff_lr: Annotated[float | None, typer.Option("--aff-lr", help="rw: SGD learning rate (0.1).")] = None,
        run: RunOpt = None,
        data: DataOpt = None,
        device: DeviceOpt = None,
        workers: WorkersOpt = None,
        seed: SeedOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
        shard: ShardOpt = None,
    ) -> None:
        from stages.refine.stage import RefineConfig
        from stages.refine.stage import run as run_refine

        def flags() -> dict[str, Any]:
            dilations = _int_tuple(pamr_dilations, "--pamr-dilations")
            return dict(
                method=method,
                cams=cams,
                classifier=classifier,
                affinity=affinity,
                out=out,
                split=split,
                bg=bg,
                bg_power=bg_power,
                pamr_stride=pamr_stride,
                pamr_iterations=pamr_iterations,
                pamr_dilations=dilations,
                scg_fg=scg_fg,
                scg_bg=scg_bg,
                scg_scale=scg_scale,
                walk_radius=walk_radius,
                walk_beta=walk_beta,
                walk_steps=walk_steps,
                conf_fg=conf_fg,
                conf_bg=conf_bg,
                aff_stride=aff_stride,
                aff_embed_dim=aff_embed_dim,
                aff_epochs=aff_epochs,
                aff_batch_size=aff_batch_size,
                aff_crop=aff_crop,
                aff_lr=aff_lr,
            )

        run_stage(
            run_refine,
            RefineConfig,
            "refine",
            flags,
            run=run,
            data=data,
            device=device,
            workers=workers,
            seed=seed,
            force=force,
            quiet=quiet,
            shard=shard,
        )


def _int_tuple(text: str | None, flag: str) -> tuple[int, ...] | None:
    from stages.common.errors import ConfigError

    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{flag} {text}: expected comma-separated integers, e.g. 1,2,4,8,12,24") from exc
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{flag} {text}: give at least one positive integer")
    return values
