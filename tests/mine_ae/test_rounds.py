"""Round records, fusion, classifier quality and CAM extraction on constructed inputs."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.common.artifacts import Provenance, begin
from stages.common.cam import multiscale_cam, normalise_image
from stages.common.errors import ConfigError
from stages.mine_ae.erasing import erase
from stages.mine_ae.extract import CamRecipe, extract_cams, image_cam
from stages.mine_ae.rounds import MaskEraser, classifier_quality, fuse_scores, round_records

from .conftest import TinyCam


def test_round_records_first_round_and_union_with_previous() -> None:
    # One class, a 2x5 CAM already at full size (stride 1): positives 0.2, 0.4, 0.6, 0.8, 1.0.
    cam = np.array([[[0.0, 0.2, 0.4, 0.6, 0.8], [1.0, 0.0, 0.0, 0.0, 0.0]]], dtype=np.float32)
    first = round_records(cam, (2, 5), None, top_fraction=0.2, erase_thr=None, low_cam_thr=0.05)
    # top 20% of 5 positive pixels = 1 pixel, the peak.
    expected = np.zeros((1, 2, 5), dtype=bool)
    expected[0, 1, 0] = True
    np.testing.assert_array_equal(first["mined"], expected)
    np.testing.assert_array_equal(first["union"], expected)
    # low: < 0.05 x max (1.0): the five zeros.
    np.testing.assert_array_equal(first["low"], cam[0] < 0.05)

    # Round 2 with a fixed threshold 0.5: mines 0.6, 0.8; union adds round 1's peak; low ANDs.
    previous = (first["union"], first["low"])
    cam2 = np.array([[[0.0, 0.0, 0.1, 0.6, 0.8], [0.0, 0.0, 0.0, 0.0, 0.2]]], dtype=np.float32)
    second = round_records(cam2, (2, 5), previous, top_fraction=0.2, erase_thr=0.5, low_cam_thr=0.05)
    np.testing.assert_array_equal(second["mined"][0], cam2[0] >= 0.5)
    np.testing.assert_array_equal(second["union"][0], (cam2[0] >= 0.5) | expected[0])
    np.testing.assert_array_equal(second["low"], (cam[0] < 0.05) & (cam2[0] < 0.05 * 0.8))


def test_pixels_erased_before_are_neither_mined_again_nor_counted_in_the_top_fraction() -> None:
    # Round 1 erased the two left pixels; round 2's CAM still peaks there (spill-over onto the mean fill).
    union = np.zeros((1, 1, 6), dtype=bool)
    union[0, 0, :2] = True
    previous = (union, np.zeros((1, 6), dtype=bool))
    cam = np.array([[[1.0, 0.9, 0.5, 0.4, 0.3, 0.2]]], dtype=np.float32)
    second = round_records(cam, (1, 6), previous, top_fraction=0.25, erase_thr=None, low_cam_thr=0.05)
    # Top 25% of the 4 visible positive pixels = 1 pixel: 0.5, the best the erased image still shows.
    np.testing.assert_array_equal(second["mined"][0, 0], [False, False, True, False, False, False])
    np.testing.assert_array_equal(second["union"][0, 0], [True, True, True, False, False, False])
    # A fixed threshold is subject to the same rule.
    fixed = round_records(cam, (1, 6), previous, top_fraction=0.2, erase_thr=0.45, low_cam_thr=0.05)
    np.testing.assert_array_equal(fixed["mined"][0, 0], [False, False, True, False, False, False])


def test_round_records_upsample_stride_maps_to_image_size() -> None:
    cam = np.zeros((2, 3, 4), dtype=np.float32)
    cam[0, :, :2] = 1.0  # class 0 fires on the left half, class 1 nowhere
    records = round_records(cam, (12, 16), None, top_fraction=0.2, erase_thr=0.5, low_cam_thr=0.05)
    assert records["mined"].shape == (2, 12, 16) and records["low"].shape == (12, 16)
    # Bilinear x4 (align_corners=False): columns 0..7 are >= 0.5, 8..15 below; nothing for class 1.
    np.testing.assert_array_equal(records["mined"][0].any(0), np.arange(16) < 8)
    assert records["mined"][0].all(0)[:8].all() and not records["mined"][1].any()
    assert not (records["low"] & records["mined"][0]).any()


def test_fuse_scores_keeps_round_1_and_later_rounds_only_where_they_mined() -> None:
    round1 = np.array([[[0.9, 0.2, 0.1, 0.0]]], dtype=np.float32)
    round2 = np.array([[[0.1, 1.0, 0.8, 0.6]]], dtype=np.float32)  # (K=1, h=1, w=4) at stride 2
    mined2 = np.zeros((1, 1, 8), dtype=bool)
    mined2[0, 0, 3] = True  # one pixel of the second grid cell
    mined2[0, 0, 6:] = True  # the whole fourth cell
    fused = fuse_scores([round1, round2], [np.zeros_like(mined2), mined2])
    np.testing.assert_array_equal(fused, np.array([[[0.9, 1.0, 0.1, 0.6]]], dtype=np.float32))


def test_fuse_scores_is_the_per_pixel_max() -> None:
    a = np.array([[[0.1, 0.9]]], dtype=np.float32)
    b = np.array([[[0.5, 0.2]]], dtype=np.float32)
    np.testing.assert_array_equal(fuse_scores([a, b]), np.array([[[0.5, 0.9]]], dtype=np.float32))
    np.testing.assert_array_equal(fuse_scores([a]), a)
    with pytest.raises(ValueError):
        fuse_scores([])


def test_classifier_quality_hand_values() -> None:
    # Decisions: image 0 says {0}, truth {0}; image 1 says {0, 1}, truth {1}: tp 2, 3 said, 2 true.
    logits = np.array([[5.0, -5.0], [5.0, 5.0]], dtype=np.float32)
    targets = np.array([[1, 0], [0, 1]], dtype=np.float32)
    quality = classifier_quality(logits, targets)
    assert quality["f1"] == pytest.approx(2 * 2 / (3 + 2))
    # Loss: mean over images and classes of softplus(-y x) terms: three at log(1+e^-5), one at log(1+e^5).
    expected = (3 * math.log1p(math.exp(-5)) + math.log1p(math.exp(5))) / 4
    assert quality["loss"] == pytest.approx(expected, rel=1e-5)


def test_mask_eraser_reads_the_union_and_survives_pickling(tmp_path: Path) -> None:
    provenance = Provenance("scores", "mine-ae", {}, {}, {"name": "t"})
    status = begin(tmp_path / "cams_r1.h5", provenance)
    union = np.zeros((2, 4, 5), dtype=bool)
    union[0, 1, 1] = union[1, 2, 3] = True
    with status.writer as writer:
        writer.write_image("a", extra={"union": union})
        writer.finish()
    mean = np.array([10.4, 20.6, 30.5])
    eraser = pickle.loads(pickle.dumps(MaskEraser(tmp_path / "cams_r1.h5", mean)))
    image = np.full((4, 5, 3), 200, dtype=np.uint8)
    np.testing.assert_array_equal(eraser("a", image), erase(image, union.any(0), mean))
    with pytest.raises(Exception, match="masks of image"):
        eraser("a", np.zeros((5, 5, 3), dtype=np.uint8))


def test_extract_cams_returns_multiscale_cam_and_logits_with_erase_hook() -> None:
    model = TinyCam(3, seed=1).eval()
    rng = np.random.default_rng(0)
    images = {
        "x": rng.integers(0, 256, (20, 28, 3), dtype=np.uint8),
        "y": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
    }
    black = np.zeros((3,), dtype=np.float32)

    def hook(image_id: str, image: np.ndarray) -> np.ndarray:
        mask = np.zeros(image.shape[:2], dtype=bool)
        mask[:4] = True
        return erase(image, mask, black)

    recipe = CamRecipe()
    out = extract_cams(model, images.__getitem__, [("x", (1, 3)), ("y", (2,))], recipe, erase=hook)
    for image_id, classes in (("x", (1, 3)), ("y", (2,))):
        seen = hook(image_id, images[image_id])
        x = normalise_image(seen)
        expected = multiscale_cam(model, x, [c - 1 for c in classes]).numpy()
        np.testing.assert_allclose(out[image_id]["scores"], expected, rtol=1e-6)
        with torch.no_grad():
            np.testing.assert_allclose(out[image_id]["logits"], model(x[None])[0].numpy(), rtol=1e-5)
    cams, _ = image_cam(model, images["y"], (2,), CamRecipe(method="gradcam", gradcam_layer="layer4"))
    assert cams.shape == (1, 4, 4)


def test_cam_recipe_refuses_unknown_methods_and_scales() -> None:
    with pytest.raises(ConfigError, match="--cam"):
        CamRecipe(method="lrp")
    with pytest.raises(ConfigError, match="--scales"):
        CamRecipe(scales=(1.0, -0.5))
