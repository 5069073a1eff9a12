"""`wsss eval`: score artifacts against the dataset's masks (stages/evaluate.py does the work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from wsss_cli.common import DataOpt, ForceOpt, QuietOpt, RunOpt, execute, render, run_options, stage_config


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        artifacts: Annotated[
            list[Path] | None,
            typer.Argument(
                help="Scores or labels artifacts (cams.h5, seeds.h5, refined.h5, pseudo.h5, "
                "pred_val.h5, ...), looked up in the run directory too. "
                "Default: every artifact there with ground truth."
            ),
        ] = None,
        split: Annotated[
            str | None,
            typer.Option("--split", help="Ground-truth split to score on (default: each artifact's own)."),
        ] = None,
        max_images: Annotated[
            int | None, typer.Option("--max-images", help="Score only the first N images of each artifact.")
        ] = None,
        bg_threshold: Annotated[
            float | None,
            typer.Option(
                "--bg-threshold",
                help="Background score for maps without a background channel (CAM); default 0.25 (IRN). "
                "The best threshold on ground truth is shown beside it as a diagnostic.",
            ),
        ] = None,
        out: Annotated[
            Path | None, typer.Option("--out", help="Metrics artifact (default RUN/eval.h5).")
        ] = None,
        as_json: Annotated[
            bool,
            typer.Option("--json", help="Print one JSON object {results: [...]} on stdout, nothing else."),
        ] = False,
        run: RunOpt = None,
        data: DataOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Score artifacts against the masks: mIoU, per-class IoU, precision/recall, FP/FN, coverage."""
        from stages.common.context import RunOptions
        from stages.evaluate import EvalConfig, EvalSummary
        from stages.evaluate import run as run_eval

        flags = {
            "artifacts": tuple(artifacts) if artifacts else None,
            "split": split,
            "max_images": max_images,
            "bg_threshold": bg_threshold,
            "out": out,
        }

        def work() -> tuple[RunOptions, EvalSummary]:
            opts = run_options(run=run, data=data, force=force, quiet=quiet or as_json)
            return opts, run_eval(opts, stage_config(EvalConfig, "eval", flags))

        opts, summary = execute(work)
        if as_json:
            typer.echo(json.dumps({"results": summary.results, "skipped": summary.skipped}, default=str))
        else:
            render(summary, opts.quiet)
