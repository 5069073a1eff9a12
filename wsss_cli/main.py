"""The `wsss` Typer app: one subcommand per stage, plus init, info and make-toy."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from stages import __version__
from stages.common.errors import ConfigError
from wsss_cli import common
from wsss_cli.commands import register_all
from wsss_cli.common import (
    GLOBALS,
    DataOpt,
    DeviceOpt,
    QuietOpt,
    RunOpt,
    SeedOpt,
    console,
    execute,
)
from wsss_cli.config import CONFIG_NAME, dump_toml

app = typer.Typer(
    name="wsss",
    help="Weakly-supervised semantic segmentation from image-level labels, one resumable stage at a time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


@app.callback()
def global_options(
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    quiet: QuietOpt = False,
    data: DataOpt = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """Options given before the command apply to it unless the command's own flags say otherwise."""
    if version:
        console.print(f"wsss {__version__}")
        raise typer.Exit()
    GLOBALS.update(device=device, seed=seed, quiet=quiet, data=data, debug=debug)


@app.command("init")
def init(
    data: Annotated[
        str, typer.Option("--data", help="Dataset spec: voc:PATH, coco:PATH, folder:PATH or toy.")
    ],
    run: RunOpt = None,
    force: Annotated[bool, typer.Option("--force", help=f"Overwrite an existing {CONFIG_NAME}.")] = False,
) -> None:
    """Write wsss.toml for a dataset and report the splits and classes found."""

    def work() -> None:
        from stages.common.datasets import open_dataset

        config_path = Path(CONFIG_NAME)
        if config_path.exists() and not force:
            raise ConfigError(f"{config_path}: already exists; pass --force to replace it")
        run_dir = run or Path("runs") / (data.split(":", 1)[0] if ":" in data else data)
        dataset = open_dataset(data, cache_dir=run_dir)
        rows = []
        for split in dataset.split_names():
            ids = dataset.ids(split)
            rows.append(
                {"split": split, "images": len(ids), "masks": "yes" if dataset.has_masks(split) else "no"}
            )
        config_path.write_text(
            dump_toml({"data": {"spec": data}, "run": {"dir": str(run_dir), "device": "auto", "seed": 0}})
        )
        console.print(
            f"[bold]{dataset.name}[/bold] at {dataset.root}: {len(dataset.class_names) - 1} classes"
        )
        console.print("  " + ", ".join(dataset.class_names[1:]), highlight=False)
        console.print(common.render_table("splits", rows))
        console.print(f"wrote {config_path} (run directory {run_dir})")

    execute(work)


@app.command("make-toy")
def make_toy(
    out: Annotated[Path, typer.Argument(help="Folder to write the toy dataset into (VOC layout).")],
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    train: Annotated[int, typer.Option(help="Training images.")] = 200,
    val: Annotated[int, typer.Option(help="Validation images.")] = 60,
    min_size: Annotated[int, typer.Option(help="Smallest image side.")] = 64,
    max_size: Annotated[int, typer.Option(help="Largest image side.")] = 128,
) -> None:
    """Write the built-in toy dataset (VOC layout, read with --data voc:OUT)."""

    def work() -> None:
        from stages.common.datasets.toy import make_toy as generate

        root = generate(out, seed=seed, n_train=train, n_val=val, min_size=min_size, max_size=max_size)
        console.print(
            f"wrote {train} train + {val} val toy images to {root} (read it with --data voc:{root})"
        )

    execute(work)


@app.command("info")
def info(path: Annotated[Path, typer.Argument(help="An artifact (.h5 or .h5.partial).")]) -> None:
    """Print an artifact's kind, provenance, images, size and whether it is complete."""

    def work() -> None:
        import json

        from stages.common.artifacts import FORMAT_VERSION, describe_file

        found = describe_file(path)
        provenance = found["provenance"]
        state = "[green]complete[/green]" if found["complete"] else "[yellow]incomplete[/yellow]"
        console.print(
            f"[bold]{path}[/bold]: {provenance.kind} from {provenance.stage}, {state}, {found['size_mb']:.2f} MB"
        )
        if not found["format_ok"]:
            console.print(
                f"  [red]format {found['format']}: this wsss reads format {FORMAT_VERSION}; "
                "rerun its stage with --force[/red]"
            )
        ds = provenance.dataset
        console.print(
            f"  dataset {ds.get('name')}:{ds.get('split')} at {ds.get('root')} "
            f"({ds.get('num_images')} images, fingerprint {ds.get('fingerprint')})",
            highlight=False,
        )
        console.print(f"  fingerprint {provenance.fingerprint}; images recorded: {found['images']}")
        if found["arch"]:
            console.print(f"  arch {json.dumps(found['arch'])}", highlight=False)
        console.print(f"  config {json.dumps(provenance.config, sort_keys=True)}", highlight=False)
        for role, ref in provenance.inputs.items():
            console.print(f"  input {role}: {ref.get('path')} ({ref.get('fingerprint')})", highlight=False)
        if found["records"]:
            console.print(f"  records: {', '.join(found['records'])}")

    execute(work)


register_all(app)


def main() -> None:
    """Console entry point; `--debug` anywhere on the line keeps tracebacks."""
    if "--debug" in sys.argv:
        GLOBALS["debug"] = True
    app()


if __name__ == "__main__":
    main()
