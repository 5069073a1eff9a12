"""One module per stage command; each exposes ``register(app)``."""

from __future__ import annotations

import typer

from wsss_cli.commands import crf, evaluate, merge, mine_ae, pipeline, refine, show, train_cls, train_seg


def register_all(app: typer.Typer) -> None:
    """Add every stage command to the app, in pipeline order (the order `wsss --help` lists them)."""
    modules: tuple = (train_cls, mine_ae, refine, crf, train_seg, evaluate, merge, pipeline, show)
    for module in modules:
        module.register(app)
