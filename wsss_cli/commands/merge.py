"""`wsss merge`: join the artifacts written by `--shard k/n` runs into one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from stages.common.summary import Summary
from wsss_cli.common import ForceOpt, QuietOpt, execute, render


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge(
        shards: Annotated[
            list[Path], typer.Argument(help="The shard files, e.g. runs/toy/pseudo.shard*of4.h5.")
        ],
        out: Annotated[
            Path | None, typer.Option("--out", help="Merged artifact (default: the name without .shardKofN).")
        ] = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Join the n shards of one stage (made with --shard k/n on several machines) into one artifact.

        Refuses shards made with other settings or inputs, a shard missing or given twice, and missing
        or repeated images. The merged file is the one a single process would have written (same
        fingerprint, same records); the shards are kept.
        """
        from stages.common.shards import merge_shards

        def work() -> Summary:
            started = time.perf_counter()
            result = merge_shards(shards, out, force=force)
            return Summary(
                "merge",
                artifacts=[result.out],
                seconds=time.perf_counter() - started,
                images=result.images,
                figures={"shards": result.shards, "fingerprint": result.fingerprint},
            )

        render(execute(work), quiet)
