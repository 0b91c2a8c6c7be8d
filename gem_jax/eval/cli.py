"""``gem-jax eval``: mIoU of GEM on a standard segmentation validation set.

`register(subparsers)` adds the ``eval`` subcommand to the top-level ``gem-jax`` parser;
`main(argv)` runs it standalone (``python -m gem_jax.eval ...``).  Exit codes: 0 success,
1 runtime failure (missing dataset, unreadable checkpoint, existing outputs, ...), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .classnames import GEM_TEMPLATE, IMAGENET_TEMPLATES, NAME_SETS
from .datasets import ALIASES, DATASETS
from ..argtypes import DTYPES, gem_depth as _depth, model_source
from ..argtypes import nonneg_int as _nonneg_int, positive_float as _positive_float
from ..argtypes import positive_int as _positive_int, temperature as _temp

__all__ = ["register", "add_arguments", "run", "main", "build_parser"]

DEFAULT_MODEL = "openai/clip-vit-base-patch16"
DEFAULTS = {  # per protocol: what the corresponding papers' code does (see docs/reproduce.md)
    "gem": dict(size=448, names="mmseg", background="threshold", threshold=0.85),
    "sliding": dict(size=336, names="sclip", background="both", threshold=0.1),
}

DESCRIPTION = """\
Evaluate GEM open-vocabulary semantic segmentation (mIoU, per-class IoU, pixel accuracy) on a
standard validation set in mmsegmentation's on-disk layout.  Two protocols:
  gem      GEM's: resize to 448x448, the template "a photo of a {}.", maps upsampled to the label
           size, argmax; background (voc21/context60/coco_object) where the top softmax
           probability of logit_scale*cosine is below --background-threshold (default 0.85).
  sliding  SCLIP/ClearCLIP/ProxyCLIP's: short side 336 keeping the aspect ratio, 336x336 windows
           every 112 px averaged, 80 ImageNet templates, SCLIP's class names; background both
           prompted and thresholded (default 0.1).
Results go to --out as JSON (written atomically); a checkpoint <out>.ckpt.npz is kept while the
run is unfinished so that --resume continues an interrupted run."""

EPILOG = """\
examples:
  gem-jax eval --dataset voc21 --root data/VOCdevkit --model openai/clip-vit-base-patch16
  gem-jax eval --dataset context59 --root data/VOCdevkit --iters 2 --out context59.json
  gem-jax eval --dataset ade20k --root data/ade --protocol sliding --size 448 --crop 448
  gem-jax eval --dataset voc21 --root data/VOCdevkit --limit 50 --out smoke.json
  gem-jax eval --dataset voc21 --root data/VOCdevkit --out smoke.json --resume   # finish it
datasets: """ + ", ".join(DATASETS) + " (aliases: " + ", ".join(sorted(ALIASES)) + ")"


def _threshold(s):
    if s.lower() in ("none", "off"):
        return "none"
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none', got {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"background threshold must be in [0, 1], got {s!r}")
    return v


def _dataset_name(s):
    from .datasets import get_dataset
    try:
        return get_dataset(s).name
    except KeyError as e:
        raise argparse.ArgumentTypeError(str(e.args[0])) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--dataset", required=True, type=_dataset_name, metavar="NAME",
                   help="voc21, voc20, context60, context59, ade20k, coco_stuff, coco_object, "
                        "cityscapes (or an alias)")
    g.add_argument("--root", required=True, metavar="PATH",
                   help="the dataset directory or a parent of it (e.g. data/VOCdevkit)")
    g.add_argument("--model", default=DEFAULT_MODEL, type=model_source, metavar="SRC",
                   help=f"hub id or local checkpoint directory (default {DEFAULT_MODEL})")
    g.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights and compute dtype (default float32)")
    g.add_argument("--protocol", default="gem", choices=["gem", "sliding"],
                   help="gem (default) or sliding")
    g.add_argument("--limit", type=_positive_int, metavar="N",
                   help="only the first N images (sorted ids); resumable later without --limit")

    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="FILE.json",
                   help="results JSON (default: eval-<dataset>-<protocol>.json)")
    g.add_argument("--resume", action="store_true",
                   help="continue the unfinished run recorded in <out>.ckpt.npz")
    g.add_argument("--force", action="store_true",
                   help="overwrite existing results / discard an existing checkpoint")
    g.add_argument("--checkpoint-every", type=_positive_int, default=50, metavar="N",
                   help="save the confusion matrix every N images (default 50)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    g = p.add_argument_group("GEM knobs")
    g.add_argument("--gem-depth", type=_depth, default=7, metavar="D",
                   help="GEM modifies the last D-1 blocks (default 7)")
    g.add_argument("--iters", type=_nonneg_int, default=1, metavar="K",
                   help="self-self attention iterations (default 1)")
    g.add_argument("--temp", type=_temp, default=None, metavar="T",
                   help="self-self attention inverse temperature, or 'adaptive' (default)")
    g.add_argument("--ori", action="store_true",
                   help="use the original CLIP tokens instead of GEM's (the CLIP baseline)")

    g = p.add_argument_group("protocol")
    g.add_argument("--size", type=_positive_int, metavar="S",
                   help="gem: the square input size (default 448); sliding: the short side "
                        "(default 336)")
    g.add_argument("--crop", type=_positive_int, metavar="C",
                   help="sliding: window size (default --size)")
    g.add_argument("--stride", type=_positive_int, metavar="S",
                   help="sliding: window stride (default 112 for crop 336, 224 for 448)")
    g.add_argument("--max-long-side", type=_positive_int, default=2048, metavar="L",
                   help="sliding: cap on the resized long side (default 2048, as mmseg)")
    g.add_argument("--resample", choices=["bicubic", "bilinear"], default="bicubic",
                   help="sliding: PIL filter of the aspect-preserving resize (default bicubic)")
    g.add_argument("--names", metavar="SET|FILE",
                   help=f"class prompts: {' or '.join(NAME_SETS)} or a text file with one class "
                        f"per line, synonyms comma-separated (default: gem mmseg, sliding sclip)")
    g.add_argument("--template", default=None, metavar="TEXT",
                   help=f"gem: the prompt template (default {GEM_TEMPLATE!r}); sliding: use this "
                        f"one template instead of the 80 ImageNet ones")
    g.add_argument("--scores", choices=["cosine", "minmax"], default="cosine",
                   help="gem: classify raw cosine maps (default) or per-map min-max normalized "
                        "heatmaps")
    g.add_argument("--logit-scale", type=_positive_float, metavar="S",
                   help="softmax scale on the cosines (default: the model's learned scale, 100 for "
                        "OpenAI CLIP)")
    g.add_argument("--background", choices=["threshold", "prompt", "both"],
                   help="background on voc21/context60/coco_object: by threshold only (gem "
                        "default), as a prompted class, or both (sliding default)")
    g.add_argument("--background-threshold", type=_threshold, metavar="T",
                   help="probability threshold for background, or 'none' (default: gem 0.85, "
                        "sliding 0.1)")
    g.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help="images (gem) or windows (sliding) per forward pass (default 1 on CPU, "
                        "8 on accelerators)")
    from ..distributed import add_distributed_args
    add_distributed_args(p)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand (``func=run``) to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser("eval", help="mIoU on a standard segmentation dataset",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser(prog: str = "python -m gem_jax.eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _err(msg: str, code: int) -> int:
    print(f"gem-jax eval: error: {msg}", file=sys.stderr)
    return code


def _options(args):
    """Protocol options from the arguments; raises ValueError for inconsistent usage."""
    from .classnames import names_for
    from .datasets import get_dataset
    spec = get_dataset(args.dataset)
    d = DEFAULTS[args.protocol]
    class_prompts = names_for(spec.name, args.names or d["names"])
    opts = dict(has_background=spec.has_background, gem_depth=args.gem_depth,
                ss_attn_iter=args.iters, ss_attn_temp=args.temp, use_ori=args.ori,
                logit_scale=args.logit_scale, batch_size=args.batch_size)
    thr = args.background_threshold
    if spec.has_background:
        background = args.background or d["background"]
        if thr == "none":
            if args.background in ("threshold", "both"):
                raise ValueError(f"--background {args.background} needs a threshold")
            background, thr = "prompt", None
        elif background == "prompt":
            if thr is not None:
                raise ValueError("--background prompt takes no --background-threshold")
        elif thr is None:
            thr = d["threshold"]
        opts.update(background=background, threshold=thr)
    else:
        if args.background is not None or thr not in (None, "none"):
            raise ValueError(f"{spec.name} has no background class: --background and "
                             f"--background-threshold do not apply")
    size = args.size or d["size"]
    if args.protocol == "gem":
        if args.crop or args.stride:
            raise ValueError("--crop and --stride apply to --protocol sliding only")
        opts.update(size=size, template=args.template or GEM_TEMPLATE, scores=args.scores)
    else:
        if args.scores != "cosine":
            raise ValueError("--scores applies to --protocol gem only")
        opts.update(size=size, crop=args.crop, stride=args.stride,
                    max_long_side=args.max_long_side, resample=args.resample,
                    templates=[args.template] if args.template else IMAGENET_TEMPLATES)
    return spec, class_prompts, opts


def run(args) -> int:
    """Run ``eval`` from parsed arguments; returns the exit code."""
    try:
        spec, class_prompts, opts = _options(args)
    except ValueError as e:
        return _err(str(e), 2)
    out = Path(args.out or f"eval-{spec.name}-{args.protocol}.json")
    if out.is_dir():  # the same output rule as every command: say what is wrong, exit 2
        return _err(f"--out {out} is a directory; eval writes one JSON file (e.g. --out "
                    f"{out / f'eval-{spec.name}-{args.protocol}.json'})", 2)

    from ..distributed import initialize
    try:  # before JAX computes anything
        cluster = initialize(getattr(args, "coordinator", None),
                             getattr(args, "num_processes", None),
                             getattr(args, "process_id", None),
                             auto=bool(getattr(args, "distributed", False)))
    except ValueError as e:
        return _err(str(e), 2)
    from .datasets import DatasetError
    from .protocols import PROTOCOLS
    from .runner import EvalError, checkpoint_path, evaluate
    try:
        spec.resolve_root(args.root)  # fail on a missing dataset before loading the model
    except DatasetError as e:
        return _err(str(e), 1)
    try:
        import jax.numpy as jnp
        from .. import load
        model = load(args.model, dtype=getattr(jnp, args.dtype))
    except Exception as e:  # CheckpointError and anything a broken checkpoint raises
        from ..convert import CheckpointError
        return _err(str(e) if isinstance(e, CheckpointError) else
                    f"could not load model {args.model!r}: {type(e).__name__}: {e}", 1)
    try:
        protocol = PROTOCOLS[args.protocol](model, class_prompts, **opts)
    except ValueError as e:  # knobs / sizes that need the model to check (e.g. --gem-depth)
        return _err(str(e), 2)
    if cluster.multi:
        return _run_multi(args, cluster, model, spec, protocol, out)
    try:
        res = evaluate(model, spec, args.root, protocol, out=out, limit=args.limit,
                       resume=args.resume, force=args.force,
                       checkpoint_every=args.checkpoint_every, quiet=args.quiet,
                       model_source=str(args.model))
    except (DatasetError, EvalError) as e:
        return _err(str(e), 1)
    except KeyboardInterrupt:
        print(f"\ninterrupted; progress saved: rerun with --resume --out {out}", file=sys.stderr)
        return 130
    except Exception as e:
        hint = f" (progress saved: rerun with --resume --out {out})" \
            if checkpoint_path(out).exists() else ""
        return _err(f"{type(e).__name__}: {e}{hint}", 1)
    if not args.quiet:
        m = res["metrics"]
        c = res["counts"]
        print(f"{spec.name} [{args.protocol}] {c['images']}/{c['images_total']} images: "
              f"mIoU {_fmt(m['mIoU'])}  mAcc {_fmt(m['mAcc'])}  aAcc {_fmt(m['aAcc'])}  "
              f"({res['status']}) -> {out}")
    return 0


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}"


def part_path(out: Path, process: int, processes: int) -> Path:
    """One process's share of a multi-process eval: its own results JSON (and checkpoint)."""
    return out.with_name(f"{out.stem}.part-{process:05d}-of-{processes:05d}{out.suffix or '.json'}")


def _run_multi(args, cluster, model, spec, protocol, out: Path) -> int:
    """Several processes: process p evaluates every N-th image from p (sorted ids, after
    --limit) into its own part (resumable as usual); the confusion matrices are then summed
    across processes, exactly (int64), and process 0 writes the global results to --out."""
    import dataclasses
    import numpy as np
    from ..distributed import agree, allgather_bytes, allgather_json, barrier
    from .datasets import DatasetError
    from .runner import EvalError, atomic_write_json, checkpoint_path, evaluate, results_dict
    pid, n = cluster.process_id, cluster.num_processes
    limit = args.limit
    find = spec._find

    def shard(root, resolve_only=False):
        if resolve_only:
            return find(root, resolve_only=True)
        return find(root)[:limit][pid::n]
    part = part_path(out, pid, n)
    err = None
    finished = False
    if args.resume and not args.force and out.is_file() and not part.exists() \
            and not checkpoint_path(part).exists():
        try:
            import json
            finished = json.loads(out.read_text()).get("status") == "complete"
        except ValueError:
            pass
    if all(allgather_json(finished)):  # every process must take the same way
        if pid == 0 and not args.quiet:
            print(f"{out} is already complete; nothing to resume", file=sys.stderr)
        return 0
    if out.exists() and not (args.force or args.resume):
        err = f"{out} exists: pass --force to overwrite (or --resume to finish an unfinished run)"
    if not any(agree(err)):
        try:
            total = len(spec.samples(args.root))
            res = evaluate(model, dataclasses.replace(spec, _find=shard), args.root, protocol,
                           out=part, resume=args.resume, force=args.force,
                           checkpoint_every=args.checkpoint_every, quiet=args.quiet,
                           model_source=str(args.model))
        except KeyboardInterrupt:
            print(f"\ninterrupted; progress saved: rerun with --resume --out {out}", file=sys.stderr)
            return 130
        except (DatasetError, EvalError) as e:
            err = str(e)
        except Exception as e:
            hint = " (progress saved: rerun with --resume)" if checkpoint_path(part).exists() else ""
            err = f"{type(e).__name__}: {e}{hint}"
    errors = agree(err)
    if any(errors):
        p, e = next((p, e) for p, e in enumerate(errors) if e)
        return _err(e if p == pid else f"process {p} failed: {e}", 1)
    # The global confusion matrix: every process's int64 matrix, summed (exact).
    mats = [np.frombuffer(b, np.int64).reshape(spec.num_classes, spec.num_classes)
            for b in allgather_bytes(np.asarray(res["confusion_matrix"], np.int64).tobytes())]
    counts = [int(c) for c in np.frombuffer(b"".join(allgather_bytes(
        np.asarray([res["counts"]["images"]], np.int64).tobytes())), np.int64)]
    seconds = max(float(np.frombuffer(b, np.float64)[0]) for b in
                  allgather_bytes(np.asarray([res.get("seconds") or 0.0], np.float64).tobytes()))
    done = sum(counts)
    if pid == 0:
        glob = results_dict(sum(mats), spec, root=args.root, protocol_knobs=res["protocol"],
                            model_info=res["model"], images_done=done, images_total=total,
                            status="complete" if done == total else "partial", seconds=seconds)
        glob["processes"] = {"count": n, "images": counts,
                             "parts": [part_path(out, p, n).name for p in range(n)]}
        atomic_write_json(out, glob)
    barrier("gem_jax.eval.written")
    if done == total:  # the parts are folded into --out; unfinished parts stay for --resume
        part.unlink(missing_ok=True)
    if not args.quiet and pid == 0:
        m = glob["metrics"]
        print(f"{spec.name} [{args.protocol}] {done}/{total} images on {n} processes: "
              f"mIoU {_fmt(m['mIoU'])}  mAcc {_fmt(m['mAcc'])}  aAcc {_fmt(m['aAcc'])}  "
              f"({glob['status']}) -> {out}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
