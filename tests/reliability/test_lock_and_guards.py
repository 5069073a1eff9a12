"""Two processes on one run directory, a diverging training, and an artifact from another run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

from stages.common.artifacts import Provenance, begin, load_checkpoint, partial_path
from stages.common.datasets import open_dataset
from stages.common.errors import StaleArtifact
from stages.common.training import CheckpointedTraining, TrainingDiverged, check_finite
from wsss_cli.common import execute

HOLD = """
import sys, time
from stages.common.lock import RunLock
with RunLock(sys.argv[1], "train-cls"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _labels_artifact(run: Path, toy_root: Path) -> Path:
    dataset = open_dataset(f"voc:{toy_root}")
    prov = Provenance(kind="labels", stage="crf", config={}, dataset=dataset.describe("val"))
    status = begin(run / "pseudo.h5", prov)
    with status.writer as writer:
        for image_id in dataset.ids("val"):
            writer.write_image(image_id, labels=dataset.mask(image_id))
        return writer.finish()


def test_second_process_is_refused_by_the_lock(tmp_path: Path, toy_root: Path, run_wsss) -> None:
    run = tmp_path / "run"
    artifact = _labels_artifact(run, toy_root)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        done = run_wsss("eval", str(artifact), "--run", str(run), "--data", f"voc:{toy_root}", cwd=tmp_path)
        assert done.stderr.strip() == (
            f"error: {run}: another wsss process is writing here (pid {holder.pid}: train-cls); wait for it "
            "to finish or use another --run"
        )
        assert done.returncode == 2
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock, no stale lock is left behind
        holder.wait()
    done = run_wsss("eval", str(artifact), "--run", str(run), "--data", f"voc:{toy_root}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    path = tmp_path / "cls.h5"
    prov = Provenance(kind="model", stage="train-cls", config={"lr": 0.1}, dataset={"fingerprint": "d"})
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)

    def train() -> None:
        training = CheckpointedTraining(path, prov, model, optimizer, {"arch": "linear"})
        for epoch in training.epochs(3):
            optimizer.zero_grad()
            loss = model(x).pow(2).mean() * (float("nan") if epoch == 1 else 1.0)
            check_finite(loss, path, epoch, training.step)
            loss.backward()
            optimizer.step()
            training.step += 1
            training.end_epoch({"loss": loss.item()})
        training.finish()

    with pytest.raises(typer.Exit) as exit_info:
        execute(train)
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {path}: the loss became nan at epoch 2, step 1; the last good checkpoint (epoch 1) is kept "
        "in cls.h5.partial; lower --lr and rerun to resume"
    )
    assert not path.exists()
    kept = load_checkpoint(path, prov)
    assert kept is not None and kept.train_state["epoch"] == 1 and kept.train_state["step"] == 1
    assert all(torch.isfinite(t).all() for t in kept.state_dict.values())
    with pytest.raises(TrainingDiverged):
        CheckpointedTraining(path, prov, model, optimizer, {"arch": "linear"}).end_epoch(
            {"loss": float("inf")}
        )
    assert partial_path(path).exists()


def test_artifact_from_another_run_is_refused(artifact: Path) -> None:
    other = Provenance(
        kind="scores",
        stage="test",
        config={"lr": 0.5},
        dataset={
            "name": "toy",
            "root": "/data/toy",
            "split": "train",
            "class_names": ["background", "a", "b"],
            "num_images": 3,
            "fingerprint": "d1",
        },
    )
    with pytest.raises(StaleArtifact) as refused:
        begin(artifact, other)
    assert str(refused.value) == (
        f"{artifact}: made with other settings (--lr 0.1 -> 0.5); rerun with --force to replace it, or use "
        "another --run"
    )
