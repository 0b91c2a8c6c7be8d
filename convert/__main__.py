"""python -m gem_jax.convert SRC OUT [--force] [--dtype float16]

OUT must be absent or an empty directory; with --force it may hold a previous gem-jax
checkpoint, whose own files alone are replaced.  A file at OUT, or a directory holding anything
else, is never touched.  Exit codes: 0 written, 1 failure, 2 usage error (OUT is a file, SRC a
path that does not exist, ...).
"""

from __future__ import annotations

import argparse
import sys


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from ..argtypes import DTYPES, model_source
    p = parser or argparse.ArgumentParser(
        prog="python -m gem_jax.convert",
        description="Convert a CLIP checkpoint (HF hub id, HF transformers or OpenCLIP directory) "
                    "into a gem_jax native checkpoint that loads without torch or transformers.",
        epilog="examples:\n  python -m gem_jax.convert openai/clip-vit-base-patch16 ckpt/b16\n"
               "  python -m gem_jax.convert ./my-open-clip-dir ckpt/mine --dtype float16 --force",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=model_source, help="hub id or local checkpoint directory")
    p.add_argument("out", help="output directory: new, empty, or (with --force) a previous "
                               "gem-jax checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace the previous gem-jax checkpoint in OUT (only its own files; a "
                        "directory holding anything else, or a file, is refused)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="store weights in this dtype (default: float32)")
    p.set_defaults(_parser=p)
    return p


def run(args) -> int:
    import numpy as np
    from . import CheckpointError, convert
    from ..outputs import OutIsAFileError
    dtype = None
    if args.dtype:
        import ml_dtypes  # shipped with jax
        dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[args.dtype]
    try:
        out = convert(args.src, args.out, force=args.force, dtype=dtype)
    except OutIsAFileError as e:  # a usage error: OUT names a file
        parser = getattr(args, "_parser", None)
        if parser is not None:
            parser.error(str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return run(args)
    except SystemExit as e:  # argparse: --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
