"""Adversarial erasing and its seeds (AE-PSL, Wei et al. CVPR 2017), with saliency by components.

Every function here is pure: numpy arrays in, a new numpy array out, inputs never modified.
Seed maps use the label convention of the whole tool: 0 = background, 1..C = classes, 255 = in doubt
(ignored by the segmenter's loss).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from stages.common.errors import ConfigError

IGNORE = 255
BACKGROUND = 0

# AE-PSL: the mined region of a round is the top 20% of a class's CAM.
DEFAULT_TOP_FRACTION = 0.2
# AE-PSL: background is where every round's CAM is below 5% of its max ...
DEFAULT_LOW_CAM_THR = 0.05
# ... or, with a saliency map, where saliency is below 0.06.
DEFAULT_SALIENCY_BG_THR = 0.06
# Oh et al. CVPR 2017: salient objects are the saliency map binarised at 0.5.
DEFAULT_SALIENT_THR = 0.5


def mined_region(
    cam: np.ndarray,
    top_fraction: float | None = DEFAULT_TOP_FRACTION,
    threshold: float | None = None,
) -> np.ndarray:
    """The region R_t,c a round mines for one class: what the next round's image loses.

    Args:
        cam: (H, W) float, the class's CAM normalised by its max, values in [0, 1].
        top_fraction: keep the pixels holding the top share of the class's CAM, counted among the
            pixels with CAM > 0 (AE-PSL: 0.2). The cut is the value of the k-th largest positive pixel,
            k = round(top_fraction * number of positive pixels) (at least 1), and every pixel whose
            CAM is >= that value is kept: pixels tied with the k-th are all mined, so the region can
            be larger than k, never smaller.
        threshold: a fixed cut δ in (0, 1] on the normalised CAM (`--erase-thr`); when given it
            replaces the top-fraction rule, so `mined_region(cam, threshold=0.5)` needs no
            `top_fraction=None`.

    Returns:
        (H, W) bool, True on mined pixels. A CAM with no positive pixel mines nothing.
    """
    cam = np.asarray(cam)
    if cam.ndim != 2:
        raise ValueError(f"cam must be (H, W), got shape {cam.shape}")
    if threshold is not None:
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"erase threshold must be in (0, 1], got {threshold}")
        return cam >= threshold
    if top_fraction is None:
        raise ConfigError("give either top_fraction or threshold to mine a region, got neither")
    if not 0.0 < top_fraction <= 1.0:
        raise ConfigError(f"top fraction must be in (0, 1], got {top_fraction}")
    positive = cam[cam > 0]
    if positive.size == 0:
        return np.zeros(cam.shape, dtype=bool)
    # floor(x + 0.5) rather than round(): 0.2 * 5 must give 1, and Python rounds halves to even.
    k = max(1, math.floor(top_fraction * positive.size + 0.5))
    cut = np.partition(positive, positive.size - k)[positive.size - k]
    return cam >= cut


def erase(image: np.ndarray, mask: np.ndarray, mean_pixel: np.ndarray) -> np.ndarray:
    """I_{t+1}: the image with its mined pixels filled by the dataset mean pixel (AE-PSL).

    Args:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool, the union over classes of this round's mined regions.
        mean_pixel: (3,) RGB mean of the dataset in 0..255, rounded to the nearest integer (half to even).

    Returns:
        (H, W, 3) uint8, a new array; pixels outside `mask` are bit-identical to `image`.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
    fill = _mean_as_uint8(mean_pixel)
    erased = image.copy()
    erased[mask.astype(bool)] = fill
    return erased


def _mean_as_uint8(mean_pixel: np.ndarray) -> np.ndarray:
    mean = np.asarray(mean_pixel, dtype=np.float64).reshape(-1)
    if mean.shape != (3,):
        raise ValueError(f"mean_pixel must have 3 values (RGB), got shape {np.shape(mean_pixel)}")
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def union_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Pixel-wise OR of same-shape bool masks (e.g. F_c = ∪_t R_t,c). Needs at least one mask."""
    if len(masks) == 0:
        raise ValueError("union_masks needs at least one mask to know the shape")
    shape = np.shape(masks[0])
    for m in masks:
        if np.shape(m) != shape:
            raise ValueError(f"masks differ in shape: {shape} and {np.shape(m)}")
    return np.logical_or.reduce([np.asarray(m, dtype=bool) for m in masks])


def _claims(mined: Mapping[int, np.ndarray], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(count, label): how many classes' F_c hold at each pixel, and the last such class id."""
    count = np.zeros(shape, dtype=np.int32)
    label = np.zeros(shape, dtype=np.uint8)
    for class_id, region in mined.items():
        if not 1 <= class_id < IGNORE:
            raise ValueError(f"class ids must be in 1..254 (0 is background), got {class_id}")
        region = np.asarray(region, dtype=bool)
        if region.shape != shape:
            raise ValueError(f"mined region of class {class_id} is {region.shape}, expected {shape}")
        count += region
        label[region] = class_id
    return count, label


def seeds_from_mined(mined: Mapping[int, np.ndarray], low_cam: np.ndarray) -> np.ndarray:
    """Segmentation seeds from the mined regions and the low-CAM background (AE-PSL).

    Args:
        mined: class id (1..C) -> (H, W) bool F_c, the union of the class's mined regions over rounds.
        low_cam: (H, W) bool, True where every round's CAM of every class is low (`low_cam_mask`).

    Returns:
        (H, W) uint8: c where exactly one F_c holds; 255 where two or more classes claim the pixel;
        0 where `low_cam` and no class claims it; 255 elsewhere.
    """
    low_cam = np.asarray(low_cam, dtype=bool)
    if low_cam.ndim != 2:
        raise ValueError(f"low_cam must be (H, W), got shape {low_cam.shape}")
    count, label = _claims(mined, low_cam.shape)
    seeds = np.full(low_cam.shape, IGNORE, dtype=np.uint8)
    seeds[low_cam & (count == 0)] = BACKGROUND
    seeds[count == 1] = label[count == 1]
    return seeds


def seeds_with_saliency(
    mined: Mapping[int, np.ndarray],
    saliency: np.ndarray,
    bg_thr: float = DEFAULT_SALIENCY_BG_THR,
) -> np.ndarray:
    """Seeds with background from a saliency map instead of low CAM (AE-PSL, `--saliency`).

    Args:
        mined: class id (1..C) -> (H, W) bool F_c.
        saliency: (H, W) float in [0, 1].
        bg_thr: saliency below this is background (AE-PSL: 0.06).

    Returns:
        (H, W) uint8: c where exactly one F_c holds and saliency >= bg_thr; 0 where saliency < bg_thr
        and no class claims the pixel; 255 for mined pixels of low saliency (a class and the saliency
        disagree), for pixels two classes claim, and for everything else.
    """
    saliency = np.asarray(saliency)
    if saliency.ndim != 2:
        raise ValueError(f"saliency must be (H, W), got shape {saliency.shape}")
    count, label = _claims(mined, saliency.shape)
    low = saliency < bg_thr
    seeds = np.full(saliency.shape, IGNORE, dtype=np.uint8)
    seeds[low & (count == 0)] = BACKGROUND
    sure = (count == 1) & ~low
    seeds[sure] = label[sure]
    return seeds


def merge_saliency_components(
    seeds: np.ndarray,
    saliency: np.ndarray,
    salient_thr: float = DEFAULT_SALIENT_THR,
    bg_thr: float = DEFAULT_SALIENCY_BG_THR,
) -> np.ndarray:
    """Grow seeds over salient objects (Oh et al. CVPR 2017, "Exploiting saliency for object
    segmentation from image level labels").

    Seeds are reliable but small; saliency covers whole objects but not only those of the classes
    asked. So each 8-connected component of salient pixels (saliency >= salient_thr) takes its label
    from the class seeds inside it:
      - seeds of one class inside -> the whole component takes that class;
      - seeds of several classes -> every component pixel takes the class of its nearest seed pixel
        in the component (Euclidean distance, measured straight even where the component bends; at
        equal distance scipy's distance transform picks one, deterministically);
      - no class seed inside -> 255: a salient object of no class of interest, or a missed one.
    A component touches a seed when it contains a seed pixel; 0 and 255 seeds carry no class.
    Outside components: saliency < bg_thr -> 0; between bg_thr and salient_thr -> 255, whatever
    the seed there says (the saliency band is the authority outside objects).

    Args:
        seeds: (H, W) uint8 with 0 / 1..C / 255, e.g. from `seeds_from_mined`.
        saliency: (H, W) float in [0, 1].
        salient_thr: Oh et al.'s binarisation of the saliency map (0.5).
        bg_thr: AE-PSL's background saliency (0.06).

    Returns:
        (H, W) uint8 labels with 0 / 1..C / 255.
    """
    seeds = np.asarray(seeds)
    saliency = np.asarray(saliency)
    if seeds.ndim != 2 or seeds.shape != saliency.shape:
        raise ValueError(f"seeds {seeds.shape} and saliency {saliency.shape} must be the same (H, W)")
    if not 0.0 <= bg_thr <= salient_thr:
        raise ConfigError(f"need 0 <= bg_thr <= salient_thr, got bg_thr={bg_thr}, salient_thr={salient_thr}")
    merged = np.full(seeds.shape, IGNORE, dtype=np.uint8)
    merged[saliency < bg_thr] = BACKGROUND
    components, _ = ndimage.label(saliency >= salient_thr, structure=np.ones((3, 3), dtype=bool))
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        inside = components[box] == index
        local_seeds = seeds[box]
        class_seed = inside & (local_seeds != BACKGROUND) & (local_seeds != IGNORE)
        classes = np.unique(local_seeds[class_seed])
        if classes.size == 0:
            continue
        target = merged[box]
        if classes.size == 1:
            target[inside] = classes[0]
            continue
        # Zeros of the input are the seed pixels; the indices say which one is nearest to each pixel.
        rows, cols = ndimage.distance_transform_edt(~class_seed, return_distances=False, return_indices=True)
        target[inside] = local_seeds[rows, cols][inside]
    return merged


def low_cam_mask(cams: Sequence[np.ndarray], thr: float = DEFAULT_LOW_CAM_THR) -> np.ndarray:
    """Where no round's CAM of any class fires: background for `seeds_from_mined` (AE-PSL).

    Args:
        cams: one (K, H, W) float array per round, K = the image's labelled classes (K may be 0).
        thr: a pixel is low for a class when its CAM is < thr times that class map's max (AE-PSL:
            0.05). A class map that is zero everywhere is low everywhere.

    Returns:
        (H, W) bool, True where every class of every round is low.
    """
    if len(cams) == 0:
        raise ValueError("low_cam_mask needs the CAM of at least one round")
    shape = np.shape(cams[0])[1:]
    low = np.ones(shape, dtype=bool)
    for cam in cams:
        cam = np.asarray(cam)
        if cam.ndim != 3 or cam.shape[1:] != shape or len(shape) != 2:
            raise ValueError(f"each round's CAM must be (K, H, W) with one (H, W), got {cam.shape}")
        peak = cam.max(axis=(1, 2), keepdims=True, initial=0.0)
        low &= np.all((cam < thr * peak) | (peak <= 0), axis=0)
    return low
