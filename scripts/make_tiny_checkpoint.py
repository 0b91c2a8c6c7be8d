#!/usr/bin/env python
"""Write a tiny random-weight gem_jax native checkpoint (no torch, no download).

    python scripts/make_tiny_checkpoint.py ckpt/tiny
    gem-jax heatmap photo.jpg -p cat --model ckpt/tiny --gem-depth 3 --size 64

The weights are random: the maps it gives are not meaningful, but every code path (CLI, notebook,
tests) runs in seconds on a CPU and offline.  The architecture is a 3-block ViT (patch 8, width
64) and a 2-block text tower with the real CLIP tokenizer, so GEM depths 2..4 are valid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def tiny_config(layers: int = 3):
    from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
    return CLIPConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=layers, heads=4, mlp_dim=128),
        text=TextConfig(width=32, layers=2, heads=4, mlp_dim=64),
        embed_dim=32, name="tiny-random")


def make_tiny_checkpoint(out, *, seed: int = 0, force: bool = False, layers: int = 3) -> Path:
    """Write the tiny checkpoint to directory `out` and return its path."""
    import jax
    import gem_jax
    from gem_jax.convert import save_native
    cfg = tiny_config(layers)
    params = gem_jax.params.init(cfg, jax.random.PRNGKey(seed))
    return Path(save_native(out, cfg, params, gem_jax.CLIPTokenizer.from_bpe_gz(), force=force))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Write a tiny random-weight gem_jax checkpoint (for offline tries and tests).",
        epilog="example:\n  python scripts/make_tiny_checkpoint.py ckpt/tiny\n"
               "  gem-jax heatmap img.png -p cat --model ckpt/tiny --gem-depth 3 --size 64",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--layers", type=int, default=3, help="vision blocks (default 3)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    try:
        out = make_tiny_checkpoint(args.out, seed=args.seed, force=args.force, layers=args.layers)
    except (FileExistsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
