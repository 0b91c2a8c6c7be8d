"""``gem-jax eval``: mIoU of a training-free method (GEM by default) on a standard segmentation
validation set, or p-mIoU on the OpenImages V7 point labels.

`register(subparsers)` adds the ``eval`` subcommand to the top-level ``gem-jax`` parser;
`main(argv)` runs it standalone (``python -m gem_jax.eval ...``).  Exit codes: 0 success,
1 runtime failure (missing dataset, unreadable checkpoint, existing outputs, ...), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .classnames import GEM_TEMPLATE, IMAGENET_TEMPLATES, NAME_SETS
from .datasets import ALIASES, DATASETS, POINT_DATASETS
from ..argtypes import DTYPES, finite_float as _finite_float, model_source
from ..argtypes import nonneg_int as _nonneg_int, positive_float as _positive_float
from ..argtypes import positive_int as _positive_int
from ..cli import GEM_KNOB_FLAGS, _method_knob, add_knob_args, method_knobs, method_names

__all__ = ["register", "add_arguments", "run", "main", "build_parser", "kind_defaults"]

DEFAULT_MODEL = "openai/clip-vit-base-patch16"
# Per protocol kind: what --method gem uses (the corresponding papers' code, docs/reproduce.md),
# and any method given a --protocol other than its own (see kind_defaults).
DEFAULTS = {
    "gem": dict(size=448, names="mmseg", background="threshold", threshold=0.85),
    "sliding": dict(size=336, names="sclip", background="both", threshold=0.1),
}
TEMPLATE_SET_NAMES = ("gem", "imagenet", "maskclip")   # gem_jax.eval.protocols.TEMPLATE_SETS
NAME_SET_NAMES = tuple(NAME_SETS) + ("clearclip",)     # + protocols.clearclip_names
POINT_THRESHOLD = 0.5
POINT_SIZE = 448

DESCRIPTION = """\
Evaluate a training-free open-vocabulary segmentation method (--method: GEM by default, MaskCLIP,
CLIP Surgery, SCLIP, ClearCLIP, NACLIP) on a standard validation set in mmsegmentation's on-disk
layout (mIoU, per-class IoU, pixel accuracy), or on the OpenImages V7 point labels (p-mIoU).

Each method runs its own paper's protocol by default (gem_jax.eval.protocols.METHOD_PROTOCOLS,
from its upstream configs; docs/methods.md); every protocol option given on the command line
overrides that default.  Two protocol kinds:
  gem      one pass at size x size; GEM's: 448x448, the template "a photo of a {}.", mmseg's
           class names, background (voc21/context60/coco_object) where the top softmax
           probability of logit_scale*cosine is below 0.85.  Also CLIP Surgery's (512, 85
           templates, background prompted).
  sliding  short side --size keeping the aspect ratio, --crop windows every --stride averaged
           (SCLIP, ClearCLIP, NACLIP, MaskCLIP as re-run by ClearCLIP: sizes, templates, names,
           logit scale, thresholds and PAMR per method and dataset).
--dataset oiv7-points: one size x size pass per image (default 448), one heatmap per class with
points on the image, min-max normalized, a point positive where its map exceeds
--point-threshold (default 0.5); p-mIoU over the split (gem_jax.eval.oiv7); on several
processes the per-class point counts are summed (exact).
Results go to --out as JSON (written atomically) recording the method, its knobs, every protocol
value and where the defaults came from; a checkpoint <out>.ckpt.npz is kept while the run is
unfinished so that --resume continues an interrupted run."""

EPILOG = """\
examples:
  gem-jax eval --dataset voc21 --root data/VOCdevkit --model openai/clip-vit-base-patch16
  gem-jax eval --dataset context59 --root data/VOCdevkit --iters 2 --out context59.json
  gem-jax eval --dataset voc21 --root data --method naclip          # NACLIP's protocol, PAMR on
  gem-jax eval --dataset voc21 --root data --method naclip --pamr 0 # ... without PAMR
  gem-jax eval --dataset ade20k --root data --method maskclip --knob residual=true  # official
  gem-jax eval --dataset ade20k --root data --method sclip --logit-scale 50 --size 448
  gem-jax eval --dataset ade20k --root data/ade --protocol sliding --size 448 --crop 448
  gem-jax eval --dataset oiv7-points --root data/openimages --method clearclip --limit 500
  gem-jax eval --dataset voc21 --root data/VOCdevkit --limit 50 --out smoke.json
  gem-jax eval --dataset voc21 --root data/VOCdevkit --out smoke.json --resume   # finish it
methods: """ + ", ".join(method_names()) + """
datasets: """ + ", ".join(DATASETS) + " (aliases: " + ", ".join(sorted(ALIASES)) + """)
point-label datasets: """ + ", ".join(POINT_DATASETS)


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


def _template(s):
    if s in TEMPLATE_SET_NAMES or "{}" in s:
        return s
    raise argparse.ArgumentTypeError(f"expected a template with '{{}}' where the class name goes "
                                     f"or one of {', '.join(TEMPLATE_SET_NAMES)}, got {s!r}")


def _dataset_name(s):
    from .datasets import get_dataset, get_point_dataset, is_point_dataset
    if is_point_dataset(s):
        return get_point_dataset(s).name
    try:
        return get_dataset(s).name
    except KeyError as e:
        raise argparse.ArgumentTypeError(str(e.args[0])) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--dataset", required=True, type=_dataset_name, metavar="NAME",
                   help="voc21, voc20, context60, context59, ade20k, coco_stuff, coco_object, "
                        "cityscapes (or an alias); oiv7-points for the OpenImages V7 point labels")
    g.add_argument("--root", required=True, metavar="PATH",
                   help="the dataset directory or a parent of it (e.g. data/VOCdevkit)")
    g.add_argument("--model", default=DEFAULT_MODEL, type=model_source, metavar="SRC",
                   help=f"hub id or local checkpoint directory (default {DEFAULT_MODEL})")
    g.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights and compute dtype (default float32)")
    g.add_argument("--limit", type=_positive_int, metavar="N",
                   help="only the first N images (sorted ids); resumable later without --limit")

    g = p.add_argument_group("method")
    methods = method_names()
    g.add_argument("--method", choices=methods, default=methods[0],
                   help=f"the dense method (default {methods[0]}); it brings its paper's protocol "
                        f"defaults")
    g.add_argument("--knob", action="append", default=[], type=_method_knob, metavar="KEY=VALUE",
                   help="a knob or option of --method, e.g. gaussian_std=3 (naclip), blocks=4 "
                        "(surgery), residual=true (maskclip: the official code and its "
                        "protocol), branches=v (gem); repeat for several (docs/methods.md)")
    add_knob_args(g)
    g.add_argument("--ori", action="store_true",
                   help="use the original CLIP tokens instead of the method's (the CLIP baseline)")

    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="FILE.json",
                   help="results JSON (default: eval-<dataset>-<method>.json; "
                        "eval-<dataset>-<method>-<protocol>.json with a --protocol other than "
                        "the method's)")
    g.add_argument("--resume", action="store_true",
                   help="continue the unfinished run recorded in <out>.ckpt.npz")
    g.add_argument("--force", action="store_true",
                   help="overwrite existing results / discard an existing checkpoint")
    g.add_argument("--checkpoint-every", type=_positive_int, default=50, metavar="N",
                   help="save the confusion matrix (point counts) every N images (default 50)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    g = p.add_argument_group(
        "protocol", "each option defaults to the method's protocol on the dataset (shown for gem)")
    g.add_argument("--protocol", choices=["gem", "sliding"],
                   help="the protocol kind (default: the method's own; gem for gem and surgery, "
                        "sliding for the others).  Naming the other kind keeps the method's "
                        "tokens and knobs but takes that kind's generic defaults, those of "
                        "--method gem --protocol KIND (gem: 448, one template, mmseg names, "
                        "threshold 0.85; sliding: short side 336, 336 windows every 112, 80 "
                        "templates, SCLIP's names, background both at 0.1, no PAMR), not the "
                        "method's own")
    g.add_argument("--size", type=_positive_int, metavar="S",
                   help="gem: the square input size (448); sliding: the short side (336 for "
                        "--protocol sliding); oiv7-points: the square input size (448)")
    g.add_argument("--crop", type=_nonneg_int, metavar="C",
                   help="sliding: window size, 0 for the whole image as one window (default: the "
                        "method's, else --size)")
    g.add_argument("--stride", type=_positive_int, metavar="S",
                   help="sliding: window stride (default: the method's, else 112 for crop 336, "
                        "224 for 448)")
    g.add_argument("--max-long-side", type=_positive_int, metavar="L",
                   help="sliding: cap on the resized long side (default 2048, as mmseg)")
    g.add_argument("--resample", choices=["bicubic", "bilinear"],
                   help="sliding: PIL filter of the aspect-preserving resize (default: bilinear "
                        "for the SCLIP family, mmseg's cv2 resize; bicubic for --protocol "
                        "sliding)")
    g.add_argument("--names", metavar="SET|FILE",
                   help=f"class prompts: {', '.join(NAME_SET_NAMES)} or a text file with one "
                        f"class per line, synonyms comma-separated (default: the method's; "
                        f"gem mmseg)")
    g.add_argument("--template", type=_template, metavar="TEXT|SET",
                   help=f"one prompt template with '{{}}' (gem: {GEM_TEMPLATE!r}), or a set: "
                        f"{', '.join(TEMPLATE_SET_NAMES)} (the 80 ImageNet templates; MaskCLIP's "
                        f"85)")
    g.add_argument("--scores", choices=["cosine", "minmax"],
                   help="gem protocol and oiv7-points: classify raw cosine maps (segmentation "
                        "default) or per-map min-max normalized heatmaps (oiv7-points default)")
    g.add_argument("--logit-scale", type=_positive_float, metavar="S",
                   help="softmax scale on the cosines (default: the method's, else the model's "
                        "learned scale, 100 for OpenAI CLIP)")
    g.add_argument("--background", choices=["threshold", "prompt", "both"],
                   help="background on voc21/context60/coco_object: by threshold only (gem "
                        "default), as a prompted class, or both")
    g.add_argument("--background-threshold", type=_threshold, metavar="T",
                   help="probability threshold for background, or 'none' (default: the "
                        "method's; gem 0.85)")
    g.add_argument("--pamr", type=_nonneg_int, metavar="STEPS",
                   help="PAMR refinement iterations of the maps, 0 = off (default: the "
                        "method's; 10 for naclip, else 0)")
    g.add_argument("--point-threshold", type=_finite_float, metavar="T",
                   help=f"oiv7-points: a point is positive where its class's map exceeds T "
                        f"(default {POINT_THRESHOLD})")
    g.add_argument("--missing-images", choices=["error", "skip"],
                   help="oiv7-points: labelled images absent from disk are an error (default) "
                        "or skipped (their number is recorded)")
    g.add_argument("--batch-size", type=_positive_int, metavar="B",
                   help="images (gem, oiv7-points) or windows (sliding) per forward pass "
                        "(default 1 on CPU, 8 on accelerators)")
    from ..distributed import add_distributed_args
    add_distributed_args(p)


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand (``func=run``) to a top-level ``add_subparsers()`` object."""
    p = subparsers.add_parser("eval", help="mIoU (p-mIoU) on a standard segmentation dataset",
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


class _Usage:
    """`gem_jax.cli.method_knobs` reports through parser.error; here a ValueError (exit 2)."""

    def __init__(self, method: str):
        self.method = method

    def error(self, msg):
        raise ValueError(f"{msg}; set {self.method}'s knobs and options with --knob KEY=VALUE")


def _knobs(args) -> dict:
    """--method's knobs and options: GEM's flags (gem only), then --knob KEY=VALUE, with the
    wording of `gem-jax heatmap`; ValueError for one that does not apply to the method."""
    from .. import methods
    knobs = method_knobs(_Usage(args.method), args)
    explicit = getattr(args, "_explicit", set()) or set()
    for flag, (dest, knob) in GEM_KNOB_FLAGS.items():  # --knob would silently win
        if dest in explicit and knobs.get(knob) != getattr(args, dest):
            raise ValueError(f"{flag} {getattr(args, dest)} and --knob {knob}={knobs[knob]} "
                             f"disagree; give one")
    methods.build(args.method, **knobs)  # a knob that does not apply: before loading the model
    return knobs


def _given(args, *dests) -> list[str]:
    return ["--" + d.replace("_", "-") for d in dests if getattr(args, d, None) is not None]


def _applies(flags: list[str]) -> str:
    return f"{', '.join(flags)} appl{'ies' if len(flags) == 1 else 'y'}"


def _class_prompts(dataset: str, names: str):
    from .classnames import names_for
    from .protocols import clearclip_names
    return clearclip_names(dataset) if names == "clearclip" else names_for(dataset, names)


def _template_list(t: str):
    from .protocols import TEMPLATE_SETS
    return TEMPLATE_SETS[t] if t in TEMPLATE_SETS else [t]


def kind_defaults(kind: str, dataset: str) -> dict:
    """A protocol kind's generic defaults on a dataset, in `protocol_defaults`' form: what
    ``--method gem --protocol KIND`` runs (DEFAULTS), and any method given a --protocol other
    than its own."""
    from .classnames import names_for
    from .datasets import get_dataset
    spec = get_dataset(dataset)
    d = DEFAULTS[kind]
    kw = dict(kind=kind, class_prompts=names_for(spec.name, d["names"]),
              has_background=spec.has_background, logit_scale=None, pamr_steps=0)
    if spec.has_background:
        kw.update(background=d["background"], threshold=d["threshold"], area_threshold=None)
    if kind == "gem":
        kw.update(size=d["size"], templates=(GEM_TEMPLATE,))
    else:  # SlidingProtocol's own defaults: crop = size, stride by crop, windows padded
        kw.update(size=d["size"], crop=None, stride=None, max_long_side=2048, resample="bicubic",
                  pad=True, templates=IMAGENET_TEMPLATES)
    return kw


def _options(args):
    """(spec, kind, the method's own kind, knobs, protocol overrides) from the arguments: only
    the options given on the command line override the defaults (the method's, or with a foreign
    --protocol those of `kind_defaults`).  Raises ValueError for inconsistent usage."""
    from .datasets import get_dataset
    from .protocols import protocol_defaults
    spec = get_dataset(args.dataset)
    bad = _given(args, "point_threshold", "missing_images")
    if bad:
        raise ValueError(f"{_applies(bad)} to point-label datasets (--dataset oiv7-points) only")
    knobs = _knobs(args)
    base = protocol_defaults(args.method, spec.name, knobs)
    native = base["kind"]
    kind = args.protocol or native
    if kind != native:
        base = kind_defaults(kind, spec.name)
    over = {}
    if args.names:
        over["class_prompts"] = _class_prompts(spec.name, args.names)
    thr = args.background_threshold
    if spec.has_background:
        background = args.background or base["background"]
        if thr == "none":
            if args.background in ("threshold", "both"):
                raise ValueError(f"--background {args.background} needs a threshold")
            background, thr = "prompt", None
        elif background == "prompt":
            if thr is not None:
                raise ValueError("--background prompt takes no --background-threshold"
                                 if args.background else
                                 f"{args.method} prompts the background on {spec.name} without a "
                                 f"threshold: add --background threshold or both to use "
                                 f"--background-threshold")
        elif thr is None:
            thr = base["threshold"]
            if thr is None:  # the method only prompts it
                raise ValueError(f"--background {background} needs --background-threshold T "
                                 f"({args.method} has no threshold on {spec.name})")
        over.update(background=background, threshold=thr)
    elif args.background is not None or thr not in (None, "none"):
        raise ValueError(f"{spec.name} has no background class: --background and "
                         f"--background-threshold do not apply")
    sliding = _given(args, "crop", "stride", "max_long_side", "resample")
    if kind == "gem":
        if sliding:
            raise ValueError(f"{_applies(sliding)} to the sliding protocol only ({args.method} "
                             f"runs the gem protocol here: one size x size pass; --protocol "
                             f"sliding for windows)")
        if args.scores:
            over["scores"] = args.scores
    else:
        if args.scores not in (None, "cosine"):
            raise ValueError("--scores minmax applies to the gem protocol only")
        over.update({d: getattr(args, d) for d in ("crop", "stride", "max_long_side", "resample")
                     if getattr(args, d) is not None})
        if args.crop == 0 and args.stride is not None:
            raise ValueError("--stride does not apply to --crop 0 (the whole image, one window)")
    for dest, key in (("size", "size"), ("logit_scale", "logit_scale"), ("pamr", "pamr_steps"),
                      ("batch_size", "batch_size")):
        if getattr(args, dest) is not None:
            over[key] = getattr(args, dest)
    if args.template is not None:
        over["templates"] = _template_list(args.template)
    if args.ori:
        over["use_ori"] = True
    return spec, kind, native, knobs, over


def _protocol(model, args, spec, kind, native, knobs, over):
    """The protocol: `method_protocol` (the method's defaults) with the overrides, or for a
    foreign --protocol the kind's generic defaults with the overrides."""
    from .protocols import METHOD_PROTOCOLS, PROTOCOLS, method_protocol, protocol_key
    if kind == native:
        return method_protocol(model, args.method, spec.name, knobs=knobs, **over)
    kw = dict(kind_defaults(kind, spec.name), **over)
    kw.pop("kind")
    proto = PROTOCOLS[kind](model, kw.pop("class_prompts"), method=args.method, knobs=knobs,
                            **kw)
    own = METHOD_PROTOCOLS[protocol_key(args.method, knobs)].source
    proto.defaults_from = (f"gem-jax eval --protocol {kind} (generic {kind} defaults, those of "
                           f"--method gem --protocol {kind}); {args.method}'s own {native} "
                           f"protocol ({own}) not used")
    return proto


def _point_options(args):
    """(dataset, knobs, PointProtocol keyword arguments) for --dataset oiv7-points."""
    from .datasets import get_point_dataset
    ds = get_point_dataset(args.dataset)
    bad = _given(args, "protocol", "crop", "stride", "max_long_side", "resample", "names",
                 "logit_scale", "background", "background_threshold", "pamr")
    if bad:
        raise ValueError(f"{', '.join(bad)} do{'es' if len(bad) == 1 else ''} not apply to "
                         f"--dataset {ds.name} (point labels: one size x size pass per image, "
                         f"the classes' display names as prompts; see --point-threshold)")
    if args.template in TEMPLATE_SET_NAMES and args.template != "gem":
        raise ValueError(f"--dataset {ds.name} takes one template, not the set {args.template!r}")
    scores = args.scores or "minmax"
    thr = POINT_THRESHOLD if args.point_threshold is None else args.point_threshold
    if scores == "minmax" and not 0.0 <= thr <= 1.0:
        raise ValueError(f"--point-threshold must be in [0, 1] for min-max normalized maps, got "
                         f"{thr:g} (--scores cosine thresholds raw cosines)")
    knobs = _knobs(args)
    kw = dict(size=args.size or POINT_SIZE, threshold=thr, normalize=scores == "minmax",
              use_ori=args.ori, batch_size=args.batch_size, method=args.method, knobs=knobs)
    if args.template is not None:
        kw["template"] = GEM_TEMPLATE if args.template == "gem" else args.template
    return ds, kw


def _initialize(args):
    from ..distributed import initialize
    return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None),
                      auto=bool(getattr(args, "distributed", False)))


def _load(args):
    """(model, None) or (None, exit code) after printing the error."""
    try:
        import jax.numpy as jnp
        from .. import load
        return load(args.model, dtype=getattr(jnp, args.dtype)), None
    except Exception as e:  # CheckpointError and anything a broken checkpoint raises
        from ..convert import CheckpointError
        return None, _err(str(e) if isinstance(e, CheckpointError) else
                          f"could not load model {args.model!r}: {type(e).__name__}: {e}", 1)


def _check_out(out: Path, default_name: str):
    if out.is_dir():  # the same output rule as every command: say what is wrong, exit 2
        return _err(f"--out {out} is a directory; eval writes one JSON file (e.g. --out "
                    f"{out / default_name})", 2)
    return None


def _start(args, default_name: str, check_dataset):
    """What every eval does before computing, in this order: the output rule (exit 2), joining
    the processes (exit 2), the dataset present under --root (`check_dataset(root)`, exit 1,
    before the model loads), the model loaded (exit 1).  (out, cluster, model, None), or
    (.., None, exit code) with the error reported."""
    out = Path(args.out or default_name)
    if _check_out(out, default_name):
        return out, None, None, 2
    try:  # before JAX computes anything
        cluster = _initialize(args)
    except ValueError as e:
        return out, None, None, _err(str(e), 2)
    from .datasets import DatasetError
    try:
        check_dataset(args.root)
    except DatasetError as e:
        return out, cluster, None, _err(str(e), 1)
    model, code = _load(args)
    return out, cluster, model, code


def run(args) -> int:
    """Run ``eval`` from parsed arguments; returns the exit code."""
    from .datasets import is_point_dataset
    if is_point_dataset(args.dataset):
        return _run_points(args)
    try:
        spec, kind, native, knobs, over = _options(args)
    except ValueError as e:
        return _err(str(e), 2)
    tag = args.method if kind == native else f"{args.method}-{kind}"
    label = args.method if kind == native else f"{args.method}, {kind} protocol"
    out, cluster, model, code = _start(args, f"eval-{spec.name}-{tag}.json", spec.resolve_root)
    if model is None:
        return code
    from .runner import evaluate
    try:
        protocol = _protocol(model, args, spec, kind, native, knobs, over)
    except ValueError as e:  # knobs / sizes that need the model to check (e.g. --gem-depth)
        return _err(str(e), 2)
    if cluster.multi:
        return _run_multi(args, cluster, model, spec, protocol, out, label)
    res, code = _guarded(out, lambda: evaluate(
        model, spec, args.root, protocol, out=out, limit=args.limit, resume=args.resume,
        force=args.force, checkpoint_every=args.checkpoint_every, quiet=args.quiet,
        model_source=str(args.model)))
    if res is None:
        return code
    if not args.quiet:
        m = res["metrics"]
        c = res["counts"]
        print(f"{spec.name} [{label}] {c['images']}/{c['images_total']} images: "
              f"mIoU {_fmt(m['mIoU'])}  mAcc {_fmt(m['mAcc'])}  aAcc {_fmt(m['aAcc'])}  "
              f"({res['status']}) -> {out}")
    return 0


def _run_points(args) -> int:
    """--dataset oiv7-points: `PointProtocol` + `evaluate_points` (p-mIoU), on one process or
    several (counts summed across processes)."""
    try:
        ds, kw = _point_options(args)
    except ValueError as e:
        return _err(str(e), 2)
    out, cluster, model, code = _start(args, f"eval-{ds.name}-{args.method}.json", ds.files)
    if model is None:
        return code
    from .protocols import PointProtocol
    from .runner import evaluate_points
    try:
        protocol = PointProtocol(model, **kw)
    except ValueError as e:  # knobs / sizes that need the model to check
        return _err(str(e), 2)
    if cluster.multi:
        return _run_points_multi(args, cluster, model, ds, protocol, out)
    res, code = _guarded(out, lambda: evaluate_points(
        model, ds, args.root, protocol, out=out, limit=args.limit, resume=args.resume,
        force=args.force, checkpoint_every=args.checkpoint_every,
        missing_images=args.missing_images or "error", quiet=args.quiet,
        model_source=str(args.model)))
    if res is None:
        return code
    if not args.quiet:
        c = res["counts"]
        print(f"{ds.name} [{args.method}] {c['images']}/{c['images_total']} images, "
              f"{c['points_yes'] + c['points_no']} points: p-mIoU {_fmt(res['metrics']['p-mIoU'])}"
              f"  ({res['status']}) -> {out}")
    return 0


def _guarded(out: Path, run):
    """(run(), None), or (None, exit code) with the error reported: dataset/eval errors 1,
    Ctrl-C 130 and any other failure 1, both saying how to resume when a checkpoint exists."""
    from .datasets import DatasetError
    from .runner import EvalError, checkpoint_path
    try:
        return run(), None
    except (DatasetError, EvalError) as e:
        return None, _err(str(e), 1)
    except KeyboardInterrupt:
        print(f"\ninterrupted; progress saved: rerun with --resume --out {out}", file=sys.stderr)
        return None, 130
    except Exception as e:
        hint = f" (progress saved: rerun with --resume --out {out})" \
            if checkpoint_path(out).exists() else ""
        return None, _err(f"{type(e).__name__}: {e}{hint}", 1)


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}"


def part_path(out: Path, process: int, processes: int) -> Path:
    """One process's share of a multi-process eval: its own results JSON (and checkpoint)."""
    return out.with_name(f"{out.stem}.part-{process:05d}-of-{processes:05d}{out.suffix or '.json'}")


def _run_sharded(args, cluster, out: Path, run_part, contribution, fold) -> int:
    """Several processes: process p runs `run_part(part, (p, n))`, every n-th image from p (sorted
    ids, after --limit), into its own part (resumable as usual); every process's
    `contribution(results)` (JSON: exact integer counts) is gathered and process 0 writes
    `fold(contributions)` -> (results, summary line) to --out.  All processes stop together on
    any process's error."""
    from ..distributed import agree, allgather_json, barrier
    from .datasets import DatasetError
    from .runner import EvalError, atomic_write_json, checkpoint_path
    pid, n = cluster.process_id, cluster.num_processes
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
            res = run_part(part, (pid, n))
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
    shares = allgather_json(dict(contribution(res), images=res["counts"]["images"],
                                 seconds=res.get("seconds") or 0.0))
    glob, line = fold(shares)
    glob["processes"] = {"count": n, "images": [c["images"] for c in shares],
                         "parts": [part_path(out, p, n).name for p in range(n)]}
    if pid == 0:
        atomic_write_json(out, glob)
    barrier("gem_jax.eval.written")
    if glob["status"] == "complete":  # the parts are folded into --out; unfinished ones stay
        part.unlink(missing_ok=True)
    if not args.quiet and pid == 0:
        print(f"{line} on {n} processes ({glob['status']}) -> {out}")
    return 0


def _run_multi(args, cluster, model, spec, protocol, out: Path, label: str) -> int:
    """Segmentation datasets on several processes: the confusion matrices are summed (int64,
    exact), so the global mIoU equals one process's."""
    import dataclasses
    import numpy as np
    from .runner import evaluate, results_dict
    find = spec._find
    first = {}

    def run_part(part, shard):  # (inside the error handling that every process agrees on)
        first["total"] = len(spec.samples(args.root))

        def find_shard(root, resolve_only=False):
            if resolve_only:
                return find(root, resolve_only=True)
            return find(root)[:args.limit][shard[0]::shard[1]]
        return evaluate(model, dataclasses.replace(spec, _find=find_shard), args.root, protocol,
                        out=part, resume=args.resume, force=args.force,
                        checkpoint_every=args.checkpoint_every, quiet=args.quiet,
                        model_source=str(args.model))

    def contribution(res):
        first.update(protocol=res["protocol"], model=res["model"])
        return {"confusion_matrix": res["confusion_matrix"]}

    def fold(shares):
        cm = sum(np.asarray(c["confusion_matrix"], np.int64) for c in shares)
        done, total = sum(c["images"] for c in shares), first["total"]
        glob = results_dict(cm, spec, root=args.root, protocol_knobs=first["protocol"],
                            model_info=first["model"], images_done=done, images_total=total,
                            status="complete" if done == total else "partial",
                            seconds=max(c["seconds"] for c in shares))
        m = glob["metrics"]
        return glob, (f"{spec.name} [{label}] {done}/{total} images: mIoU {_fmt(m['mIoU'])}  "
                      f"mAcc {_fmt(m['mAcc'])}  aAcc {_fmt(m['aAcc'])}")
    return _run_sharded(args, cluster, out, run_part, contribution, fold)


def _run_points_multi(args, cluster, model, ds, protocol, out: Path) -> int:
    """Point-label datasets on several processes: the per-class point counts (tp, fp, fn, tn,
    unsure) are summed by class, so the global p-mIoU equals one process's."""
    import numpy as np
    from .oiv7 import PointCounts
    from .runner import evaluate_points, point_results_dict
    first = {}

    def run_part(part, shard):
        return evaluate_points(model, ds, args.root, protocol, out=part, limit=args.limit,
                               resume=args.resume, force=args.force,
                               checkpoint_every=args.checkpoint_every,
                               missing_images=args.missing_images or "error", quiet=args.quiet,
                               model_source=str(args.model), shard=shard)

    def contribution(res):
        first.update(protocol=res["protocol"], model=res["model"], counts=res["counts"])
        rows = [[r[k] for k in ("tp", "fp", "fn", "tn", "unsure")] for r in res["per_class"]]
        return {"classes": [r["class"] for r in res["per_class"]], "rows": rows,
                "names": {r["class"]: r["name"] for r in res["per_class"]},
                "status": res["status"]}

    def fold(shares):
        counts = PointCounts()
        names = {}
        for c in shares:
            rows = np.asarray(c["rows"], np.int64).reshape(-1, 5)  # (0, 5): a process with no images
            counts.merge(PointCounts.from_state(c["classes"], rows))
            names.update(c["names"])
        done = sum(c["images"] for c in shares)
        complete = all(c["status"] == "complete" for c in shares)
        total, missing = first["counts"]["images_total"], first["counts"]["images_missing"]
        glob = point_results_dict(counts, ds, names, root=args.root,
                                  protocol_knobs=first["protocol"], model_info=first["model"],
                                  images_done=done, images_total=total, images_missing=missing,
                                  status="complete" if complete else "partial",
                                  seconds=max(c["seconds"] for c in shares))
        c = glob["counts"]
        return glob, (f"{ds.name} [{args.method}] {done}/{total} images, "
                      f"{c['points_yes'] + c['points_no']} points: "
                      f"p-mIoU {_fmt(glob['metrics']['p-mIoU'])}")
    return _run_sharded(args, cluster, out, run_part, contribution, fold)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
