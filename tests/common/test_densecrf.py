import sys

import numpy as np
import pytest
from scipy.ndimage import uniform_filter

from stages.common.densecrf import CrfParams, crf_labels, dense_crf, label_crf
from stages.common.errors import ConfigError


def square_image() -> np.ndarray:
    """(32, 32, 3) black image with a white square on rows/columns 10..21."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[10:22, 10:22] = 255
    return image


def square_mask() -> np.ndarray:
    mask = np.zeros((32, 32), dtype=bool)
    mask[10:22, 10:22] = True
    return mask


def test_crf_snaps_a_blurred_square_to_the_image_edge():
    # A square 3 px too large on each side, blurred: the argmax before the CRF overshoots the edge.
    blob = np.zeros((32, 32), dtype=np.float32)
    blob[7:25, 7:25] = 1.0
    foreground = 0.1 + 0.8 * uniform_filter(blob, size=5)
    probs = np.stack([1.0 - foreground, foreground])
    before = probs.argmax(axis=0).astype(bool)
    assert (before != square_mask()).sum() > 40

    after = dense_crf(square_image(), probs, CrfParams())
    assert after.dtype == np.float32 and after.shape == (2, 32, 32)
    assert np.allclose(after.sum(axis=0), 1.0, atol=1e-4)
    assert (after.argmax(axis=0).astype(bool) == square_mask()).all()


def test_label_crf_removes_label_noise_inside_a_colour_region():
    labels = square_mask().astype(np.int64)
    labels[15, 15] = 0  # a hole in the square
    labels[2, 2] = 1  # a speck in the background
    labels[0, 31] = 255  # unsure: uniform unary
    after = label_crf(square_image(), labels, n_labels=2)
    assert after.shape == (2, 32, 32)
    assert (crf_labels(after) == square_mask()).all()


def test_crf_labels_min_conf():
    probs = np.array([[[0.9, 0.45]], [[0.1, 0.55]]], dtype=np.float32)  # (2, 1, 2)
    assert crf_labels(probs).tolist() == [[0, 1]]
    assert crf_labels(probs, min_conf=0.6).tolist() == [[0, 255]]
    assert crf_labels(probs).dtype == np.uint8


def test_deeplab_params():
    params = CrfParams.deeplab()
    assert (params.gaussian_sxy, params.gaussian_compat) == (1, 3)
    assert (params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat) == (67, 3, 4)
    assert params.iterations == 10


def test_bad_input_raises():
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(square_image().astype(np.float32), np.full((2, 32, 32), 0.5), CrfParams())
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(square_image(), np.full((2, 16, 16), 0.5), CrfParams())


def test_missing_pydensecrf_is_one_line(monkeypatch: pytest.MonkeyPatch):
    # None in sys.modules makes `import pydensecrf.densecrf` raise ImportError.
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ConfigError) as error:
        dense_crf(square_image(), np.full((2, 32, 32), 0.5), CrfParams())
    assert str(error.value) == (
        "pydensecrf is not installed: pip install pydensecrf2 "
        "(it builds from source and needs a C++ compiler)"
    )
