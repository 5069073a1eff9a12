"""`wsss show`: PNG sheets of what each stage did."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages import show
from wsss_cli.common import DataOpt, QuietOpt, RunOpt, run_stage


def register(app: typer.Typer) -> None:
    @app.command("show")
    def show_command(
        artifacts: Annotated[
            list[Path] | None,
            typer.Argument(help="Artifacts to show (default: all the pipeline's in --run)."),
        ] = None,
        images: Annotated[int | None, typer.Option("--images", help="Images per sheet (default 6).")] = None,
        out: Annotated[
            Path | None, typer.Option("--out", help="Folder for the sheets (default RUN/show).")
        ] = None,
        run: RunOpt = None,
        data: DataOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Write PNG sheets: image | ground truth | CAM | seeds | refined | pseudo | prediction."""
        run_stage(
            show.run,
            show.ShowConfig,
            "show",
            lambda: {"artifacts": tuple(artifacts or ()) or None, "images": images, "out": out},
            run=run,
            data=data,
            quiet=quiet,
        )
