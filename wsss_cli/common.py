"""What every command shares: the common options, their resolution, rendering and one-line errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from stages.common.context import RunOptions
from stages.common.errors import ConfigError, WsssError
from stages.common.summary import Summary
from wsss_cli.config import CONFIG_NAME, load_toml, merge_options

T = TypeVar("T")
# Piped output (logs, CI) is not cut to 80 columns: the per-round and per-class tables are wide.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

# Common options, declared once and used by every stage command.
RunOpt = Annotated[Path | None, typer.Option("--run", help="Run directory holding the artifacts.")]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="Dataset spec: voc:PATH, coco:PATH, folder:PATH or toy.")
]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Worker processes (0 = all cores).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (CPU runs repeat bit for bit).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even when an artifact is up to date.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries.")]
AmpOpt = Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (default on).")]
ShardOpt = Annotated[
    str | None, typer.Option("--shard", help="k/n: process only the k-th of n slices of the images.")
]

# Global defaults set by `wsss --device ... COMMAND` (the callback), below per-command flags.
GLOBALS: dict[str, Any] = {}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise ConfigError(f"--shard {text}: expected k/n, e.g. 0/4") from exc
    if n < 1 or not 0 <= k < n:
        raise ConfigError(f"--shard {text}: k must be in 0..n-1")
    return (k, n)


def run_options(
    run: Path | None = None,
    data: str | None = None,
    device: str | None = None,
    workers: int | None = None,
    seed: int | None = None,
    force: bool = False,
    quiet: bool = False,
    amp: bool | None = None,
    shard: str | None = None,
) -> RunOptions:
    """Flags > global flags > ``wsss.toml`` > the built-in toy dataset in ``runs/toy``."""
    toml = load_toml() or {}
    run_table = toml.get("run", {})
    data_table = toml.get("data", {})

    def pick(flag: Any, name: str, table: dict[str, Any], default: Any) -> Any:
        if flag is not None:
            return flag
        if GLOBALS.get(name) is not None:
            return GLOBALS[name]
        return table.get(name, default)

    quiet = quiet or bool(GLOBALS.get("quiet"))
    if not toml and data is None and GLOBALS.get("data") is None and not quiet:
        err_console.print(f"[dim]no {CONFIG_NAME} here: using the built-in toy dataset in runs/toy[/dim]")
    return RunOptions(
        run_dir=Path(pick(run, "dir", run_table, "runs/toy")),
        data=str(pick(data, "spec", data_table, "toy")),
        device=str(pick(device, "device", run_table, "auto")),
        workers=int(pick(workers, "workers", run_table, 0)),
        seed=int(pick(seed, "seed", run_table, 0)),
        force=force,
        quiet=quiet,
        amp=bool(pick(amp, "amp", run_table, True)),
        shard=parse_shard(shard),
    )


def stage_config(config_cls: type[T], section: str, flags: dict[str, Any]) -> T:
    """A stage's typed config from its ``wsss.toml`` table and the flags given."""
    toml = load_toml() or {}
    try:
        return merge_options(config_cls, toml.get(section), flags)
    except TypeError as exc:
        raise ConfigError(f"{CONFIG_NAME} [{section}]: {exc}") from exc


def execute(work: Callable[[], T]) -> T:
    """Run a stage, turning the tool's own errors into one red line and exit code 2."""
    try:
        return work()
    except WsssError as exc:
        if os.environ.get("WSSS_DEBUG") or GLOBALS.get("debug"):
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted: rerun the same command to resume[/yellow]")
        raise typer.Exit(code=130) from None


def run_stage(
    stage: Callable[[RunOptions, Any], Summary],
    config_cls: type,
    section: str,
    flags: Callable[[], dict[str, Any]],
    **options: Any,
) -> Summary:
    """The body of every stage command: resolve the common options and the stage's config, run it, render.

    ``flags`` is called, and everything else happens, inside `execute`, so a bad ``--scales``, ``--shard``
    or ``wsss.toml`` is one line and exit 2 like any other error of the tool. ``options`` are
    `run_options`' keyword arguments.
    """

    def work() -> tuple[RunOptions, Summary]:
        opts = run_options(**options)
        return opts, stage(opts, stage_config(config_cls, section, flags()))

    opts, summary = execute(work)
    render(summary, opts.quiet)
    return summary


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def render_table(title: str, rows: list[dict[str, Any]]) -> Table:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(
            column, justify="left" if column in {"class", "stage", "artifact", "name"} else "right"
        )
    for row in rows:
        table.add_row(*(_format(row.get(c, "")) for c in columns))
    return table


def render(summary: Summary, quiet: bool = False) -> None:
    """A one-screen summary: status, time, throughput, figures, tables and notes."""
    if quiet:
        return
    rate = f", {summary.images_per_second:.1f} images/s" if summary.images_per_second else ""
    artifacts = ", ".join(str(p) for p in summary.artifacts)
    console.print(
        f"[bold green]{summary.stage}[/bold green] {summary.status}: {artifacts} "
        f"({summary.seconds:.1f} s{rate})",
        highlight=False,
    )
    for note in summary.notes:
        console.print(f"  [dim]{note}[/dim]", highlight=False)
    if summary.figures:
        console.print("  " + "   ".join(f"{k} [bold]{_format(v)}[/bold]" for k, v in summary.figures.items()))
    for title, rows in summary.tables.items():
        if rows:
            console.print(render_table(title, rows))


def is_terminal() -> bool:
    return sys.stdout.isatty()
