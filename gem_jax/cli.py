"""The `gem-jax` command line.

    gem-jax heatmap photo.jpg -p cat -p "remote control"
    gem-jax segment photo.jpg -c cat -c sofa --background-threshold 0.5
    gem-jax convert openai/clip-vit-base-patch16 ckpt/b16
    gem-jax models

Exit codes: 0 success; 2 usage error, before anything is computed (a bad option value, an input
or --model path that does not exist, --out naming a file, a knob the model cannot take such as
--size below its patch size); 1 runtime failure (an unreadable image -- reported, skipped, the
others done --, a model that cannot be loaded, --out holding outputs without --force, ...).
Errors are `error: ...` lines on stderr, never a traceback (set GEM_JAX_TRACEBACK=1 to see one
for unexpected errors).

Every command that writes follows one rule (gem_jax.outputs): --out must be absent, an empty
directory, or -- with --force -- a previous gem-jax output, of which only the files this run
writes are replaced; all output names are planned (and deduplicated) before computing and
recorded in --out/manifest.json.

Other modules add subcommands with `register(subparsers)`: each adds its parser(s) with
`set_defaults(func=callable)`, where `func(args) -> int`; `add_model_args(parser)` and
`load_model(args)` give them the shared model options.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence
from .argtypes import DTYPES, finite_float as _finite_float, gem_depth, model_source
from .argtypes import nonneg_int as _nonneg_int, positive_int as _positive_int, temperature
from .argtypes import unit_float as _unit_float
from .distributed import add_distributed_args

DEFAULT_MODEL = "openai/clip-vit-base-patch16"
DEFAULT_OUT = "gem-jax-out"
_PROGRESS_MIN = 4  # show a progress bar from this many images on


class CLIError(Exception):
    """A runtime failure reported as `error: <message>` and exit code 1."""


# ----------------------------------------------------------------------------- argument types


def _template(s: str) -> str:
    if "{}" not in s:
        raise argparse.ArgumentTypeError(f"the template must contain '{{}}' where the prompt goes "
                                         f"(use '{{}}' alone for none), got {s!r}")
    return s


def method_names() -> tuple[str, ...]:
    """The heatmap methods offered by --method (and `gem-jax serve`): one place, the library's
    `gem_jax.METHODS` once it has one, else GEM alone."""
    import gem_jax
    return tuple(getattr(gem_jax, "METHODS", ("gem",)))


# ----------------------------------------------------------------------------- shared options
def add_dtype_arg(g, default: str | None = "float32", help: str | None = None) -> None:
    """--dtype with the same choices in every command (gem_jax.argtypes.DTYPES)."""
    g.add_argument("--dtype", choices=DTYPES, default=default,
                   help=help or "weights and compute dtype (default float32; bfloat16/float16 "
                                "halve memory and are fast on GPU/TPU; LayerNorm, softmax and the "
                                "maps stay float32)")


def add_model_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    """--model, --dtype and --compile-cache (what every command that loads a model takes)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=default, type=model_source, metavar="SRC",
                   help=f"hub id or local checkpoint directory (HF transformers, OpenCLIP or "
                        f"gem_jax native); default {default}, read from the Hugging Face "
                        f"cache or downloaded on first use" if default else
                        "hub id or local checkpoint directory (HF transformers, OpenCLIP or "
                        "gem_jax native)")
    add_dtype_arg(g)
    g.add_argument("--compile-cache", metavar="DIR", nargs="?", const="", default=None,
                   help="keep XLA compilations in DIR (default $GEM_JAX_CACHE or "
                        "~/.cache/gem_jax/xla) so later runs start without compiling")


class _Explicit(argparse._StoreAction):
    """Store the value and remember that the option was given (in `namespace._explicit`), so
    that a knob given for a method it does not apply to is a usage error, while its default
    is silently left out."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        explicit = set(getattr(namespace, "_explicit", ()) or ())
        explicit.add(self.dest)
        setattr(namespace, "_explicit", explicit)


# CLI option -> (argparse dest, the method knob it sets)
GEM_KNOB_FLAGS = {"--gem-depth": ("gem_depth", "gem_depth"), "--iters": ("iters", "ss_attn_iter"),
                  "--temp": ("temp", "ss_attn_temp")}


def add_knob_args(g, *, temp_default=None) -> None:
    """GEM's knobs, parsed the same way by every command."""
    g.add_argument("--gem-depth", type=gem_depth, default=7, metavar="D", action=_Explicit,
                   help="GEM modifies the last D-1 blocks (default 7; valid 2..layers+1; "
                        "--method gem only)")
    g.add_argument("--iters", type=_nonneg_int, default=1, metavar="N", action=_Explicit,
                   help="self-self attention iterations (default 1; --method gem only)")
    g.add_argument("--temp", type=temperature, default=temp_default, metavar="T", action=_Explicit,
                   help="self-self attention inverse temperature >= 0, or 'adaptive' (default: "
                        + ("adaptive" if temp_default is None else f"{temp_default:g}")
                        + "; --method gem only)")


def _method_knob(s: str):
    from gem_jax.methods import parse_knob
    try:
        return parse_knob(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def method_knobs(parser, args) -> dict:
    """The knobs of --method from the command line: GEM's three for gem; for another method,
    none of them (its own defaults apply).  A GEM knob given explicitly with another method is a
    usage error naming the method's knobs."""
    from gem_jax import methods
    method = getattr(args, "method", "gem")
    cls = methods.METHODS[method]
    explicit = getattr(args, "_explicit", set()) or set()
    bad = [flag for flag, (dest, knob) in GEM_KNOB_FLAGS.items()
           if dest in explicit and knob not in cls.knob_names]
    if bad:
        parser.error(f"{', '.join(bad)} do{'es' if len(bad) == 1 else ''} not apply to method "
                     f"{method!r} (GEM's knobs; {method}'s knobs: "
                     f"{', '.join(cls.knob_names) or 'none'}, left at their defaults)")
    knobs = {knob: getattr(args, dest) for dest, knob in GEM_KNOB_FLAGS.values()
             if knob in cls.knob_names}
    # --knob KEY=VALUE: the method's other knobs and options (checked when the step is built:
    # one that does not apply to the method is a usage error naming the method's).
    return dict(knobs, **dict(getattr(args, "knob", None) or []))


def add_gem_args(p: argparse.ArgumentParser) -> None:
    """The GEM knobs and batching options."""
    g = p.add_argument_group("GEM")
    g.add_argument("--size", type=_positive_int, default=448, metavar="PX",
                   help="images are resized to PX x PX before the model (default 448, GEM's "
                        "protocol; must be at least the model's patch size)")
    add_knob_args(g)
    g.add_argument("--template", type=_template, default="a photo of a {}.",
                   help="prompt template (default 'a photo of a {}.'; '{}' for none)")
    methods = method_names()
    g.add_argument("--method", choices=methods, default=methods[0],
                   help=f"heatmap method (default {methods[0]})")
    g.add_argument("--knob", action="append", default=[], type=_method_knob, metavar="KEY=VALUE",
                   help="a knob or option of --method, e.g. gaussian_std=3 (naclip), blocks=4 "
                        "(surgery), residual=true (maskclip), branches=v (gem); repeat for "
                        "several (docs/methods.md lists them)")
    g.add_argument("--batch-size", "-b", type=_positive_int, default=4, metavar="N",
                   help="images per step on each process (default 4; rounded up to a multiple "
                        "of its devices); a few batches are held in memory at a time")
    g = p.add_argument_group("pipeline")
    g.add_argument("--workers", type=int, default=-1, metavar="N",
                   help="processes decoding and preprocessing images (grain); 0: threads of this "
                        "process; default: 0 below 256 images, else min(8, cores/2)")
    g.add_argument("--writers", type=_positive_int, default=2, metavar="N",
                   help="threads writing outputs (default 2)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run recorded in --out (manifest.json and the journals of "
                        "a crashed run): skip the images already complete, redo the others; "
                        "needs the same settings")


def add_output_args(p: argparse.ArgumentParser, *, npy_help: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output directory (default ./{DEFAULT_OUT}): new, empty, or a previous "
                        f"gem-jax output (with --force); a manifest.json in it maps every file to "
                        f"its image and prompt")
    g.add_argument("--force", "-f", action="store_true",
                   help="replace a previous gem-jax output in --out (only the files this run "
                        "writes; never files gem-jax did not write)")
    g.add_argument("--format", choices=["png", "npy", "both"], default="png",
                   help=f"png: images (default); npy: {npy_help}; both")
    g.add_argument("--save-raw", dest="format", action="store_const", const="both",
                   help="same as --format both")
    g.add_argument("--alpha", type=_unit_float, default=0.5,
                   help="overlay opacity in [0, 1] (default 0.5)")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")


def load_model(args):
    """gem_jax.load(args.model, dtype=args.dtype), or CLIError with a one-line message."""
    import jax.numpy as jnp
    import gem_jax
    from gem_jax.config import ConfigError
    src = args.model
    hint = ("pass a local checkpoint directory with --model DIR (for example one written by "
            "`python scripts/make_tiny_checkpoint.py DIR` or `gem-jax convert SRC DIR`)")
    if getattr(args, "compile_cache", None) is not None:
        gem_jax.enable_compilation_cache(args.compile_cache or None)
    try:
        return gem_jax.load(src, dtype=getattr(jnp, getattr(args, "dtype", None) or "float32"))
    except gem_jax.CheckpointError as e:
        msg = str(e)
        if "not in the local Hugging Face cache" in msg:
            raise CLIError(f"cannot load model {src!r}: it is not in the local Hugging Face cache "
                           f"and could not be downloaded (offline?); {hint}") from None
        if "neither an existing directory" in msg:
            raise CLIError(f"cannot load model {src!r}: no such directory, and not a hub id "
                           f"(owner/name); {hint}") from None
        raise CLIError(f"cannot load model {src!r}: {msg}") from None
    except (ConfigError, OSError, ValueError) as e:
        raise CLIError(f"cannot load model {src!r}: {e}") from None


def check_knobs(parser, model, args) -> None:
    """Knobs that need the model to check (--size vs its patch, --gem-depth vs its depth): usage
    errors (exit 2), in the user's terms."""
    v = model.config.vision
    if args.size < v.patch_size:
        parser.error(f"--size {args.size} is smaller than one {v.patch_size}-pixel patch of model "
                     f"{args.model}; use --size {v.patch_size} or more (GEM's protocol: 448)")
    if getattr(args, "method", "gem") != "gem":
        return  # the method's own knobs are checked when its step is built
    if not 2 <= args.gem_depth <= v.layers + 1:
        parser.error(f"--gem-depth {args.gem_depth} is too large for model {args.model} "
                     f"({v.layers} blocks): valid 2..{v.layers + 1}")
    try:
        from gem_jax.model import check_knobs as check
    except ImportError:  # the library checks again on the first call
        return
    try:
        check(v, args.gem_depth, args.iters, args.temp)
    except (TypeError, ValueError) as e:
        parser.error(f"{e} (model {args.model})")


def check_out(parser, args) -> Path:
    """--out naming a file is a usage error, with or without --force."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out} is a file; outputs go into a directory (new, empty, or a "
                     f"previous gem-jax output with --force)")
    return out


def check_out_dir(parser, out: Path, planned, force: bool):
    """The OUT rule (gem_jax.outputs.check_out_dir): a file is a usage error, a conflict exit 1."""
    from gem_jax.outputs import OutIsAFileError, check_out_dir as check
    try:
        return check(out, planned, force=force)
    except OutIsAFileError as e:
        parser.error(str(e))
    except FileExistsError as e:
        raise CLIError(str(e)) from None


# ----------------------------------------------------------------------------- helpers
def _slug(text: str, maxlen: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-._")
    return s[:maxlen].rstrip("-._")


def _slugs(prompts: Sequence[str]) -> list[str]:
    """File-name parts for prompts; uniqueness is the OutputPlan's job (case-insensitive)."""
    return [_slug(p) or f"prompt{i}" for i, p in enumerate(prompts)]


def _progress(total: int, args, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr,
                disable=args.quiet or total < _PROGRESS_MIN, leave=False)


def _header(args, command: str, knobs: dict, **extra) -> dict:
    """The run's settings in manifest.json (what `--resume` must find unchanged)."""
    from gem_jax import methods
    cls = methods.METHODS[getattr(args, "method", "gem")]
    all_knobs = {k: knobs.get(k, cls.defaults.get(k)) for k in cls.knob_names}
    options = {k: v for k, v in knobs.items() if k not in cls.knob_names}
    return dict(command=command, model=str(args.model), method=getattr(args, "method", "gem"),
                knobs=dict(all_knobs, template=args.template, size=args.size, dtype=args.dtype),
                **({"method_options": options} if options else {}), **extra)


def _prompts_or_usage_error(parser, prompts, what):
    from gem_jax.model import check_prompts
    try:
        return check_prompts(prompts, what)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def run_images(args, task):
    """Run an image task (gem_jax.batch) on this process's share of the inputs, one process or
    many (--coordinator/--num-processes/--process-id): (exit code, this process's Stats,
    every process's Stats).  Prints nothing."""
    from gem_jax.batch import Options, run_task
    from gem_jax.distributed import cluster_from_args
    parser = args._parser
    cluster = cluster_from_args(parser, args)   # before JAX computes anything
    opts = Options(images=args.images, out=check_out(parser, args), size=args.size,
                   batch_size=args.batch_size, force=args.force, resume=args.resume,
                   workers=args.workers, writers=args.writers, quiet=args.quiet)

    def fail(msg):
        raise CLIError(msg)
    return run_task(task, opts, cluster, load_model=lambda: load_model(args),
                    check_model=lambda m: check_knobs(parser, m, args),
                    usage_error=parser.error, fail=fail)


def _run_images(args, task) -> int:
    """`run_images`, then this process's summary (and process 0 the whole run's); the exit
    code is the run's."""
    from gem_jax.distributed import cluster_from_args
    cluster = cluster_from_args(args._parser, args)
    out = Path(args.out)
    code, stats, everyone = run_images(args, task)
    who = f"process {cluster.process_id}/{cluster.num_processes}: " if cluster.multi else ""
    if not args.quiet:
        line = _throughput(stats)
        print(f"{who}{line}")
        if cluster.multi and cluster.process_id == 0:
            print(f"all {cluster.num_processes} processes: {_overall(everyone)}")
    # Process 0 reports the whole run's failures, every other process its own.
    mine_only = cluster.multi and cluster.process_id != 0
    failures = stats.failures if mine_only else [f for s in everyone for f in s.failures]
    total = stats.images if mine_only else sum(s.images for s in everyone) + stats.skipped
    if failures:
        print(f"error: {len(failures)} of {total} image(s) failed "
              f"({', '.join(failures[:3])}{', ...' if len(failures) > 3 else ''}); "
              f"{who}wrote {stats.files} file(s) for the others to {out} "
              f"(see {out / 'manifest.json'})", file=sys.stderr)
        return code
    if code:
        print(f"error: images failed on other processes; {who}wrote {stats.files} file(s) to "
              f"{out} (see process 0's output and {out / 'manifest.json'})", file=sys.stderr)
        return code
    if not args.quiet:
        print(f"{who}wrote {stats.files} file(s) to {out} (manifest.json maps them to images and "
              f"prompts)")
    return code


def _throughput(s) -> str:
    """One process's summary line: images/s, the device's wait for the host, failures."""
    import math
    parts = [f"{s.done} image(s) in {s.seconds:.1f} s"]
    if s.done and s.seconds > 0:
        parts.append(f"{s.images_per_s:.2f} images/s")
    if not math.isnan(s.steady_images_per_s):
        parts[-1] += (f" ({s.steady_images_per_s:.2f} after the first step, which took "
                      f"{s.first_step:.1f} s with compilation)")
    share = s.host_wait_share
    if not math.isnan(share):
        parts.append(f"host wait {share:.0%} of device time")
    parts.append(f"{s.failed} failed")
    if s.skipped:
        parts.append(f"{s.skipped} already complete (--resume)")
    return "; ".join(parts)


def _overall(everyone) -> str:
    done = sum(s.done for s in everyone)
    failed = sum(s.failed for s in everyone)
    wall = max((s.seconds for s in everyone), default=0.0)
    rate = f"; {done / wall:.2f} images/s overall" if wall > 0 and done else ""
    return f"{done} image(s) done, {failed} failed{rate}"


def _min_max(maps):
    """Per-map min-max over the last two axes (a constant map -> zeros), as model.heatmaps'
    normalize=True does, so one raw computation gives both the .npy and the PNGs."""
    import numpy as np
    lo = maps.min(axis=(-2, -1), keepdims=True)
    rng = maps.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(rng > 0, (maps - lo) / np.where(rng > 0, rng, 1.0), 0.0).astype(np.float32)


# ----------------------------------------------------------------------------- heatmap
HEATMAP_EPILOG = """\
inputs: image files, directories (searched recursively for image files, sorted), quoted glob
patterns ('photos/**/*.jpg'), @list.txt files (one input per line), WebDataset-style .tar shards
(each sample's image member) and brace ranges ('shards-{000..099}.tar').  Images are decoded and
preprocessed ahead of the model by grain (--workers).  Unreadable images are reported and
skipped; the exit code is then 1, after all the others are done.

many processes (hosts): run the same command once per process with --coordinator HOST:PORT
--num-processes N --process-id I (or JAX's environment variables, or --distributed on a TPU pod
slice / SLURM); each process decodes and writes only its share, --out must be shared by all.
--resume continues a run that was interrupted or crashed (skips the images already complete).

outputs, for each IMAGE (stem S) in --out DIR:
  S_<prompt>.png   the heatmap of each prompt overlaid on the image (image size)
  S_grid.png       the image and every prompt's overlay, prompts as titles
  S_raw.npy        with --format npy/both: the raw cosine maps, float32 [P, H, W] at the model's
                   input size (model.heatmaps(..., normalize=False)), prompts in -p order
  manifest.json    every image, prompt, file, knob and map shape; names that would collide
                   (also case-insensitively) get -2, -3, ... and are listed under "collisions"

examples:
  gem-jax heatmap cat.jpg -p cat -p "remote control"
  gem-jax heatmap photos/ -p person -p dog --out maps --batch-size 8 --format both
  gem-jax heatmap 'shots/*.png' @more.txt -p cat --temp adaptive --out maps
  gem-jax heatmap cat.jpg -p cat --gem-depth 5 --iters 2 --temp 0.5 --out maps --force
  gem-jax heatmap cat.jpg -p cat --model ckpt/tiny --gem-depth 3 --size 64   # offline
  gem-jax heatmap cat.jpg -p cat --method maskclip                            # another method
  gem-jax heatmap 'shards-{000..099}.tar' -p cat --format npy --out /shared/maps --resume \\
      --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0            # host 0 of 2
"""


def cmd_heatmap(args) -> int:
    return _run_images(args, heatmap_task(args))


def heatmap_task(args):
    """The `heatmap` command's gem_jax.batch.Task for parsed arguments."""
    from gem_jax import viz
    from gem_jax.batch import Task
    from gem_jax.distributed import heatmap_step
    from gem_jax.io import save_image, save_npy
    parser = args._parser
    prompts = _prompts_or_usage_error(parser, args.prompt, "prompts")
    knobs = method_knobs(parser, args)
    slugs = _slugs(prompts)
    out = Path(args.out)
    png, npy = args.format in ("png", "both"), args.format in ("npy", "both")
    replace = args.force or args.resume  # the OUT rule has checked that these files are ours

    def plan_image(plan, rec, stem):
        path = rec.key
        outs = []
        if png:
            outs.append(dict(file=plan.claim(f"{stem}_grid.png", image=path, kind="grid"),
                             kind="grid"))
            outs += [dict(file=plan.claim(f"{stem}_{s}.png", image=path, prompt=p, kind="overlay"),
                          kind="overlay", prompt=p) for p, s in zip(prompts, slugs)]
        if npy:
            outs.append(dict(file=plan.claim(f"{stem}_raw.npy", image=path, kind="raw"),
                             kind="raw"))
        return outs

    def build_step(model, dp):
        return heatmap_step(model, dp, prompts, method=args.method, knobs=knobs,
                            template=args.template, normalize=False)

    def write(img, image_size, raw, outs, done) -> dict:
        maps = _min_max(raw)
        per_prompt = iter(maps)  # overlays are planned in -p order
        for o in outs:
            if o["kind"] == "overlay":
                save_image(viz.overlay(img, next(per_prompt), args.alpha, args.cmap),
                           out / o["file"], force=replace)
            elif o["kind"] == "grid":
                save_image(viz.grid(img, maps, titles=prompts, alpha=args.alpha, cmap=args.cmap),
                           out / o["file"], force=replace)
            else:
                save_npy(raw, out / o["file"], force=replace)
            done(o["file"])
        return dict(map_shape=list(raw.shape))

    header = _header(args, "heatmap", knobs, prompts=prompts, output_format=args.format,
                     render=dict(alpha=args.alpha, cmap=args.cmap))
    return Task("heatmap", header, plan_image, build_step, write, keep_image=png)


# ----------------------------------------------------------------------------- segment
SEGMENT_EPILOG = """\
inputs: as for `gem-jax heatmap` (files, directories, globs, @list.txt).

outputs, for each IMAGE (stem S) in --out DIR:
  S_seg.png          class ids as a palette PNG (pixel value = class id, coloured; image size)
  S_seg_overlay.png  the class colours over the image, with a legend
  S_seg.npy          with --format npy/both: the ids, int32 [H, W] at the image size
  manifest.json      every image, file, class and knob

Ids are 0..C-1 in the order of -c; with --background-threshold T, 0 is background (pixels whose
highest class probability is below T) and the classes are 1..C.

examples:
  gem-jax segment street.jpg -c car -c person -c tree
  gem-jax segment street.jpg -c car -c person --background-threshold 0.6 --out seg
  gem-jax segment img.png -c cat --model ckpt/tiny --gem-depth 3 --size 64   # offline
"""


def cmd_segment(args) -> int:
    return _run_images(args, segment_task(args))


def segment_task(args):
    """The `segment` command's gem_jax.batch.Task for parsed arguments."""
    import numpy as np
    from PIL import Image
    from gem_jax import viz
    from gem_jax.batch import Task
    from gem_jax.distributed import heatmap_step
    from gem_jax.io import save_image, save_npy
    parser = args._parser
    classes = _prompts_or_usage_error(parser, args.cls, "classes")
    knobs = method_knobs(parser, args)
    out = Path(args.out)
    bg = args.background_threshold is not None
    png, npy = args.format in ("png", "both"), args.format in ("npy", "both")
    replace = args.force or args.resume  # the OUT rule has checked that these files are ours

    def plan_image(plan, rec, stem):
        kinds = ([("seg.png", "segmentation"), ("seg_overlay.png", "overlay")] if png else []) + \
            ([("seg.npy", "ids")] if npy else [])
        return [dict(file=plan.claim(f"{stem}_{suffix}", image=rec.key, kind=kind), kind=kind)
                for suffix, kind in kinds]

    def build_step(model, dp):
        return heatmap_step(model, dp, classes, method=args.method, knobs=knobs,
                            template=args.template, segment=True,
                            background_threshold=args.background_threshold)

    def write(img, image_size, a, outs, done) -> dict:
        shape = list(a.shape)
        a = np.asarray(Image.fromarray(a.astype(np.int32)).resize(tuple(image_size), Image.NEAREST),
                       np.int32)
        for o in outs:
            if o["kind"] == "segmentation":
                save_image(viz.colorize_segmentation(a, len(classes),
                                                     background=(0, 0, 0) if bg else None),
                           out / o["file"], force=replace)
            elif o["kind"] == "overlay":
                save_image(viz.segmentation_overlay(img, a, classes, alpha=args.alpha,
                                                    background="background" if bg else None),
                           out / o["file"], force=replace)
            else:
                save_npy(a, out / o["file"], force=replace)
            done(o["file"])
        return dict(map_shape=shape)

    ids = (["background"] if bg else []) + list(classes)
    header = _header(args, "segment", knobs, classes=list(classes), ids=ids,
                     background_threshold=args.background_threshold, output_format=args.format,
                     render=dict(alpha=args.alpha))
    return Task("segment", header, plan_image, build_step, write, keep_image=png)


# ----------------------------------------------------------------------------- models
MODELS_EPILOG = """\
examples:
  gem-jax models
  gem-jax heatmap img.jpg -p cat --model openai/clip-vit-base-patch32
  gem-jax heatmap img.jpg -p cat --model path/to/local/checkpoint
"""


def _cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def cmd_models(args) -> int:
    from gem_jax.config import PRESET_ALIASES, PRESETS
    print("architectures (gem_jax.config.PRESETS):")
    print(f"  {'name':<26} {'patch':>5} {'width':>6} {'layers':>6} {'embed':>6}  act")
    for name, c in PRESETS.items():
        v = c.vision
        print(f"  {name:<26} {v.patch_size:>5} {v.width:>6} {v.layers:>6} {c.embed_dim:>6}  {v.act}")
    print("\nhub ids known to load (--model ID; downloaded on first use, then cached):")
    for hub, preset in PRESET_ALIASES.items():
        mark = "  [cached]" if _cached(hub) else ""
        print(f"  {hub:<36} {preset}{mark}")
    print("\nalso: any local directory holding an HF transformers CLIP, an OpenCLIP hub-layout "
          "checkpoint (open_clip_config.json), or a gem_jax native checkpoint (gem-jax convert).")
    return 0


# ----------------------------------------------------------------------------- convert
CONVERT_EPILOG = """\
examples:
  gem-jax convert openai/clip-vit-base-patch16 ckpt/b16
  gem-jax convert ./my-open-clip-dir ckpt/mine --dtype float16 --force
  gem-jax heatmap img.jpg -p cat --model ckpt/b16      # then loads without torch/transformers
"""


def cmd_convert(args) -> int:
    from gem_jax.convert.__main__ import run
    return run(args)


# ----------------------------------------------------------------------------- parser
def _add_optional(sub, module: str) -> None:
    """Let `module` register its subcommands, if it is installed."""
    import importlib
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            return  # not written yet
        _broken(sub, module, e)
        return
    except Exception as e:  # a broken optional module must not break the other commands
        _broken(sub, module, e)
        return
    register = getattr(mod, "register", None)
    if callable(register):
        register(sub)


def _broken(sub, module: str, err: Exception) -> None:
    name = module.rsplit(".", 2)[-2] if module.endswith(".cli") else module.rsplit(".", 1)[-1]
    if name in sub.choices:
        return
    p = sub.add_parser(name, help=f"(unavailable: {module} failed to import)")
    msg = f"the {name} command is unavailable: importing {module} failed: {type(err).__name__}: {err}"

    def fail(args):
        raise CLIError(msg)
    p.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    from gem_jax import __version__
    parser = argparse.ArgumentParser(
        prog="gem-jax",
        description="GEM (Grounding Everything Module) open-vocabulary heatmaps and segmentation "
                    "with a pure-JAX CLIP.",
        epilog="examples:\n"
               "  gem-jax heatmap cat.jpg -p cat -p \"remote control\"\n"
               "  gem-jax segment street.jpg -c car -c person --background-threshold 0.5\n"
               "  gem-jax convert openai/clip-vit-base-patch16 ckpt/b16\n"
               "  gem-jax models\n\n"
               "offline? make a local checkpoint (random weights) and pass it with --model:\n"
               "  python scripts/make_tiny_checkpoint.py ckpt/tiny\n"
               "  gem-jax heatmap cat.jpg -p cat --model ckpt/tiny --gem-depth 3 --size 64\n\n"
               "run `gem-jax COMMAND --help` for each command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gem-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("heatmap", help="heatmap overlays of text prompts on images",
                       description="GEM heatmaps of each prompt on each image: overlay PNGs and a "
                                   "grid figure per image.",
                       epilog=HEATMAP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files (any format Pillow reads), directories (recursive), quoted "
                        "glob patterns, or @list.txt files")
    p.add_argument("-p", "--prompt", action="append", required=True, metavar="PROMPT",
                   help="a text prompt (repeat for several)")
    p.add_argument("--cmap", choices=["viridis", "turbo"], default="viridis",
                   help="colormap (default viridis)")
    add_model_args(p)
    add_gem_args(p)
    add_output_args(p, npy_help="one S_raw.npy per image, the raw cosine maps [P, H, W]")
    add_distributed_args(p)
    p.set_defaults(func=cmd_heatmap, _parser=p)

    p = sub.add_parser("segment", help="open-vocabulary segmentation into class-id PNGs",
                       description="Per-pixel classes among the given names (GEM heatmaps, argmax), "
                                   "optionally with a background class.",
                       epilog=SEGMENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="INPUT",
                   help="image files (any format Pillow reads), directories (recursive), quoted "
                        "glob patterns, or @list.txt files")
    p.add_argument("-c", "--class", dest="cls", action="append", required=True, metavar="CLASS",
                   help="a class name (repeat for several)")
    p.add_argument("--background-threshold", type=_unit_float, default=None, metavar="T",
                   help="pixels whose highest class probability (softmax over the classes) is "
                        "below T in [0, 1] become background, id 0")
    add_model_args(p)
    add_gem_args(p)
    add_output_args(p, npy_help="one S_seg.npy per image, the class ids [H, W]")
    add_distributed_args(p)
    p.set_defaults(func=cmd_segment, _parser=p)

    from gem_jax.convert.__main__ import build_parser as convert_parser
    p = sub.add_parser("convert", help="convert a checkpoint to gem_jax's native format",
                       description="Convert a CLIP checkpoint (HF hub id, HF transformers or "
                                   "OpenCLIP directory) into a gem_jax native checkpoint that loads "
                                   "without torch or transformers.",
                       epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert_parser(p)
    p.set_defaults(func=cmd_convert, _parser=p)

    p = sub.add_parser("models", help="list known architectures and hub ids",
                       description="The architectures gem_jax implements and the hub ids known to "
                                   "load.", epilog=MODELS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_models, _parser=p)

    _add_optional(sub, "gem_jax.eval.cli")
    _add_optional(sub, "gem_jax.bench")
    _add_optional(sub, "gem_jax.demo")
    _add_optional(sub, "gem_jax.serve")
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 runtime failure, 2 usage error)."""
    import warnings
    saved = warnings.formatwarning
    warnings.formatwarning = _format_warning  # `warning: ...` lines, not source excerpts
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = saved


def _main(argv) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help(sys.stderr)
            return 2
        return int(func(args) or 0)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileExistsError, OSError) as e:
        if os.environ.get("GEM_JAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("GEM_JAX_TRACEBACK"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"error: unexpected {type(e).__name__}: {first} "
              f"(set GEM_JAX_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
