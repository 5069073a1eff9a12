"""Contract tests of the classifier network: strides, frozen BN, weight files, CAM head."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from stages.common.errors import ConfigError
from stages.common.networks import CamNet, build_resnet, freeze_batchnorm, load_backbone_weights

DEVICE = torch.device(os.environ.get("WSSS_TEST_DEVICE", "cpu"))


def _layer_sizes(net: CamNet, size: int) -> list[int]:
    with torch.no_grad():
        return [f.shape[-1] for f in net.forward_features(torch.zeros(1, 3, size, size, device=DEVICE))]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize(
    ("output_stride", "expected"), [(32, [16, 8, 4, 2]), (16, [16, 8, 4, 4]), (8, [16, 8, 8, 8])]
)
def test_output_stride_sets_feature_sizes(arch: str, output_stride: int, expected: list[int]) -> None:
    net = CamNet(3, arch=arch, output_stride=output_stride).to(DEVICE).eval()
    assert _layer_sizes(net, 64) == expected


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_dilated_network_equals_strided_network_on_its_grid(arch: str) -> None:
    # À trous: with the same weights, the OS8 network sampled every 2nd (layer3) / 4th (layer4)
    # pixel computes exactly what the plain OS32 network computes.
    torch.manual_seed(0)
    strided = CamNet(2, arch=arch, output_stride=32).to(DEVICE).eval()
    dilated = CamNet(2, arch=arch, output_stride=8).to(DEVICE).eval()
    dilated.load_state_dict(strided.state_dict())
    x = torch.randn(1, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        plain, atrous = strided.forward_features(x), dilated.forward_features(x)
    torch.testing.assert_close(atrous[2][..., ::2, ::2], plain[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(atrous[3][..., ::4, ::4], plain[3], atol=1e-4, rtol=1e-4)


def test_build_resnet_refuses_unknown_arch_and_stride() -> None:
    with pytest.raises(ConfigError, match="resnet50"):
        build_resnet("vgg16")
    with pytest.raises(ConfigError, match="output stride 4"):
        build_resnet("resnet18", output_stride=4)
    with pytest.raises(ConfigError):
        CamNet(0, arch="resnet18")


def test_frozen_batchnorm_survives_train_mode_and_a_step() -> None:
    torch.manual_seed(0)
    net = CamNet(2, arch="resnet18").to(DEVICE)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    before = {k: v.clone() for k, v in net.state_dict().items() if "bn" in k or "downsample.1" in k}
    net.train()
    optimizer = torch.optim.SGD(net.param_groups(lr=0.1), lr=0.1, momentum=0.9)
    loss = nn.functional.multilabel_soft_margin_loss(
        net(torch.randn(2, 3, 32, 32, device=DEVICE)), torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEVICE)
    )
    loss.backward()
    optimizer.step()
    after = net.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert net.backbone.conv1.weight.grad is not None  # the rest of the network did learn


def test_freeze_batchnorm_keeps_the_eval_output() -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    frozen = freeze_batchnorm(bn)
    assert isinstance(frozen, FrozenBatchNorm2d)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen.train()(x), bn.eval()(x))
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    assert freeze_batchnorm(block) is block and isinstance(block[1], FrozenBatchNorm2d)


def test_unfrozen_network_keeps_batchnorm() -> None:
    net = CamNet(2, arch="resnet18", frozen_bn=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_weights_from_a_file_load_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    net = CamNet(5, arch="resnet18")
    load_backbone_weights(net, path)
    torch.testing.assert_close(net.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(net.backbone.bn1.running_var, source.bn1.running_var)
    plain = build_resnet("resnet18")  # a bare ResNet body (with fc) loads too
    load_backbone_weights(plain, path)
    torch.testing.assert_close(plain.conv1.weight, source.conv1.weight)


def test_weights_of_a_segmentation_model_are_refused(tmp_path: Path) -> None:
    fake_deeplab = {
        "backbone.conv1.weight": torch.zeros(64, 3, 7, 7),
        "classifier.4.weight": torch.zeros(21, 256, 1, 1),
    }
    path = tmp_path / "deeplab.pth"
    torch.save(fake_deeplab, path)
    with pytest.raises(ConfigError, match="pixel masks") as caught:
        load_backbone_weights(CamNet(2, arch="resnet18"), path)
    assert "deeplab.pth" in str(caught.value) and "\n" not in str(caught.value)
    whole = tmp_path / "camnet.pth"
    torch.save(CamNet(2, arch="resnet18").state_dict(), whole)
    with pytest.raises(ConfigError, match="whole wsss classifier"):
        load_backbone_weights(CamNet(2, arch="resnet18"), whole)


def test_mismatched_or_missing_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match=r"r18\.pth does not fit.*missing keys.*--arch"):
        load_backbone_weights(CamNet(2, arch="resnet34"), path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_backbone_weights(CamNet(2, arch="resnet18"), tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_text("not a tensor archive")
    with pytest.raises(ConfigError, match="cannot read"):
        load_backbone_weights(CamNet(2, arch="resnet18"), tmp_path / "junk.pth")


def test_logits_are_the_mean_of_the_class_maps_and_cam_is_their_relu() -> None:
    torch.manual_seed(0)
    net = CamNet(4, arch="resnet18").to(DEVICE).eval()
    x = torch.randn(2, 3, 48, 40, device=DEVICE)
    with torch.no_grad():
        maps = net.class_maps(net.forward_features(x)[-1])
        logits, cam = net(x), net.cam(x)
    assert maps.shape == (2, 4, 3, 3) and logits.shape == (2, 4)
    torch.testing.assert_close(logits, maps.mean(dim=(2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam, maps.clamp(min=0))
    assert net.head.bias is None


def test_arch_spec_rebuilds_the_network() -> None:
    net = CamNet(7, arch="resnet18", output_stride=8, frozen_bn=False)
    spec = json.loads(json.dumps(net.arch_spec()))
    rebuilt = CamNet(**spec)
    rebuilt.load_state_dict(net.state_dict())  # strict: same keys and shapes
    assert rebuilt.arch_spec() == net.arch_spec()


def test_param_groups_cover_every_trainable_parameter_once() -> None:
    net = CamNet(3, arch="resnet18")
    groups = net.param_groups(lr=0.1, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(1.0)]
    assert groups[1]["params"] == [net.head.weight]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters() if p.requires_grad)
