"""The `gem-jax` command line.

    gem-jax heatmap photo.jpg -p cat -p "remote control"
    gem-jax segment photo.jpg -c cat -c sofa --background-threshold 0.5
    gem-jax convert openai/clip-vit-base-patch16 ckpt/b16
    gem-jax models

Exit codes: 0 success, 1 runtime failure (an unreadable image, a model that cannot be loaded,
an output that exists without --force, ...), 2 usage error.  Errors are one `error: ...` line on
stderr, never a traceback (set GEM_JAX_TRACEBACK=1 to see one for unexpected errors).

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
from .argtypes import finite_float as _finite_float, int_at_least, nonneg_int as _nonneg_int
from .argtypes import positive_int as _positive_int, unit_float as _unit_float

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


# ----------------------------------------------------------------------------- shared options
def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --dtype (what every command that loads a model takes)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL, metavar="SRC",
                   help=f"hub id or local checkpoint directory (HF transformers, OpenCLIP or "
                        f"gem_jax native); default {DEFAULT_MODEL}, read from the Hugging Face "
                        f"cache or downloaded on first use")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and compute dtype (default float32; bfloat16 halves memory and "
                        "is fast on GPU/TPU; LayerNorm, softmax and the maps stay float32)")
    g.add_argument("--compile-cache", metavar="DIR", nargs="?", const="", default=None,
                   help="keep XLA compilations in DIR (default $GEM_JAX_CACHE or "
                        "~/.cache/gem_jax/xla) so later runs start without compiling")


def add_gem_args(p: argparse.ArgumentParser) -> None:
    """The GEM knobs and batching options."""
    g = p.add_argument_group("GEM")
    g.add_argument("--size", type=_positive_int, default=448, metavar="PX",
                   help="images are resized to PX x PX before the model (default 448, GEM's "
                        "protocol; must be at least the model's patch size)")
    g.add_argument("--gem-depth", type=int_at_least(2), default=7, metavar="D",
                   help="GEM modifies the last D-1 blocks (default 7; valid 2..layers+1)")
    g.add_argument("--iters", type=_nonneg_int, default=1, metavar="N",
                   help="self-self attention iterations (default 1)")
    g.add_argument("--temp", type=_finite_float, default=None, metavar="T",
                   help="fixed self-self attention inverse temperature (default: adaptive)")
    g.add_argument("--template", type=_template, default="a photo of a {}.",
                   help="prompt template (default 'a photo of a {}.'; '{}' for none)")
    g.add_argument("--batch-size", "-b", type=_positive_int, default=4, metavar="N",
                   help="images read and processed together (default 4); only one batch of "
                        "images is held in memory at a time")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", "-o", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output directory, created if needed (default ./{DEFAULT_OUT})")
    g.add_argument("--force", "-f", action="store_true",
                   help="overwrite existing output files (default: refuse and exit 1)")
    g.add_argument("--save-raw", action="store_true",
                   help="also write the raw arrays as .npy")
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
        return gem_jax.load(src, dtype=jnp.bfloat16 if getattr(args, "dtype", "float32") == "bfloat16"
                            else jnp.float32)
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


# ----------------------------------------------------------------------------- helpers
def _slug(text: str, maxlen: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-._")
    return s[:maxlen].rstrip("-._")


def _unique_slugs(prompts: Sequence[str], reserved: set[str]) -> list[str]:
    out, taken = [], set(reserved)
    for i, p in enumerate(prompts):
        base = _slug(p) or f"prompt{i}"
        s, k = base, 2
        while s.lower() in taken:
            s, k = f"{base}-{k}", k + 1
        taken.add(s.lower())
        out.append(s)
    return out


def _stems(parser, paths: Sequence[str]) -> list[str]:
    stems = [Path(p).stem or Path(p).name or "image" for p in paths]
    seen: dict[str, str] = {}
    for p, s in zip(paths, stems):
        if s.lower() in seen:
            parser.error(f"{seen[s.lower()]} and {p} would write the same output names "
                         f"({s}_*); process them in separate runs or rename one")
        seen[s.lower()] = p
    return stems


def _check_inputs(paths: Sequence[str]) -> None:
    for p in paths:
        if not os.path.exists(p):
            raise CLIError(f"{p}: no such file")
        if os.path.isdir(p):
            raise CLIError(f"{p}: is a directory, not an image file")


def _check_outputs(out: Path, names: list[str], force: bool) -> None:
    if force:
        return
    existing = [n for n in names if (out / n).exists()]
    if existing:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise CLIError(f"output {out / existing[0]} already exists"
                       f"{' (' + ', '.join(existing[1:3]) + more + ' too)' if len(existing) > 1 else ''}"
                       f"; pass --force to overwrite, or choose another --out")


def _check_knobs(model, args) -> None:
    from gem_jax import vision
    from gem_jax.model import check_knobs
    try:
        check_knobs(model.config.vision, args.gem_depth, args.iters, args.temp)
        vision.patch_grid(model.config.vision, args.size, args.size)
    except ValueError as e:
        raise CLIError(f"{e} (model {args.model})") from None


def _progress(total: int, args, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr,
                disable=args.quiet or total < _PROGRESS_MIN, leave=False)


def _read_batch(paths, errors: list[str]):
    from gem_jax.io import ImageReadError, read_image
    ok = []
    for p in paths:
        try:
            ok.append((p, read_image(p)))
        except ImageReadError as e:
            print(f"error: {e}", file=sys.stderr)
            errors.append(p)
    return ok


def _finish(args, written: int, errors: list[str], total: int, out: Path) -> int:
    if errors:
        print(f"error: {len(errors)} of {total} image(s) could not be read "
              f"({', '.join(errors[:3])}{', ...' if len(errors) > 3 else ''}); "
              f"wrote {written} file(s) for the others to {out}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {written} file(s) to {out}")
    return 0


def _run_images(args, stems, names, desc: str, infer, write) -> int:
    """The shared image loop: check inputs and outputs before loading the model, then for each
    batch read -> preprocess -> `infer(model, pixels)` -> `write(path, image, result, stem)`
    (returns the number of files written); only one batch is held in memory."""
    from gem_jax.io import batched
    out = Path(args.out)
    _check_inputs(args.images)
    _check_outputs(out, [n for s in stems for n in names(s)], args.force)
    model = load_model(args)
    _check_knobs(model, args)
    stem_of = dict(zip(args.images, stems))
    errors: list[str] = []
    written = 0
    with _progress(len(args.images), args, desc) as bar:
        for chunk in batched(args.images, args.batch_size):
            batch = _read_batch(chunk, errors)
            if batch:
                pixels = model.preprocess([im for _, im in batch], size=args.size)
                results = infer(model, pixels)
                del pixels
                for (path, img), r in zip(batch, results):
                    written += write(img, r, stem_of[path])
                del results, batch
            bar.update(len(chunk))
    return _finish(args, written, errors, len(args.images), out)


def _knobs(args) -> dict:
    return dict(gem_depth=args.gem_depth, ss_attn_iter=args.iters, ss_attn_temp=args.temp,
                template=args.template)


def _prompts_or_usage_error(parser, prompts, what):
    from gem_jax.model import check_prompts
    try:
        return check_prompts(prompts, what)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------- heatmap
HEATMAP_EPILOG = """\
outputs, for each IMAGE (stem S) in --out DIR:
  S_<prompt>.png   the heatmap of each prompt overlaid on the image (image size)
  S_grid.png       the image and every prompt's overlay, prompts as titles
  S_<prompt>.npy   with --save-raw: the map, float32 [H, W] in [0, 1] at the image size

examples:
  gem-jax heatmap cat.jpg -p cat -p "remote control"
  gem-jax heatmap photos/*.jpg -p person -p dog --out maps --batch-size 8 --save-raw
  gem-jax heatmap cat.jpg -p cat --gem-depth 5 --iters 2 --temp 0.5 --force
  gem-jax heatmap cat.jpg -p cat --model ckpt/tiny --gem-depth 3 --size 64   # offline
"""


def cmd_heatmap(args) -> int:
    import numpy as np
    from gem_jax import viz
    from gem_jax.io import save_image, save_npy
    parser = args._parser
    prompts = _prompts_or_usage_error(parser, args.prompt, "prompts")
    stems = _stems(parser, args.images)
    slugs = _unique_slugs(prompts, {"grid"})
    out = Path(args.out)

    def names(stem):
        n = [f"{stem}_{s}.png" for s in slugs] + [f"{stem}_grid.png"]
        return n + ([f"{stem}_{s}.npy" for s in slugs] if args.save_raw else [])

    def infer(model, pixels):
        return np.asarray(model.heatmaps(pixels, prompts, **_knobs(args)), np.float32)

    def write(img, m, stem) -> int:
        n = 0
        for slug, hm in zip(slugs, m):
            save_image(viz.overlay(img, hm, args.alpha, args.cmap), out / f"{stem}_{slug}.png",
                       force=args.force)
            n += 1
            if args.save_raw:
                raw = np.clip(viz.resize_map(hm, img.size), 0.0, 1.0)
                save_npy(raw, out / f"{stem}_{slug}.npy", force=args.force)
                n += 1
        save_image(viz.grid(img, m, titles=prompts, alpha=args.alpha, cmap=args.cmap),
                   out / f"{stem}_grid.png", force=args.force)
        return n + 1
    return _run_images(args, stems, names, "heatmap", infer, write)


# ----------------------------------------------------------------------------- segment
SEGMENT_EPILOG = """\
outputs, for each IMAGE (stem S) in --out DIR:
  S_seg.png          class ids as a palette PNG (pixel value = class id, coloured; image size)
  S_seg_overlay.png  the class colours over the image, with a legend
  S_seg.npy          with --save-raw: the ids, int32 [H, W] at the image size

Ids are 0..C-1 in the order of -c; with --background-threshold T, 0 is background (pixels whose
highest class probability is below T) and the classes are 1..C.

examples:
  gem-jax segment street.jpg -c car -c person -c tree
  gem-jax segment street.jpg -c car -c person --background-threshold 0.6 --out seg
  gem-jax segment img.png -c cat --model ckpt/tiny --gem-depth 3 --size 64   # offline
"""


def cmd_segment(args) -> int:
    import numpy as np
    from PIL import Image
    from gem_jax import viz
    from gem_jax.io import save_image, save_npy
    parser = args._parser
    classes = _prompts_or_usage_error(parser, args.cls, "classes")
    stems = _stems(parser, args.images)
    out = Path(args.out)
    bg = args.background_threshold is not None

    def names(stem):
        return [f"{stem}_seg.png", f"{stem}_seg_overlay.png"] + \
            ([f"{stem}_seg.npy"] if args.save_raw else [])

    def infer(model, pixels):
        return np.asarray(model.segment(pixels, classes, background_threshold=args.background_threshold,
                                        **_knobs(args)))

    def write(img, a, stem) -> int:
        a = np.asarray(Image.fromarray(a.astype(np.int32)).resize(img.size, Image.NEAREST), np.int32)
        save_image(viz.colorize_segmentation(a, len(classes), background=(0, 0, 0) if bg else None),
                   out / f"{stem}_seg.png", force=args.force)
        save_image(viz.segmentation_overlay(img, a, classes, alpha=args.alpha,
                                            background="background" if bg else None),
                   out / f"{stem}_seg_overlay.png", force=args.force)
        if args.save_raw:
            save_npy(a, out / f"{stem}_seg.npy", force=args.force)
            return 3
        return 2
    return _run_images(args, stems, names, "segment", infer, write)


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
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("-p", "--prompt", action="append", required=True, metavar="PROMPT",
                   help="a text prompt (repeat for several)")
    p.add_argument("--cmap", choices=["viridis", "turbo"], default="viridis",
                   help="colormap (default viridis)")
    add_model_args(p)
    add_gem_args(p)
    add_output_args(p)
    p.set_defaults(func=cmd_heatmap, _parser=p)

    p = sub.add_parser("segment", help="open-vocabulary segmentation into class-id PNGs",
                       description="Per-pixel classes among the given names (GEM heatmaps, argmax), "
                                   "optionally with a background class.",
                       epilog=SEGMENT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("-c", "--class", dest="cls", action="append", required=True, metavar="CLASS",
                   help="a class name (repeat for several)")
    p.add_argument("--background-threshold", type=_unit_float, default=None, metavar="T",
                   help="pixels whose highest class probability (softmax over the classes) is "
                        "below T in [0, 1] become background, id 0")
    add_model_args(p)
    add_gem_args(p)
    add_output_args(p)
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
