"""train-seg's pure parts: augmentation, the small segmenters, multi-scale prediction, config resolution."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.common.datasets import open_dataset
from stages.common.errors import ConfigError
from stages.train_seg.config import RECIPES, TrainSegConfig, resolve
from stages.train_seg.data import SegAugment
from stages.train_seg.networks import backbone_of, param_groups
from stages.train_seg.predict import (
    arch_record,
    build_model,
    multiscale_probs,
    restrict_to_classes,
)
from wsss_cli.commands.train_seg import parse_scales


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, more threads on tiny inputs only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seg_augment_moves_label_with_image() -> None:
    # The label is a function of the pixels (label = red channel // 50), so after any scale, flip
    # and crop the two must still agree wherever the label is not padding or a resampled edge.
    rng = np.random.default_rng(0)
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30, 0] = 200  # left half red 200 -> label 4
    image[:, 30:, 0] = 50  # right half red 50 -> label 1
    label = (image[..., 0] // 50).astype(np.uint8)
    augment = SegAugment(crop_size=48, mean_pixel=(0.0, 0.0, 0.0))
    for _ in range(20):
        crop, crop_label = augment(image, label, rng)
        assert crop.shape == (48, 48, 3) and crop_label.shape == (48, 48)
        inside = crop_label != 255
        assert inside.any()
        # Away from the single vertical edge the bilinear image equals its nearest label exactly.
        clean = inside & (np.abs(crop[..., 0].astype(int) - 200) < 1) | inside & (crop[..., 0] == 50)
        assert np.array_equal(crop_label[clean], crop[..., 0][clean] // 50)
        # Padding (label 255) is filled with the mean pixel.
        assert (crop[~inside] == 0).all()


@pytest.mark.parametrize(
    "name", ["deeplabv2_tiny", "largefov_tiny", "deeplabv2_resnet10", "deeplabv2_resnet18"]
)
@pytest.mark.parametrize("stride", [8, 16])
def test_small_segmenters_contract(name: str, stride: int) -> None:
    arch = arch_record(name, 6, stride, psl_branch=True, frozen_bn=False, crop_size=96)
    model = build_model(arch).eval()
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        result = model(x)
    assert result["out"].shape == (2, 6, 37, 45)
    assert result["features"].shape[-2:] == (-(-37 // stride), -(-45 // stride))
    assert model.classifier(result["features"]).shape == (2, 5)
    groups = {g["name"]: g for g in param_groups(model, 0.01)}
    n_body = sum(1 for _ in backbone_of(model).parameters())
    assert len(groups["backbone"]["params"]) == n_body
    assert groups["head"]["lr"] == pytest.approx(0.1)


def test_aspp_rates_scale_with_the_crop() -> None:
    # DeepLab-v2's (6, 12, 18, 24) are for 321 crops: 96/321 of them, rounded, for a 96 crop.
    assert arch_record("deeplabv2_tiny", 6, 8, False, False, crop_size=96)["aspp_rates"] == [2, 4, 5, 7]
    assert arch_record("deeplabv2_tiny", 6, 8, False, False, crop_size=321)["aspp_rates"] == [6, 12, 18, 24]
    with pytest.raises(ConfigError, match="unknown segmenter architecture"):
        arch_record("unet_resnet18", 6, 8, False, False)


def test_multiscale_probs_average_softmax_and_flip() -> None:
    torch.manual_seed(0)
    model = build_model(arch_record("deeplabv2_tiny", 4, 8, psl_branch=True, frozen_bn=False)).eval()
    image = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    probs, scores = multiscale_probs(model, image, scales=(0.5, 1.0), flip=True)
    assert probs.shape == (4, 30, 41)
    assert torch.allclose(probs.sum(0), torch.ones(30, 41), atol=1e-5)
    assert scores is not None and scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    # One scale without flip is exactly the network's own softmax at that size.
    single, _ = multiscale_probs(model, image, scales=(1.0,), flip=False)
    from stages.common.cam import normalise_image

    with torch.no_grad():
        direct = model(normalise_image(image)[None])["out"].softmax(1)[0]
    assert torch.allclose(single, direct, atol=1e-5)


def test_restrict_to_classes_keeps_background_and_the_image_classes() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None, None].expand(4, 2, 2)
    kept = restrict_to_classes(probs, [2])
    # Background 0.1 and class 2's 0.3 remain, renormalised: 0.25 and 0.75.
    assert torch.allclose(kept[:, 0, 0], torch.tensor([0.25, 0.0, 0.75, 0.0]))


def test_resolve_fills_the_toy_recipe(toy_root: Path) -> None:
    dataset = open_dataset(f"toy:{toy_root}")
    cfg = resolve(TrainSegConfig(), dataset)
    for name, (_, toy) in RECIPES.items():
        assert getattr(cfg, name) == toy, name
    assert cfg.split == "train" and cfg.labels == "pseudo"
    assert resolve(TrainSegConfig(loss="dsrg"), dataset).labels == "seeds"
    assert resolve(TrainSegConfig(loss="psl"), dataset).labels == "pseudo"
    # An explicit value wins over the recipe; deeplabv3 trains every layer at one rate.
    cfg = resolve(TrainSegConfig(arch="deeplabv3_resnet50", epochs=3), dataset)
    assert (cfg.epochs, cfg.head_lr_mult) == (3, 1.0)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (TrainSegConfig(loss="bce"), "unknown loss"),
        (TrainSegConfig(loss="ce", psl_rounds=2), "needs --loss psl"),
        (TrainSegConfig(loss="psl", expand=True), "--expand"),
        (TrainSegConfig(weights=Path("x.pth")), "no ImageNet weights for deeplabv2_resnet10"),
    ],
)
def test_resolve_refuses_contradictions(toy_root: Path, cfg: TrainSegConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(cfg, open_dataset(f"toy:{toy_root}"))


def test_parse_scales() -> None:
    assert parse_scales("0.5, 1,1.5") == (0.5, 1.0, 1.5)
    assert parse_scales(None) is None
    for bad in ("a,b", "0,1", ""):
        with pytest.raises(ConfigError):
            parse_scales(bad)


def test_segmentation_trained_weights_are_refused(tmp_path: Path, toy_root: Path) -> None:
    # A torchvision segmentation checkpoint (backbone./classifier. keys) was trained on VOC masks.
    from stages.common.context import RunOptions
    from stages.train_seg.stage import run

    bad = tmp_path / "deeplab_voc.pth"
    torch.save(
        {"backbone.conv1.weight": torch.zeros(64, 3, 7, 7), "classifier.0.weight": torch.zeros(1)}, bad
    )
    opts = RunOptions(run_dir=tmp_path / "run", data=f"toy:{toy_root}", device="cpu", quiet=True)
    cfg = TrainSegConfig(labels="gt", arch="deeplabv2_resnet18", weights=bad, epochs=1, predict=False)
    with pytest.raises(ConfigError, match="segmentation model"):
        run(opts, cfg)


def test_cli_reports_a_missing_model_in_one_line(tmp_path: Path, toy_root: Path) -> None:
    from typer.testing import CliRunner

    from wsss_cli.main import app

    args = ["predict", "--run", str(tmp_path), "--data", f"toy:{toy_root}", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "seg.h5: not found" in result.output and "Traceback" not in result.output
    assert CliRunner().invoke(app, ["train-seg", "--help"]).exit_code == 0


def _save_classifier(path: Path, dataset, arch: str) -> torch.nn.Module:
    from stages.common.artifacts import Provenance, save_model
    from stages.common.networks import CamNet

    net = CamNet(dataset.num_classes, arch=arch, output_stride=16)
    provenance = Provenance("model", "train-cls", {"arch": arch}, {}, dataset.describe("train"))
    save_model(path, provenance, net.state_dict(), net.arch_spec())
    return net


def test_init_from_the_classifier_resolves_and_copies_its_backbone(tmp_path: Path, toy_root: Path) -> None:
    from stages.common.context import RunOptions
    from stages.common.errors import ArtifactError
    from stages.train_seg.config import resolve_init
    from stages.train_seg.stage import backbone_from_classifier

    opts = RunOptions(run_dir=tmp_path, data=f"toy:{toy_root}", device="cpu", quiet=True)
    dataset = opts.dataset
    r10 = resolve(TrainSegConfig(arch="deeplabv2_resnet10"), dataset)
    # No cls.h5: auto falls back to scratch, an explicit cls says what to run.
    assert resolve_init(r10, opts) == (TrainSegConfig(**{**r10.__dict__, "init": "scratch"}), None)
    with pytest.raises(ArtifactError, match="train-cls"):
        resolve_init(resolve(TrainSegConfig(arch="deeplabv2_resnet10", init="cls"), dataset), opts)
    classifier = _save_classifier(opts.path("cls.h5"), dataset, "resnet10")
    resolved, source = resolve_init(r10, opts)
    assert (resolved.init, source) == ("cls", opts.path("cls.h5"))
    # The tiny body is not the classifier's ResNet: auto starts from scratch, cls refuses.
    assert resolve_init(resolve(TrainSegConfig(arch="deeplabv2_tiny"), dataset), opts)[1] is None
    with pytest.raises(ConfigError, match="deeplabv2_resnet10"):
        resolve_init(resolve(TrainSegConfig(arch="deeplabv2_tiny", init="cls"), dataset), opts)
    with pytest.raises(ConfigError, match="one of them"):
        resolve(TrainSegConfig(arch="deeplabv2_resnet18", init="cls", weights=Path("x.pth")), dataset)

    model = build_model(
        arch_record("deeplabv2_resnet10", 6, 8, psl_branch=False, frozen_bn=False, crop_size=96)
    )
    head_before = [p.detach().clone() for p in model.head.parameters()]
    backbone_from_classifier(model, opts.path("cls.h5"), dataset.describe("train"))
    theirs = classifier.backbone.state_dict()
    ours = backbone_of(model).state_dict()
    assert {k for k in ours if not k.endswith("num_batches_tracked")} == set(theirs) - {
        k for k in theirs if k.startswith("fc.")
    }
    for key, value in theirs.items():
        assert key.startswith("fc.") or torch.equal(ours[key], value), key
    assert all(torch.equal(a, b) for a, b in zip(head_before, model.head.parameters(), strict=True))
