"""OpenImages V7 point labels and the point-based mIoU (p-mIoU) that GEM reports on them.

Files (official names, https://storage.googleapis.com/openimages/web/download_v7.html; the same
URLs are in voxel51/fiftyone ``fiftyone/utils/openimages.py``):

    oidv7-val-annotations-point-labels.csv    (test: oidv7-test-..., train: oidv7-train-...)
        ImageId,X,Y,Label,EstimatedYesNo,Source,YesVotes,NoVotes,UnsureVotes,TextLabel
    oidv7-class-descriptions.csv
        LabelName,DisplayName

One row per labelled point: ``X``, ``Y`` are normalized coordinates in [0, 1] (x to the right, y
down), ``Label`` a class MID (``/m/...``), ``EstimatedYesNo`` the answer to "is this point on a
<class>?": ``yes``, ``no`` or ``unsure``.  ``Source``/``*Votes``/``TextLabel`` are read when
present but not needed.  The header of the class file is optional (V5/V6 files had none).

Layout under ``root`` (searched in this order):
    points CSV:  root/, root/annotations/, root/labels/
    classes CSV: root/, root/annotations/, root/metadata/
    images:      root/validation/, root/images/validation/, root/data/, root/images/, root/
                 (``<ImageId>.jpg``, as the official downloader and FiftyOne store them)

p-mIoU (Benenson & Ferrari, "From colouring-in to pointillism", arXiv 2210.14142, as used by GEM
and LeGrad): a method predicts, for every (image, class) pair that has points, a binary mask; here
the class's heatmap thresholded at `threshold` (0.5 on GEM's min-max normalized heatmaps), a point
being positive when the score at it is ``> threshold``.  Then per class c over the whole split

    TP_c = "yes" points of c predicted positive      FN_c = "yes" points of c predicted negative
    FP_c = "no"  points of c predicted positive      ("no" predicted negative: true negatives)
    "unsure" points are ignored;  IoU_c = TP_c / (TP_c + FP_c + FN_c)
    p-mIoU = mean of IoU_c over the classes where TP_c + FP_c + FN_c > 0

i.e. the usual per-class IoU with the pixels replaced by the annotated points (a class is only
ever evaluated where it was asked about; points of other classes do not count).  Caveat: the
paper's text could not be consulted offline, and GEM's OIv7 evaluation code is unreleased
(WalBouss/GEM#5); this definition is the standard reading and is stated here so that it can be
checked.  Pixel of a point in an H×W map: (row, col) = (min(⌊Y·H⌋, H−1), min(⌊X·W⌋, W−1)).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .datasets import DatasetError

__all__ = ["POINT_FILES", "CLASS_FILE", "POINT_COLUMNS", "REQUIRED_COLUMNS", "YES", "NO",
           "UNSURE", "PointLabels", "PointImage", "OIV7Points", "read_point_labels",
           "read_class_descriptions", "point_pixels", "sample_points", "PointCounts",
           "point_miou", "evaluate_image_points"]

POINT_FILES = {"validation": "oidv7-val-annotations-point-labels.csv",
               "test": "oidv7-test-annotations-point-labels.csv",
               "train": "oidv7-train-annotations-point-labels.csv"}
CLASS_FILE = "oidv7-class-descriptions.csv"
POINT_COLUMNS = ("ImageId", "X", "Y", "Label", "EstimatedYesNo", "Source", "YesVotes", "NoVotes",
                 "UnsureVotes", "TextLabel")
REQUIRED_COLUMNS = ("ImageId", "X", "Y", "Label", "EstimatedYesNo")
YES, NO, UNSURE = 1, 0, -1
_ANSWERS = {"yes": YES, "no": NO, "unsure": UNSURE}


# ----------------------------------------------------------------------------- files
@dataclass(frozen=True)
class PointLabels:
    """All point labels of a CSV, column-wise (one entry per point, file order)."""
    image_id: np.ndarray        # str
    x: np.ndarray               # float64 in [0, 1]
    y: np.ndarray               # float64 in [0, 1]
    label: np.ndarray           # str (class MID)
    answer: np.ndarray          # int8: YES / NO / UNSURE
    text_label: np.ndarray      # str ('' when absent)

    def __len__(self) -> int:
        return len(self.image_id)


def read_point_labels(path) -> PointLabels:
    """Read an OIv7 point-label CSV; bad rows raise `DatasetError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"point labels file {path} is missing")
    ids, xs, ys, labels, answers, texts = [], [], [], [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}; expected the "
                               f"OpenImages V7 header {','.join(POINT_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                x, y = float(row["X"]), float(row["Y"])
            except (TypeError, ValueError):
                raise DatasetError(f"{path}:{line}: X/Y are not numbers ({row['X']!r}, {row['Y']!r})") from None
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise DatasetError(f"{path}:{line}: X/Y must be normalized to [0, 1], got {x}, {y}")
            ans = (row["EstimatedYesNo"] or "").strip().lower()
            if ans not in _ANSWERS:
                raise DatasetError(f"{path}:{line}: EstimatedYesNo must be yes, no or unsure, got "
                                   f"{row['EstimatedYesNo']!r}")
            if not row["ImageId"] or not row["Label"]:
                raise DatasetError(f"{path}:{line}: empty ImageId or Label")
            ids.append(row["ImageId"].strip())
            xs.append(x)
            ys.append(y)
            labels.append(row["Label"].strip())
            answers.append(_ANSWERS[ans])
            texts.append((row.get("TextLabel") or "").strip())
    return PointLabels(np.asarray(ids, dtype=str), np.asarray(xs, np.float64),
                       np.asarray(ys, np.float64), np.asarray(labels, dtype=str),
                       np.asarray(answers, np.int8), np.asarray(texts, dtype=str))


def read_class_descriptions(path) -> dict[str, str]:
    """MID → display name from ``oidv7-class-descriptions.csv`` (header optional)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class descriptions file {path} is missing")
    out: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or (line == 1 and row[:2] == ["LabelName", "DisplayName"]):
                continue
            if len(row) < 2 or not row[0].strip():
                raise DatasetError(f"{path}:{line}: expected LabelName,DisplayName, got {row!r}")
            out[row[0].strip()] = row[1].strip()
    if not out:
        raise DatasetError(f"class descriptions file {path} is empty")
    return out


# ----------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class PointImage:
    """One image to evaluate: its points (indices into the split's `PointLabels`) and classes."""
    id: str
    image: Path
    points: np.ndarray            # int64 indices of this image's points
    classes: tuple[str, ...]      # MIDs with at least one point on this image, sorted


def _first_file(root: Path, dirs, name: str) -> Path | None:
    for d in dirs:
        p = (root / d / name) if d else (root / name)
        if p.is_file():
            return p
    return None


@dataclass(frozen=True)
class OIV7Points:
    """The OpenImages V7 point-label split under a root (see the module doc for the layout)."""
    split: str = "validation"
    name: str = "oiv7-points"
    title: str = "OpenImages V7 point labels (p-mIoU)"
    _cache: dict = field(default_factory=dict, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if self.split not in POINT_FILES:
            raise ValueError(f"split must be one of {', '.join(POINT_FILES)}, got {self.split!r}")

    @property
    def layout(self) -> str:
        return (f"<root>/{POINT_FILES[self.split]}, <root>/{CLASS_FILE}, "
                f"<root>/{self.split}/<ImageId>.jpg")

    def files(self, root) -> tuple[Path, Path | None]:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"{self.name}: root {root} does not exist")
        points = _first_file(root, ["", "annotations", "labels"], POINT_FILES[self.split])
        if points is None:
            raise DatasetError(f"{self.name}: {POINT_FILES[self.split]} not found under {root} "
                               f"(looked in ., annotations/, labels/). Expected layout: {self.layout}")
        classes = _first_file(root, ["", "annotations", "metadata"], CLASS_FILE)
        return points, classes

    def image_dir(self, root) -> Path:
        root = Path(root).expanduser()
        for d in [self.split, f"images/{self.split}", "data", "images", ""]:
            p = root / d if d else root
            if p.is_dir() and any(p.glob("*.jpg")):
                return p
        raise DatasetError(f"{self.name}: no <ImageId>.jpg images under {root} (looked in "
                           f"{self.split}/, images/{self.split}/, data/, images/, .)")

    def load(self, root) -> tuple[PointLabels, dict[str, str]]:
        """The split's point labels and class names (MID → prompt), read once per root."""
        key = str(Path(root).expanduser().resolve())
        if key not in self._cache:
            points_file, classes_file = self.files(root)
            labels = read_point_labels(points_file)
            names = read_class_descriptions(classes_file) if classes_file else {}
            for mid, text in zip(labels.label, labels.text_label):
                if mid not in names and text:
                    names[mid] = text  # the TextLabel column when the class file lacks the MID
            unnamed = sorted(set(labels.label.tolist()) - set(names))
            if unnamed:
                raise DatasetError(f"{self.name}: no display name for {len(unnamed)} class(es) "
                                   f"(e.g. {', '.join(unnamed[:5])}): put {CLASS_FILE} under "
                                   f"{root}")
            self._cache[key] = (labels, names)
        return self._cache[key]

    def samples(self, root, missing_images: str = "error") -> list[PointImage]:
        """Images that have at least one point, sorted by id (images without points are not
        evaluated).  missing_images: 'error' (default) or 'skip' for labelled images whose file
        is absent."""
        if missing_images not in ("error", "skip"):
            raise ValueError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        labels, _ = self.load(root)
        img_dir = self.image_dir(root)
        order = np.argsort(labels.image_id, kind="stable")
        ids_sorted = labels.image_id[order]
        uniq, starts = np.unique(ids_sorted, return_index=True)
        ends = np.append(starts[1:], len(order))
        out, missing = [], []
        for iid, s, e in zip(uniq.tolist(), starts, ends):
            path = img_dir / f"{iid}.jpg"
            if not path.is_file():
                missing.append(iid)
                continue
            idx = np.sort(order[s:e])
            out.append(PointImage(iid, path, idx, tuple(sorted(set(labels.label[idx].tolist())))))
        if missing and missing_images == "error":
            raise DatasetError(f"{self.name}: {len(missing)} of {len(uniq)} labelled images are "
                               f"missing from {img_dir} (e.g. {', '.join(missing[:3])}); download "
                               f"them or evaluate the present ones only (missing_images='skip')")
        if not out:
            raise DatasetError(f"{self.name}: none of the {len(uniq)} labelled images is in {img_dir}")
        return out


# ----------------------------------------------------------------------------- metric
def point_pixels(x, y, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) int64 of normalized points in an height×width map."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    rows = np.minimum(np.floor(y * height).astype(np.int64), height - 1)
    cols = np.minimum(np.floor(x * width).astype(np.int64), width - 1)
    return np.maximum(rows, 0), np.maximum(cols, 0)


def sample_points(maps, class_of_point: Sequence[int], x, y) -> np.ndarray:
    """Score of each point in its own class's map: maps [C, H, W], class_of_point [P] (index
    into maps), x, y [P] normalized → [P] float."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [classes, H, W], got shape {maps.shape}")
    cls = np.asarray(class_of_point, np.int64)
    r, c = point_pixels(x, y, maps.shape[1], maps.shape[2])
    return maps[cls, r, c]


class PointCounts:
    """Per-class TP / FP / FN (and TN, unsure) counts of point predictions, accumulated."""

    def __init__(self, classes: Iterable[str] = ()):
        self.index: dict[str, int] = {}
        self._buf = np.zeros((64, 5), np.int64)  # columns: tp, fp, fn, tn, unsure
        for c in classes:
            self._row(c)

    @property
    def counts(self) -> np.ndarray:
        return self._buf[:len(self.index)]

    @counts.setter
    def counts(self, value) -> None:
        self._buf = np.asarray(value, np.int64).copy()

    def _row(self, cls: str) -> int:
        i = self.index.get(cls)
        if i is None:
            i = self.index[cls] = len(self.index)
            if i >= len(self._buf):
                grow = np.zeros((max(64, len(self._buf)), 5), np.int64)
                self._buf = np.concatenate([self._buf, grow])
        return i

    def update(self, labels: Sequence[str], answers, positive) -> None:
        """Add points: their class MIDs, answers (YES/NO/UNSURE) and predictions (bool)."""
        answers = np.asarray(answers)
        positive = np.asarray(positive, bool)
        if not (len(labels) == len(answers) == len(positive)):
            raise ValueError("labels, answers and predictions must have one entry per point")
        for lab, a, p in zip(labels, answers.tolist(), positive.tolist()):
            row = self._row(str(lab))
            if a == YES:
                self.counts[row, 0 if p else 2] += 1
            elif a == NO:
                self.counts[row, 1 if p else 3] += 1
            elif a == UNSURE:
                self.counts[row, 4] += 1
            else:
                raise ValueError(f"answer must be YES (1), NO (0) or UNSURE (-1), got {a}")

    def merge(self, other: "PointCounts") -> None:
        """Add `other`'s counts, class by class (classes new to self are appended)."""
        for cls, j in other.index.items():
            row = self._row(cls)  # first: it may add the row that `self.counts` then includes
            self.counts[row] += other.counts[j]

    def classes(self) -> list[str]:
        return sorted(self.index, key=self.index.get)

    def metrics(self) -> dict:
        return point_miou(self.counts[:, 0], self.counts[:, 1], self.counts[:, 2],
                          classes=self.classes(), tn=self.counts[:, 3], unsure=self.counts[:, 4])

    def state(self) -> tuple[list[str], np.ndarray]:
        return self.classes(), self.counts.copy()

    @classmethod
    def from_state(cls, classes: Sequence[str], counts) -> "PointCounts":
        out = cls(classes)
        counts = np.asarray(counts, np.int64)
        if counts.shape != (len(classes), 5):
            raise ValueError(f"counts shape {counts.shape} does not match {len(classes)} classes")
        out.counts = counts.copy()
        return out


def point_miou(tp, fp, fn, *, classes: Sequence[str] | None = None, tn=None, unsure=None) -> dict:
    """p-mIoU (a fraction; NaN when no class is defined) and per-class IoU from counts."""
    tp, fp, fn = (np.asarray(a, np.int64) for a in (tp, fp, fn))
    union = tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    valid = union > 0
    return {
        "p-mIoU": float(np.nanmean(iou)) if valid.any() else math.nan,
        "IoU": iou,
        "classes": list(classes) if classes is not None else None,
        "tp": tp, "fp": fp, "fn": fn,
        "tn": None if tn is None else np.asarray(tn, np.int64),
        "unsure": None if unsure is None else np.asarray(unsure, np.int64),
        "num_classes_evaluated": int(valid.sum()),
    }


def evaluate_image_points(counts: PointCounts, labels: PointLabels, image: PointImage,
                          maps, threshold: float) -> None:
    """Add one image's points to `counts`, given its class maps [len(image.classes), H, W]
    (in the order of ``image.classes``) and the binarization threshold."""
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != len(image.classes):
        raise ValueError(f"expected {len(image.classes)} maps [C, H, W] for image {image.id}, got "
                         f"shape {maps.shape}")
    where = {c: i for i, c in enumerate(image.classes)}
    idx = image.points
    cls = [where[c] for c in labels.label[idx].tolist()]
    scores = sample_points(maps, cls, labels.x[idx], labels.y[idx])
    counts.update(labels.label[idx].tolist(), labels.answer[idx], scores > threshold)
