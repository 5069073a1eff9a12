"""A tiny hand-built classifier and a fake trainer, so mine-ae's round logic runs in seconds."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stages.common.artifacts import Provenance, load_model, model_status, save_model
from stages.common.context import RunOptions
from stages.common.datasets.toy import make_toy
from stages.common.summary import Summary
from stages.mine_ae.stage import ClassifierBackend


class TinyCam(nn.Module):
    """CamNet's interface (backbone.layer4, class_maps, cam, forward) at stride 4 with two convolutions."""

    def __init__(self, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(
            OrderedDict(
                layer1=nn.Conv2d(3, 8, 3, stride=2, padding=1),
                act=nn.ReLU(),
                layer4=nn.Conv2d(8, 8, 3, stride=2, padding=1),
            )
        )
        self.head = nn.Conv2d(8, num_classes, 1, bias=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.relu(self.backbone(x))]

    def class_maps(self, features_last: torch.Tensor) -> torch.Tensor:
        return self.head(features_last)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.class_maps(self.forward_features(x)[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(self.forward_features(x)[-1], 1)).flatten(1)


def save_tiny(
    path: Path,
    opts: RunOptions,
    seed: int,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, Any] | None = None,
) -> TinyCam:
    dataset = opts.dataset
    net = TinyCam(dataset.num_classes, seed)
    provenance = Provenance("model", stage, config, inputs or {}, dataset.describe("train"))
    save_model(path, provenance, net.state_dict(), {"num_classes": dataset.num_classes, "seed": seed})
    return net


def load_tiny(path: Path, description: dict, device: torch.device) -> TinyCam:
    model = load_model(path, dataset=description)
    net = TinyCam(model.arch["num_classes"], model.arch["seed"])
    net.load_state_dict(model.state_dict)
    return net.to(device).eval()


@dataclass
class FakeTrainer:
    """Stands in for train_classifier: records what the erase hook returns, 'trains' a TinyCam whose seed
    depends on the erased pixels, and is up to date on a rerun as the real one is."""

    erased: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(
        self,
        opts: RunOptions,
        recipe: dict[str, Any],
        out: Path,
        *,
        ids: list[str],
        erase: Any,
        extra_inputs: dict[str, Any],
        init_backbone: Path | None = None,
    ) -> Summary:
        self.calls.append(
            {"out": out, "recipe": recipe, "ids": list(ids), "inputs": extra_inputs, "init": init_backbone}
        )
        provenance = Provenance("model", "mine-ae", recipe, extra_inputs, opts.dataset.describe("train"))
        if model_status(out, provenance, force=opts.force):
            return Summary("mine-ae", status="up to date", artifacts=[out])
        images = {i: erase(i, opts.dataset.image(i)) for i in ids}
        self.erased[out.name] = images
        seed = zlib.crc32(b"".join(images[i].tobytes() for i in sorted(images))) % 1000
        net = TinyCam(opts.dataset.num_classes, seed)
        save_model(out, provenance, net.state_dict(), {"num_classes": opts.dataset.num_classes, "seed": seed})
        return Summary("mine-ae", artifacts=[out], seconds=0.01)


@pytest.fixture(scope="session")
def small_toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An even smaller toy dataset than ``toy_root`` (10 train images of 48-64 px): rounds run in seconds."""
    return make_toy(
        tmp_path_factory.mktemp("small_toy") / "toy", seed=1, n_train=10, n_val=2, min_size=48, max_size=64
    )


@pytest.fixture
def toy_opts(small_toy: Path, tmp_path: Path) -> RunOptions:
    """RunOptions on the small toy dataset with cls.h5 already 'trained' (a TinyCam, seed 0)."""
    opts = RunOptions(run_dir=tmp_path / "run", data=f"voc:{small_toy}", device="cpu", quiet=True)
    save_tiny(opts.path("cls.h5"), opts, 0, "train-cls", {"arch": "tiny", "epochs": 1})
    return opts


@pytest.fixture
def fake() -> tuple[FakeTrainer, ClassifierBackend]:
    trainer = FakeTrainer()
    return trainer, ClassifierBackend(train=trainer, load=load_tiny)
