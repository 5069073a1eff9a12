"""Plain per-pixel loops of the maths the vectorised algorithms compute, for `make bench` to compare.

Each loop follows its paper's definition pixel by pixel with Python scalars, so a disagreement with the
vectorised function points at the vectorised one; `bench/run.py` reports both the speed ratio and the
largest difference. Inputs are kept small: these loops are slow on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stages.refine.pamr import neighbour_shifts


def pamr_loop(image: np.ndarray, masks: np.ndarray, dilations: Sequence[int], iterations: int) -> np.ndarray:
    """PAMR (Araslanov & Roth, CVPR 2020) one pixel at a time.

    image float64 (3, H, W), masks float64 (K, H, W) at the same size -> (K, H, W). For each pixel i and
    its 8·len(dilations) neighbours j (replicate border): κ_ij = mean_c −|I_ic − I_jc| / (0.1·σ_ic + 1e-8),
    σ_ic the population std of i and its neighbours in channel c; α_i = softmax_j κ_ij; then
    `iterations` times m_i ← Σ_j α_ij m_j.
    """
    channels, height, width = image.shape
    shifts = neighbour_shifts(dilations)

    def at(y: int, x: int, dy: int, dx: int) -> tuple[int, int]:
        return min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)

    alpha = [[[0.0] * len(shifts) for _ in range(width)] for _ in range(height)]
    for y in range(height):
        for x in range(width):
            kappa = [0.0] * len(shifts)
            for c in range(channels):
                values = [float(image[c, y, x])] + [float(image[(c, *at(y, x, dy, dx))]) for dy, dx in shifts]
                mean = sum(values) / len(values)
                sigma = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                for s in range(len(shifts)):
                    kappa[s] += -abs(values[0] - values[s + 1]) / (0.1 * sigma + 1e-8) / channels
            top = max(kappa)
            exps = [math.exp(k - top) for k in kappa]
            total = sum(exps)
            alpha[y][x] = [e / total for e in exps]
    current = masks.astype(np.float64).copy()
    for _ in range(iterations):
        updated = np.zeros_like(current)
        for k in range(current.shape[0]):
            for y in range(height):
                for x in range(width):
                    updated[k, y, x] = sum(
                        alpha[y][x][s] * current[(k, *at(y, x, dy, dx))] for s, (dy, dx) in enumerate(shifts)
                    )
        current = updated
    return current


def region_grow_loop(
    probs: np.ndarray, seeds: np.ndarray, image_classes: Sequence[int], fg_thr: float, bg_thr: float
) -> np.ndarray:
    """DSRG's seeded region growing (Huang et al., CVPR 2018) as the paper describes it: repeatedly
    give an unlabelled pixel the class of a labelled 8-neighbour when that class is its argmax (among
    background and the image's classes) with probability above the threshold, until nothing changes."""
    classes = [0, *sorted({int(c) for c in image_classes})]
    height, width = seeds.shape
    winner = np.zeros((height, width), dtype=np.int64)
    above = np.zeros((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            best = max(classes, key=lambda c: (probs[c, y, x], -classes.index(c)))
            winner[y, x] = best
            above[y, x] = probs[best, y, x] > (bg_thr if best == 0 else fg_thr)
    grown = seeds.astype(np.uint8).copy()
    changed = True
    while changed:
        changed = False
        for y in range(height):
            for x in range(width):
                if grown[y, x] != 255 or not above[y, x]:
                    continue
                c = winner[y, x]
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if (dy or dx) and 0 <= ny < height and 0 <= nx < width and grown[ny, nx] == c:
                            grown[y, x] = c
                            changed = True
                            break
                    if grown[y, x] != 255:
                        break
    return grown


def confusion_loop(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix (rows ground truth, columns prediction) counted pixel by pixel, 255 skipped."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist(), strict=True):
        if g != 255 and p != 255:
            cm[g, p] += 1
    return cm


def random_walk_loop(
    aff_pairs: np.ndarray, offsets: Sequence[tuple[int, int]], seeds: np.ndarray, beta: float, steps: int
) -> np.ndarray:
    """The AffinityNet/IRN random walk with one neighbour list per pixel.

    aff_pairs (P, h, w) affinities of each pixel with its partner at each half-plane offset; the walk
    matrix holds a^β in both directions plus a self-loop of 1, each row divided by its sum; seeds
    (K+1, h, w) are multiplied `steps` times, then the class channels divided by their common max + 1e-5.
    """
    _, height, width = aff_pairs.shape
    n = height * width
    neighbours: list[list[tuple[int, float]]] = [[(i, 1.0)] for i in range(n)]
    for p, (dy, dx) in enumerate(offsets):
        for y in range(height):
            for x in range(width):
                ty, tx = y + dy, x + dx
                if 0 <= ty < height and 0 <= tx < width:
                    weight = max(float(aff_pairs[p, y, x]), 0.0) ** beta
                    neighbours[y * width + x].append((ty * width + tx, weight))
                    neighbours[ty * width + tx].append((y * width + x, weight))
    rows = []
    for entries in neighbours:
        total = sum(w for _, w in entries)
        rows.append([(j, w / total) for j, w in entries])
    walked = seeds.reshape(seeds.shape[0], n).T.astype(np.float64).tolist()
    for _ in range(steps):
        walked = [[sum(w * walked[j][k] for j, w in row) for k in range(len(walked[0]))] for row in rows]
    result = np.asarray(walked).T.reshape(seeds.shape)
    result[1:] /= result[1:].max() + 1e-5
    return result
