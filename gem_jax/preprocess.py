"""Image preprocessing equal to upstream GEM's ``gem.get_gem_img_transform``.

Upstream is ``torchvision`` ``Resize((H, W), BICUBIC)`` on the PIL image, then
``ToTensor`` (uint8 -> float32 / 255) and ``Normalize(OpenAI mean, std)``.
Here the same arithmetic is done with PIL + numpy (no torch) and the result
is returned as float32 NHWC ``[B, H, W, 3]``.
"""

from __future__ import annotations

import numbers
import os
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "to_rgb", "preprocess"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _gray_to_rgb(arr8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(arr8, dtype=np.uint8), mode="L").convert("RGB")


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    # full 0..65535 range -> 0..255, round(v / 257) (65535 / 257 == 255 exactly)
    return np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image to mode ``"RGB"`` (8 bits per channel).

    Upstream GEM assumes RGB input; these rules for other modes are ours:

    * ``RGB``: returned unchanged (the same object).
    * ``1``, ``L``, ``P``, ``RGBA``, ``LA``, ``PA``, ``CMYK``, ``YCbCr``,
      ``LAB``, ``HSV``, ``RGBX`` (and any other mode PIL can convert):
      ``img.convert("RGB")``, exactly like open_clip's ``_convert_to_rgb``.
      Alpha is dropped (not composited); ``P`` images with transparency are
      converted the same way.
    * 16-bit integer modes (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): the full
      0..65535 range is mapped to 0..255 as ``round(v / 257)``, then gray -> RGB.
    * ``I`` (32-bit int): if all values are within 0..255 they are used as is;
      else if within 0..65535 they are scaled like 16-bit; otherwise
      ``ValueError`` (naming the mode and the observed value range).
    * ``F`` (32-bit float): NaN/inf -> ``ValueError``. If all values are within
      [0, 1] they are multiplied by 255; else if within [0, 255] they are used
      as is; otherwise ``ValueError``. Values are then rounded to the nearest
      integer (half to even) and treated as 8-bit gray -> RGB.

    Raises ``TypeError`` for non-PIL input and ``ValueError`` for zero-sized
    images or values outside the rules above.
    """
    _check_pil(img, "img")
    if img.width == 0 or img.height == 0:
        raise ValueError(f"image has zero size (width={img.width}, height={img.height})")
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_scale_16bit(np.asarray(img)))
    if mode == "I":
        arr = np.asarray(img).astype(np.int64)
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return _gray_to_rgb(arr.astype(np.uint8))
        if lo >= 0 and hi <= 65535:
            return _gray_to_rgb(_scale_16bit(arr))
        raise ValueError(
            f"cannot convert mode 'I' image to RGB: values span [{lo}, {hi}], "
            f"expected within [0, 255] or [0, 65535]"
        )
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("cannot convert mode 'F' image to RGB: it contains NaN or inf values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            raise ValueError(
                f"cannot convert mode 'F' image to RGB: values span [{lo}, {hi}], "
                f"expected within [0, 1] or [0, 255]"
            )
        return _gray_to_rgb(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert mode {mode!r} image to RGB: {e}") from e


def _check_pil(img, what: str) -> None:
    if isinstance(img, Image.Image):
        return
    tname = f"{type(img).__module__}.{type(img).__qualname__}"
    if isinstance(img, np.ndarray):
        hint = " convert arrays with PIL.Image.fromarray(...), or load files with PIL.Image.open(path)"
    elif isinstance(img, (str, bytes, os.PathLike)):
        hint = " open the file first with PIL.Image.open(path)"
    else:
        hint = " open files with PIL.Image.open(path)"
    raise TypeError(f"{what} must be a PIL.Image.Image, got {tname};{hint}")


def _parse_size(size) -> Tuple[int, int]:
    def _one(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"size must be an int or a pair of ints (H, W), got {size!r}")
        if v <= 0:
            raise ValueError(f"size must be positive, got {size!r}")
        return int(v)

    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            raise ValueError(f"size must be an int or a pair of ints (H, W), got {size!r}")
        return _one(size[0]), _one(size[1])
    s = _one(size)
    return s, s


def _parse_stats(mean, std) -> Tuple[np.ndarray, np.ndarray]:
    out = []
    for name, v in (("mean", mean), ("std", std)):
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of 3 numbers, got {v!r}") from None
        if a.shape != (3,):
            raise ValueError(f"{name} must have exactly 3 values (one per RGB channel), got {v!r}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got {v!r}")
        out.append(a.astype(np.float32))
    if np.any(out[1] == 0):
        raise ValueError(f"std must not contain zeros (after conversion to float32), got {std!r}")
    return out[0], out[1]


def preprocess(
    images: Union[Image.Image, Sequence[Image.Image]],
    size: Union[int, Tuple[int, int]] = 448,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
) -> np.ndarray:
    """GEM image preprocessing, returning float32 NHWC ``[B, H, W, 3]``.

    Equal to ``gem.get_gem_img_transform(img_size=(H, W), mean, std)`` applied to
    ``to_rgb(img)`` (then permuted CHW -> HWC and stacked):

    1. :func:`to_rgb` (see its rules for non-RGB modes);
    2. ``img.resize((W, H), Image.BICUBIC)`` -- what torchvision's ``Resize`` does
       for PIL input (PIL's antialiased bicubic; skipped when already H x W);
    3. ``uint8 -> float32 / 255`` (``ToTensor``);
    4. ``(x - mean) / std`` in float32 (``Normalize``).

    ``images`` is a PIL image or a non-empty sequence of PIL images; ``size`` is
    an int (square ``size x size``, the GEM protocol) or ``(H, W)``.
    """
    if isinstance(images, Image.Image):
        images = [images]
    elif isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is empty: expected a PIL image or a non-empty sequence of PIL images")
    else:
        _check_pil(images, "images")
    h, w = _parse_size(size)
    mean32, std32 = _parse_stats(mean, std)

    out = np.empty((len(images), h, w, 3), dtype=np.float32)
    for i, img in enumerate(images):
        _check_pil(img, f"images[{i}]")
        if img.width == 0 or img.height == 0:
            raise ValueError(f"images[{i}] has zero size (width={img.width}, height={img.height})")
        try:
            img.load()
        except Exception as e:  # truncated / corrupt file data
            raise ValueError(f"could not decode image images[{i}] (truncated or corrupt file?): {e}") from e
        rgb = to_rgb(img)
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.BICUBIC)
        x = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        out[i] = (x - mean32) / std32
    return out
