"""Reading images from files and writing outputs safely (used by the `gem-jax` CLI).

* `read_image(path)` opens, decodes (EXIF orientation applied) and converts to RGB with
  `gem_jax.preprocess.to_rgb`'s rules, or raises `ImageReadError` with a message that names the
  file and the problem (missing, not an image, truncated, unsupported values, ...).
* `atomic_write(path, write)` writes through a temporary file in the same directory and renames
  it into place, so a crash or Ctrl-C never leaves a partial output; it refuses to replace an
  existing file unless `force`.
* `batched(items, n)` yields lists of at most n items (images are read one batch at a time).
* `expand_inputs(args)` turns command-line inputs (files, directories, glob patterns, `@list.txt`
  files) into the sorted list of image paths to process, or raises `InputError` naming the
  argument that matched nothing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "read_image", "decode_image", "atomic_write", "save_image", "save_npy", "batched",
           "InputError", "IMAGE_EXTENSIONS", "expand_inputs", "expand_braces"]

T = TypeVar("T")


class ImageReadError(ValueError):
    """An input file that cannot be used as an image; the message names the file."""


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file → PIL RGB image (decoded, EXIF orientation applied)."""
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a directory, not an image file")
    return _decode(p, str(p))


def decode_image(data: bytes, name: str) -> Image.Image:
    """Encoded image bytes (a file's contents, a tar member) → PIL RGB image, with exactly
    `read_image`'s rules and messages; `name` is how the messages call the image."""
    import io as _io
    if not data:
        raise ImageReadError(f"{name}: not an image file (it is empty)")
    return _decode(_io.BytesIO(data), name)


def _decode(src, name: str) -> Image.Image:
    from .preprocess import to_rgb
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                img.load()
                img = ImageOps.exif_transpose(img) or img
                img.load()
                rgb = to_rgb(img)
                if rgb is img:
                    rgb = img.copy()
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{name}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg or isinstance(e, (SyntaxError, EOFError)):
            msg = f"cannot decode it (truncated or corrupt file?): {msg}"
        raise ImageReadError(f"{name}: {msg}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageReadError(f"{name}: image has zero size ({rgb.width}x{rgb.height})")
    return rgb


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                 force: bool = False) -> Path:
    """Call `write(f)` on a temporary file next to `path`, then rename it to `path`.

    Refuses (FileExistsError) if `path` exists and not `force`.  On any error (or Ctrl-C) the
    temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def save_image(img: Image.Image, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Save a PIL image as PNG, atomically."""
    return atomic_write(path, lambda f: img.save(f, format="PNG"), force=force)


def save_npy(arr, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Save an array as .npy, atomically."""
    a = np.asarray(arr)
    return atomic_write(path, lambda f: np.save(f, a, allow_pickle=False), force=force)


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    if n < 1:
        raise ValueError(f"batch size must be >= 1, got {n}")
    batch: list[T] = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- inputs
# What a directory walk picks up (case-insensitive).  Files named explicitly (or by a glob or a
# list) are taken whatever their extension, and reported per file if they cannot be read.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm",
                    ".ppm", ".tif", ".tiff", ".webp")


class InputError(ValueError):
    """An input argument that names nothing to process (a usage error)."""


def _walk(root: str, exclude: set[str]) -> list[str]:
    """Image files under `root`, recursively, sorted by path; hidden entries and `exclude`d
    directories (the output directory) are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) not in exclude)
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: os.path.relpath(p, root).split(os.sep))


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(arg: str) -> list[str]:
    """WebDataset-style shard ranges, as a shell's brace expansion: `shards-{000..012}.tar` (a
    number range; zero padding kept from the first bound) and `{train,val}` (alternatives).
    Strings without braces come back unchanged."""
    m = _BRACE.search(arg)
    if m is None:
        return [arg]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        parts = [f"{k:0{width}d}" for k in range(lo, hi + step, step)]
    elif "," in body:
        parts = body.split(",")
    else:
        return [arg]  # a literal brace: leave it to the file system and glob
    head, tail = arg[:m.start()], arg[m.end():]
    return [x for part in parts for x in expand_braces(head + part + tail)]


def _expand_one(arg: str, exclude: set[str], where: str = "") -> list[str]:
    if not os.path.exists(arg) and _BRACE.search(arg):
        names = expand_braces(arg)
        if names != [arg]:
            return [p for n in names for p in _expand_one(n, exclude, where)]
    if os.path.isdir(arg):
        found = _walk(arg, exclude)
        if not found:
            raise InputError(f"{arg}{where}: no image files in this directory (looked recursively "
                             f"for {', '.join(IMAGE_EXTENSIONS)})")
        return found
    if os.path.exists(arg):
        return [arg]
    if glob.has_magic(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            raise InputError(f"{arg}{where}: no files match this pattern")
        return [f for m in matches for f in (_walk(m, exclude) if os.path.isdir(m) else [m])]
    raise InputError(f"{arg}{where}: no such file or directory")


def expand_inputs(args: Iterable[str], *, exclude: Iterable[str | os.PathLike] = ()) -> list[str]:
    """Image paths from command-line inputs, in order, each path once.

    * a file: itself;
    * a directory: its image files (IMAGE_EXTENSIONS), recursively, sorted, hidden ones skipped;
    * a glob pattern (`'photos/*.jpg'`, `'**/*.png'`, quoted so the shell leaves it): its
      matches, sorted;
    * `name-{000..099}.tar`, `{a,b}.png`: brace ranges and alternatives (WebDataset's shard
      notation), each name then taken as above;
    * `@list.txt`: one file, directory or pattern per line (blank lines and `#` comments
      skipped), relative to the current directory as if typed on the command line.

    `exclude`: directories never walked into (the output directory).  Raises InputError for an
    argument that matches nothing."""
    skip = {os.path.realpath(e) for e in exclude}
    paths: list[str] = []
    for arg in args:
        arg = str(arg)
        if arg.startswith("@") and not os.path.exists(arg):
            listed = arg[1:]
            try:
                with open(listed, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                raise InputError(f"{arg}: {listed}: no such file (the list of inputs)") from None
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{arg}: cannot read the list of inputs: {e}") from None
            for n, line in enumerate(lines, 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    paths += _expand_one(line, skip, f" (line {n} of {listed})")
        else:
            paths += _expand_one(arg, skip)
    seen, unique = set(), []
    for p in paths:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique
