"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as SCLIP and NACLIP use it.

A pure function of an image and per-class score maps; no parameters.  It is upstream's
``pamr.py`` (visinf/1-stage-wseg, copied unchanged in wangf3014/SCLIP@b56bd301 and, reformatted,
in sinahmr/NACLIP@0cac3a65), written out:

    masks ← bilinear resize of masks to the image size (align_corners=True)
    for each dilation d and each of the 8 neighbours o ∈ d·{-1,0,1}² \\ {0} (replicate padding):
        diff[k, (d,o)] = |x_k(p) − x_k(p+o)|                       per image channel k
    σ_k(p) = std over the 9·len(dilations) values x_k(p+o), o ∈ d·{-1,0,1}² (centre included,
             once per dilation), unbiased (N − 1)
    a(p, (d,o)) = softmax over (d,o) of  mean_k ( −diff[k,(d,o)] / (1e-8 + 0.1·σ_k(p)) )
    repeat num_iter times:  m_c(p) ← Σ_(d,o) a(p,(d,o)) · m_c(p+o)     (the centre not included)

SCLIP/NACLIP call it with the normalized input image resized (bilinear) to the label size and the
class logits before the softmax: ``PAMR(num_iter=10, dilations=(8, 16))``; NACLIP's default has it
on (``pamr_steps=10``), SCLIP's off (``pamr_steps=0``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pamr", "DEFAULT_ITERATIONS", "DEFAULT_DILATIONS"]

DEFAULT_ITERATIONS = 10
DEFAULT_DILATIONS = (8, 16)

# The 3x3 kernel positions of upstream's LocalAffinity (row, col offsets) minus the centre, in its
# order; one one-hot 3x3 kernel per neighbour (a convolution with it copies the neighbour exactly).
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_ONE_HOT = np.zeros((8, 1, 3, 3), np.float32)
for _i, (_dy, _dx) in enumerate(_NEIGHBOURS):
    _ONE_HOT[_i, 0, _dy + 1, _dx + 1] = 1.0


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``F.interpolate(mode='bilinear', align_corners=True)`` along one axis as [out, in]."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = i * scale
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        t = src - i0
        m[i, i0] += 1.0 - t
        m[i, i1] += t
    return m


def _neighbours(x, d: int):
    """The 8 neighbours at distance d of every pixel, borders replicated: [N, H, W] → [N, 8, H, W]."""
    xp = jnp.pad(x, ((0, 0), (d, d), (d, d)), mode="edge")[:, None]
    return jax.lax.conv_general_dilated(xp, jnp.asarray(_ONE_HOT), (1, 1), "VALID",
                                        rhs_dilation=(d, d), precision=jax.lax.Precision.HIGHEST)


def _check(image, masks, num_iter, dilations):
    if image.ndim != 4:
        raise ValueError(f"image must be [B, H, W, C] (channels last), got shape {image.shape}")
    if masks.ndim != 4:
        raise ValueError(f"masks must be [B, classes, H, W], got shape {masks.shape}")
    if image.shape[0] != masks.shape[0]:
        raise ValueError(f"image batch {image.shape[0]} differs from masks batch {masks.shape[0]}")
    if min(image.shape[1:3]) < 1 or min(masks.shape[2:]) < 1:
        raise ValueError("image and masks must have positive sizes")
    if isinstance(num_iter, (bool, np.bool_)) or not isinstance(num_iter, (int, np.integer)) \
            or num_iter < 0:
        raise ValueError(f"num_iter must be an integer >= 0, got {num_iter!r}")
    dil = tuple(dilations)
    if not dil or any(isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer))
                      or d < 1 for d in dil):
        raise ValueError(f"dilations must be a non-empty sequence of integers >= 1, got {dilations!r}")
    return tuple(int(d) for d in dil)


def pamr(image, masks, num_iter: int = DEFAULT_ITERATIONS,
         dilations: Sequence[int] = DEFAULT_DILATIONS):
    """Refine per-class maps with the image's local affinities.

    image: [B, H, W, K] (any K channels; SCLIP/NACLIP pass the normalized RGB input);
    masks: [B, C, h, w] scores (logits or probabilities), resized to (H, W) first if needed.
    Returns [B, C, H, W] float32.  num_iter and dilations are upstream's ``num_iter`` and
    ``dilations``.  Compiled once per (shapes, dilations); num_iter is a runtime value.
    """
    image = jnp.asarray(image, jnp.float32)
    masks = jnp.asarray(masks, jnp.float32)
    dil = _check(image, masks, num_iter, dilations)
    return _pamr(image, masks, jnp.asarray(num_iter, jnp.int32), dil)


def _pamr_impl(image, masks, num_iter, dilations: tuple):
    b, h, w, k = image.shape
    c = masks.shape[1]
    if masks.shape[2:] != (h, w):
        mh = jnp.asarray(_align_corners_matrix(masks.shape[2], h), jnp.float32)
        mw = jnp.asarray(_align_corners_matrix(masks.shape[3], w), jnp.float32)
        masks = jnp.einsum("yi,bcij,xj->bcyx", mh, masks, mw,
                           precision=jax.lax.Precision.HIGHEST)
    x = jnp.transpose(image, (0, 3, 1, 2)).reshape(b * k, h, w)     # one map per image channel

    # local standard deviation over the 3x3 (dilated) windows of every dilation, centre included
    # once per dilation, unbiased (torch.std)
    nbs = [_neighbours(x, d) for d in dilations]                    # each [B·K, 8, H, W]
    std = jnp.std(jnp.concatenate([jnp.concatenate([n[:, :4], x[:, None], n[:, 4:]], 1)
                                   for n in nbs], 1), axis=1, ddof=1)

    # affinity logits to the 8 neighbours of every dilation, averaged over channels, softmaxed
    logits = jnp.concatenate([-jnp.abs(x[:, None] - n) / (1e-8 + 0.1 * std[:, None]) for n in nbs], 1)
    aff = jax.nn.softmax(logits.reshape(b, k, -1, h, w).mean(1), axis=1)   # [B, 8·nd, H, W]

    def step(_, m):
        flat = m.reshape(b * c, h, w)
        nb = jnp.concatenate([_neighbours(flat, d) for d in dilations], 1).reshape(b, c, -1, h, w)
        return jnp.sum(nb * aff[:, None], axis=2)

    return jax.lax.fori_loop(0, num_iter, step, masks)


# num_iter is traced (a sweep over it does not recompile); the dilations fix the graph.
_pamr = jax.jit(_pamr_impl, static_argnums=(3,))
