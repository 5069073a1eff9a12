"""Evaluation numbers: hand-derived confusion matrices, torchmetrics as reference, threshold curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import (
    multiclass_confusion_matrix,
    multiclass_jaccard_index,
    multilabel_average_precision,
    multilabel_f1_score,
)

from stages.common.metrics import (
    DEFAULT_THRESHOLDS,
    ConfusionAccumulator,
    ThresholdCurve,
    average_precision,
    confusion_matrix,
    mean_iou,
    multilabel_scores,
)

NAMES = ["background", "cat", "dog"]
# gt / pred of one 2×4 image: 255 in gt is void, 255 in pred is "unsure".
GT = np.array([[0, 0, 1, 1], [2, 2, 255, 0]], dtype=np.uint8)
PRED = np.array([[0, 1, 1, 1], [2, 0, 2, 255]], dtype=np.uint8)


def test_confusion_matrix_by_hand() -> None:
    # Pixels (gt→pred): 0→0, 0→1, 1→1, 1→1, 2→2, 2→0; gt 255 skipped; pred 255 left to the accumulator.
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    cm = confusion_matrix(PRED, GT, 3)
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64


def test_summary_by_hand_and_against_torchmetrics() -> None:
    acc = ConfusionAccumulator(3)
    acc.update(PRED, GT)
    s = acc.summary(NAMES)
    # Unsure as background: cm = [[2,1,0],[0,2,0],[1,0,1]].
    #   IoU bg = 2/(3+3-2) = 1/2, cat = 2/(2+3-2) = 2/3, dog = 1/(2+1-1) = 1/2 → mIoU = 5/9 = 55.56 %.
    # Labelled only: cm = [[1,1,0],[0,2,0],[1,0,1]] → 1/3, 2/3, 1/2 → mIoU = 1/2 = 50 %.
    # coverage 6/7; pixel accuracy 5/7; foreground precision (2+1)/(3+1) = 75 %, recall 3/(2+2) = 75 %.
    assert s["miou"] == pytest.approx(500 / 9)
    assert s["miou_labelled_only"] == pytest.approx(50.0)
    assert s["per_class_iou"] == pytest.approx({"background": 50.0, "cat": 200 / 3, "dog": 50.0})
    assert s["coverage"] == pytest.approx(600 / 7)
    assert s["pixel_accuracy"] == pytest.approx(500 / 7)
    assert (s["precision"], s["recall"]) == pytest.approx((75.0, 75.0))
    assert s["per_class_fp"]["background"] == pytest.approx(25.0)  # (3 − 2) / 4
    assert s["per_class_recall"]["dog"] == pytest.approx(50.0)
    assert s["images"] == 1

    gt, as_background = torch.from_numpy(GT).long(), torch.from_numpy(np.where(PRED == 255, 0, PRED)).long()
    reference = multiclass_jaccard_index(as_background, gt, num_classes=3, ignore_index=255, average=None)
    np.testing.assert_allclose(list(s["per_class_iou"].values()), reference.numpy() * 100, rtol=1e-6)
    labelled_gt = torch.where(torch.from_numpy(PRED == 255), 255, gt)
    reference = multiclass_jaccard_index(as_background, labelled_gt, num_classes=3, ignore_index=255)
    assert s["miou_labelled_only"] == pytest.approx(reference.item() * 100)


@pytest.mark.parametrize("unsure", [0.0, 0.2])
def test_iou_fp_fn_sum_to_100_and_absent_classes_do_not_count(unsure: float) -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 3, size=(20, 30)).astype(np.uint8)  # class 3 never appears
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 3, size=gt.shape)).astype(np.uint8)
    pred[rng.random(gt.shape) < unsure] = 255
    gt[:2] = 255
    acc = ConfusionAccumulator(4)
    acc.update(pred, gt)
    s = acc.summary(NAMES + ["bird"])
    for name in NAMES:
        iou, fp, fn = (s[key][name] for key in ("per_class_iou", "per_class_fp", "per_class_fn"))
        assert iou + fp + fn == pytest.approx(100)
    assert s["per_class_iou"]["bird"] is None
    assert s["miou"] == pytest.approx(np.mean([s["per_class_iou"][n] for n in NAMES]))
    assert s["coverage"] == pytest.approx(100 * np.mean(pred[gt != 255] != 255))


def test_confusion_matrix_matches_torchmetrics_and_accumulates() -> None:
    rng = np.random.default_rng(1)
    acc = ConfusionAccumulator(5)
    total = np.zeros((5, 5), dtype=np.int64)
    for _ in range(3):
        gt = rng.integers(0, 5, size=(16, 12)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = rng.integers(0, 5, size=gt.shape).astype(np.uint8)
        acc.update(pred, gt)
        total += multiclass_confusion_matrix(
            torch.from_numpy(pred).long(), torch.from_numpy(gt).long(), num_classes=5, ignore_index=255
        ).numpy()
    np.testing.assert_array_equal(acc.matrix(), total)
    other = ConfusionAccumulator(5)
    other.merge(acc)
    assert other.images == 3 and mean_iou(other.matrix()) == pytest.approx(acc.summary(list("abcde"))["miou"])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(PRED, GT[:, :3], 3)
    with pytest.raises(ValueError, match="label 3"):
        confusion_matrix(PRED, np.where(GT == 2, 3, GT).astype(np.uint8), 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(PRED.astype(np.float32), GT, 3)
    with pytest.raises(ValueError, match="class names"):
        ConfusionAccumulator(3).summary(["a", "b"])
    with pytest.raises(ValueError, match="1..2"):
        ThresholdCurve(3).update(np.zeros((1, 2, 4)), [0], GT)
    with pytest.raises(ValueError, match=r"\(K, H, W\)"):
        ThresholdCurve(3).update(np.zeros((2, 2, 4)), [1], GT)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        multilabel_scores(np.zeros(3), np.zeros(3))


def test_threshold_curve_in_one_pass_equals_recomputation_per_threshold() -> None:
    rng = np.random.default_rng(2)
    curve = ThresholdCurve(4)
    per_threshold = [ConfusionAccumulator(4) for _ in DEFAULT_THRESHOLDS]
    for classes in ([1, 3], [2], [], [3, 1, 2]):
        gt = rng.choice([0, 255, *classes], size=(9, 11)).astype(np.uint8)
        scores = rng.random((len(classes), 9, 11)).astype(np.float16)
        scores[:, 0, :3] = [0.05, 0.5, 0.95]  # near thresholds: float16 values compared exactly
        scores[:, 0, 3] = 0.5  # exactly on one: "≥ t" is foreground
        curve.update(scores, classes, gt)
        for t, acc in zip(DEFAULT_THRESHOLDS, per_threshold, strict=True):
            best = scores.astype(np.float64).max(0, initial=-1.0)
            label = np.asarray(classes)[scores.argmax(0)] if classes else 0
            acc.update(np.where(best >= t, label, 0).astype(np.uint8), gt)
    for (t, miou), acc in zip(curve.curve(), per_threshold, strict=True):
        np.testing.assert_array_equal(curve.matrices[DEFAULT_THRESHOLDS.index(t)], acc.matrix())
        assert miou == pytest.approx(acc.summary(["bg", "a", "b", "c"])["miou"])
    t_best, m_best = curve.best()
    assert m_best == max(m for _, m in curve.curve()) and t_best in DEFAULT_THRESHOLDS


def test_average_precision_by_hand() -> None:
    # Ranked labels 1, 0, 1, 0: precision 1 at recall 1/2, 2/3 at recall 1 → AP = ½·1 + ½·⅔ = 5/6.
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # A tie between a positive and a negative is one operating point: precision ½ at recall 1.
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)


def test_multilabel_scores_match_torchmetrics() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((40, 5)) < 0.4).astype(np.int64)
    targets[:, 4] = 0  # no positive: left out of the mean
    # Rounding makes ties, and values of exactly 0.5 (not a positive decision).
    probs = np.clip(targets * 0.3 + rng.random((40, 5)) * 0.7, 0, 1).round(2)
    assert (probs == 0.5).any()
    got = multilabel_scores(probs, targets)
    p, t = torch.from_numpy(probs).float(), torch.from_numpy(targets)
    with_positives = multilabel_average_precision(p[:, :4], t[:, :4], num_labels=4, average="macro")
    assert got["mAP"] == pytest.approx(with_positives.item() * 100, rel=1e-5)
    f1 = multilabel_f1_score(p, t, num_labels=5, threshold=0.5, average="micro")
    assert got["f1"] == pytest.approx(f1.item() * 100, rel=1e-5)
