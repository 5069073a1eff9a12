"""Checkpointed training: poly decay, resume restores everything, a NaN loss keeps the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages.common.artifacts import Provenance, load_model, partial_path
from stages.common.training import CheckpointedTraining, TrainingDiverged, check_finite, poly_lr, set_poly_lr

DATASET = {"name": "toy", "class_names": ["background", "a"], "fingerprint": "d"}


def provenance() -> Provenance:
    return Provenance(kind="model", stage="test", config={"epochs": 3}, dataset=DATASET)


def test_poly_lr_hand_values() -> None:
    # 0.1 * (1 - 5/10) ** 0.9 = 0.1 * 0.5 ** 0.9 = 0.053589...
    assert poly_lr(0.1, 5, 10) == pytest.approx(0.0535887, rel=1e-5)
    assert poly_lr(0.1, 0, 10) == 0.1 and poly_lr(0.1, 10, 10) == 0.0
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": [net.weight], "lr": 0.1}, {"params": [net.bias], "lr": 1.0}], lr=0.1)
    set_poly_lr(opt, 5, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0535887, 0.535887], rel=1e-5)


def run(path: Path, stop_after: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    training = CheckpointedTraining(path, provenance(), net, opt, {"name": "linear"})
    for epoch in training.epochs(3):
        for _ in range(4):
            x = torch.randn(8, 4)  # drawn from the RNG the checkpoint restores
            loss = ((net(x) - x.sum(1, keepdim=True)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            training.step += 1
        training.end_epoch({"loss": loss.item()})
        if stop_after is not None and epoch + 1 == stop_after:
            return net
    training.finish()
    return net


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    one_go = run(tmp_path / "a" / "m.h5")
    run(tmp_path / "b" / "m.h5", stop_after=1)  # "killed" after epoch 1's checkpoint
    assert partial_path(tmp_path / "b" / "m.h5").exists()
    run(tmp_path / "b" / "m.h5")
    resumed = load_model(tmp_path / "b" / "m.h5")
    assert torch.equal(resumed.state_dict["weight"], one_go.weight.detach())
    assert [h["epoch"] for h in resumed.meta["history"]] == [1, 2, 3]


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged, match=r"became nan at epoch 2, step 9; the last good checkpoint"):
        check_finite(torch.tensor(float("nan")), tmp_path / "m.h5", 1, 9)
