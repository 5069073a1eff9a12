"""Contract tests for every segmenter: builds offline, logits at input size, features at the stride."""

from __future__ import annotations

import math
import socket
import urllib.request
from collections.abc import Iterator

import pytest
import torch
import torchvision

from stages.common.errors import ConfigError
from stages.train_seg.networks import (
    ARCHS,
    RESNET_OUT_CHANNELS,
    ClassificationBranch,
    backbone_of,
    build_segmenter,
    param_groups,
)

DEVICE = torch.device("cpu")
SIZE = 33  # odd on purpose: the upsampling must land on the input size, not a multiple of the stride


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, more threads on tiny inputs only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to fetch weights fails the test instead of downloading."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the segmenter tried to reach the network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_gives_logits_at_input_size(offline: None, arch: str, output_stride: int) -> None:
    torch.manual_seed(0)
    model = build_segmenter(arch, num_classes=5, output_stride=output_stride).eval()
    with torch.no_grad():
        result = model(torch.randn(1, 3, SIZE, SIZE, device=DEVICE))
    side = math.ceil(SIZE / output_stride)
    assert result["out"].shape == (1, 5, SIZE, SIZE)
    assert result["features"].shape == (1, RESNET_OUT_CHANNELS, side, side)
    assert torch.isfinite(result["out"]).all()


def test_training_step_reaches_backbone_and_head(offline: None) -> None:
    torch.manual_seed(0)
    model = build_segmenter("deeplabv2_resnet50", num_classes=3).train()
    logits = model(torch.randn(2, 3, SIZE, SIZE))["out"]
    logits.logsumexp(dim=1).mean().backward()
    assert backbone_of(model).conv1.weight.grad is not None
    assert all(p.grad is not None for p in model.head.parameters())


def test_backbone_keys_are_torchvision_resnet_keys_without_fc(offline: None) -> None:
    body_keys = set(backbone_of(build_segmenter("deeplabv3_resnet50", num_classes=3)).state_dict())
    resnet_keys = torchvision.models.resnet50(weights=None).state_dict()
    assert body_keys == {k for k in resnet_keys if not k.startswith("fc.")}


def test_param_groups_split_backbone_and_head_once_each(offline: None) -> None:
    model = build_segmenter("largefov_resnet50", num_classes=3)
    model.add_module("classifier", ClassificationBranch(RESNET_OUT_CHANNELS, 2))
    backbone, head = param_groups(model, lr=2.5e-4)
    assert (backbone["name"], head["name"]) == ("backbone", "head")
    assert backbone["lr"] == 2.5e-4 and head["lr"] == pytest.approx(2.5e-3)
    assert backbone["weight_decay"] == head["weight_decay"] == 5e-4
    grouped = [id(p) for p in backbone["params"] + head["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in backbone["params"]} == {id(p) for p in backbone_of(model).parameters()}
    assert id(model.classifier.fc.weight) in {id(p) for p in head["params"]}
    torch.optim.SGD(param_groups(model, lr=0.01), lr=0.01, momentum=0.9)


def test_classification_branch_pools_then_classifies() -> None:
    branch = ClassificationBranch(in_channels=4, num_classes=3)
    vector = torch.randn(2, 4)
    # A spatially constant map pools to its own vector, so the branch is just the linear layer on it.
    features = vector[:, :, None, None].expand(2, 4, 5, 5)
    assert branch(features).shape == (2, 3)
    torch.testing.assert_close(branch(features), branch.fc(vector))


@pytest.mark.parametrize(
    ("arch", "output_stride", "message"),
    [("deeplabv3_vgg16", 16, "unknown segmenter architecture"), ("deeplabv2_resnet50", 32, "output stride")],
)
def test_bad_choices_raise_config_error(arch: str, output_stride: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_segmenter(arch, num_classes=3, output_stride=output_stride)
