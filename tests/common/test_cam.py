"""CAM inference: hand-computed maps, multi-scale fusion, batching, Grad-CAM, normalisation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import Tensor

from stages.common.cam import (
    batched_multiscale_cam,
    denormalise_image,
    grad_cam,
    multiscale_cam,
    normalise_image,
)
from stages.common.networks import CamNet

DEVICE = torch.device(os.environ.get("WSSS_TEST_DEVICE", "cpu"))


class PixelCamNet(CamNet):
    """A CamNet whose 'features' are the input pixels, so class maps are the head applied per pixel."""

    def forward_features(self, x: Tensor) -> list[Tensor]:
        return [x]


def _pixel_net() -> PixelCamNet:
    net = PixelCamNet(2, arch="resnet18")
    net.head = torch.nn.Conv2d(3, 2, kernel_size=1, bias=False)
    with torch.no_grad():
        # class 0 = the red channel, class 1 = minus the green channel.
        net.head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]).view(2, 3, 1, 1))
    return net.to(DEVICE).eval()


@pytest.fixture(scope="module")
def resnet() -> CamNet:
    torch.manual_seed(0)
    return CamNet(3, arch="resnet18").to(DEVICE).eval()


def test_cam_of_a_hand_built_network_equals_the_hand_computed_map() -> None:
    red = torch.tensor([[2.0, -1.0], [0.5, 4.0]])
    green = torch.tensor([[1.0, -3.0], [0.0, -1.5]])
    image = torch.stack([red, green, torch.zeros(2, 2)]).to(DEVICE)
    # class 0: ReLU(red) = [[2, 0], [0.5, 4]], max 4 → [[0.5, 0], [0.125, 1]] (up to the 1e-5);
    # class 1: ReLU(-green) = [[0, 3], [0, 1.5]], max 3 → [[0, 1], [0, 0.5]].
    expected = torch.tensor([[[2.0, 0.0], [0.5, 4.0]], [[0.0, 3.0], [0.0, 1.5]]])
    expected = expected / (expected.amax(dim=(1, 2), keepdim=True) + 1e-5)
    net = _pixel_net()
    for flip in (False, True):  # per-pixel maps are mirror-equivariant: the flip changes nothing
        cam = multiscale_cam(net, image, [1, 0], scales=(1.0,), flip=flip, stride=1)
        torch.testing.assert_close(cam.cpu(), expected[[1, 0]])


def test_multiscale_fusion_of_a_constant_image_equals_single_scale() -> None:
    image = torch.full((3, 12, 16), 0.7, device=DEVICE)
    net = _pixel_net()
    single = multiscale_cam(net, image, [0], scales=(1.0,), flip=False)
    fused = multiscale_cam(net, image, [0], scales=(1.0, 0.5, 1.5, 2.0), flip=True)
    assert fused.shape == single.shape == (1, 3, 4)
    torch.testing.assert_close(fused, single, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("size", "stride", "grid"), [((33, 47), 4, (9, 12)), ((32, 32), 8, (4, 4))])
def test_output_shape_dtype_and_range(
    resnet: CamNet, size: tuple[int, int], stride: int, grid: tuple[int, int]
) -> None:
    image = torch.randn(3, *size, device=DEVICE)
    cam = multiscale_cam(resnet, image, [2, 0], scales=(1.0, 0.5), stride=stride)
    assert cam.shape == (2, *grid) and cam.dtype == torch.float32
    assert cam.min() >= 0 and cam.max() < 1
    assert multiscale_cam(resnet, image, [], scales=(1.0,), stride=stride).shape == (0, *grid)


def test_batched_cam_equals_one_image_at_a_time(resnet: CamNet) -> None:
    torch.manual_seed(1)
    images = [
        torch.randn(3, 32, 40, device=DEVICE),
        torch.randn(3, 36, 28, device=DEVICE),
        torch.randn(3, 32, 40, device=DEVICE),
    ]
    classes = [[0], [1, 2], [2, 1, 0]]
    batched = batched_multiscale_cam(resnet, images, classes, scales=(1.0, 0.5))
    for image, wanted, got in zip(images, classes, batched, strict=True):
        torch.testing.assert_close(
            got, multiscale_cam(resnet, image, wanted, scales=(1.0, 0.5)), atol=1e-5, rtol=1e-4
        )


def test_amp_runs_and_stays_close(resnet: CamNet) -> None:
    image = torch.randn(3, 32, 32, device=DEVICE)
    exact = multiscale_cam(resnet, image, [0, 1], scales=(1.0,))
    mixed = multiscale_cam(resnet, image, [0, 1], scales=(1.0,), amp=True)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, atol=0.1, rtol=0)


def test_bad_inputs_raise(resnet: CamNet) -> None:
    image = torch.randn(3, 32, 32, device=DEVICE)
    with pytest.raises(ValueError, match="outside"):
        multiscale_cam(resnet, image, [3])
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        multiscale_cam(resnet, image[None], [0])
    with pytest.raises(ValueError, match="scales"):
        multiscale_cam(resnet, image, [0], scales=())
    with pytest.raises(ValueError, match="2 images"):
        batched_multiscale_cam(resnet, [image, image], [[0]])
    with pytest.raises(ValueError, match="layer"):
        grad_cam(resnet, image, [0], layer="layer9")
    resnet.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            multiscale_cam(resnet, image, [0])
    finally:
        resnet.eval()


def test_grad_cam_at_layer4_equals_the_cam(resnet: CamNet) -> None:
    # With a GAP head, d logit_c / d F_k = w_ck / (h·w) everywhere: Grad-CAM is the CAM up to a scale.
    image = torch.randn(3, 40, 36, device=DEVICE)
    expected = multiscale_cam(resnet, image, [0, 2], scales=(1.0,), flip=False)
    got = grad_cam(resnet, image, [0, 2])
    assert got.shape == (2, 10, 9)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
    assert all(p.grad is None for p in resnet.parameters())  # no gradient leaks into training state
    assert grad_cam(resnet, image, [1], layer="layer3").shape == (1, 10, 9)


def test_normalise_image_round_trips_and_checks_its_input() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    x = normalise_image(image)
    assert x.shape == (3, 5, 7) and x.dtype == torch.float32
    # pixel 255 of the red channel: (1 - 0.485) / 0.229
    assert normalise_image(np.full((1, 1, 3), 255, np.uint8))[0, 0, 0].item() == pytest.approx(0.515 / 0.229)
    np.testing.assert_array_equal(denormalise_image(x), image)
    with pytest.raises(ValueError, match="uint8"):
        normalise_image(image.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        normalise_image(image[..., :2])
