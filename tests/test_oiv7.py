"""OpenImages V7 point labels: the loader, the p-mIoU, and a point-protocol run end to end.

The fixture is written by the test in the official layout and header
(``oidv7-val-annotations-point-labels.csv``: ImageId,X,Y,Label,EstimatedYesNo,Source,YesVotes,
NoVotes,UnsureVotes,TextLabel; ``oidv7-class-descriptions.csv``: LabelName,DisplayName;
``validation/<ImageId>.jpg``), with "unsure" points, an image on disk without points, and a class
named only by the TextLabel column.  p-mIoU is checked against a direct numpy computation that
reads the CSV with the csv module on its own.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gem_jax.eval.datasets import DatasetError, get_dataset, get_point_dataset, is_point_dataset
from gem_jax.eval.oiv7 import (CLASS_FILE, NO, POINT_COLUMNS, POINT_FILES, UNSURE, YES, OIV7Points,
                               PointCounts, evaluate_image_points, point_miou, point_pixels,
                               read_class_descriptions, read_point_labels)
from gem_jax.eval.protocols import PointProtocol
from gem_jax.eval.runner import EvalError, evaluate_points

from test_eval_protocols import tiny_model  # noqa: E402

CLASSES = {"/m/cat": "Cat", "/m/dog": "Dog", "/m/tree": "Tree", "/m/car": "Car"}
TEXT_ONLY = ("/m/sky", "Sky")   # not in the class file: named by the TextLabel column


# ----------------------------------------------------------------------------- fixture
def _rows(rng, image_ids):
    rows = []
    mids = list(CLASSES) + [TEXT_ONLY[0]]
    for iid in image_ids:
        for mid in rng.choice(mids, size=3, replace=False):
            for _ in range(int(rng.integers(2, 7))):
                ans = rng.choice(["yes", "no", "unsure"], p=[0.45, 0.4, 0.15])
                votes = {"yes": (3, 0, 0), "no": (0, 3, 0), "unsure": (1, 1, 1)}[ans]
                rows.append({"ImageId": iid, "X": f"{rng.uniform(0, 1):.6f}",
                             "Y": f"{rng.uniform(0, 1):.6f}", "Label": mid, "EstimatedYesNo": ans,
                             "Source": "ih", "YesVotes": votes[0], "NoVotes": votes[1],
                             "UnsureVotes": votes[2],
                             "TextLabel": TEXT_ONLY[1] if mid == TEXT_ONLY[0] else ""})
    # exact corners: X = 1 / Y = 1 must land on the last pixel
    rows.append({"ImageId": image_ids[0], "X": "1.0", "Y": "1.0", "Label": "/m/cat",
                 "EstimatedYesNo": "yes", "Source": "ih", "YesVotes": 3, "NoVotes": 0,
                 "UnsureVotes": 0, "TextLabel": ""})
    rows.append({"ImageId": image_ids[0], "X": "0", "Y": "0", "Label": "/m/cat",
                 "EstimatedYesNo": "no", "Source": "ih", "YesVotes": 0, "NoVotes": 3,
                 "UnsureVotes": 0, "TextLabel": ""})
    order = rng.permutation(len(rows))   # the official file is not grouped by image here
    return [rows[i] for i in order]


def make_oiv7(root: Path, seed=0, n_images=5, sizes=((40, 56), (64, 48), (33, 33))):
    rng = np.random.default_rng(seed)
    ids = [f"{i:016x}" for i in rng.integers(0, 2 ** 62, n_images)]
    (root / "validation").mkdir(parents=True)
    for i, iid in enumerate(ids + ["00nolabelsatall0"]):       # the last one has no points
        h, w = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "validation" / f"{iid}.jpg", quality=95)
    with open(root / POINT_FILES["validation"], "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=POINT_COLUMNS)
        wr.writeheader()
        wr.writerows(_rows(rng, ids))
    with open(root / CLASS_FILE, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["LabelName", "DisplayName"])
        wr.writerows(CLASSES.items())
    return ids


@pytest.fixture
def oiv7(tmp_path):
    root = tmp_path / "oiv7"
    ids = make_oiv7(root)
    return root, ids


def random_maps(samples, seed=1):
    rng = np.random.default_rng(seed)
    return {s.id: rng.uniform(0, 1, (len(s.classes),) + tuple(rng.integers(20, 70, 2)))
            for s in samples}


# ----------------------------------------------------------------------------- direct reference
def direct_p_miou(root: Path, maps: dict, classes_of: dict, threshold: float) -> float:
    """Read the CSV with the csv module and count TP/FP/FN per class by hand."""
    tp, fp, fn = {}, {}, {}
    with open(root / POINT_FILES["validation"], newline="") as f:
        for row in csv.DictReader(f):
            iid, mid = row["ImageId"], row["Label"]
            if iid not in maps:
                continue
            m = maps[iid][classes_of[iid].index(mid)]
            h, w = m.shape
            r = min(int(math.floor(float(row["Y"]) * h)), h - 1)
            c = min(int(math.floor(float(row["X"]) * w)), w - 1)
            pos = m[r, c] > threshold
            for d in (tp, fp, fn):
                d.setdefault(mid, 0)
            if row["EstimatedYesNo"] == "yes":
                if pos:
                    tp[mid] += 1
                else:
                    fn[mid] += 1
            elif row["EstimatedYesNo"] == "no" and pos:
                fp[mid] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in tp if tp[c] + fp[c] + fn[c] > 0]
    return float(np.mean(ious))


def ours_p_miou(ds, root, maps, threshold, samples=None):
    labels, _ = ds.load(root)
    counts = PointCounts()
    for s in samples or ds.samples(root):
        evaluate_image_points(counts, labels, s, maps[s.id], threshold)
    return counts.metrics()


# ----------------------------------------------------------------------------- tests
def test_loader_reads_the_official_layout(oiv7):
    root, ids = oiv7
    ds = get_point_dataset("oiv7-points")
    assert isinstance(ds, OIV7Points) and ds.split == "validation"
    labels, names = ds.load(root)
    with open(root / POINT_FILES["validation"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(labels) == len(rows)
    assert labels.image_id.tolist() == [r["ImageId"] for r in rows]
    assert labels.answer.tolist() == [{"yes": YES, "no": NO, "unsure": UNSURE}[r["EstimatedYesNo"]]
                                      for r in rows]
    assert np.array_equal(labels.x, [float(r["X"]) for r in rows])
    assert names == dict(CLASSES, **{TEXT_ONLY[0]: TEXT_ONLY[1]})
    samples = ds.samples(root)
    assert [s.id for s in samples] == sorted(ids)               # the point-less image is not one
    for s in samples:
        assert sorted(labels.image_id[s.points].tolist()) == [s.id] * len(s.points)
        assert s.classes == tuple(sorted(set(labels.label[s.points].tolist())))
    assert sum(len(s.points) for s in samples) == len(labels)
    # the class file without a header (V5/V6 style) reads the same
    (root / "headerless.csv").write_text("".join(f"{k},{v}\n" for k, v in CLASSES.items()))
    assert read_class_descriptions(root / "headerless.csv") == CLASSES
    assert is_point_dataset("oiv7") and not is_point_dataset("voc21")


def test_p_miou_equals_direct_numpy(oiv7):
    root, _ = oiv7
    ds = get_point_dataset("oiv7-points")
    samples = ds.samples(root)
    classes_of = {s.id: list(s.classes) for s in samples}
    maps = random_maps(samples)
    for thr in (0.3, 0.5, 0.8):
        m = ours_p_miou(ds, root, maps, thr)
        want = direct_p_miou(root, maps, classes_of, thr)
        assert m["p-mIoU"] == pytest.approx(want, abs=1e-12)
        assert 0.0 < want < 1.0
        assert m["num_classes_evaluated"] == len(CLASSES) + 1
    # the point counts add up: every point counted once, unsure points apart
    labels, _ = ds.load(root)
    c = ours_p_miou(ds, root, maps, 0.5)
    assert int(c["tp"].sum() + c["fn"].sum()) == int((labels.answer == YES).sum())
    assert int(c["fp"].sum() + c["tn"].sum()) == int((labels.answer == NO).sum())
    assert int(c["unsure"].sum()) == int((labels.answer == UNSURE).sum()) > 0


def test_unsure_points_and_pointless_images_do_not_count(oiv7):
    root, _ = oiv7
    ds = get_point_dataset("oiv7-points")
    labels, _ = ds.load(root)
    samples = ds.samples(root)
    maps = random_maps(samples, seed=2)
    base = ours_p_miou(ds, root, maps, 0.5)["p-mIoU"]

    def flip_at(kind):
        out = {k: v.copy() for k, v in maps.items()}
        for s in samples:
            for i in s.points:
                if labels.answer[i] == kind:
                    m = out[s.id][s.classes.index(labels.label[i])]
                    r, c = point_pixels(labels.x[i], labels.y[i], *m.shape)
                    m[r, c] = 1.0 - m[r, c] if abs(m[r, c] - 0.5) > 1e-3 else 0.9
        return out
    # predictions at "unsure" points are irrelevant...
    assert ours_p_miou(ds, root, flip_at(UNSURE), 0.5)["p-mIoU"] == base
    # ...while those at "yes" and "no" points are not (the fixture has teeth)
    assert abs(ours_p_miou(ds, root, flip_at(YES), 0.5)["p-mIoU"] - base) > 0.02  # observed 0.052
    assert abs(ours_p_miou(ds, root, flip_at(NO), 0.5)["p-mIoU"] - base) > 0.01   # observed 0.024
    # an image without points is not a sample; more such images change nothing
    for i in range(3):
        Image.new("RGB", (20, 20)).save(root / "validation" / f"ffffffff0000000{i}.jpg")
    assert [s.id for s in ds.samples(root)] == [s.id for s in samples]
    assert ours_p_miou(ds, root, maps, 0.5)["p-mIoU"] == base


def test_point_miou_definition_edge_cases():
    m = point_miou([2, 0, 0], [1, 0, 3], [1, 0, 0], classes=["a", "b", "c"])
    assert m["IoU"][0] == 0.5 and math.isnan(m["IoU"][1]) and m["IoU"][2] == 0.0
    assert m["p-mIoU"] == 0.25 and m["num_classes_evaluated"] == 2   # b: only true negatives
    assert math.isnan(point_miou([0], [0], [0])["p-mIoU"])
    # rows, cols of normalized points: floor, clamped at the last pixel
    r, c = point_pixels(np.array([0.0, 0.5, 0.999, 1.0]), np.array([0.0, 0.25, 1.0, 0.5]), 10, 4)
    assert r.tolist() == [0, 2, 9, 5] and c.tolist() == [0, 2, 3, 3]


def test_loader_errors_name_the_problem(tmp_path, oiv7):
    root, ids = oiv7
    ds = get_point_dataset("oiv7-points")
    pts = root / POINT_FILES["validation"]
    text = pts.read_text()
    bad = tmp_path / "bad.csv"
    bad.write_text(text.replace("EstimatedYesNo", "Answer", 1))
    with pytest.raises(DatasetError, match="missing column.*EstimatedYesNo"):
        read_point_labels(bad)
    lines = text.splitlines()
    bad.write_text("\n".join(lines[:2] + [lines[2].replace(",yes,", ",maybe,").replace(",no,", ",maybe,")
                                          .replace(",unsure,", ",maybe,")]) + "\n")
    with pytest.raises(DatasetError, match=r"bad.csv:3: EstimatedYesNo"):
        read_point_labels(bad)
    bad.write_text(lines[0] + "\nabc,1.5,0.2,/m/cat,yes,ih,3,0,0,\n")
    with pytest.raises(DatasetError, match="normalized"):
        read_point_labels(bad)
    with pytest.raises(DatasetError, match="not found"):
        ds.files(tmp_path)
    # a class without a display name
    (root / CLASS_FILE).write_text("LabelName,DisplayName\n/m/cat,Cat\n")
    with pytest.raises(DatasetError, match="no display name"):
        get_point_dataset("oiv7-points").load(root)
    (root / CLASS_FILE).write_text("LabelName,DisplayName\n" +
                                   "".join(f"{k},{v}\n" for k, v in CLASSES.items()))
    # a labelled image missing from disk: an error by default, skipped on request
    (root / "validation" / f"{ids[0]}.jpg").unlink()
    with pytest.raises(DatasetError, match="1 of 5 labelled images are missing"):
        get_point_dataset("oiv7-points").samples(root)
    assert len(get_point_dataset("oiv7-points").samples(root, missing_images="skip")) == 4
    # the mIoU registry points to the right tool instead of "unknown dataset"
    with pytest.raises(KeyError, match="point-label dataset"):
        get_dataset("oiv7-points")


# ----------------------------------------------------------------------------- end to end
def test_evaluate_points_end_to_end(oiv7, tmp_path):
    root, _ = oiv7
    model = tiny_model()
    proto = PointProtocol(model, size=32, gem_depth=3)
    ds = get_point_dataset("oiv7-points")
    out = tmp_path / "oiv7.json"
    res = evaluate_points(model, "oiv7-points", root, proto, out=out, quiet=True)
    saved = json.loads(out.read_text())
    assert saved["status"] == "complete" and saved["metrics"] == res["metrics"]
    # the same number from the protocol's own maps, counted directly from the CSV
    samples = ds.samples(root)
    _, names = ds.load(root)
    maps = {s.id: proto.maps_batch([Image.open(s.image).convert("RGB")],
                                   [[names[c] for c in s.classes]])[0] for s in samples}
    want = direct_p_miou(root, maps, {s.id: list(s.classes) for s in samples}, 0.5)
    assert res["metrics"]["p-mIoU"] == pytest.approx(100 * want, abs=1e-3)
    assert res["counts"]["images"] == 5 and res["counts"]["points_unsure"] > 0
    assert {r["class"] for r in res["per_class"]} == set(CLASSES) | {TEXT_ONLY[0]}
    # outputs are never overwritten without force
    with pytest.raises(EvalError, match="exists"):
        evaluate_points(model, "oiv7-points", root, proto, out=out, quiet=True)

    # an interrupted run resumes to the same result
    out2 = tmp_path / "oiv7-2.json"

    def stop(n, _):
        if n == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        evaluate_points(model, "oiv7-points", root, proto, out=out2, quiet=True, callback=stop,
                        checkpoint_every=1)
    assert json.loads(out2.read_text())["counts"]["images"] == 2
    res2 = evaluate_points(model, "oiv7-points", root, proto, out=out2, quiet=True, resume=True)
    assert res2["metrics"] == res["metrics"] and res2["per_class"] == res["per_class"]
    assert not (tmp_path / "oiv7-2.json.ckpt.npz").exists()


def test_point_counts_merge_adds_by_class():
    """Merging into an empty PointCounts and with new classes (what the multi-process eval does
    with each process's counts).  Before the fix, merging into an empty one raised IndexError."""
    from gem_jax.eval.oiv7 import PointCounts
    a = PointCounts()
    a.merge(PointCounts.from_state(["x", "y"], [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]))
    a.merge(PointCounts.from_state(["y", "z"], [[1, 1, 1, 1, 1], [2, 2, 2, 2, 2]]))
    assert a.classes() == ["x", "y", "z"]
    assert a.counts.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11], [2, 2, 2, 2, 2]]
