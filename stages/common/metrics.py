"""Segmentation and classification quality: confusion matrices, mIoU, threshold curves, mAP.

The confusion matrix is accumulated with one `np.bincount` per image, as detectron2's
`SemSegEvaluator` does; IoU_c = TP / (TP + FP + FN), mIoU = mean over the classes present in the
ground truth or the prediction (an absent class has no union, so no IoU). All percentages are floats
in 0..100. Label maps use 0 = background, 1..C = classes, 255 = void (ground truth) or unsure
(prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE = 255

# Background thresholds for score maps without a background channel: 0.05, 0.10, ..., 0.95.
DEFAULT_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _check_maps(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    for name, array in (("prediction", pred), ("ground truth", gt)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be an integer label map, got {array.dtype}")
        bad = (array >= num_classes) & (array != IGNORE) | (array < 0)
        if bad.any():
            raise ValueError(
                f"{name} holds label {int(array[bad].flat[0])}, outside 0..{num_classes - 1} and 255"
            )


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel counts (num_classes, num_classes) int64: rows = ground truth, columns = prediction.

    Counts pixels whose ground truth is not 255 and whose prediction is not 255; predicted 255
    (unsure) pixels are left out here and counted by `ConfusionAccumulator`, which reports them.
    """
    _check_maps(pred, gt, num_classes)
    keep = (gt != IGNORE) & (pred != IGNORE)
    index = gt[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of each class from a (N, N) confusion matrix, as a fraction; NaN where the union is empty."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """mIoU in percent over the classes present in ground truth or prediction (0 for an empty matrix)."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else 0.0


def _percent(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.asarray(den) > 0, 100.0 * np.asarray(num) / np.asarray(den), np.nan)


def _by_name(values: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    # None (JSON null) rather than NaN, which strict JSON readers reject.
    return {name: (None if np.isnan(v) else float(v)) for name, v in zip(names, values, strict=True)}


class ConfusionAccumulator:
    """Accumulates a segmentation evaluation over images (reset / update / summary, as detectron2).

    Keeps two counts: the confusion matrix of labelled predictions, and per ground-truth class the
    pixels predicted 255 (unsure). The headline numbers count unsure pixels as background (a pixel the
    method did not claim is not an object); `miou_labelled_only` and `coverage` describe a seed map
    that abstains on purpose: how much it labels, and how right it is where it does.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes counts background and classes, needs ≥ 2, got {num_classes}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.labelled = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.unsure = np.zeros(self.num_classes, dtype=np.int64)
        self.images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: `pred` and `gt` integer label maps (H, W), 255 = unsure / void."""
        self.labelled += confusion_matrix(pred, gt, self.num_classes)
        unsure = (pred == IGNORE) & (gt != IGNORE)
        self.unsure += np.bincount(gt[unsure].astype(np.int64), minlength=self.num_classes)
        self.images += 1

    def merge(self, other: ConfusionAccumulator) -> None:
        """Add another accumulator's counts (e.g. from another shard or rank)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
        self.labelled += other.labelled
        self.unsure += other.unsure
        self.images += other.images

    def matrix(self) -> np.ndarray:
        """Confusion matrix with unsure predictions counted as background (column 0)."""
        cm = self.labelled.copy()
        cm[:, 0] += self.unsure
        return cm

    def summary(self, class_names: Sequence[str]) -> dict[str, Any]:
        """JSON-able figures; `class_names` has num_classes entries, background first.

        miou, pixel_accuracy and the per-class figures use unsure-as-background. Per class:
        iou + fp + fn = 100 (fp = FP / union, fn = FN / union). precision / recall pool the
        foreground classes: correctly labelled foreground pixels over predicted (resp. ground-truth)
        foreground pixels. Classes absent from ground truth and prediction have null entries.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        cm = self.matrix()
        tp = np.diag(cm)
        predicted, actual = cm.sum(0), cm.sum(1)
        union = predicted + actual - tp
        labelled, total = int(self.labelled.sum()), int(cm.sum())
        return {
            "miou": mean_iou(cm),
            "miou_labelled_only": mean_iou(self.labelled),
            "per_class_iou": _by_name(_percent(tp, union), class_names),
            "per_class_precision": _by_name(_percent(tp, predicted), class_names),
            "per_class_recall": _by_name(_percent(tp, actual), class_names),
            "per_class_fp": _by_name(_percent(predicted - tp, union), class_names),
            "per_class_fn": _by_name(_percent(actual - tp, union), class_names),
            "precision": float(np.nan_to_num(_percent(tp[1:].sum(), predicted[1:].sum()))),
            "recall": float(np.nan_to_num(_percent(tp[1:].sum(), actual[1:].sum()))),
            "pixel_accuracy": float(np.nan_to_num(_percent(tp.sum(), total))),
            "coverage": float(np.nan_to_num(_percent(labelled, total))),
            "images": self.images,
            "unsure_convention": "predicted 255 counted as background, except in miou_labelled_only",
        }


def threshold_curve_update(
    matrices: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[int],
    gt: np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> None:
    """Add one image to a stack of confusion matrices (T, N, N), one per background threshold.

    `scores` (K, H, W) are the image's foreground score maps (no background channel) for `classes`
    (their labels in 1..N-1), at the ground truth's size. At threshold t a pixel takes the class of its
    highest score when that score ≥ t, else background. One pass over the pixels: a pixel is
    foreground exactly for the first n thresholds (n = number of thresholds ≤ its max score), so a
    single bincount over (n, gt, class) gives every matrix by cumulative sums over n.
    """
    count, n_cls, _ = matrices.shape
    thr = np.asarray(thresholds, dtype=np.float64)
    if count != len(thr) or np.any(np.diff(thr) <= 0):
        raise ValueError(f"need {count} increasing thresholds for {count} matrices, got {len(thr)}")
    if scores.ndim != 3 or scores.shape[0] != len(classes) or scores.shape[1:] != gt.shape:
        raise ValueError(
            f"scores {scores.shape} must be (K, H, W) with K = {len(classes)} classes and (H, W) = {gt.shape}"
        )
    labels = np.asarray(classes, dtype=np.int64)
    if np.any((labels < 1) | (labels >= n_cls)):
        raise ValueError(f"classes {list(classes)} must lie in 1..{n_cls - 1} (0 is the background)")
    _check_maps(gt, gt, n_cls)
    keep = gt != IGNORE
    truth = gt[keep].astype(np.int64)
    if len(labels) == 0:
        matrices[:, :, 0] += np.bincount(truth, minlength=n_cls)
        return
    flat = scores.reshape(len(labels), -1)[:, keep.reshape(-1)].astype(np.float64)
    best = labels[flat.argmax(0)]
    n_fg = np.searchsorted(thr, flat.max(0), side="right")  # thresholds at which the pixel is foreground
    hist = np.bincount((n_fg * n_cls + truth) * n_cls + best, minlength=(count + 1) * n_cls * n_cls).reshape(
        count + 1, n_cls, n_cls
    )
    # At threshold i, pixels with n_fg > i keep their class; the others (n_fg ≤ i) become background.
    foreground = np.cumsum(hist[::-1], axis=0)[::-1][1:]
    background = np.cumsum(hist.sum(axis=2), axis=0)[:-1]
    matrices += foreground
    matrices[:, :, 0] += background


class ThresholdCurve:
    """mIoU of score maps without background as a function of a constant background threshold.

    A diagnostic that uses ground truth to choose the threshold: report it as such; the pipeline's
    defaults never pick a threshold this way (METHODS §6).
    """

    def __init__(self, num_classes: int, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
        self.num_classes = num_classes
        self.thresholds = tuple(float(t) for t in thresholds)
        self.matrices = np.zeros((len(self.thresholds), num_classes, num_classes), dtype=np.int64)

    def update(self, scores: np.ndarray, classes: Sequence[int], gt: np.ndarray) -> None:
        """Add one image: scores (K, H, W) for `classes` (1..C), gt (H, W) with 255 = void."""
        threshold_curve_update(self.matrices, scores, classes, gt, self.thresholds)

    def curve(self) -> list[tuple[float, float]]:
        """(threshold, mIoU in percent) for every threshold."""
        return [(t, mean_iou(cm)) for t, cm in zip(self.thresholds, self.matrices, strict=True)]

    def best(self) -> tuple[float, float]:
        """The (threshold, mIoU) with the highest mIoU; the lowest such threshold on ties."""
        return max(self.curve(), key=lambda point: point[1])


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall step curve, Σ_n (R_n − R_{n−1}) P_n, as a fraction.

    Tied scores form one operating point (the definition of scikit-learn and torchmetrics).
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positives[order].astype(np.int64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_scores(probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Image-classification quality of probabilities (N, C) against 0/1 targets (N, C), in percent.

    mAP = mean average precision over the classes with at least one positive; f1 = micro F1 of the
    decisions probs > 0.5 (logit > 0, torchmetrics' convention) over all (image, class) pairs.
    """
    if probs.shape != targets.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} must both be (N, C)")
    truth = targets.astype(bool)
    aps = [average_precision(probs[:, c], truth[:, c]) for c in range(probs.shape[1]) if truth[:, c].any()]
    decided = probs > 0.5
    tp = np.sum(decided & truth)
    denominator = decided.sum() + truth.sum()
    return {
        "mAP": float(np.mean(aps) * 100) if aps else 0.0,
        "f1": float(200.0 * tp / denominator) if denominator else 0.0,
    }
