"""`wsss crf` on toy data: worker counts agree, a killed run resumes to the one-go result, refusals."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from stages.common.artifacts import Provenance, begin, open_artifact, partial_path
from stages.common.cam import cam_grid
from stages.common.context import RunOptions, default_train_split
from stages.common.errors import ArtifactError, ConfigError
from stages.crf import CrfConfig, crf_image, run


def synthetic_refined(
    opts: RunOptions, path: Path, background: bool = True, described: dict | None = None
) -> Path:
    """A refined.h5 of random smooth probabilities at stride 4 (background channel first if asked)."""
    dataset = opts.dataset
    split = default_train_split(dataset)
    described = described or dataset.describe(split)
    provenance = Provenance("scores", "refine", {"synthetic": background}, {}, described)
    status = begin(path, provenance, force=True)
    assert status.writer is not None
    rng = np.random.default_rng(0)
    with status.writer as writer:
        for image_id in dataset.ids(split):
            classes = dataset.labels(image_id)
            channels = (0, *classes) if background else classes
            grid = cam_grid(*dataset.image_size(image_id), 4)
            scores = rng.random((len(channels), *grid)).astype(np.float32) + 0.05
            writer.write_image(image_id, scores=scores / scores.sum(0), classes=channels, stride=4)
        writer.finish()
    return path


@pytest.fixture(scope="module")
def crf_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> RunOptions:
    opts = RunOptions(run_dir=tmp_path_factory.mktemp("crf"), data=f"toy:{toy_root}", quiet=True, workers=1)
    synthetic_refined(opts, opts.path("refined.h5"))
    return opts


def _labels(path: Path) -> dict[str, np.ndarray]:
    with open_artifact(path, kind="labels") as art:
        return {image_id: art.labels(image_id) for image_id in art.ids()}


def test_crf_image_maps_channels_to_class_ids() -> None:
    # Two channels (background, class 7); the left half is sure of 7, the right half of background.
    image = np.zeros((6, 8, 3), np.uint8)
    probs = np.zeros((2, 6, 8), np.float32)
    probs[1, :, :4], probs[0, :, :4] = 0.99, 0.01
    probs[0, :, 4:], probs[1, :, 4:] = 0.99, 0.01
    labels = crf_image(image, probs, (0, 7), CrfConfig().params(), None)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 7}
    assert (labels[:, 0] == 7).all() and (labels[:, -1] == 0).all()
    # Uniform probabilities stay near 0.5 after the CRF: below --min-conf 0.9 every pixel is unsure.
    assert (
        crf_image(image, np.full((2, 6, 8), 0.5, np.float32), (0, 7), CrfConfig().params(), 0.9) == 255
    ).all()


def test_crf_one_and_two_workers_give_identical_artifacts(crf_run: RunOptions) -> None:
    one = run(crf_run, CrfConfig(out=crf_run.path("pseudo_1.h5")))
    two_opts = dataclasses.replace(crf_run, workers=2)
    two = run(two_opts, CrfConfig(out=crf_run.path("pseudo_2.h5")))
    assert one.images == two.images == len(crf_run.dataset.ids("train"))
    a, b = _labels(crf_run.path("pseudo_1.h5")), _labels(crf_run.path("pseudo_2.h5"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    image_id = next(iter(a))
    assert a[image_id].shape == crf_run.dataset.image_size(image_id)
    assert set(np.unique(a[image_id])) <= {0, *crf_run.dataset.labels(image_id)}
    assert run(crf_run, CrfConfig(out=crf_run.path("pseudo_1.h5"))).status == "up to date"


@pytest.mark.slow
def test_killed_crf_resumes_to_the_one_go_result(crf_run: RunOptions) -> None:
    whole = crf_run.path("pseudo_whole.h5")
    run(crf_run, CrfConfig(out=whole))
    out = crf_run.path("pseudo_killed.h5")
    # The child dies by SIGKILL right after writing its 10th image (8 are flushed by then).
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from stages.common import artifacts
        from stages.common.context import RunOptions
        from stages.crf import CrfConfig, run
        original = artifacts.ArtifactWriter.write_image
        count = 0
        def write_then_die(self, *args, **kwargs):
            global count
            original(self, *args, **kwargs)
            count += 1
            if count == 10:
                self.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        artifacts.ArtifactWriter.write_image = write_then_die
        if __name__ == "__main__":
            opts = RunOptions(
                run_dir=Path({str(crf_run.run_dir)!r}), data={crf_run.data!r}, quiet=True, workers=1
            )
            run(opts, CrfConfig(out=Path({str(out)!r})))
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert partial_path(out).exists() and not out.exists()
    summary = run(crf_run, CrfConfig(out=out))
    assert summary.status == "resumed" and summary.images == len(crf_run.dataset.ids("train")) - 10
    a, b = _labels(out), _labels(whole)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_crf_refuses_scores_without_background(crf_run: RunOptions, tmp_path: Path) -> None:
    cams = synthetic_refined(crf_run, tmp_path / "cams.h5", background=False)
    with pytest.raises(ArtifactError, match="no background channel"):
        run(crf_run, CrfConfig(scores=cams, out=tmp_path / "pseudo.h5"))


def test_crf_refuses_another_class_list_and_bad_min_conf(crf_run: RunOptions, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--min-conf"):
        run(crf_run, CrfConfig(min_conf=1.5))
    described = crf_run.dataset.describe("train")
    described["class_names"] = [*described["class_names"][:-1], "zebra"]
    foreign = synthetic_refined(crf_run, tmp_path / "refined.h5", described=described)
    with pytest.raises(ArtifactError, match="made for classes"):
        run(crf_run, CrfConfig(scores=foreign, out=tmp_path / "pseudo.h5"))


def test_pool_forks_unless_cuda_is_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    import torch

    from stages.crf import pool_context

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert pool_context().get_start_method() == "fork"
    # A forked child cannot use the parent's CUDA context.
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert pool_context().get_start_method() == "spawn"
