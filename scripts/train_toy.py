#!/usr/bin/env python
"""Train the bundled toy CLIP (gem_jax/assets/toy_clip) from scratch on generated scenes.

    taskset -c 1 python scripts/train_toy.py gem_jax/assets/toy_clip --force

reproduces the committed checkpoint: seed 0, 900 steps x 128 scenes (the defaults below).
Recorded run: 22.8 min on one core of an AMD EPYC machine (`taskset -c 1`, XLA single-threaded),
final training loss 0.97; gem_jax/assets/toy_clip/README.md has its zero-shot and localization
numbers.  Nothing is downloaded: the data is `gem_jax.scenes` (train split,
seed = --seed), the tokenizer is the packaged CLIP BPE.

Recipe: contrastive CLIP loss where captions of identical object sets are positives of each
other, AdamW (lr 2e-3, wd 0.1, b2 0.98) with linear warmup + cosine decay, global-norm clipping at
1.0, random horizontal flips.  The weights are stored in float16 (the full 49408-token CLIP
vocabulary at text width 32 is 3.2 MB of the ≤ 5 MB budget).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")


def toy_config():
    from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
    return CLIPConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=96, layers=6, heads=4, mlp_dim=384,
                            act="gelu"),
        text=TextConfig(vocab_size=49408, context_length=20, width=32, layers=3, heads=4,
                        mlp_dim=128, act="gelu"),
        embed_dim=64, name="toy-clip-scenes")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output checkpoint directory (native gem_jax format, float16)")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="init key and training-scene seed")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not args.force:
        print(f"error: {args.out} exists; pass --force", file=sys.stderr)
        return 1

    import jax
    import jax.numpy as jnp
    import numpy as np
    from gem_jax import params as P, scenes, train
    from gem_jax.convert import save_native
    from gem_jax.tokenizer import CLIPTokenizer

    cfg = toy_config()
    tok = CLIPTokenizer.from_bpe_gz(context_length=cfg.text.context_length)
    key = jax.random.PRNGKey(args.seed)
    key, k_init = jax.random.split(key)
    params = P.init(cfg, k_init)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx = train.make_optimizer(args.lr, args.steps, args.warmup, args.weight_decay)
    opt_state = tx.init(params)
    step = train.make_train_step(cfg, tx, flip=True)

    def get_batch(i):
        b = scenes.batch(args.batch, seed=args.seed, split="train", start=i * args.batch,
                         size=cfg.vision.image_size)
        return dict(pixels=jnp.asarray(train.normalize_pixels(b["images"], cfg)),
                    ids=jnp.asarray(tok(b["captions"]), jnp.int32),
                    groups=jnp.asarray(b["groups"]))

    print(f"toy CLIP: {n_params / 1e6:.2f} M params, {args.steps} steps x {args.batch}, "
          f"seed {args.seed}", flush=True)
    t0 = time.time()
    hist = []
    nxt = get_batch(0)
    for i in range(args.steps):
        key, k = jax.random.split(key)
        params, opt_state, m = step(params, opt_state, nxt, k)
        if i + 1 < args.steps:
            nxt = get_batch(i + 1)  # generated while the step runs (async dispatch)
        if (i + 1) % args.log_every == 0 or i == 0 or i + 1 == args.steps:
            m = {k_: float(v) for k_, v in m.items()}
            hist.append(dict(step=i + 1, time_s=round(time.time() - t0, 1), **m))
            print(f"step {i + 1:5d}  loss {m['loss']:.3f}  acc {m['acc_i2t']:.3f}  "
                  f"scale {m['logit_scale']:.1f}  |g| {m['grad_norm']:.2f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    wall = time.time() - t0
    readme = Path(args.out) / "README.md"
    keep = readme.read_text() if readme.is_file() else None  # survives --force
    out = save_native(args.out, cfg, jax.tree.map(np.asarray, params), None, force=args.force,
                      dtype=np.float16)
    (Path(out) / "train_log.json").write_text(json.dumps(
        dict(args=vars(args), wall_s=round(wall, 1), params=int(n_params), history=hist), indent=1))
    if keep is not None:
        (Path(out) / "README.md").write_text(keep)
    print(f"wrote {out} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
