"""Streaming confusion matrix and the mmsegmentation segmentation metrics.

    cm[t, p] = number of pixels of true class t predicted as p     (ignore label excluded)

    IoU_c  = cm[c, c] / (Σ_p cm[c, p] + Σ_t cm[t, c] − cm[c, c])   NaN when the class is absent
                                                                     from both truth and prediction
    Acc_c  = cm[c, c] / Σ_p cm[c, p]                                NaN when absent from the truth
    mIoU   = nanmean(IoU),  mAcc = nanmean(Acc),  aAcc = trace(cm) / Σ cm

exactly as mmseg's ``IoUMetric`` (``intersect_and_union`` + ``total_area_to_metrics``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ConfusionMatrix", "metrics_from_confusion"]

IGNORE_INDEX = 255


class ConfusionMatrix:
    """An int64 ``[C, C]`` confusion matrix accumulated with `numpy.bincount`."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, matrix=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        if matrix is None:
            self.matrix = np.zeros((num_classes, num_classes), np.int64)
        else:
            m = np.asarray(matrix)
            if m.shape != (num_classes, num_classes):
                raise ValueError(f"matrix shape {m.shape} does not match {num_classes} classes")
            self.matrix = m.astype(np.int64).copy()

    def update(self, pred, label) -> None:
        """Add one prediction / label pair (same shape, integer class ids)."""
        pred = np.asarray(pred)
        label = np.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
        c = self.num_classes
        label = label.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        keep = label != self.ignore_index
        label, pred = label[keep], pred[keep]
        if label.size == 0:
            return
        bad = (label < 0) | (label >= c)
        if bad.any():
            vals = np.unique(label[bad])[:10].tolist()
            raise ValueError(f"label values {vals} are outside 0..{c - 1} and not the ignore "
                             f"index {self.ignore_index}: wrong dataset (or reduce_zero_label)?")
        if ((pred < 0) | (pred >= c)).any():
            raise ValueError(f"prediction values outside 0..{c - 1}")
        self.matrix += np.bincount(label * c + pred, minlength=c * c).reshape(c, c)

    def merge(self, other: "ConfusionMatrix") -> None:
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices of different sizes")
        self.matrix += other.matrix

    def metrics(self) -> dict:
        return metrics_from_confusion(self.matrix)


def metrics_from_confusion(cm) -> dict:
    """Metrics (fractions in [0, 1], NaN where undefined) from a confusion matrix."""
    cm = np.asarray(cm, np.int64)
    inter = np.diag(cm).astype(np.float64)
    area_label = cm.sum(1).astype(np.float64)
    area_pred = cm.sum(0).astype(np.float64)
    union = area_label + area_pred - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
        acc = np.where(area_label > 0, inter / np.where(area_label > 0, area_label, 1), np.nan)
    total = cm.sum()
    valid = ~np.isnan(iou)
    return {
        "mIoU": float(np.nanmean(iou)) if valid.any() else math.nan,
        "mAcc": float(np.nanmean(acc)) if (~np.isnan(acc)).any() else math.nan,
        "aAcc": float(inter.sum() / total) if total > 0 else math.nan,
        "IoU": iou,
        "Acc": acc,
        "intersection": inter.astype(np.int64),
        "union": union.astype(np.int64),
        "gt_pixels": area_label.astype(np.int64),
        "pred_pixels": area_pred.astype(np.int64),
        "num_classes_evaluated": int(valid.sum()),
        "pixels": int(total),
    }
