"""The bundled toy CLIP and `gem-jax demo`: GEM heatmaps on generated scenes, fully offline.

    gem-jax demo --out demo-out --n 4

`gem_jax/assets/toy_clip` is a *toy*: a 2.3 M-parameter CLIP trained from scratch by
`scripts/train_toy.py` on `gem_jax.scenes` (coloured circles, squares, triangles, stars and crosses
on noisy backgrounds).  It knows six colours and five shapes and nothing else; GEM on it
localizes objects by their **colour** (shape is weak), which is what makes it useful as an
offline demo and as an end-to-end localization check -- not as a model for real photos.

Two settings of the toy model are explicit here rather than hidden:

* `TOY_KNOBS`: GEM with a *fixed* self-self attention inverse temperature.  At this width GEM's
  adaptive temperature (mean token norm × K^-½) is small, which makes the self-self attention
  nearly uniform; the fixed value was tuned on a validation split (`benchmarks/localization.py`).
* `subtract_class_mean` (on by default in `toy_heatmaps`): each prompt's raw similarity map has
  the mean map over all the toy's class prompts (`CLASS_PROMPTS`, the 30 colour × shape names)
  subtracted before min-max normalization.  Without it, background patches, which are similar to
  every prompt, tend to outscore the object.  Turn it off to see the plain GEM maps.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from . import scenes

TOY_MODEL_DIR = Path(__file__).parent / "assets" / "toy_clip"
# GEM settings for the toy model, tuned on held-out scenes (see benchmarks/localization.py).
TOY_KNOBS = dict(gem_depth=7, ss_attn_iter=1, ss_attn_temp=5.0)
TOY_SIZE = 64  # input resolution of the maps (the model's native 64x64; GEM resamples positions)
# Every object name the toy model was trained on, as full sentences.
CLASS_PROMPTS: tuple[str, ...] = tuple(scenes.caption([(c, s)]) for c in scenes.COLORS
                                       for s in scenes.SHAPES)


def toy_model(dtype=None):
    """Load the bundled toy CLIP (float32 unless `dtype`)."""
    import jax.numpy as jnp
    from .model import load
    if not (TOY_MODEL_DIR / "params.safetensors").is_file():
        raise FileNotFoundError(f"the toy model is missing from {TOY_MODEL_DIR}; rebuild it with "
                                f"`python scripts/train_toy.py {TOY_MODEL_DIR} --force`")
    return load(TOY_MODEL_DIR, dtype=dtype or jnp.float32)


def object_prompt(color: str, shape: str) -> str:
    """The sentence used to query one object: "a photo of a red circle."."""
    return scenes.caption([(color, shape)])


def raw_maps(model, pixels, prompts: Sequence[str], *, method: str = "gem", **knobs):
    """Raw cosine-similarity maps [B, P, H, W] of sentences used verbatim (no template).

    method: "gem" (q, k, v self-self attention), "vv" (value-value only, CLIP-Surgery style) or
    "ori" (original CLIP's patch tokens)."""
    kw = dict(TOY_KNOBS, **knobs)
    if method == "ori":
        kw.update(return_ori=True)
    elif method == "vv":
        kw.update(branches=("v",))
    elif method != "gem":
        raise ValueError(f"method must be 'gem', 'vv' or 'ori', got {method!r}")
    return np.asarray(model.heatmaps(pixels, list(prompts), normalize=False, template=None, **kw))


def relative_maps(raw, class_raw=None, *, subtract_class_mean: bool = True):
    """Min-max normalized maps from raw ones, optionally minus the mean over class prompts.

    raw [B, P, H, W]; class_raw [B, C, H, W] (the maps of every class prompt; default: raw)."""
    import jax.numpy as jnp
    from .gem import min_max
    raw = np.asarray(raw, np.float32)
    if subtract_class_mean:
        ref = raw if class_raw is None else np.asarray(class_raw, np.float32)
        raw = raw - ref.mean(axis=1, keepdims=True)
    return np.asarray(min_max(jnp.asarray(raw)))


def toy_heatmaps(model, pixels, prompts: Sequence[str], *, method: str = "gem",
                 subtract_class_mean: bool = True, class_prompts: Sequence[str] = CLASS_PROMPTS,
                 **knobs):
    """Heatmaps [B, P, H, W] in [0, 1] for the toy model (see the module docstring)."""
    prompts = list(prompts)
    texts = prompts + ([p for p in class_prompts] if subtract_class_mean else [])
    raw = raw_maps(model, pixels, texts, method=method, **knobs)
    return relative_maps(raw[:, :len(prompts)], raw[:, len(prompts):] if subtract_class_mean else None,
                         subtract_class_mean=subtract_class_mean)


# ----------------------------------------------------------------------------- CLI
DEMO_EPILOG = """\
outputs in --out DIR, for each generated scene i:
  scene_<i>.png        the scene itself (64x64)
  scene_<i>_grid.png   the scene and one GEM heatmap per prompt: each object in it, plus one
                       colour that is not in it (every map is min-max normalized, so even
                       that one has a hottest spot: there is nothing right to find)
  manifest.json        every scene, its prompts and files, and the knobs

The model is a toy trained on these scenes (gem_jax/assets/toy_clip): it localizes colours.
examples:
  gem-jax demo
  gem-jax demo --out maps --n 8 --seed 3 --no-subtract-mean --force
"""


def register(subparsers) -> None:
    from .argtypes import DTYPES, model_source, positive_int, temperature
    p = subparsers.add_parser(
        "demo", help="offline demo: GEM heatmaps of the bundled toy model on generated scenes",
        description="Generate scenes of coloured shapes and write GEM heatmaps from the bundled toy "
                    "CLIP (trained by scripts/train_toy.py; it localizes colours, not real-world "
                    "objects).  Needs no download.",
        epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "-o", default="gem-jax-demo", metavar="DIR",
                   help="output directory (default ./gem-jax-demo): new, empty, or a previous "
                        "gem-jax output (with --force); manifest.json lists every file")
    p.add_argument("--n", type=positive_int, default=4, help="number of scenes (default 4)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (held-out 'test' split; default 0)")
    p.add_argument("--temp", type=temperature, default=TOY_KNOBS["ss_attn_temp"], metavar="T",
                   help=f"self-self attention inverse temperature, or 'adaptive' "
                        f"(default {TOY_KNOBS['ss_attn_temp']:g}, tuned for the toy model)")
    p.add_argument("--no-subtract-mean", action="store_true",
                   help="plain min-max GEM maps, without subtracting the mean map over the 30 class "
                        "prompts")
    p.add_argument("--model", "-m", default=None, type=model_source, metavar="DIR",
                   help="another checkpoint trained on the same scenes (default: the bundled toy)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and compute dtype (default float32)")
    p.add_argument("--force", "-f", action="store_true",
                   help="replace a previous gem-jax output in --out (only the files it writes)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=run, _parser=p)


def run(args) -> int:
    from . import viz
    from .cli import CLIError, check_out, check_out_dir, load_model
    from .io import save_image
    from .outputs import Manifest, OutputPlan
    parser = args._parser
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    out = check_out(parser, args)
    plan = OutputPlan()
    images = []
    for i in range(args.n):
        stem = plan.stem(f"scene_{i}")
        images.append(dict(image=f"scenes.scene({i}, seed={args.seed}, split='test')", stem=stem,
                           outputs=[dict(file=plan.claim(f"{stem}.png"), kind="scene"),
                                    dict(file=plan.claim(f"{stem}_grid.png"), kind="grid")]))
    previous = check_out_dir(parser, out, plan.names, args.force)
    if args.model is None:
        try:
            import jax.numpy as jnp
            model = toy_model(getattr(jnp, args.dtype))
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
    else:
        model = load_model(args)
    out.mkdir(parents=True, exist_ok=True)
    header = dict(command="demo", model=str(args.model or TOY_MODEL_DIR), method="gem",
                  knobs=dict(TOY_KNOBS, ss_attn_temp=args.temp, template=None, size=TOY_SIZE,
                             dtype=args.dtype, subtract_class_mean=not args.no_subtract_mean))
    manifest = Manifest(out, header, images, collisions=plan.collisions,
                        previous=previous.carried(plan.names, out))
    manifest.save()
    rng = np.random.default_rng(args.seed)
    written = 0
    try:
        for i in range(args.n):
            s = scenes.scene(i, seed=args.seed, split="test", size=TOY_SIZE)
            absent = [c for c in scenes.COLORS if c not in {c_ for c_, _ in s.objects}]
            extra = absent[int(rng.integers(len(absent)))]
            queries = list(s.objects) + [(extra, s.objects[0][1])]
            prompts = [object_prompt(c, sh) for c, sh in queries]
            pixels = model.preprocess(s.pil(), size=TOY_SIZE)
            maps = toy_heatmaps(model, pixels, prompts,
                                subtract_class_mean=not args.no_subtract_mean,
                                ss_attn_temp=args.temp)[0]
            titles = [scenes.prompt(c, sh) + ("" if k < len(s.objects) else " (absent)")
                      for k, (c, sh) in enumerate(queries)]
            scene_file, grid_file = (o["file"] for o in images[i]["outputs"])
            save_image(s.pil(), out / scene_file, force=args.force)
            manifest.output_done(i, scene_file)
            save_image(viz.grid(s.pil(), maps, titles=titles, image_title=s.caption[11:-1],
                                ncols=len(titles) + 1, tile_size=192),
                       out / grid_file, force=args.force)
            manifest.output_done(i, grid_file)
            manifest.image_done(i, prompts=prompts, image_size=list(s.pil().size),
                                map_shape=list(maps.shape))
            manifest.maybe_save()
            written += 2
    except KeyboardInterrupt:
        manifest.finish("interrupted")
        raise
    except BaseException:
        manifest.finish("failed")
        raise
    manifest.finish("complete")
    if not args.quiet:
        print(f"wrote {written} file(s) to {out} (toy model: it localizes colours; see "
              f"gem_jax/assets/toy_clip/README.md)")
    return 0
