"""Interpolation that reproduces ``torch.nn.functional.interpolate`` exactly.

Every supported mode of ``F.interpolate(..., align_corners=False)`` is a
separable linear map, so it can be written as one dense ``[out, in]`` weight
matrix per spatial axis. The matrices are computed in numpy float64 at trace
time (the shapes are static) and applied with ``tensordot`` in ``jax.numpy``,
so :func:`resize` is jittable and differentiable with respect to its input.

Modes (all use ``scale = in_size / out_size``, i.e. ``F.interpolate(size=...)``
without ``scale_factor``):

``"bilinear"``
    ``mode="bilinear", antialias=False``. Source coordinate
    ``scale * (i + 0.5) - 0.5`` clamped at 0, two taps, upper index clamped.
``"bicubic"``
    ``mode="bicubic", antialias=False``. Keys cubic convolution with
    ``a = -0.75``, four taps at ``floor(src) - 1 .. floor(src) + 2`` with the
    indices clamped to the border (the weights are not renormalised).
``"bilinear_aa"`` / ``"bicubic_aa"``
    ``antialias=True`` (the PIL-style separable filter of
    ``aten/src/ATen/native/cpu/UpSampleKernel.cpp``,
    ``_compute_indices_min_size_weights_aa``). Triangle filter for bilinear,
    Keys cubic with ``a = -0.5`` for bicubic. When downsampling
    (``scale > 1``) the filter support is stretched by ``scale`` and its
    argument shrunk by ``1 / scale``; taps falling outside the input are
    dropped and the remaining weights are normalised to sum to one.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MODES", "interp_matrix", "resize", "resample_pos_embed", "pos_embed_scale_factor",
           "pos_embed_by_size"]

MODES = ("bilinear", "bicubic", "bilinear_aa", "bicubic_aa")


def _cubic_conv1(x, a):
    # |x| <= 1
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0


def _cubic_conv2(x, a):
    # 1 < |x| < 2
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a


def _aa_cubic_filter(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, _cubic_conv1(x, a), np.where(x < 2.0, _cubic_conv2(x, a), 0.0))


def _aa_linear_filter(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}; valid modes are {', '.join(map(repr, MODES))}")


def _check_sizes(in_size, out_size, mode):
    _check_mode(mode)
    for name, v in (("in_size", in_size), ("out_size", out_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")


def interp_matrix(in_size: int, out_size: int, mode: str, scale: Optional[float] = None) -> np.ndarray:
    """Dense ``[out_size, in_size]`` float64 matrix ``W`` such that
    ``y = W @ x`` equals ``F.interpolate`` along one axis (``align_corners=False``).

    ``mode`` is one of ``"bilinear"``, ``"bicubic"``, ``"bilinear_aa"``,
    ``"bicubic_aa"`` (see the module docstring).  ``scale`` (non-antialiased
    modes only) overrides the source-coordinate step ``in_size / out_size``:
    torch uses ``1 / scale_factor`` when ``F.interpolate`` is called with a
    ``scale_factor`` (and ``recompute_scale_factor`` unset or False).
    """
    _check_sizes(in_size, out_size, mode)
    in_size, out_size = int(in_size), int(out_size)
    if scale is not None and mode.endswith("_aa"):
        raise ValueError("an explicit scale is only supported for the non-antialiased modes")
    scale = in_size / out_size if scale is None else float(scale)
    W = np.zeros((out_size, in_size), dtype=np.float64)
    dst = np.arange(out_size, dtype=np.float64)
    rows = np.arange(out_size)

    if mode == "bilinear":
        src = np.maximum(scale * (dst + 0.5) - 0.5, 0.0)
        i0 = src.astype(np.int64)  # src >= 0, so truncation == floor
        lam1 = src - i0
        lam0 = 1.0 - lam1
        i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
        np.add.at(W, (rows, i0), lam0)
        np.add.at(W, (rows, i1), lam1)
        return W

    if mode == "bicubic":
        a = -0.75
        src = scale * (dst + 0.5) - 0.5  # no clamping for cubic
        fl = np.floor(src)
        t = src - fl
        fl = fl.astype(np.int64)
        coeffs = (
            _cubic_conv2(t + 1.0, a),
            _cubic_conv1(t, a),
            _cubic_conv1(1.0 - t, a),
            _cubic_conv2(2.0 - t, a),
        )
        for k, c in enumerate(coeffs):
            idx = np.clip(fl - 1 + k, 0, in_size - 1)
            np.add.at(W, (rows, idx), c)
        return W

    # antialiased ("*_aa") path
    interp_size, filt = (2, _aa_linear_filter) if mode == "bilinear_aa" else (4, _aa_cubic_filter)
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        # C++ static_cast<int64_t> truncates toward zero; the max with 0 makes
        # truncation vs floor irrelevant for negative values.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        j = np.arange(xmin, xmax, dtype=np.float64)
        w = filt((j - center + 0.5) * invscale)
        total = w.sum()
        if total != 0.0:
            w = w / total
        W[i, xmin:xmax] = w
    return W


def _apply_axis(x: jnp.ndarray, mat: np.ndarray, axis: int) -> jnp.ndarray:
    m = jnp.asarray(mat.T, dtype=x.dtype)  # [in, out]
    y = jnp.tensordot(x, m, axes=([axis], [0]), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, -1, axis)


def resize(
    x,
    out_hw: Tuple[int, int],
    mode: str,
    axes: Tuple[int, int] = (-2, -1),
) -> jnp.ndarray:
    """Resize ``x`` to ``out_hw`` on ``axes`` like ``F.interpolate(align_corners=False)``.

    ``x`` is any array (jnp or numpy); non-floating inputs are cast to float32.
    The contraction runs in the input dtype with ``Precision.HIGHEST``.
    Jittable (sizes are static) and differentiable w.r.t. ``x``.
    """
    _check_mode(mode)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if len(out_hw) != 2 or len(axes) != 2:
        raise ValueError(f"out_hw and axes must both have 2 entries, got out_hw={out_hw!r}, axes={axes!r}")
    ax = [a % x.ndim if -x.ndim <= a < x.ndim else None for a in axes]
    if None in ax or ax[0] == ax[1]:
        raise ValueError(f"invalid axes {axes!r} for an array with {x.ndim} dimensions")
    for a, n_out in zip(ax, out_hw):
        n_in = x.shape[a]
        if n_in == n_out:
            continue  # every mode is exactly the identity when sizes match
        x = _apply_axis(x, interp_matrix(n_in, int(n_out), mode), a)
    return x


def _grid2(g, name) -> Tuple[int, int]:
    if isinstance(g, (int, np.integer)) and not isinstance(g, bool):
        g = (g, g)
    try:
        h, w = (int(v) for v in g)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints (h, w), got {g!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def resample_pos_embed(
    pos,
    new_grid: Tuple[int, int],
    old_grid: Optional[Tuple[int, int]] = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic_aa",
):
    """Resample absolute position embeddings to a new patch grid.

    JAX port of ``gem.gem_utils.resample_abs_pos_embed`` (bicubic, antialias=True
    by default). ``pos`` is ``[num_prefix_tokens + old_h * old_w, D]`` (extra
    leading batch dims are allowed) with the grid in row-major (h, then w)
    order. ``old_grid`` defaults to a square grid ``sqrt(rows - prefix)``.
    The prefix (class token) rows are passed through untouched. Returns
    ``[num_prefix_tokens + new_h * new_w, D]``; when the grids are equal the
    input is returned unchanged (same object).
    """
    _check_mode(mode)
    if pos.ndim < 2:
        raise ValueError(f"pos must be [num_tokens, D], got shape {tuple(pos.shape)}")
    n_rows = pos.shape[-2]
    n_grid = n_rows - num_prefix_tokens
    if num_prefix_tokens < 0 or n_grid < 1:
        raise ValueError(
            f"pos has {n_rows} rows, which leaves no grid tokens after {num_prefix_tokens} prefix token(s)"
        )
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise ValueError(
                f"pos has {n_grid} grid tokens (+{num_prefix_tokens} prefix), which is not a square; "
                f"pass old_grid=(h, w) explicitly"
            )
        old_grid = (side, side)
    old_h, old_w = _grid2(old_grid, "old_grid")
    new_h, new_w = _grid2(new_grid, "new_grid")
    if old_h * old_w != n_grid:
        raise ValueError(
            f"pos has {n_rows} rows = {num_prefix_tokens} prefix + {n_grid} grid tokens, but "
            f"old_grid={(old_h, old_w)} needs {old_h * old_w} grid tokens"
        )
    if (old_h, old_w) == (new_h, new_w):
        return pos

    pos = jnp.asarray(pos)
    lead = pos.shape[:-2]
    d = pos.shape[-1]
    prefix = pos[..., :num_prefix_tokens, :]
    grid = pos[..., num_prefix_tokens:, :].reshape(*lead, old_h, old_w, d)
    grid = resize(grid, (new_h, new_w), mode, axes=(-3, -2))
    grid = grid.reshape(*lead, new_h * new_w, d).astype(prefix.dtype)
    return jnp.concatenate([prefix, grid], axis=-2)


def _split_square(pos, native_grid):
    """(prefix row [1, D], grid [h, w, D]) of a [1 + h*w, D] table with its native grid."""
    h, w = _grid2(native_grid, "native_grid")
    if pos.ndim != 2 or pos.shape[0] != 1 + h * w:
        raise ValueError(f"pos must be [1 + {h}*{w}, D] for a {h}x{w} grid, got {tuple(pos.shape)}")
    pos = jnp.asarray(pos)
    return pos[:1], pos[1:].reshape(h, w, -1)


def pos_embed_scale_factor(pos, new_grid, native_grid):
    """The positional table of the SCLIP family (SCLIP, ClearCLIP, NACLIP) for a patch grid.

    Their ``interpolate_pos_encoding`` (wangf3014/SCLIP@b56bd301 clip/model.py L263-281,
    sinahmr/NACLIP@0cac3a65 clip/model.py L134-151, mc-lan/ClearCLIP@ad68a404
    open_clip/transformer.py L569-587) calls
    ``F.interpolate(pe, scale_factor=((gh + 0.1) / s, (gw + 0.1) / s), mode="bicubic")``
    (s = √N the native side, no antialias), i.e. output pixel i samples the source at
    ``(i + 0.5) · s / (g + 0.1) − 0.5`` -- not the ``s / g`` of a size-based resize.  It is applied
    only when the token count differs from the native one: a grid with as many patches as the
    native grid (e.g. 7x28 for 14x14) gets the native table unchanged (upstream quirk, kept).
    pos [1 + s*s, D] → [1 + gh*gw, D].
    """
    gh, gw = _grid2(new_grid, "new_grid")
    nh, nw = _grid2(native_grid, "native_grid")
    if gh * gw == nh * nw:
        return pos
    if nh != nw:
        raise ValueError(f"the scale-factor rule assumes a square native grid, got {(nh, nw)}")
    prefix, grid = _split_square(pos, (nh, nw))
    s = math.sqrt(nh * nw)
    # torch: output size floor(s · (g + 0.1) / s) = g, step 1 / scale_factor = s / (g + 0.1)
    mh = interp_matrix(nh, gh, "bicubic", scale=1.0 / ((gh + 0.1) / s))
    mw = interp_matrix(nw, gw, "bicubic", scale=1.0 / ((gw + 0.1) / s))
    grid = _apply_axis(_apply_axis(grid, mh, 0), mw, 1)
    return jnp.concatenate([prefix, grid.reshape(gh * gw, -1).astype(prefix.dtype)], axis=0)


def pos_embed_by_size(pos, new_grid, native_grid, mode: str = "bicubic", *,
                      same_count: bool = False):
    """A size-based, non-antialiased resize of the positional grid (``F.interpolate(pe,
    size=(gh, gw), mode=mode)``): CLIP Surgery's ``"bilinear"`` and mmseg's (official MaskCLIP)
    ``"bicubic"``.  same_count: skip when the token count equals the native one (mmseg's
    condition) instead of when the grid equals it."""
    gh, gw = _grid2(new_grid, "new_grid")
    nh, nw = _grid2(native_grid, "native_grid")
    if (gh, gw) == (nh, nw) or (same_count and gh * gw == nh * nw):
        return pos
    prefix, grid = _split_square(pos, (nh, nw))
    grid = resize(grid, (gh, gw), mode, axes=(0, 1))
    return jnp.concatenate([prefix, grid.reshape(gh * gw, -1).astype(prefix.dtype)], axis=0)
