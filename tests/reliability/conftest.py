"""Fixtures of the reliability tests: a small valid artifact, and a way to run `wsss` as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.common.artifacts import Provenance, begin

DATASET = {
    "name": "toy",
    "root": "/data/toy",
    "split": "train",
    "class_names": ["background", "a", "b"],
    "num_images": 3,
    "fingerprint": "d1",
}
IDS = ["img0", "img1", "img2"]


def scores_of(i: int) -> np.ndarray:
    """Deterministic (2, 12, 12) float32 score maps of image ``i``."""
    return np.random.default_rng(i).random((2, 12, 12)).astype(np.float32)


def labels_of(i: int) -> np.ndarray:
    return (np.arange(48 * 48).reshape(48, 48) % 3 + i).astype(np.uint8) % 3


def write_artifact(path: Path, stage: str = "test", config: dict | None = None) -> Path:
    """A complete scores artifact of three images (compressed scores and labels), as a stage writes it."""
    prov = Provenance(kind="scores", stage=stage, config=config or {"lr": 0.1}, dataset=dict(DATASET))
    status = begin(path, prov)
    assert status.writer is not None
    with status.writer as writer:
        for i, image_id in enumerate(IDS):
            writer.write_image(image_id, scores=scores_of(i), classes=(1, 2), stride=4, labels=labels_of(i))
        writer.set_meta("note", {"rounds": 1})
        return writer.finish()


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return write_artifact(tmp_path / "cams.h5")


def wsss(*args: str, cwd: Path, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `wsss` command line in ``cwd``; stdout and stderr captured as text."""
    full_env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("WSSS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "wsss_cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def run_wsss():
    return wsss


def write_model(path: Path) -> Path:
    """A complete model artifact of a tiny network (conv + batch norm, so integer buffers too)."""
    import torch

    from stages.common.artifacts import save_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    prov = Provenance(kind="model", stage="train-cls", config={"lr": 0.1}, dataset=dict(DATASET))
    return save_model(path, prov, net.state_dict(), {"backbone": "tiny", "num_classes": 2})


@pytest.fixture
def make_scores():
    return write_artifact


@pytest.fixture
def make_model():
    return write_model
