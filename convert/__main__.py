"""python -m gem_jax.convert SRC OUT [--force] [--dtype float16]"""

from __future__ import annotations

import argparse
import sys


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(
        prog="python -m gem_jax.convert",
        description="Convert a CLIP checkpoint (HF hub id, HF transformers or OpenCLIP directory) "
                    "into a gem_jax native checkpoint that loads without torch or transformers.",
        epilog="examples:\n  python -m gem_jax.convert openai/clip-vit-base-patch16 ckpt/b16\n"
               "  python -m gem_jax.convert ./my-open-clip-dir ckpt/mine --dtype float16 --force",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="hub id or local checkpoint directory")
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="store weights in this dtype (default: float32)")
    return p


def run(args) -> int:
    import numpy as np
    from . import CheckpointError, convert
    dtype = None
    if args.dtype:
        import ml_dtypes  # shipped with jax
        dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[args.dtype]
    try:
        out = convert(args.src, args.out, force=args.force, dtype=dtype)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
