#!/usr/bin/env python
"""Localization benchmark of the bundled toy CLIP on held-out generated scenes.

    python benchmarks/localization.py                      # 200 test scenes, table on stdout
    python benchmarks/localization.py --n 500 --json out.json --model DIR

Runs without the `gem-jax` command (plain `python`, the library only).  Scenes come from
`gem_jax.scenes`' "test" split, a stream disjoint from the "train" split the model was trained on:
the fixed temperatures are chosen on `--val` scenes of test seed `--val-seed` (default 1) and the
table reports `--n` other scenes of test seed `--seed` (default 0).

Each object of each scene is one query: the prompt "a photo of a <colour> <shape>.", its map
(upsampled to 64×64, min-max normalized) and that object's mask.

* foreground IoU: IoU of (map > 0.5) with the object's mask; mIoU is the mean over queries;
* pointing accuracy: the fraction of queries whose map maximum lies on the object.

Methods: raw patch tokens of the original CLIP ("ori"), value-value self-self attention
(CLIP-Surgery style, "vv") and GEM (q, k, v), both at their best fixed inverse temperature on the
validation scenes, GEM with its adaptive temperature, and every other method of
`gem_jax.METHODS` with its upstream defaults (MaskCLIP and its official residual variant, CLIP
Surgery with and without feature surgery, SCLIP, ClearCLIP, NACLIP; nothing tuned).  Every
method is scored with the toy model's class-mean subtraction (`gem_jax.demo.relative_maps`: the
mean map over the 30 class prompts is subtracted before normalization) and without it ("plain").

Caveat: the toy model is a 6-layer, 96-wide CLIP trained by us on generated scenes of coloured
shapes (scripts/train_toy.py), not real CLIP; methods designed around properties of real CLIP's
last blocks (e.g. ClearCLIP's and NACLIP's "the residual stream carries noise", NACLIP's σ = 5
patches on a 14x14 window, while the toy's grid is 8x8) need not rank here as they do on the
segmentation benchmarks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

TEMPS = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0)


def _class_index():
    from gem_jax import demo, scenes
    return {(c, s): i for i, (c, s) in enumerate((c, s) for c in scenes.COLORS for s in scenes.SHAPES)}, \
        demo.CLASS_PROMPTS


def load_scenes(n: int, seed: int, size: int):
    """Test-split scenes → (pixels [n, S, S, 3] at model input size, queries) where queries are
    (image index, class index, mask [64, 64]) triples."""
    from gem_jax import scenes
    from gem_jax.preprocess import preprocess
    idx, _ = _class_index()
    ss = scenes.scenes(n, seed=seed, split="test", size=scenes.DEFAULT_SIZE)
    pixels = preprocess([s.pil() for s in ss], size=size)
    q_img, q_cls, q_mask = [], [], []
    for b, s in enumerate(ss):
        for obj, m in zip(s.objects, s.masks):
            q_img.append(b)
            q_cls.append(idx[obj])
            q_mask.append(m)
    return pixels, (np.asarray(q_img), np.asarray(q_cls), np.stack(q_mask))


# the other methods, each with its upstream defaults: (row name, method, keyword arguments)
OTHERS = (
    ("MaskCLIP", "maskclip", {}),
    ("MaskCLIP, official (res.+FFN)", "maskclip", dict(residual=True)),
    ("CLIP Surgery (6 blocks)", "surgery", {}),
    ("CLIP Surgery, no feat. surg.", "surgery", dict(feature_surgery=False)),
    ("SCLIP", "sclip", {}),
    ("ClearCLIP", "clearclip", {}),
    ("NACLIP (sigma 5)", "naclip", {}),
)


def class_maps(model, pixels, method: str, temp, chunk: int = 50, **knobs):
    """Raw maps of all class prompts [B, C, 64, 64] (float32).  method: "ori", "vv" or "gem"
    (the toy's GEM knobs, `temp` its inverse temperature), or any other name of gem_jax.METHODS
    with its `knobs`."""
    import jax.numpy as jnp
    from gem_jax import demo, gem, scenes
    _, prompts = _class_index()
    out = []
    for i in range(0, len(pixels), chunk):
        if method in ("ori", "vv", "gem"):
            m = demo.raw_maps(model, pixels[i:i + chunk], prompts, method=method,
                              ss_attn_temp=temp, **knobs)
        else:
            m = np.asarray(model.heatmaps(pixels[i:i + chunk], list(prompts), method=method,
                                          normalize=False, template=None, **knobs))
        if m.shape[-1] != scenes.DEFAULT_SIZE:
            m = np.asarray(gem.upsample(jnp.asarray(m), (scenes.DEFAULT_SIZE,) * 2))
        out.append(m.astype(np.float32))
    return np.concatenate(out)


def score(maps, queries, subtract: bool) -> dict:
    """Foreground mIoU and pointing accuracy of the queries' maps."""
    from gem_jax import demo
    q_img, q_cls, q_mask = queries
    rel = demo.relative_maps(maps, subtract_class_mean=subtract)  # [B, C, H, W] in [0, 1]
    m = rel[q_img, q_cls]  # [Q, H, W]
    pred = m > 0.5
    inter = (pred & q_mask).sum((1, 2))
    union = (pred | q_mask).sum((1, 2))
    iou = inter / np.maximum(union, 1)
    flat = m.reshape(len(m), -1)
    hit = q_mask.reshape(len(m), -1)[np.arange(len(m)), flat.argmax(1)]
    return dict(miou=float(iou.mean()), pointing=float(hit.mean()), queries=int(len(m)))


def evaluate(model, *, n: int = 200, seed: int = 0, val: int = 100, val_seed: int = 1,
             temps=TEMPS, size: int | None = None, verbose: bool = False,
             others=OTHERS) -> dict:
    """The benchmark as a dict: {"rows": [...], "sweep": {...}, "settings": {...}}."""
    from gem_jax import demo
    size = size or demo.TOY_SIZE
    t0 = time.time()
    vpx, vq = load_scenes(val, val_seed, size)
    sweep = {}
    best = {}
    for method in ("vv", "gem"):
        res = {t: score(class_maps(model, vpx, method, t), vq, True)["miou"] for t in temps}
        sweep[method] = res
        best[method] = max(res, key=res.get)
        if verbose:
            print(f"val sweep {method}: " + "  ".join(f"{t:g}:{v:.3f}" for t, v in res.items()),
                  file=sys.stderr)
    px, q = load_scenes(n, seed, size)
    rows = []
    for name, method, temp in (("raw patch tokens (ori)", "ori", None),
                               ("value-value (vv)", "vv", best["vv"]),
                               ("GEM (q,k,v)", "gem", best["gem"]),
                               ("GEM, adaptive temp", "gem", None)):
        maps = class_maps(model, px, method, temp)
        rows.append(dict(method=name, key=method, temp=temp, subtract=score(maps, q, True),
                         plain=score(maps, q, False)))
    for name, method, knobs in others:
        maps = class_maps(model, px, method, None, **knobs)
        rows.append(dict(method=name, key=method, temp=None, knobs=knobs,
                         subtract=score(maps, q, True), plain=score(maps, q, False)))
    return dict(rows=rows, sweep={m: {str(t): v for t, v in r.items()} for m, r in sweep.items()},
                settings=dict(n=n, seed=seed, val=val, val_seed=val_seed, size=size,
                              gem_depth=demo.TOY_KNOBS["gem_depth"], queries=rows[0]["subtract"]["queries"],
                              seconds=round(time.time() - t0, 1)))


def table(result: dict) -> str:
    s = result["settings"]
    lines = [f"toy CLIP localization: {s['n']} held-out scenes (test split, seed {s['seed']}), "
             f"{s['queries']} object queries, input {s['size']}px, gem_depth {s['gem_depth']}; "
             f"temperatures tuned on {s['val']} scenes (seed {s['val_seed']}); other methods "
             f"at their upstream defaults",
             "",
             f"| {'method':<30} | {'inv. temp':>9} | {'fg mIoU':>7} | {'pointing':>8} "
             f"| {'mIoU plain':>10} | {'pointing plain':>14} |",
             f"|{'-' * 32}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 12}|{'-' * 16}|"]
    for r in result["rows"]:
        if r["key"] in ("vv", "gem"):
            t = "adaptive" if r["temp"] is None else f"{r['temp']:g}"
        else:
            t = "-"
        lines.append(f"| {r['method']:<30} | {t:>9} | {r['subtract']['miou']:>7.3f} | "
                     f"{r['subtract']['pointing']:>8.3f} | {r['plain']['miou']:>10.3f} | "
                     f"{r['plain']['pointing']:>14.3f} |")
    lines.append("")
    lines.append("fg mIoU / pointing: with the mean map over the 30 class prompts subtracted "
                 "(gem_jax.demo.relative_maps); 'plain': min-max of the raw map.")
    lines.append("Toy model trained by us on coloured shapes (6 layers, 8x8 patch grid), not real "
                 "CLIP: methods built on properties of real CLIP need not rank here as on real "
                 "benchmarks.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Localization benchmark of the toy CLIP on held-out "
                                            "generated scenes.")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the bundled toy model)")
    p.add_argument("--n", type=int, default=200, help="test scenes (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val", type=int, default=100, help="validation scenes for the temperature")
    p.add_argument("--val-seed", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="model input size (default 64)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.seed == args.val_seed:
        p.error("--seed and --val-seed must differ (temperatures are tuned on other scenes)")
    import gem_jax
    from gem_jax import demo
    model = demo.toy_model() if args.model is None else gem_jax.load(args.model)
    res = evaluate(model, n=args.n, seed=args.seed, val=args.val, val_seed=args.val_seed,
                   size=args.size, verbose=True)
    print(table(res))
    if args.json:
        from gem_jax.io import atomic_write
        atomic_write(args.json, lambda f: f.write(json.dumps(res, indent=1).encode()), force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
