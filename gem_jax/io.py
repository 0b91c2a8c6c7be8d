"""Reading images from files and writing outputs safely (used by the `gem-jax` CLI).

* `read_image(path)` opens, decodes (EXIF orientation applied) and converts to RGB with
  `gem_jax.preprocess.to_rgb`'s rules, or raises `ImageReadError` with a message that names the
  file and the problem (missing, not an image, truncated, unsupported values, ...).
* `atomic_write(path, write)` writes through a temporary file in the same directory and renames
  it into place, so a crash or Ctrl-C never leaves a partial output; it refuses to replace an
  existing file unless `force`.
* `batched(items, n)` yields lists of at most n items (images are read one batch at a time).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "read_image", "atomic_write", "save_image", "save_npy", "batched"]

T = TypeVar("T")


class ImageReadError(ValueError):
    """An input file that cannot be used as an image; the message names the file."""


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file → PIL RGB image (decoded, EXIF orientation applied)."""
    from .preprocess import to_rgb
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: no such file")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                img.load()
                img = ImageOps.exif_transpose(img) or img
                img.load()
                rgb = to_rgb(img)
                if rgb is img:
                    rgb = img.copy()
    except UnidentifiedImageError:
        raise ImageReadError(f"{p}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{p}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, MemoryError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg or isinstance(e, (SyntaxError, EOFError)):
            msg = f"cannot decode it (truncated or corrupt file?): {msg}"
        raise ImageReadError(f"{p}: {msg}") from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageReadError(f"{p}: image has zero size ({rgb.width}x{rgb.height})")
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
