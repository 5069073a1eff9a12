"""`wsss demo` end to end on a tiny toy set: the table it promises and the files it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.errors import ConfigError
from stages.pipeline import STAGE_NAMES, pipeline_stages, select


def test_stage_selection() -> None:
    stages = pipeline_stages()
    assert [s.name for s in stages] == list(STAGE_NAMES)
    assert [s.name for s in select(stages, "refine", "crf")] == ["refine", "crf"]
    with pytest.raises(ConfigError, match="unknown stage 'cams'"):
        select(stages, "cams", None)
    with pytest.raises(ConfigError, match="--from eval comes after --to crf"):
        select(stages, "eval", "crf")


TINY_DEMO = ("--quick", "--train", "10", "--val", "4", "--rounds", "2")


def wsss(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a child process, one torch thread, wide output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "wsss_cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=cwd,
    )


@pytest.mark.slow
def test_demo_runs_everything_and_reports(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"
    done = wsss(tmp_path, "demo", *TINY_DEMO, "--run", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    # The one table: every stage's mIoU, the supervised bound, the ratio, and time per stage.
    for row in (
        "CAM (train)",
        "AE seeds (train)",
        "refined (train)",
        "pseudo labels (train)",
        "segmenter (val)",
        "supervised bound (val)",
        "weak/supervised",
        "time per stage",
    ):
        assert row in out, row
    for name in (
        "cls.h5",
        "cams.h5",
        "seeds.h5",
        "refined.h5",
        "pseudo.h5",
        "seg.h5",
        "pred_val.h5",
        "seg_gt.h5",
        "pred_val_gt.h5",
        "report.html",
        "show/sheet_train.png",
        "show/sheet_val.png",
    ):
        assert (run_dir / name).exists(), name
    assert not list(run_dir.glob("*.partial"))
    html = (run_dir / "report.html").read_text()
    assert "mIoU per stage" in html and "Adversarial erasing rounds" in html and "Provenance" in html
    # A second demo finds everything up to date and recomputes nothing.
    again = wsss(tmp_path, "demo", *TINY_DEMO, "--run", str(run_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("up to date") >= 5
    # eval --json over the run directory is one parseable object with the promised keys.
    evaluated = wsss(
        tmp_path, "eval", "--json", "--run", str(run_dir), "--data", f"toy:{run_dir / 'toy_data'}"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads(evaluated.stdout)["results"]
    assert {"miou", "per_class_iou", "precision", "recall", "fp", "fn", "images"} <= set(results[0])
