"""argparse value types shared by the command-line tools (errors become usage errors, exit 2)."""

from __future__ import annotations

import argparse
import math
import os


def int_at_least(lo: int):
    """An argparse type accepting integers >= lo."""
    what = "a positive integer" if lo == 1 else f"an integer >= {lo}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def positive_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def unit_float(s: str) -> float:
    v = finite_float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}")
    return v


# ----------------------------------------------------------------------------- shared knobs
# One set of dtype names for every command (heatmap, segment, eval, demo, serve: the compute
# dtype; convert: the storage dtype).  float16 runs (LayerNorm, softmax and maps stay float32).
DTYPES = ("float32", "bfloat16", "float16")
gem_depth = int_at_least(2)  # GEM modifies the last depth-1 blocks: at least one


def temperature(s: str) -> float | None:
    """--temp: a fixed inverse temperature >= 0, or 'adaptive' (also 'auto', 'none') -> None."""
    if s.strip().lower() in ("adaptive", "auto", "none"):
        return None
    v = finite_float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or an inverse temperature >= 0, "
                                         f"got {s!r}")
    return v


def looks_like_path(s: str) -> bool:
    """True when a --model value is meant as a local path rather than a hub id (owner/name).

    Hub ids are `name` or `owner/name`; anything starting with '.', '/', '~', holding a backslash
    or more than one '/', ending in '/', or whose first component is an existing local directory
    is a path (`ckpt/tni` when ./ckpt exists)."""
    if s.startswith((".", "/", "~")) or "\\" in s or s.endswith("/") or s.count("/") > 1:
        return True
    head = s.split("/", 1)[0]
    return "/" in s and os.path.isdir(os.path.expanduser(head))


def model_source(s: str) -> str:
    """--model: a hub id or a local checkpoint directory.  A path that is not a directory is a
    usage error here, so that a typo is never reported as a hub id that could not be downloaded."""
    if not s.strip():
        raise argparse.ArgumentTypeError("expected a hub id or a checkpoint directory, got ''")
    p = os.path.expanduser(s)
    if os.path.isdir(p):
        return s
    if os.path.exists(p):
        raise argparse.ArgumentTypeError(f"{s} is a file, not a checkpoint directory")
    if looks_like_path(s):
        parent = os.path.dirname(p.rstrip("/")) or "."
        hint = ""
        if os.path.isdir(parent):
            import difflib
            subdirs = sorted(e for e in os.listdir(parent)
                             if os.path.isdir(os.path.join(parent, e)) and not e.startswith("."))
            close = difflib.get_close_matches(os.path.basename(p.rstrip("/")), subdirs, n=3)
            if close:
                hint = f" (did you mean {', '.join(os.path.join(os.path.dirname(s), c) for c in close)}?)"
        raise argparse.ArgumentTypeError(f"no such directory: {s}{hint}")
    return s
