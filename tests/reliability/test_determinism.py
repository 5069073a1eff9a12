"""Two runs of each stage with the same --seed on the CPU write identical artifacts.

Each stage runs a second time, as a real process, on copies of the inputs the module's first pipeline
made, and every artifact it writes is compared with the first run's: fingerprint, config and recorded
figures (timings aside), and every record's arrays and every weight bit for bit, trained models included
(one thread per process; see docs/reliability.md for what the GPU does not repeat). The stage table and
the comparison are test_kill_resume's, so both files hold the stages to the same settings.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("kill_resume", Path(__file__).with_name("test_kill_resume.py"))
assert _spec is not None and _spec.loader is not None
kill_resume = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kill_resume  # dataclasses look their module up there
_spec.loader.exec_module(kill_resume)
STAGES = kill_resume.STAGES


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, toy_root: Path) -> Path:
    """The whole tiny pipeline once, made once for the module."""
    return kill_resume.build_pipeline(tmp_path_factory.mktemp("first") / "run", f"voc:{toy_root}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_same_seed_gives_identical_artifacts(
    name: str, first_run: Path, tmp_path: Path, toy_root: Path
) -> None:
    stage = STAGES[name]
    run = kill_resume.inputs_of(stage, first_run, tmp_path / "run")
    kill_resume.run_ok(stage, run, f"voc:{toy_root}")
    for artifact in stage.makes:
        kill_resume.assert_same_artifact(first_run / artifact, run / artifact, atol=0.0)


def test_the_comparison_sees_one_changed_value(tmp_path: Path, make_scores, make_model) -> None:
    """The check above can fail: a single changed score, weight or config value is reported."""
    import h5py

    a, b = make_scores(tmp_path / "a" / "cams.h5"), make_scores(tmp_path / "b" / "cams.h5")
    kill_resume.assert_same_artifact(a, b)
    with h5py.File(b, "r+") as h5:
        scores = h5["images/img1/scores"]
        value = scores[()]
        value[0, 3, 4] = -1.0
        scores[...] = value
    with pytest.raises(AssertionError, match="img1/scores differs"):
        kill_resume.assert_same_artifact(a, b)
    other = make_scores(tmp_path / "c" / "cams.h5", config={"lr": 0.2})
    with pytest.raises(AssertionError, match="another identity"):
        kill_resume.assert_same_artifact(a, other)

    m1, m2 = make_model(tmp_path / "a" / "cls.h5"), make_model(tmp_path / "b" / "cls.h5")
    kill_resume.assert_same_artifact(m1, m2)
    with h5py.File(m2, "r+") as h5:
        weight = h5["weights/0.weight"]
        value = weight[()]
        value.flat[0] = np.nextafter(value.flat[0], np.float32(1))  # one unit in the last place
        weight[...] = value
    with pytest.raises(AssertionError, match="0.weight differs"):
        kill_resume.assert_same_artifact(m1, m2)
    kill_resume.assert_same_artifact(m1, m2, atol=1e-6)  # within a training tolerance
