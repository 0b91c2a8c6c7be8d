"""`gem-jax eval` end to end: tiny datasets written in each mmseg layout, a tiny native
checkpoint, the JSON written, resume, exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gem_jax.eval import GEMProtocol, evaluate, get_dataset, names_for
from gem_jax.eval.cli import main
from gem_jax.eval.datasets import load_label
from gem_jax.eval.runner import checkpoint_path

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_protocols import tiny_model  # noqa: E402

KNOBS = ["--size", "32", "--gem-depth", "3", "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from gem_jax.convert import save_native
    m = tiny_model(seed=1)
    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_native(d, m.config, m.params, m.tokenizer)
    return d


def _img(path: Path, h, w, rng, png=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _lbl(path: Path, arr, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), "L")
    if palette:  # VOC's SegmentationClass PNGs are palette images
        im = im.convert("P")
        im.putpalette(list(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8)))
    im.save(path)


def _label(rng, h, w, hi, ignore=True):
    a = rng.integers(0, hi, (h, w))
    if ignore:
        a[: h // 5] = 255
    return a


SIZES = [(24, 40), (40, 32), (33, 47)]


def make_dataset(name, root: Path, n=3, seed=0):
    """Write a tiny dataset in mmseg's layout; returns the raw label arrays by id."""
    rng = np.random.default_rng(seed)
    sizes = [SIZES[i % len(SIZES)] for i in range(n)]
    labels = {}
    if name in ("voc21", "voc20", "context60", "context59"):
        year, seg, split, hi = ((2012, "SegmentationClass", "Segmentation", 21)
                                if name.startswith("voc") else
                                (2010, "SegmentationClassContext", "SegmentationContext", 60))
        d = root / "VOCdevkit" / f"VOC{year}"
        ids = [f"2008_{i:06d}" for i in range(n)]
        for i, (h, w) in zip(ids, sizes):
            _img(d / "JPEGImages" / f"{i}.jpg", h, w, rng)
            labels[i] = _label(rng, h, w, hi)
            _lbl(d / seg / f"{i}.png", labels[i], palette=name.startswith("voc"))
        (d / "ImageSets" / split).mkdir(parents=True, exist_ok=True)
        (d / "ImageSets" / split / "val.txt").write_text("\n".join(reversed(ids)) + "\n")
        (d / "JPEGImages" / "not_in_val.jpg").write_bytes(b"")  # ignored: not in val.txt
    elif name == "ade20k":
        d = root / "ADEChallengeData2016"
        for k, (h, w) in enumerate(sizes):
            i = f"ADE_val_{k:08d}"
            _img(d / "images/validation" / f"{i}.jpg", h, w, rng)
            labels[i] = _label(rng, h, w, 151, ignore=False)   # 0 = "other", ignored
            _lbl(d / "annotations/validation" / f"{i}.png", labels[i])
    elif name in ("coco_stuff", "coco_object"):
        d = root / "coco_stuff164k"
        for k, (h, w) in enumerate(sizes):
            i = f"{k:012d}"
            _img(d / "images/val2017" / f"{i}.jpg", h, w, rng)
            labels[i] = _label(rng, h, w, 171 if name == "coco_stuff" else 81)
            suffix = "_labelTrainIds.png" if name == "coco_stuff" else "_instanceTrainIds.png"
            _lbl(d / "annotations/val2017" / f"{i}{suffix}", labels[i])
            # the other conversion's labels live in the same folder and must be ignored
            other = "_instanceTrainIds.png" if name == "coco_stuff" else "_labelTrainIds.png"
            _lbl(d / "annotations/val2017" / f"{i}{other}", np.zeros((h, w)))
    elif name == "cityscapes":
        d = root / "cityscapes"
        for k, (h, w) in enumerate(sizes):
            city = ["frankfurt", "lindau"][k % 2]
            i = f"{city}/{city}_000000_{k:06d}"
            _img(d / "leftImg8bit/val" / f"{i}_leftImg8bit.png", h, w, rng)
            labels[i] = _label(rng, h, w, 19)
            _lbl(d / "gtFine/val" / f"{i}_gtFine_labelTrainIds.png", labels[i])
            _lbl(d / "gtFine/val" / f"{i}_gtFine_labelIds.png", np.full((h, w), 33))
    else:
        raise ValueError(name)
    return labels


def _reduce(a):  # mmseg's reduce_zero_label, written out independently
    a = a.astype(int)
    return np.where((a == 0) | (a == 255), 255, a - 1)


NUM = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "ade20k": 150,
       "coco_stuff": 171, "coco_object": 81, "cityscapes": 19}


@pytest.mark.parametrize("name", list(NUM))
def test_eval_end_to_end_each_layout(name, ckpt, tmp_path):
    raw = make_dataset(name, tmp_path / "data")
    out = tmp_path / "res.json"
    rc = main(["--dataset", name, "--root", str(tmp_path / "data"), "--model", str(ckpt),
               "--out", str(out)] + KNOBS)
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["status"] == "complete" and res["format"] == "gem-jax-eval/1"
    assert res["dataset"]["name"] == name and res["dataset"]["num_classes"] == NUM[name]
    assert res["counts"] == {"images": 3, "images_total": 3,
                             "pixels_evaluated": res["counts"]["pixels_evaluated"]}
    assert res["model"]["source"] == str(ckpt)
    assert res["protocol"]["protocol"] == "gem" and res["protocol"]["gem_depth"] == 3
    assert len(res["per_class"]) == NUM[name]
    assert not checkpoint_path(out).exists()
    # the reader: the confusion matrix's rows are the true-label histogram
    spec = get_dataset(name)
    truth = np.concatenate([(_reduce(a) if spec.reduce_zero_label else a).ravel()
                            for a in raw.values()])
    truth = truth[truth != 255]
    cm = np.asarray(res["confusion_matrix"])
    np.testing.assert_array_equal(cm.sum(1), np.bincount(truth, minlength=NUM[name]))
    assert res["counts"]["pixels_evaluated"] == truth.size
    # the metrics: mIoU from the matrix (classes absent from both excluded)
    inter, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt + pred - inter
    iou = inter[union > 0] / union[union > 0]
    assert res["metrics"]["mIoU"] == pytest.approx(100 * iou.mean(), abs=1e-3)
    assert res["metrics"]["aAcc"] == pytest.approx(100 * inter.sum() / cm.sum(), abs=1e-3)
    if spec.has_background:
        assert res["protocol"]["background"] == "threshold"
        assert res["protocol"]["background_threshold"] == 0.85


def test_predictions_match_the_protocol(ckpt, tmp_path):
    """The confusion matrix written equals one built here from the protocol's predictions."""
    import gem_jax
    raw = make_dataset("voc20", tmp_path)
    out = tmp_path / "r.json"
    assert main(["--dataset", "voc20", "--root", str(tmp_path), "--model", str(ckpt),
                 "--out", str(out), "--iters", "2", "--temp", "3.5"] + KNOBS) == 0
    model = gem_jax.load(ckpt)
    proto = GEMProtocol(model, names_for("voc20"), has_background=False, size=32, gem_depth=3,
                        ss_attn_iter=2, ss_attn_temp=3.5)
    cm = np.zeros((20, 20), int)
    for s in get_dataset("voc20").samples(tmp_path):
        label = load_label(s.label, True)
        (pred,) = proto.predict_batch([Image.open(s.image).convert("RGB")], [label.shape])
        keep = label != 255
        np.add.at(cm, (label[keep].astype(int), pred[keep]), 1)
    np.testing.assert_array_equal(np.asarray(json.loads(out.read_text())["confusion_matrix"]), cm)


def test_sliding_protocol_end_to_end(ckpt, tmp_path):
    make_dataset("voc21", tmp_path)
    out = tmp_path / "s.json"
    assert main(["--dataset", "voc21", "--root", str(tmp_path / "VOCdevkit"), "--model", str(ckpt),
                 "--protocol", "sliding", "--crop", "16", "--stride", "8", "--batch-size", "4",
                 "--out", str(out)] + KNOBS) == 0
    res = json.loads(out.read_text())
    p = res["protocol"]
    assert (p["protocol"], p["size"], p["crop"], p["stride"]) == ("sliding", 32, 16, 8)
    assert p["background"] == "both" and p["background_threshold"] == 0.1
    assert p["templates"] == "80 templates (ImageNet)" and len(p["class_prompts"][0]) == 26
    assert res["status"] == "complete" and res["counts"]["images"] == 3


def test_resume_after_limit_equals_uninterrupted_run(ckpt, tmp_path):
    make_dataset("voc21", tmp_path, n=5, seed=3)
    args = ["--dataset", "voc21", "--root", str(tmp_path), "--model", str(ckpt)] + KNOBS
    full = tmp_path / "full.json"
    assert main(args + ["--out", str(full)]) == 0
    part = tmp_path / "part.json"
    assert main(args + ["--out", str(part), "--limit", "2", "--checkpoint-every", "1"]) == 0
    r = json.loads(part.read_text())
    assert r["status"] == "partial" and r["counts"]["images"] == 2
    assert checkpoint_path(part).exists()
    assert main(args + ["--out", str(part)]) == 1              # never clobbers an unfinished run
    assert main(args + ["--out", str(part), "--iters", "2", "--resume"]) == 1  # other knobs
    assert main(args + ["--out", str(part), "--resume"]) == 0
    a, b = json.loads(full.read_text()), json.loads(part.read_text())
    assert b["status"] == "complete" and b["counts"]["images"] == 5
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["metrics"] == b["metrics"]
    assert not checkpoint_path(part).exists()
    assert main(args + ["--out", str(part), "--resume"]) == 0  # already complete: nothing to do
    assert main(args + ["--out", str(full)]) == 1              # exists: needs --force
    assert main(args + ["--out", str(full), "--force"]) == 0


def test_interrupted_run_loses_nothing(ckpt, tmp_path):
    import gem_jax
    make_dataset("voc21", tmp_path, n=5, seed=4)
    model = gem_jax.load(ckpt)
    proto = GEMProtocol(model, names_for("voc21"), has_background=True, size=32, gem_depth=3,
                        background="threshold", threshold=0.5, batch_size=2)
    ref = evaluate(model, "voc21", tmp_path, proto, out=tmp_path / "ref.json", quiet=True)

    class Boom(Exception):
        pass

    def interrupt(n, sample_id):
        if n == 3:
            raise Boom(sample_id)

    out = tmp_path / "run.json"
    with pytest.raises(Boom):
        evaluate(model, "voc21", tmp_path, proto, out=out, quiet=True, checkpoint_every=100,
                 callback=interrupt)
    partial = json.loads(out.read_text())
    assert partial["status"] == "partial" and partial["counts"]["images"] == 3
    seen = []
    res = evaluate(model, "voc21", tmp_path, proto, out=out, quiet=True, resume=True,
                   callback=lambda n, i: seen.append(n))
    assert seen == [4, 5]                       # only the two images not yet evaluated
    assert res["confusion_matrix"] == ref["confusion_matrix"]
    assert res["metrics"] == ref["metrics"] and res["status"] == "complete"


def test_usage_and_runtime_errors(ckpt, tmp_path, capsys):
    make_dataset("voc20", tmp_path)
    base = ["--root", str(tmp_path), "--model", str(ckpt)] + KNOBS
    assert main(["--dataset", "nope"] + base) == 2
    assert main(["--dataset", "voc20", "--background-threshold", "1.5"] + base) == 2
    assert main(["--dataset", "voc20", "--background-threshold", "0.5"] + base) == 2
    assert main(["--dataset", "voc21", "--crop", "16"] + base) == 2
    assert main(["--dataset", "voc20", "--out", str(tmp_path / "x.json")] + base
                + ["--gem-depth", "9"]) == 2                          # checked against the model
    assert main(["--dataset", "ade20k"] + base) == 1                  # not under root
    assert "ADEChallengeData2016" in capsys.readouterr().err
    assert main(["--dataset", "voc20", "--root", str(tmp_path), "--model",
                 str(tmp_path / "no_model")] + KNOBS[:-1] + ["--out", str(tmp_path / "y.json")]) == 2
    assert main(["--help"]) == 0 and "--background-threshold" in capsys.readouterr().out


def test_register_adds_the_eval_subcommand(ckpt, tmp_path):
    import argparse
    from gem_jax.eval.cli import register
    parser = argparse.ArgumentParser(prog="gem-jax")
    register(parser.add_subparsers(dest="command"))
    make_dataset("cityscapes", tmp_path)
    out = tmp_path / "c.json"
    args = parser.parse_args(["eval", "--dataset", "city", "--root", str(tmp_path), "--model",
                              str(ckpt), "--out", str(out)] + KNOBS)
    assert args.func(args) == 0 and json.loads(out.read_text())["dataset"]["name"] == "cityscapes"


def test_python_dash_m(ckpt, tmp_path):
    make_dataset("context59", tmp_path)
    out = tmp_path / "ctx.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "gem_jax.eval", "--dataset", "context59", "--root",
                        str(tmp_path), "--model", str(ckpt), "--out", str(out), "--size", "32",
                        "--gem-depth", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "context59 [gem] 3/3 images: mIoU" in p.stdout
    assert json.loads(out.read_text())["status"] == "complete"
    p = subprocess.run([sys.executable, "-m", "gem_jax.eval", "--dataset", "context59"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "--root" in p.stderr
