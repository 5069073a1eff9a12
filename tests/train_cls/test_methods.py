"""The classifier methods on constructed inputs: optimizer, Puzzle-CAM, Hide-and-Seek, complementary net."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.common.augment import puzzle_stitch, puzzle_tiles, regional_dropout_masks
from stages.common.cam import multiscale_cam, normalise_image
from stages.common.classifier_data import ClassificationSamples, TrainAugment, eval_view, multi_hot
from stages.common.cls_methods import (
    ChannelAssistedAttention,
    ClassifierObjective,
    ComplementaryNet,
    SpatialSelfAttention,
    build_classifier,
    complementary_loss,
    labelled_l1,
    puzzle_alpha,
    puzzle_loss,
)
from stages.common.errors import ConfigError
from stages.common.networks import CamNet
from stages.train_cls import TrainClsConfig, make_optimizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def small_net() -> CamNet:
    torch.manual_seed(0)
    return CamNet(3, "resnet18", 16, frozen_bn=False)


@pytest.fixture(scope="module")
def comp_net() -> ComplementaryNet:
    torch.manual_seed(0)
    return ComplementaryNet(3, "resnet18", 16, frozen_bn=False)


def test_optimizer_has_real_momentum_and_head_lr(small_net: CamNet, comp_net: ComplementaryNet) -> None:
    cfg = TrainClsConfig(lr=0.05, head_lr_mult=10.0, weight_decay=1e-4)
    for net in (small_net, comp_net):
        optimizer = make_optimizer(net, cfg)
        assert [g["momentum"] for g in optimizer.param_groups] == [0.9, 0.9]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.5])
        assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 1e-4]
        grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert grouped == {id(p) for p in net.parameters() if p.requires_grad}
    # The complementary net's new layers (second head, attention) learn at the head's rate.
    head_group = {id(p) for p in make_optimizer(comp_net, cfg).param_groups[1]["params"]}
    assert id(comp_net.head_b.weight) in head_group and id(comp_net.assisted.gamma_a) in head_group


def test_puzzle_alpha_ramps_over_the_first_half() -> None:
    assert [puzzle_alpha(s, 100) for s in (0, 25, 50, 75, 100)] == [0.0, 2.0, 4.0, 4.0, 4.0]


def test_labelled_l1_counts_only_labelled_maps() -> None:
    a = torch.zeros(1, 2, 2, 2)
    b = torch.ones(1, 2, 2, 2)
    b[0, 1] = 10.0  # unlabelled class: its huge difference must not count
    assert labelled_l1(a, b, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(1.0)


def test_puzzle_loss_stitches_tiles_back_and_is_finite(small_net: CamNet) -> None:
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(puzzle_stitch(puzzle_tiles(x)), x)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss0, logits = puzzle_loss(small_net, x, targets, alpha=0.0)
    loss4, _ = puzzle_loss(small_net, x, targets, alpha=4.0)
    assert torch.isfinite(loss4) and logits.shape == (2, 3)
    # The reconstruction term is non-negative and weighted by alpha.
    assert loss4.item() >= loss0.item()
    loss4.backward()
    assert small_net.head.weight.grad is not None
    small_net.zero_grad()


class _OneImage:
    """A duck-typed dataset of one red image with classes 1 and 3 of 3."""

    num_classes = 3

    def image(self, image_id: str) -> np.ndarray:
        image = np.zeros((48, 64, 3), dtype=np.uint8)
        image[..., 0] = 200
        return image

    def labels(self, image_id: str) -> tuple[int, ...]:
        return (1, 3)


def test_hide_and_seek_hides_training_crops_never_test_views() -> None:
    mean = (10.0, 20.0, 30.0)
    hide = TrainAugment((64, 64), 64, mean, jitter=0.0, hide_grid_sizes=(16,))
    train = ClassificationSamples(_OneImage(), ["a"] * 8, train_augment=hide, seed=0)
    hidden = [
        np.allclose(train[i][0], normalise_image(np.full((64, 64, 3), mean, np.uint8)), atol=1e-4)
        for i in range(8)
    ]
    mean_cells = [int((train[i][0][0] < -1.5).sum()) for i in range(8)]  # mean pixels are very dark in R
    assert sum(m > 0 for m in mean_cells) >= 6 and not any(hidden)
    test = ClassificationSamples(_OneImage(), ["a"], eval_size=64, mean_pixel=mean)
    image, target, _ = test[0]
    expected = normalise_image(eval_view(_OneImage().image("a"), 64, mean))
    assert torch.equal(image, expected)
    # Only the padding (rows 48..63) holds the mean: nothing inside the image is hidden.
    assert (image[0, :48] > 0).all() and torch.equal(target, torch.tensor([1.0, 0.0, 1.0]))


def test_multi_hot_rejects_background_and_unknown_classes() -> None:
    assert multi_hot((2,), 3).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        multi_hot((0,), 3)


def test_complementary_views_add_up_to_the_image(comp_net: ComplementaryNet) -> None:
    x = torch.randn(2, 3, 64, 64)
    masks = regional_dropout_masks(2, 64, 64, torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    hook = comp_net.backbone.conv1.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    try:
        loss, logits = complementary_loss(comp_net, x, torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]]), masks)
    finally:
        hook.remove()
    view_a, view_b = seen[0].chunk(2)
    assert torch.allclose(view_a + view_b, x) and (view_a * view_b == 0).all()
    assert ((masks == 0) | (masks == 1)).all() and (masks.flatten(1).sum(1) > 0).all()
    assert ((1 - masks).flatten(1).sum(1) > 0).all()
    assert torch.isfinite(loss) and logits.shape == (2, 3)
    loss.backward()
    assert comp_net.head_b.weight.grad is not None and comp_net.assisted.gamma_a.grad is not None
    comp_net.zero_grad()


def test_complementary_net_keeps_the_cam_interface(comp_net: ComplementaryNet) -> None:
    comp_net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = comp_net.forward_features(x)
        assert len(features) == 4 and features[-1].shape == (2, 512, 4, 4)
        maps = comp_net.class_maps(features[-1])
        assert maps.shape == (2, 3, 4, 4)
        assert torch.allclose(comp_net(x), maps.mean(dim=(2, 3)), atol=1e-5)
        assert torch.equal(comp_net.cam(x), torch.relu(maps))
    cam = multiscale_cam(comp_net, x[0], [0, 2], scales=(1.0,))
    assert cam.shape == (2, 16, 16)
    rebuilt = build_classifier(comp_net.arch_spec())
    assert isinstance(rebuilt, ComplementaryNet)
    rebuilt.load_state_dict(comp_net.state_dict())
    assert isinstance(build_classifier(CamNet(3, "resnet18").arch_spec()), CamNet)
    comp_net.train()
    with pytest.raises(ConfigError):
        build_classifier({"type": "transformer", "num_classes": 3})


def test_channel_assisted_attention_by_hand() -> None:
    module = ChannelAssistedAttention()
    fa, fb = torch.zeros(1, 2, 1, 2), torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    out_a, out_b = module(fa, fb)
    assert torch.equal(out_a, fa) and torch.equal(out_b, fb)  # gamma starts at 0: the plain network
    with torch.no_grad():
        module.gamma_a.fill_(1.0)
    out_a, _ = module(fa, fb)
    # fa = 0 -> all affinities 0 -> uniform softmax: each channel of fa' = mean of fb's channels = [2, 3].
    assert torch.allclose(out_a, torch.tensor([[[[2.0, 3.0]], [[2.0, 3.0]]]]))


def test_spatial_self_attention_single_position_adds_its_value() -> None:
    module = SpatialSelfAttention(8)
    with torch.no_grad():
        module.gamma.fill_(0.5)
    f = torch.randn(2, 8, 1, 1)
    # One position: attention is 1 on itself, so the output is f + gamma * value(f).
    assert torch.allclose(module(f), f + 0.5 * module.value(f), atol=1e-6)
    assert module(torch.randn(2, 8, 3, 5)).shape == (2, 8, 3, 5)


def test_objective_refuses_a_plain_net_for_the_complementary_method(small_net: CamNet) -> None:
    with pytest.raises(ConfigError):
        ClassifierObjective(small_net, "complementary")
    loss, logits = ClassifierObjective(small_net, "plain")(torch.randn(2, 3, 32, 32), torch.ones(2, 3))
    assert torch.isfinite(loss) and logits.shape == (2, 3)
