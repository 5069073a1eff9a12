"""`wsss crf`: refined probabilities -> pseudo labels at full image size (dense CRF, process pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsss_cli.common import (
    DataOpt,
    ForceOpt,
    QuietOpt,
    RunOpt,
    SeedOpt,
    ShardOpt,
    WorkersOpt,
    run_stage,
)

HELP = """Dense CRF on refined probabilities -> pseudo labels (pseudo.h5): 0 background, classes, 255 unsure.

Defaults are PSA's kernels (Gaussian sxy 3 compat 3; bilateral sxy 80, srgb 13, compat 10; 10
iterations); DeepLab's set for segmenter outputs is --gaussian-sxy 1 --bilateral-sxy 67 --bilateral-srgb 3
--bilateral-compat 4. Images run in a pool of --workers processes (default all cores); any worker count
gives the same artifact.
"""
HELP = "\n\n".join(" ".join(p.split()) for p in HELP.split("\n\n"))


def register(app: typer.Typer) -> None:
    @app.command("crf", help=HELP)
    def crf(
        scores: Annotated[
            Path | None, typer.Option("--scores", help="Scores with a background channel (RUN/refined.h5).")
        ] = None,
        out: Annotated[
            Path | None, typer.Option("--out", help="Output artifact (default RUN/pseudo.h5).")
        ] = None,
        split: Annotated[
            str | None, typer.Option("--split", help="Split (default: the training split).")
        ] = None,
        gaussian_sxy: Annotated[
            float | None,
            typer.Option(
                "--gaussian-sxy",
                help="Smoothness kernel width (PSA: 3 px on ~500 px images; auto: scaled to the median long side).",
            ),
        ] = None,
        gaussian_compat: Annotated[
            float | None, typer.Option("--gaussian-compat", help="Its weight (3).")
        ] = None,
        bilateral_sxy: Annotated[
            float | None,
            typer.Option(
                "--bilateral-sxy",
                help="Appearance kernel width (PSA: 80 px on ~500 px images; auto: scaled to the median long side).",
            ),
        ] = None,
        bilateral_srgb: Annotated[
            float | None, typer.Option("--bilateral-srgb", help="Its colour width (13).")
        ] = None,
        bilateral_compat: Annotated[
            float | None, typer.Option("--bilateral-compat", help="Its weight (10).")
        ] = None,
        iterations: Annotated[
            int | None, typer.Option("--iterations", help="Mean-field iterations (10).")
        ] = None,
        min_conf: Annotated[
            float | None,
            typer.Option("--min-conf", help="Mark pixels whose CRF confidence is below this 255."),
        ] = None,
        run: RunOpt = None,
        data: DataOpt = None,
        workers: WorkersOpt = None,
        seed: SeedOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
        shard: ShardOpt = None,
    ) -> None:
        from stages.crf import CrfConfig
        from stages.crf import run as run_crf

        def flags() -> dict[str, Any]:
            return dict(
                scores=scores,
                out=out,
                split=split,
                gaussian_sxy=gaussian_sxy,
                gaussian_compat=gaussian_compat,
                bilateral_sxy=bilateral_sxy,
                bilateral_srgb=bilateral_srgb,
                bilateral_compat=bilateral_compat,
                iterations=iterations,
                min_conf=min_conf,
            )

        run_stage(
            run_crf,
            CrfConfig,
            "crf",
            flags,
            run=run,
            data=data,
            workers=workers,
            seed=seed,
            force=force,
            quiet=quiet,
            shard=shard,
        )
