"""`wsss crf --shard 0/2`, `--shard 1/2` and `wsss merge` give the artifact one process writes."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stages.common.artifacts import open_artifact
from stages.common.context import RunOptions
from stages.crf import CrfConfig, run
from wsss_cli.main import app

pytestmark = pytest.mark.slow

_HELPER = Path(__file__).resolve().parents[1] / "crf" / "test_crf_stage.py"


def _synthetic_refined(opts: RunOptions, path: Path) -> Path:
    """tests/crf's random refined.h5 (loaded by path: test modules are not a package here)."""
    spec = importlib.util.spec_from_file_location("crf_stage_tests", _HELPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_refined(opts, path)


def test_two_shards_merged_equal_one_process(toy_root: Path, tmp_path: Path) -> None:
    opts = RunOptions(run_dir=tmp_path, data=f"toy:{toy_root}", quiet=True, workers=1)
    _synthetic_refined(opts, opts.path("refined.h5"))
    single = run(opts, CrfConfig(out=tmp_path / "single.h5")).artifacts[0]
    shards = []
    for k in range(2):
        summary = run(dataclasses.replace(opts, shard=(k, 2)), CrfConfig(out=tmp_path / "pseudo.h5"))
        shards.append(summary.artifacts[0])
    assert shards == [tmp_path / "pseudo.shard0of2.h5", tmp_path / "pseudo.shard1of2.h5"]
    result = CliRunner().invoke(app, ["merge", *map(str, shards), "--quiet"])
    assert result.exit_code == 0, result.output
    with open_artifact(single) as a, open_artifact(tmp_path / "pseudo.h5") as b:
        assert a.fingerprint == b.fingerprint
        assert a.ids() == b.ids() == opts.dataset.ids("train")  # every image exactly once
        for image_id in a.ids():
            assert np.array_equal(a.labels(image_id), b.labels(image_id))
    # The merged file is what `wsss crf` without --shard considers its own, finished output.
    assert run(opts, CrfConfig(out=tmp_path / "pseudo.h5")).status == "up to date"
    refused = CliRunner().invoke(app, ["merge", str(shards[0])])
    assert refused.exit_code == 2 and "shard 1/2 is missing" in refused.output
