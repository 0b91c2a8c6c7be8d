"""Streaming confusion matrix and mmseg metrics vs independent computations."""

import math

import numpy as np
import pytest

from gem_jax.eval.metrics import ConfusionMatrix, metrics_from_confusion


def _reference(preds, labels, c, ignore=255):
    """Per-class pixel-set computation, written independently of the confusion matrix."""
    inter = np.zeros(c)
    union = np.zeros(c)
    gt = np.zeros(c)
    correct = total = 0
    for p, l in zip(preds, labels):
        keep = l != ignore
        p, l = p[keep], l[keep]
        correct += int((p == l).sum())
        total += l.size
        for k in range(c):
            pk, lk = p == k, l == k
            inter[k] += np.logical_and(pk, lk).sum()
            union[k] += np.logical_or(pk, lk).sum()
            gt[k] += lk.sum()
    iou = [inter[k] / union[k] if union[k] else math.nan for k in range(c)]
    acc = [inter[k] / gt[k] if gt[k] else math.nan for k in range(c)]
    present = [v for v in iou if not math.isnan(v)]
    present_acc = [v for v in acc if not math.isnan(v)]
    return dict(IoU=iou, Acc=acc, mIoU=sum(present) / len(present),
                mAcc=sum(present_acc) / len(present_acc), aAcc=correct / total)


def test_hand_built_confusion_matrix():
    # 3 classes, one ignored pixel; class 2 never appears in truth or prediction
    label = np.array([[0, 0, 1, 255], [1, 1, 0, 0]])
    pred = np.array([[0, 1, 1, 2], [1, 0, 0, 0]])
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1] = 3, 1     # truth 0: (0,0) (1,2) (1,3) right, (0,1) → 1
    expected[1, 1], expected[1, 0] = 2, 1     # truth 1: (0,2) (1,0) right, (1,1) → 0
    np.testing.assert_array_equal(cm.matrix, expected)
    m = cm.metrics()
    assert m["IoU"][0] == pytest.approx(3 / 5) and m["IoU"][1] == pytest.approx(2 / 4)
    assert math.isnan(m["IoU"][2]) and math.isnan(m["IoU"][3])   # absent from both: excluded
    assert m["mIoU"] == pytest.approx((3 / 5 + 2 / 4) / 2)
    assert m["aAcc"] == pytest.approx(5 / 7)
    assert m["mAcc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert m["num_classes_evaluated"] == 2 and m["pixels"] == 7


def test_predicted_only_class_counts_as_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 2, 2]), np.array([0, 0, 0]))
    m = cm.metrics()
    assert m["IoU"][2] == 0.0 and math.isnan(m["Acc"][2]) and math.isnan(m["IoU"][1])
    assert m["mIoU"] == pytest.approx((1 / 3 + 0) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_predictions_match_independent_computation(seed):
    rng = np.random.default_rng(seed)
    c = 12
    preds, labels = [], []
    cm = ConfusionMatrix(c)
    for _ in range(4):
        h, w = rng.integers(5, 30, 2)
        # classes 9..11 never used in truth; 10, 11 never predicted either → NaN, excluded
        label = rng.integers(0, 9, (h, w))
        label[rng.random((h, w)) < 0.2] = 255
        pred = rng.integers(0, 10, (h, w))
        cm.update(pred, label)
        preds.append(pred)
        labels.append(label)
    m = cm.metrics()
    ref = _reference(preds, labels, c)
    np.testing.assert_allclose(m["IoU"], ref["IoU"], equal_nan=True)
    np.testing.assert_allclose(m["Acc"], ref["Acc"], equal_nan=True)
    for k in ("mIoU", "mAcc", "aAcc"):
        assert m[k] == pytest.approx(ref[k])
    assert np.isnan(m["IoU"][10:]).all() and m["IoU"][9] == 0.0
    # streaming == one big update
    one = ConfusionMatrix(c)
    one.update(np.concatenate([p.ravel() for p in preds]),
               np.concatenate([l.ravel() for l in labels]))
    np.testing.assert_array_equal(one.matrix, cm.matrix)


def test_update_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside 0..2"):
        cm.update(np.zeros((2, 2)), np.full((2, 2), 7))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="prediction"):
        cm.update(np.full((2, 2), 3), np.zeros((2, 2)))
    cm.update(np.zeros((2, 2)), np.full((2, 2), 255))  # all ignored: no-op
    assert cm.matrix.sum() == 0
    assert math.isnan(metrics_from_confusion(cm.matrix)["mIoU"])
