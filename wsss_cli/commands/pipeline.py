"""`wsss run`, `wsss demo` and `wsss report`: the pipeline as one experience."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages import pipeline
from stages import report as report_stage
from stages.common.summary import Summary
from wsss_cli.common import (
    DataOpt,
    DeviceOpt,
    ForceOpt,
    QuietOpt,
    RunOpt,
    SeedOpt,
    WorkersOpt,
    console,
    execute,
    render,
    run_options,
    run_stage,
    stage_config,
)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_command(
        start: Annotated[str | None, typer.Option("--from", help="First stage (default train-cls).")] = None,
        stop: Annotated[str | None, typer.Option("--to", help="Last stage (default eval).")] = None,
        run: RunOpt = None,
        data: DataOpt = None,
        device: DeviceOpt = None,
        workers: WorkersOpt = None,
        seed: SeedOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Run train-cls, mine-ae, refine, crf, train-seg and eval with wsss.toml's options.

        Complete, up-to-date artifacts are skipped, partial ones resumed; a stage whose options or inputs
        changed is recomputed with everything after it, and the reason is printed first.
        """

        def work() -> None:
            opts = run_options(
                run=run, data=data, device=device, workers=workers, seed=seed, force=force, quiet=quiet
            )
            configs = {s.name: stage_config(s.config, s.name, {}) for s in pipeline.pipeline_stages()}
            pipeline.run_pipeline(
                opts,
                configs,
                start=start,
                stop=stop,
                on_summary=lambda summary: render(summary, opts.quiet),
                on_note=lambda note: console.print(f"[yellow]{note}[/yellow]", highlight=False),
            )

        execute(work)

    @app.command("demo")
    def demo_command(
        train: Annotated[
            int | None, typer.Option("--train", help="Toy training images (default 200).")
        ] = None,
        val: Annotated[int | None, typer.Option("--val", help="Toy validation images (default 60).")] = None,
        rounds: Annotated[
            int | None, typer.Option("--rounds", help="Adversarial erasing rounds (3).")
        ] = None,
        refine: Annotated[
            str | None, typer.Option("--refine", help="Refinement: rs, pamr, scg or rw.")
        ] = None,
        supervised: Annotated[
            bool | None, typer.Option("--supervised/--no-supervised", help="Also train the supervised bound.")
        ] = None,
        quick: Annotated[bool, typer.Option("--quick", help="One epoch everywhere (a smoke run).")] = False,
        run: RunOpt = None,
        device: DeviceOpt = None,
        workers: WorkersOpt = None,
        seed: SeedOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Make the toy dataset and run the whole pipeline on it (CPU, a few minutes), ending with one table."""

        def work() -> Summary:
            opts = run_options(
                run=run or Path("runs/demo"),
                data="toy",
                device=device,
                workers=workers,
                seed=seed,
                force=force,
                quiet=quiet,
            )
            flags = {"train": train, "val": val, "rounds": rounds, "refine": refine, "supervised": supervised}
            cfg = stage_config(pipeline.DemoConfig, "demo", {**flags, "quick": quick or None})
            return pipeline.run_demo(
                opts,
                cfg,
                on_summary=lambda s: render(s, opts.quiet),
                on_note=lambda note: console.print(f"[yellow]{note}[/yellow]", highlight=False),
            )

        render(execute(work), quiet=False)

    @app.command("report")
    def report_command(
        out: Annotated[
            Path | None, typer.Option("--out", help="HTML file (default RUN/report.html).")
        ] = None,
        images: Annotated[int | None, typer.Option("--images", help="Images per sample sheet (4).")] = None,
        run: RunOpt = None,
        data: DataOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Write report.html: per-stage mIoU chart, per-class IoU, AE rounds, provenance and sample sheets."""
        run_stage(
            report_stage.run,
            report_stage.ReportConfig,
            "report",
            lambda: {"out": out, "images": images},
            run=run,
            data=data,
            quiet=quiet,
        )
