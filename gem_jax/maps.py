"""Tokens → maps: the one path from projected patch tokens and text embeddings to heatmaps and
segmentations, used by the API (shared and ragged prompts), the CLI, eval and every method.

    sim  = cos(patch_b,n , text_b,p)        [B, P, gh, gw]   (text [P, E] shared or [B, P, E])
    maps = upsample(sim) → min-max per map   [B, P, H, W]
    ids  = argmax_p (+ background by threshold)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import layers
from .resample import resize


def patch_similarity(tokens, text_emb, grid: tuple[int, int]):
    """Cosine similarity of patch tokens with text embeddings, in float32 (float64 for float64).

    tokens [B, 1+N, E] (class token first), text_emb [P, E] (shared) or [B, P, E] (per image)
    → [B, P, gh, gw].
    """
    acc = layers.acc_dtype(tokens.dtype)
    img = layers.l2_normalize(tokens[:, 1:].astype(acc))
    txt = layers.l2_normalize(text_emb.astype(acc))
    eq = "bne,pe->bpn" if txt.ndim == 2 else "bne,bpe->bpn"
    s = jnp.einsum(eq, img, txt, precision=jax.lax.Precision.HIGHEST)
    return s.reshape(s.shape[:2] + tuple(grid))


def upsample(maps, out_hw: tuple[int, int]):
    """Bilinear (align_corners=False) resize of [..., gh, gw] maps to out_hw, as torch."""
    return resize(maps, tuple(out_hw), "bilinear")


def min_max(maps):
    """Per-map (last two axes) min-max normalization; a constant map becomes zeros (a NaN map,
    from out-of-range traced knobs, stays NaN)."""
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    rng = hi - lo
    return jnp.where(rng == 0, 0.0, (maps - lo) / jnp.where(rng == 0, 1.0, rng))


def heatmaps(tokens, text_emb, grid, out_hw, normalize: bool = True, similarity=None):
    """Heatmaps [B, P, H, W] from image tokens and text embeddings ([P, E] or [B, P, E]);
    `similarity` replaces `patch_similarity` (a method's own, e.g. CLIP Surgery's)."""
    m = upsample((similarity or patch_similarity)(tokens, text_emb, grid), out_hw)
    return min_max(m) if normalize else m


def segment_from_scores(scores, background_threshold=None):
    """Class ids from per-class score maps [B, C, H, W] → int32 [B, H, W].

    Without a threshold: argmax over classes (ties → lowest index), ids 0..C-1.
    With one (upstream GEM README's recipe, with its mask bug fixed): classes are numbered from 1
    and id 0 (background) is given wherever max_c softmax_c(scores) is below the threshold.
    """
    ids = jnp.argmax(scores, axis=1).astype(jnp.int32)
    if background_threshold is None:
        return ids
    prob = jax.nn.softmax(scores.astype(jnp.float32), axis=1).max(axis=1)
    return jnp.where(prob < background_threshold, 0, ids + 1).astype(jnp.int32)
