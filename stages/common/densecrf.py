"""Fully connected CRF (Krähenbühl & Koltun, NeurIPS 2011) through pydensecrf, as pure array functions.

pydensecrf builds from source, so it is imported on first use: a missing install becomes one
`ConfigError` line that says what to type, not an ImportError at `wsss --help`.
One call handles one image on one core; stages run images in a process pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from stages.common.errors import ConfigError

_MISSING = (
    "pydensecrf is not installed: pip install pydensecrf2 (it builds from source and needs a C++ compiler)"
)

# Probabilities are clipped before the log so a zero never becomes an infinite unary.
_MIN_PROB = 1e-8


def _densecrf() -> ModuleType:
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as error:
        raise ConfigError(_MISSING) from error
    return densecrf


@dataclass(frozen=True)
class CrfParams:
    """Pairwise kernels and iterations; the defaults are PSA's (Ahn & Kwak, CVPR 2018) for refined maps.

    `gaussian_*` is the smoothness kernel (position only), `bilateral_*` the appearance kernel
    (position and RGB); `*_sxy` in pixels, `bilateral_srgb` in 0-255 intensity units.
    """

    gaussian_sxy: float = 3
    gaussian_compat: float = 3
    bilateral_sxy: float = 80
    bilateral_srgb: float = 13
    bilateral_compat: float = 10
    iterations: int = 10

    @classmethod
    def deeplab(cls) -> CrfParams:
        """DeepLab's (Chen et al., TPAMI 2017) set for segmenter outputs at test time."""
        return cls(
            gaussian_sxy=1,
            gaussian_compat=3,
            bilateral_sxy=67,
            bilateral_srgb=3,
            bilateral_compat=4,
        )


def _check_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.dtype != np.uint8 or image.shape != (height, width, 3):
        raise ValueError(
            f"the CRF needs a uint8 (H, W, 3) image of the maps' size {(height, width, 3)}, "
            f"got {image.dtype} {image.shape}"
        )
    return np.ascontiguousarray(image)


def _infer(image: np.ndarray, unary: np.ndarray, params: CrfParams) -> np.ndarray:
    """Mean-field inference from a (K, H*W) unary energy; returns the (K, H, W) posterior."""
    n_labels = unary.shape[0]
    height, width = image.shape[:2]
    crf = _densecrf().DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=image,
        compat=params.bilateral_compat,
    )
    posterior = crf.inference(params.iterations)
    return np.asarray(posterior, dtype=np.float32).reshape(n_labels, height, width)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
    """Dense CRF on class probabilities.

    Args:
        image: (H, W, 3) uint8 RGB.
        probs: (K, H, W) probabilities, background channel included if the caller has one; each
            pixel should sum to 1 (the unary is -log p, with p clipped at 1e-8).
        params: kernels; `CrfParams.deeplab()` for segmenter outputs.

    Returns:
        (K, H, W) float32 posterior marginals.
    """
    if probs.ndim != 3:
        raise ValueError(f"probs must be (K, H, W), got shape {probs.shape}")
    n_labels, height, width = probs.shape
    image = _check_image(image, height, width)
    unary = -np.log(np.clip(probs.astype(np.float32, copy=False), _MIN_PROB, None))
    return _infer(image, unary.reshape(n_labels, -1), params)


def label_crf(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    gt_prob: float = 0.7,
    params: CrfParams = CrfParams(),
) -> np.ndarray:
    """Dense CRF on a hard label map, as PSA and IRN smooth their confident labels.

    Each pixel's label gets probability `gt_prob` (0.7, PSA/IRN) and the others share the rest
    equally; a label outside [0, n_labels) (e.g. 255) gives a uniform, uninformative unary.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) integer label indices.
        n_labels: number of labels K (at least 2).

    Returns:
        (K, H, W) float32 posterior; `crf_labels` turns it into labels.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if n_labels < 2:
        raise ValueError(f"label_crf needs at least 2 labels, got {n_labels}")
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    height, width = labels.shape
    image = _check_image(image, height, width)
    flat = labels.reshape(-1).astype(np.int64)
    known = (flat >= 0) & (flat < n_labels)
    probs = np.full((n_labels, flat.size), (1.0 - gt_prob) / (n_labels - 1), dtype=np.float32)
    probs[:, ~known] = 1.0 / n_labels
    probs[flat[known], np.flatnonzero(known)] = gt_prob
    return _infer(image, -np.log(probs), params)


def crf_labels(probs_after: np.ndarray, min_conf: float | None = None) -> np.ndarray:
    """Argmax of a (K, H, W) posterior as (H, W) uint8 channel indices, 255 where max < `min_conf`.

    The indices point into the K channels; mapping a channel to a class id is the caller's.
    """
    if probs_after.ndim != 3 or probs_after.shape[0] > 255:
        raise ValueError(f"probs_after must be (K, H, W) with K <= 255, got shape {probs_after.shape}")
    labels = probs_after.argmax(axis=0).astype(np.uint8)
    if min_conf is not None:
        labels[probs_after.max(axis=0) < min_conf] = 255
    return labels
