"""train-cls end to end on the tiny toy dataset: artifact, reload, resume after SIGKILL, refusals, CLI."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stages.common.artifacts import load_model, open_artifact, partial_path
from stages.common.cls_methods import ComplementaryNet
from stages.common.context import RunOptions
from stages.common.errors import ArtifactError, ConfigError
from stages.train_cls import (
    TrainClsConfig,
    build_network,
    copy_backbone,
    load_classifier,
    resolve_config,
    run,
)

pytestmark = pytest.mark.slow

# Tiny but real: 24 toy images, 32-px crops, batch 8 (3 steps per epoch), resnet18 from scratch.
TINY = dict(arch="resnet18", crop_size=32, resize_long=(32, 48), batch_size=8, lr=0.01)

TRAIN_SCRIPT = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from stages.common.context import RunOptions
from stages.train_cls import TrainClsConfig, run
run_dir, data = sys.argv[1], sys.argv[2]
opts = RunOptions(run_dir=Path(run_dir), data=data, device="cpu", quiet=True, seed=3)
cfg = TrainClsConfig(arch="resnet18", crop_size=32, resize_long=(32, 48), batch_size=8, lr=0.01, epochs=3)
print(run(opts, cfg).status, flush=True)
"""


def _opts(run_dir: Path, toy_root: Path, **kwargs: object) -> RunOptions:
    return RunOptions(run_dir=run_dir, data=f"toy:{toy_root}", device="cpu", quiet=True, **kwargs)


def test_one_epoch_writes_a_model_that_reloads(tmp_path: Path, toy_root: Path) -> None:
    torch.set_num_threads(1)
    opts = _opts(tmp_path, toy_root)
    summary = run(opts, TrainClsConfig(epochs=1, **TINY))
    assert summary.status == "made" and summary.artifacts == [tmp_path / "cls.h5"]
    assert {"loss", "train_f1", "val_mAP", "val_f1"} <= set(summary.figures)
    with open_artifact(tmp_path / "cls.h5", kind="model") as art:
        assert art.stage == "train-cls" and art.config["frozen_bn"] is False and art.config["epochs"] == 1
        assert art.config["split"] == "train" and art.config["val_split"] == "val"
    model = load_model(tmp_path / "cls.h5")
    assert len(model.meta["history"]) == 1 and model.train_state is None
    described = opts.dataset.describe("train")
    net = load_classifier(tmp_path / "cls.h5", described, "cpu")
    assert not net.training and net.num_classes == opts.dataset.num_classes
    for key, value in net.state_dict().items():
        assert torch.equal(value, model.state_dict[key])

    again = run(_opts(tmp_path, toy_root), TrainClsConfig(epochs=1, **TINY))
    assert again.status == "up to date" and again.figures["epochs"] == 1
    with pytest.raises(ArtifactError, match="lr"):
        run(_opts(tmp_path, toy_root), TrainClsConfig(epochs=1, **{**TINY, "lr": 0.02}))
    replaced = run(_opts(tmp_path, toy_root, force=True), TrainClsConfig(epochs=1, **{**TINY, "lr": 0.02}))
    assert replaced.status == "made"


def test_copy_backbone_takes_the_backbone_and_leaves_the_head(tmp_path: Path, toy_root: Path) -> None:
    torch.set_num_threads(1)
    opts = _opts(tmp_path, toy_root)
    run(opts, TrainClsConfig(epochs=1, **TINY))
    described = opts.dataset.describe("train")
    trained = load_classifier(tmp_path / "cls.h5", described, "cpu")
    cfg = resolve_config(TrainClsConfig(epochs=1, **TINY), opts.dataset)
    fresh = build_network(cfg, opts.dataset.num_classes)
    head_before = fresh.head.weight.detach().clone()
    copy_backbone(fresh, tmp_path / "cls.h5", described)
    for key, value in fresh.backbone.state_dict().items():
        assert torch.equal(value, trained.backbone.state_dict()[key])
    assert torch.equal(fresh.head.weight, head_before) and not torch.equal(
        fresh.head.weight, trained.head.weight
    )
    other = build_network(dataclasses.replace(cfg, arch="resnet10"), opts.dataset.num_classes)
    with pytest.raises(ConfigError, match="same --arch"):
        copy_backbone(other, tmp_path / "cls.h5", described)


def test_complementary_model_reloads_as_complementary(tmp_path: Path, toy_root: Path) -> None:
    torch.set_num_threads(1)
    opts = _opts(tmp_path, toy_root)
    summary = run(
        opts, TrainClsConfig(epochs=1, complementary=True, hide_and_seek=True, val_split="none", **TINY)
    )
    assert summary.status == "made" and "val_f1" not in summary.figures
    net = load_classifier(tmp_path / "cls.h5", opts.dataset.describe("train"), "cpu")
    assert isinstance(net, ComplementaryNet)


def test_killed_training_resumes_to_the_uninterrupted_weights(tmp_path: Path, toy_root: Path) -> None:
    data = f"toy:{toy_root}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(straight), data], check=True, env=env, timeout=300
    )

    process = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(killed), data], env=env)
    checkpoint = partial_path(killed / "cls.h5")
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the training ended before it could be killed"
    assert checkpoint.exists() and not (killed / "cls.h5").exists()

    resumed = subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(killed), data],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == "resumed"
    a, b = load_model(straight / "cls.h5"), load_model(killed / "cls.h5")
    assert [row["epoch"] for row in b.meta["history"]] == [1, 2, 3]
    # Same seed, same per-sample augmentation and shuffling: equal up to float summation order.
    for key, value in a.state_dict.items():
        assert torch.allclose(value.float(), b.state_dict[key].float(), atol=1e-5), key


def test_cli_refuses_a_changed_option_in_one_line(tmp_path: Path, toy_root: Path) -> None:
    from wsss_cli.main import app

    args = [
        "train-cls",
        "--run",
        str(tmp_path),
        "--data",
        f"toy:{toy_root}",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--crop-size",
        "32",
        "--resize-long",
        "32",
        "48",
        "--batch-size",
        "8",
        "--arch",
        "resnet18",
        "-q",
    ]
    made = CliRunner().invoke(app, args)
    assert made.exit_code == 0, made.output
    refused = CliRunner().invoke(app, [*args[:-1], "--lr", "0.3"])
    assert refused.exit_code == 2 and "--force" in refused.output
    conflicting = CliRunner().invoke(app, [*args, "--puzzle", "--complementary"])
    assert conflicting.exit_code == 2 and "pick one" in conflicting.output
