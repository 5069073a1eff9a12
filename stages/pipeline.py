"""The whole pipeline, read top to bottom: `wsss run` and `wsss demo`.

    train-cls -> mine-ae -> refine -> crf -> train-seg -> eval

Each stage skips an artifact that is complete and up to date, resumes a partial one, and, when an
option or an input changed, says what differs and recomputes it and then everything after it (their
inputs' fingerprints change in turn).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.context import RunOptions
from stages.common.errors import ConfigError, StaleArtifact
from stages.common.summary import Summary


@dataclass(frozen=True)
class Stage:
    """One pipeline step: its command name (= its wsss.toml table), config type and entry function."""

    name: str
    config: type
    run: Callable[[RunOptions, Any], Summary]


def pipeline_stages() -> list[Stage]:
    """The stages of `wsss run`, in order."""
    from stages import crf, evaluate, train_cls
    from stages.mine_ae import stage as mine_ae
    from stages.refine import stage as refine
    from stages.train_seg import stage as train_seg

    return [
        Stage("train-cls", train_cls.TrainClsConfig, train_cls.run),
        Stage("mine-ae", mine_ae.MineAeConfig, mine_ae.run),
        Stage("refine", refine.RefineConfig, refine.run),
        Stage("crf", crf.CrfConfig, crf.run),
        Stage("train-seg", train_seg.TrainSegConfig, train_seg.run),
        Stage("eval", evaluate.EvalConfig, evaluate.run),
    ]


STAGE_NAMES = ("train-cls", "mine-ae", "refine", "crf", "train-seg", "eval")


def select(stages: list[Stage], start: str | None, stop: str | None) -> list[Stage]:
    names = [s.name for s in stages]
    for given in (start, stop):
        if given is not None and given not in names:
            raise ConfigError(f"unknown stage {given!r}; stages are {', '.join(names)}")
    first = names.index(start) if start else 0
    last = names.index(stop) if stop else len(names) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    return stages[first : last + 1]


def run_pipeline(
    opts: RunOptions,
    configs: dict[str, Any],
    *,
    start: str | None = None,
    stop: str | None = None,
    on_summary: Callable[[Summary], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[Summary]:
    """Run the stages from ``start`` to ``stop`` with their configs (missing ones take defaults)."""
    summaries: list[Summary] = []
    for stage in select(pipeline_stages(), start, stop):
        cfg = configs.get(stage.name) or stage.config()
        try:
            summary = stage.run(opts, cfg)
        except StaleArtifact as exc:
            if on_note is not None:
                on_note(f"{stage.name}: {exc} -> recomputing {stage.name} and the stages after it")
            summary = stage.run(dataclasses.replace(opts, force=True), cfg)
        summaries.append(summary)
        if on_summary is not None:
            on_summary(summary)
    return summaries


# ---------------------------------------------------------------------------------------------------------
# wsss demo


@dataclass
class DemoConfig:
    """Options of `wsss demo`: the toy dataset's size and how thorough the run is."""

    train: int = 200
    val: int = 60
    rounds: int = 3  # adversarial erasing rounds (AE-PSL's best)
    refine: str = "rs"  # refinement method
    supervised: bool = True  # also train the fully supervised bound on ground-truth masks
    quick: bool = False  # one epoch everywhere, single-scale CAM: for tests and smoke runs


def demo_configs(cfg: DemoConfig) -> dict[str, Any]:
    """Per-stage configs of the demo: the toy-scaled defaults, or the quickest settings that still run."""
    from stages import crf, evaluate, train_cls
    from stages.mine_ae import stage as mine_ae
    from stages.refine import stage as refine
    from stages.train_seg import stage as train_seg

    if not cfg.quick:
        return {
            "mine-ae": mine_ae.MineAeConfig(rounds=cfg.rounds),
            "refine": refine.RefineConfig(method=cfg.refine),
            # AE-PSL's segmenter on the refined pseudo labels: val 51.0 on the toy data, against 48.6 for ce.
            "train-seg": train_seg.TrainSegConfig(loss="psl"),
        }
    return {
        "train-cls": train_cls.TrainClsConfig(epochs=1, batch_size=4),
        "mine-ae": mine_ae.MineAeConfig(rounds=cfg.rounds, scales=(1.0,), stop_f1=0.0),
        "refine": refine.RefineConfig(method=cfg.refine, aff_epochs=1),
        "crf": crf.CrfConfig(),
        "train-seg": train_seg.TrainSegConfig(loss="psl", epochs=1, batch_size=4),
        "eval": evaluate.EvalConfig(),
    }


DEMO_ROWS: tuple[tuple[str, str], ...] = (
    ("cams.h5", "CAM (train)"),
    ("seeds.h5", "AE seeds (train)"),
    ("refined.h5", "refined (train)"),
    ("pseudo.h5", "pseudo labels (train)"),
    ("pred_val.h5", "segmenter (val)"),
    ("pred_val_gt.h5", "supervised bound (val)"),
)


def run_demo(
    opts: RunOptions,
    cfg: DemoConfig,
    *,
    on_summary: Callable[[Summary], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Summary:
    """Make the toy dataset, run every stage and the supervised bound, and return one table."""
    from stages.common.datasets.toy import ensure_toy
    from stages.evaluate import evaluate_artifact
    from stages.report import ReportConfig
    from stages.report import run as write_report
    from stages.train_seg import stage as train_seg

    started = time.perf_counter()
    # Another size or an older generator remakes the folder; the artifacts made from it turn stale.
    toy_dir = ensure_toy(opts.run_dir, seed=opts.seed, n_train=cfg.train, n_val=cfg.val)
    opts = dataclasses.replace(opts, data=f"toy:{toy_dir}")
    configs = demo_configs(cfg)
    summaries = run_pipeline(opts, configs, stop="train-seg", on_summary=on_summary, on_note=on_note)
    if cfg.supervised:
        base = configs.get("train-seg") or train_seg.TrainSegConfig()
        # The same network and schedule on the masks, with plain cross entropy: PSL's class filter is
        # for labels that can be wrong about which classes an image holds.
        bound = train_seg.run(opts, dataclasses.replace(base, labels="gt", loss="ce", psl_rounds=1))
        summaries.append(bound)
        if on_summary is not None:
            on_summary(bound)
    time_rows = [{"stage": s.stage, "status": s.status, "seconds": round(s.seconds, 1)} for s in summaries]
    if cfg.supervised:
        time_rows[-1]["stage"] = "train-seg --labels gt (bound)"
    dataset = opts.dataset
    rows: list[dict[str, Any]] = []
    mious: dict[str, float] = {}
    for name, title in DEMO_ROWS:
        path = opts.path(name)
        if not path.exists():
            continue
        result = evaluate_artifact(path, dataset)
        mious[name] = float(result["miou"])
        rows.append(
            {
                "stage": title,
                "mIoU": result["miou"],
                "precision": result.get("precision"),
                "recall": result.get("recall"),
                "images": result.get("images"),
            }
        )
    figures: dict[str, Any] = {}
    if "pred_val.h5" in mious and mious.get("pred_val_gt.h5"):
        figures["weak/supervised"] = mious["pred_val.h5"] / mious["pred_val_gt.h5"]
    report = write_report(opts, ReportConfig())
    total = time.perf_counter() - started
    figures["total seconds"] = total
    return Summary(
        "demo",
        artifacts=[*report.artifacts, Path(opts.run_dir)],
        seconds=total,
        figures=figures,
        tables={"mIoU per stage (percent)": rows, "time per stage": time_rows},
    )
