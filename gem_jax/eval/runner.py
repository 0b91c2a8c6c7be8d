"""The evaluation loop: stream a dataset through a protocol into a confusion matrix, with
checkpoints that make a long run resumable and results written atomically as JSON."""

from __future__ import annotations

import collections
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from .datasets import DatasetSpec, get_dataset, load_image, load_label
from .metrics import IGNORE_INDEX, ConfusionMatrix, metrics_from_confusion

__all__ = ["EvalError", "evaluate", "evaluate_points", "checkpoint_path", "atomic_write_json",
           "results_dict", "point_results_dict"]

FORMAT = "gem-jax-eval/1"
POINTS_FORMAT = "gem-jax-eval-points/1"


class EvalError(RuntimeError):
    """A run that cannot start or continue (existing outputs, mismatched checkpoint, ...)."""


def checkpoint_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt.npz")


def _atomic_write(path: Path, write: Callable) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_json(path, obj) -> None:
    data = (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def _pct(x):
    return None if x is None or math.isnan(x) else round(100.0 * float(x), 4)


def results_dict(cm: np.ndarray, spec: DatasetSpec, *, root, protocol_knobs: dict,
                 model_info: dict, images_done: int, images_total: int, status: str,
                 seconds: float | None = None) -> dict:
    m = metrics_from_confusion(cm)
    per_class = []
    for i, name in enumerate(spec.classes):
        per_class.append({
            "id": i, "class": name, "IoU": _pct(m["IoU"][i]), "Acc": _pct(m["Acc"][i]),
            "gt_pixels": int(m["gt_pixels"][i]), "pred_pixels": int(m["pred_pixels"][i]),
            "intersection": int(m["intersection"][i]), "union": int(m["union"][i]),
        })
    try:
        import jax
        jax_version = jax.__version__
    except Exception:  # pragma: no cover
        jax_version = None
    from .. import __version__
    return {
        "format": FORMAT,
        "status": status,
        "metrics": {"mIoU": _pct(m["mIoU"]), "mAcc": _pct(m["mAcc"]), "aAcc": _pct(m["aAcc"]),
                    "units": "percent", "classes_in_mean": m["num_classes_evaluated"]},
        "dataset": {"name": spec.name, "title": spec.title, "root": str(root),
                    "num_classes": spec.num_classes, "has_background": spec.has_background,
                    "reduce_zero_label": spec.reduce_zero_label, "ignore_index": IGNORE_INDEX},
        "protocol": protocol_knobs,
        "model": model_info,
        "counts": {"images": images_done, "images_total": images_total,
                   "pixels_evaluated": m["pixels"]},
        "per_class": per_class,
        "confusion_matrix": np.asarray(cm, np.int64).tolist(),  # [true class][predicted class]
        "seconds": None if seconds is None else round(seconds, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"gem_jax": __version__, "jax": jax_version},
    }


def _fingerprint(spec: DatasetSpec, knobs: dict, model_info: dict) -> str:
    """What must match for a checkpoint to be resumed (not the root, the limit or batch sizes)."""
    return json.dumps({"dataset": spec.name, "protocol": knobs,
                       "model": model_info.get("source")}, sort_keys=True, default=str)


def _save_checkpoint(path: Path, cm: np.ndarray, ids: list[str], fingerprint: str) -> None:
    def write(f):
        np.savez(f, confusion=cm, ids=np.asarray(ids, dtype=str),
                 fingerprint=np.asarray(fingerprint))
    _atomic_write(path, write)


def _load_checkpoint(path: Path, num_classes: int):
    try:
        with np.load(path, allow_pickle=False) as z:
            cm = z["confusion"].astype(np.int64)
            ids = [str(i) for i in z["ids"].tolist()]
            fp = str(z["fingerprint"])
    except Exception as e:
        raise EvalError(f"cannot read checkpoint {path}: {e}") from e
    if cm.shape != (num_classes, num_classes):
        raise EvalError(f"checkpoint {path} has a {cm.shape} confusion matrix, expected "
                        f"{num_classes} classes")
    return cm, ids, fp


def _diff(a: str, b: str) -> str:
    try:
        da, db = json.loads(a), json.loads(b)
    except Exception:  # pragma: no cover
        return ""
    out = []

    def walk(x, y, key):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{key}.{k}" if key else k)
        elif x != y:
            out.append(f"{key}: checkpoint {x!r} vs now {y!r}")
    walk(da, db, "")
    return "; ".join(out[:5])


def _prefetch(fn, items, depth: int = 4):
    """fn(item) for each item, computed `depth` items ahead in a background thread."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=1) as ex:
        q = collections.deque()
        it = iter(items)
        for item in it:
            q.append(ex.submit(fn, item))
            if len(q) >= depth:
                break
        while q:
            fut = q.popleft()
            nxt = next(it, None)
            if nxt is not None:
                q.append(ex.submit(fn, nxt))
            yield fut.result()


def evaluate(model, dataset, root, protocol, *, out=None, limit: int | None = None,
             resume: bool = False, force: bool = False, checkpoint_every: int = 50,
             quiet: bool = False, progress: bool | None = None, callback=None,
             model_source: str | None = None, log=None) -> dict:
    """Evaluate `protocol` (a `GEMProtocol` / `SlidingProtocol` built for this dataset) on the
    validation set of `dataset` (a name or `DatasetSpec`) found under `root`.

    out: results JSON path (None: nothing written, no checkpoints).  Every `checkpoint_every`
    images — and when the run stops, for whatever reason — the confusion matrix and the ids
    done so far go to ``<out>.ckpt.npz`` and a ``"status": "partial"`` JSON to `out`, both
    replaced atomically.  resume: continue from that checkpoint (its dataset, protocol knobs and
    model must match).  limit: only the first `limit` images (sorted ids); a limited run keeps
    its checkpoint so that a later ``resume`` without a limit completes it.  Existing outputs are
    never overwritten without `force` (or `resume`).  callback(n_done, sample_id) runs after
    each image (tests use it to interrupt a run).  Returns the results dict.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset(dataset)
    log = log or (lambda msg: None if quiet else print(msg, file=sys.stderr))
    samples = spec.samples(root)
    total = len(samples)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        samples = samples[:limit]
    knobs = protocol.knobs()
    model_info = {"source": model_source if model_source is not None else
                  getattr(model, "source", ""), "name": model.config.name,
                  "patch_size": model.config.vision.patch_size,
                  "layers": model.config.vision.layers, "width": model.config.vision.width,
                  "embed_dim": model.config.embed_dim}
    fp = _fingerprint(spec, knobs, model_info)

    cm = ConfusionMatrix(spec.num_classes)
    done: list[str] = []
    ckpt = checkpoint_path(out) if out is not None else None
    if out is not None:
        out = Path(out)
        if ckpt.exists() and not resume:
            if not force:
                raise EvalError(f"checkpoint {ckpt} of an unfinished run exists: pass --resume to "
                                f"continue it or --force to start over")
            ckpt.unlink()
        elif ckpt.exists():
            m, ids, old_fp = _load_checkpoint(ckpt, spec.num_classes)
            if old_fp != fp:
                raise EvalError(f"checkpoint {ckpt} was written with other settings "
                                f"({_diff(old_fp, fp)}); use --force to start over")
            cm = ConfusionMatrix(spec.num_classes, matrix=m)
            done = ids
            log(f"resuming from {ckpt}: {len(done)} images already evaluated")
        elif out.exists() and not force:
            if resume:
                try:
                    prev = json.loads(out.read_text())
                except Exception as e:
                    raise EvalError(f"{out} exists and is not readable JSON ({e})") from e
                if prev.get("status") == "complete":
                    log(f"{out} is already complete; nothing to resume")
                    return prev
            raise EvalError(f"{out} exists (and no checkpoint to resume): pass --force to overwrite")

    done_set = set(done)
    todo = [s for s in samples if s.id not in done_set]
    t0 = time.perf_counter()
    last_saved = len(done)
    show = (not quiet) if progress is None else progress
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), unit="img",
                   desc=f"{spec.name}/{protocol.name}", dynamic_ncols=True,
                   disable=not (show and sys.stderr.isatty()))
    except ImportError:  # pragma: no cover
        bar = None

    def save(status="partial"):
        nonlocal last_saved
        if out is None:
            return
        _save_checkpoint(ckpt, cm.matrix, done, fp)
        atomic_write_json(out, results_dict(cm.matrix, spec, root=root, protocol_knobs=knobs,
                                            model_info=model_info, images_done=len(done),
                                            images_total=total, status=status,
                                            seconds=time.perf_counter() - t0))
        last_saved = len(done)

    def load(sample):
        return sample, load_image(sample.image), load_label(sample.label, spec.reduce_zero_label)

    step = max(1, int(getattr(protocol, "images_per_step", 1)))
    try:
        batch = []
        stream = _prefetch(load, todo, depth=max(4, 2 * step))
        for i, item in enumerate(stream):
            batch.append(item)
            if len(batch) < step and i < len(todo) - 1:
                continue
            preds = protocol.predict_batch([b[1] for b in batch], [b[2].shape for b in batch])
            for (sample, _, label), pred in zip(batch, preds):
                cm.update(pred, label)
                done.append(sample.id)
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback(len(done), sample.id)
                if out is not None and len(done) - last_saved >= checkpoint_every:
                    save()
            batch = []
    finally:
        if bar is not None:
            bar.close()
        if out is not None and len(done) != last_saved:
            save()  # an interrupted run keeps everything evaluated so far

    complete = len(done) == total
    res = results_dict(cm.matrix, spec, root=root, protocol_knobs=knobs, model_info=model_info,
                       images_done=len(done), images_total=total,
                       status="complete" if complete else "partial",
                       seconds=time.perf_counter() - t0)
    if out is not None:
        if complete:
            atomic_write_json(out, res)
            if ckpt.exists():
                ckpt.unlink()
        else:
            _save_checkpoint(ckpt, cm.matrix, done, fp)
            atomic_write_json(out, res)
    return res


# ----------------------------------------------------------------------------- point labels
def point_results_dict(counts, dataset, names: dict, *, root, protocol_knobs: dict,
                       model_info: dict, images_done: int, images_total: int,
                       images_missing: int, status: str, seconds: float | None = None) -> dict:
    """The results JSON of a point-label run (p-mIoU, per-class IoU and point counts)."""
    m = counts.metrics()
    per_class = []
    for i, mid in enumerate(m["classes"]):
        per_class.append({"class": mid, "name": names.get(mid, ""), "IoU": _pct(m["IoU"][i]),
                          "tp": int(m["tp"][i]), "fp": int(m["fp"][i]), "fn": int(m["fn"][i]),
                          "tn": int(m["tn"][i]), "unsure": int(m["unsure"][i])})
    per_class.sort(key=lambda r: r["class"])
    try:
        import jax
        jax_version = jax.__version__
    except Exception:  # pragma: no cover
        jax_version = None
    from .. import __version__
    c = counts.counts
    return {
        "format": POINTS_FORMAT,
        "status": status,
        "metrics": {"p-mIoU": _pct(m["p-mIoU"]), "units": "percent",
                    "classes_in_mean": m["num_classes_evaluated"]},
        "dataset": {"name": dataset.name, "title": dataset.title, "split": dataset.split,
                    "root": str(root)},
        "protocol": protocol_knobs,
        "model": model_info,
        "counts": {"images": images_done, "images_total": images_total,
                   "images_missing": images_missing,
                   "points_yes": int(c[:, 0].sum() + c[:, 2].sum()),
                   "points_no": int(c[:, 1].sum() + c[:, 3].sum()),
                   "points_unsure": int(c[:, 4].sum()), "classes": len(m["classes"])},
        "per_class": per_class,
        "seconds": None if seconds is None else round(seconds, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"gem_jax": __version__, "jax": jax_version},
    }


def _save_point_checkpoint(path: Path, counts, ids: list[str], fingerprint: str) -> None:
    classes, arr = counts.state()

    def write(f):
        np.savez(f, classes=np.asarray(classes, dtype=str), counts=arr,
                 ids=np.asarray(ids, dtype=str), fingerprint=np.asarray(fingerprint))
    _atomic_write(path, write)


def _load_point_checkpoint(path: Path):
    from .oiv7 import PointCounts
    try:
        with np.load(path, allow_pickle=False) as z:
            counts = PointCounts.from_state([str(c) for c in z["classes"].tolist()],
                                            z["counts"].astype(np.int64))
            ids = [str(i) for i in z["ids"].tolist()]
            fp = str(z["fingerprint"])
    except Exception as e:
        raise EvalError(f"cannot read checkpoint {path}: {e}") from e
    return counts, ids, fp


def evaluate_points(model, dataset, root, protocol, *, out=None, limit: int | None = None,
                    resume: bool = False, force: bool = False, checkpoint_every: int = 50,
                    missing_images: str = "error", quiet: bool = False, callback=None,
                    model_source: str | None = None, log=None,
                    shard: tuple[int, int] | None = None) -> dict:
    """p-mIoU of `protocol` (a `PointProtocol`) on a point-label dataset (a name such as
    ``"oiv7-points"`` or a `gem_jax.eval.oiv7.OIV7Points`) under `root`.

    Images are those with at least one point, sorted by id; `limit` takes the first ones.
    Outputs, checkpoints (``<out>.ckpt.npz``: per-class counts and the ids done), `resume`,
    `force` and `callback` behave as in `evaluate`.  missing_images: 'error' (default) or 'skip'
    labelled images whose file is absent (their number is reported).  shard=(p, n): only every
    n-th image from p (after `limit`), one process's share; shares' counts add up exactly.
    """
    from .datasets import get_point_dataset
    from .oiv7 import PointCounts, evaluate_image_points
    ds = get_point_dataset(dataset) if isinstance(dataset, str) else dataset
    log = log or (lambda msg: None if quiet else print(msg, file=sys.stderr))
    labels, names = ds.load(root)
    all_ids = set(labels.image_id.tolist())
    samples = ds.samples(root, missing_images=missing_images)
    missing = len(all_ids) - len(samples)
    total = len(samples)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        samples = samples[:limit]
    selected = len(samples)  # == total unless limited (a limited run is never "complete")
    if shard is not None:
        samples = samples[shard[0]::shard[1]]
    knobs = protocol.knobs()
    model_info = {"source": model_source if model_source is not None else
                  getattr(model, "source", ""), "name": model.config.name,
                  "patch_size": model.config.vision.patch_size,
                  "layers": model.config.vision.layers, "width": model.config.vision.width,
                  "embed_dim": model.config.embed_dim}
    fp = json.dumps({"dataset": ds.name, "split": ds.split, "protocol": knobs,
                     "model": model_info.get("source")}, sort_keys=True, default=str)

    counts = PointCounts()
    done: list[str] = []
    ckpt = checkpoint_path(out) if out is not None else None
    if out is not None:
        out = Path(out)
        if ckpt.exists() and not resume:
            if not force:
                raise EvalError(f"checkpoint {ckpt} of an unfinished run exists: pass --resume to "
                                f"continue it or --force to start over")
            ckpt.unlink()
        elif ckpt.exists():
            counts, done, old_fp = _load_point_checkpoint(ckpt)
            if old_fp != fp:
                raise EvalError(f"checkpoint {ckpt} was written with other settings "
                                f"({_diff(old_fp, fp)}); use --force to start over")
            log(f"resuming from {ckpt}: {len(done)} images already evaluated")
        elif out.exists() and not force:
            if resume:
                try:
                    prev = json.loads(out.read_text())
                except Exception as e:
                    raise EvalError(f"{out} exists and is not readable JSON ({e})") from e
                if prev.get("status") == "complete":
                    log(f"{out} is already complete; nothing to resume")
                    return prev
            raise EvalError(f"{out} exists (and no checkpoint to resume): pass --force to overwrite")

    done_set = set(done)
    todo = [s for s in samples if s.id not in done_set]
    t0 = time.perf_counter()
    last_saved = len(done)

    def result(status):
        return point_results_dict(counts, ds, names, root=root, protocol_knobs=knobs,
                                  model_info=model_info, images_done=len(done),
                                  images_total=total, images_missing=missing, status=status,
                                  seconds=time.perf_counter() - t0)

    def save():
        nonlocal last_saved
        if out is None:
            return
        _save_point_checkpoint(ckpt, counts, done, fp)
        atomic_write_json(out, result("partial"))
        last_saved = len(done)

    def load(sample):
        return sample, load_image(sample.image)

    step = max(1, int(getattr(protocol, "images_per_step", 1)))
    try:
        batch = []
        for i, item in enumerate(_prefetch(load, todo, depth=max(4, 2 * step))):
            batch.append(item)
            if len(batch) < step and i < len(todo) - 1:
                continue
            prompts = [[names[c] for c in s.classes] for s, _ in batch]
            maps = protocol.maps_batch([im for _, im in batch], prompts)
            for (sample, _), m in zip(batch, maps):
                evaluate_image_points(counts, labels, sample, m, protocol.threshold)
                done.append(sample.id)
                if callback is not None:
                    callback(len(done), sample.id)
                if out is not None and len(done) - last_saved >= checkpoint_every:
                    save()
            batch = []
    finally:
        if out is not None and len(done) != last_saved:
            save()  # an interrupted run keeps everything evaluated so far

    complete = len(done) == len(samples) and selected == total
    res = result("complete" if complete else "partial")
    if out is not None:
        if complete:
            atomic_write_json(out, res)
            if ckpt.exists():
                ckpt.unlink()
        else:
            _save_point_checkpoint(ckpt, counts, done, fp)
            atomic_write_json(out, res)
    return res
