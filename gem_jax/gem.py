r"""GEM (Grounding Everything Module, Bousselham et al., CVPR 2024) as pure functions.

Self-self attention of one block, for each enabled branch x ∈ {q, k, v} (per head, τ the inverse
temperature):

    repeat ss_attn_iter times:   x ← softmax(τ · x̂ x̂ᵀ) x̂,      x̂ = x / ‖x‖
    A_x = softmax(τ · x̂ x̂ᵀ)
    out = mean_x(A_x · v)

The GEM stream starts at the input of block L-(gem_depth-1) and, in each of the last gem_depth-1
blocks, adds out_proj(out) -- residual, no MLP -- while the original stream runs unchanged.
Adaptive τ = mean_n ‖LN1(x)_n‖ · K^-½ per image; or a fixed ss_attn_temp.
Both streams end with LN_post and the projection.

Knobs: gem_depth, ss_attn_iter and ss_attn_temp may be traced values (sweeps do not recompile;
they become dynamic loop bounds); `branches` and whether τ is adaptive are static.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import layers, vision
from .config import VisionConfig
from .resample import resize

BRANCHES = ("q", "k", "v")


def check_branches(branches: Sequence[str]) -> tuple[str, ...]:
    b = tuple(branches)
    if not b or any(x not in BRANCHES for x in b) or len(set(b)) != len(b):
        raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {branches!r}")
    return b


def adaptive_inv_temp(h, head_dim: int):
    """Mean token norm of the block's normalized input × K^-½.  h [B,N,D] → [B]."""
    return jnp.linalg.norm(h.astype(jnp.float32), axis=-1).mean(-1) * head_dim ** -0.5


def _ss_exp(x, inv_temp):
    """Unnormalized self-self attention: E = exp(τ x̂x̂ᵀ - |τ|·‖x̂‖), its row sums, and x̂.

    As ‖x̂_j‖ ≤ 1, |x̂_i·x̂_j| ≤ ‖x̂_i‖ (equality on the diagonal of unit rows), so the shift is the
    row maximum and softmax(τ x̂x̂ᵀ) = E / rowsum(E) without a max pass; dividing the product E·y
    by the row sums instead of E itself saves another pass over the N×N matrix.
    x [B,H,N,K], τ [B] or scalar.
    """
    xn = layers.l2_normalize(x)
    tau = jnp.reshape(inv_temp, jnp.shape(inv_temp) + (1, 1, 1)).astype(jnp.float32)
    norm = jnp.linalg.norm(xn.astype(jnp.float32), axis=-1, keepdims=True)
    s = jnp.einsum("bhnk,bhmk->bhnm", xn, xn).astype(jnp.float32)
    e = jnp.exp(tau * s - jnp.abs(tau) * norm)
    return e, e.sum(-1, keepdims=True), xn


def _apply(e, rowsum, y):
    """softmax-weighted sum: (E y) / rowsum, in y's dtype."""
    out = jnp.einsum("bhnm,bhmk->bhnk", e.astype(y.dtype), y)
    return out / jnp.maximum(rowsum, 1e-30).astype(y.dtype)


def self_self_attention(q, k, v, inv_temp, ss_attn_iter=1, branches=BRANCHES, *,
                        impl: str = "einsum", heads_per_step: int = 0):
    """GEM's attention output for one block.  q,k,v [B,H,N,K], inv_temp [B] → [B,H,N,K].

    impl "einsum": explicit products with a max-free softmax (see `_ss_exp`); "xla"/"cudnn":
    jax.nn.dot_product_attention with τ folded into the query (scale 1).
    heads_per_step > 0 loops over groups of heads so each N×N matrix stays in cache.
    """
    branches = check_branches(branches)
    h = q.shape[1]
    if heads_per_step and heads_per_step < h:
        if h % heads_per_step:
            raise ValueError(f"heads_per_step={heads_per_step} does not divide {h} heads")
        split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], h // heads_per_step, heads_per_step,
                                                 *x.shape[2:]), 1, 0)
        out = jax.lax.map(lambda a: self_self_attention(*a, inv_temp, ss_attn_iter, branches,
                                                        impl=impl), (split(q), split(k), split(v)))
        return jnp.moveaxis(out, 0, 1).reshape(q.shape)
    src = dict(q=q, k=k, v=v)
    if impl != "einsum":
        tau = jnp.reshape(inv_temp, jnp.shape(inv_temp) + (1, 1, 1))

        def attend(x, values):
            xn = layers.l2_normalize(x)
            return layers.dot_product_attention((tau * xn).astype(xn.dtype), xn,
                                                xn if values is None else values, 1.0, impl)
        out = 0.0
        for name in branches:
            x = jax.lax.fori_loop(0, ss_attn_iter, lambda _, x: attend(x, None), src[name])
            out = out + attend(x, v)
        return out / len(branches)

    def refine(_, x):
        e, r, xn = _ss_exp(x, inv_temp)
        return _apply(e, r, xn)

    out = 0.0
    for name in branches:
        x = jax.lax.fori_loop(0, ss_attn_iter, refine, src[name])
        e, r, _ = _ss_exp(x, inv_temp)
        out = out + _apply(e, r, v)
    return out / len(branches)


def check_depth(gem_depth, layers_: int):
    """Concrete depths are validated here; traced ones are clamped into range by `encode`."""
    if isinstance(gem_depth, (int, np.integer)) and not 2 <= gem_depth <= layers_ + 1:
        raise ValueError(f"gem_depth must be in [2, {layers_ + 1}] for a {layers_}-layer tower "
                         f"(GEM modifies the last gem_depth-1 blocks), got {gem_depth}")


def encode(p, cfg: VisionConfig, pixels, *, gem_depth=7, ss_attn_iter=1, ss_attn_temp=None,
           branches=BRANCHES, with_ori: bool = True, ex: layers.Execution = layers.DEFAULT):
    """Both token streams of the image tower.

    Returns (gem_tokens, ori_tokens), each [B, 1+N, E] after LN_post and the projection;
    ori_tokens is None when `with_ori` is False (the last block's attention output and MLP on the
    original stream are then skipped: GEM only needs that block's q, k, v).
    `ss_attn_temp` None means adaptive; otherwise a scalar (or [B]) inverse temperature.
    """
    branches = check_branches(branches)
    n_layers = cfg.layers
    check_depth(gem_depth, n_layers)
    if isinstance(gem_depth, (int, np.integer)):
        start = n_layers - (int(gem_depth) - 1)  # static bounds: the loops lower to scans
    else:
        start = n_layers - (jnp.clip(gem_depth, 2, n_layers + 1) - 1)
    blocks = p["blocks"]
    x = vision.embed(p, cfg, pixels, ex.jnp_dtype)
    ex = ex.resolve(x.shape[0], x.shape[1], cfg.heads)

    def plain(i, x):
        return layers.block(layers.layer(blocks, i), x, cfg.act, cfg.ln_eps, impl=ex.attention)

    def gem_step(i, carry, finish=True):
        x, xg = carry
        bp = layers.layer(blocks, i)
        h, q, k, v = layers.block_qkv(bp, x, cfg.ln_eps)
        tau = adaptive_inv_temp(h, cfg.head_dim) if ss_attn_temp is None else ss_attn_temp
        o = self_self_attention(q, k, v, tau, ss_attn_iter, branches, impl=ex.attention,
                                heads_per_step=ex.heads_per_step)
        xg = xg + layers.out_proj(bp, o)
        if finish:
            x = layers.block_finish(bp, x, q, k, v, cfg.act, cfg.ln_eps, impl=ex.attention)
        return x, xg

    x = jax.lax.fori_loop(0, start, plain, x)
    # The GEM stream starts from the input of the first GEM block.
    x, xg = jax.lax.fori_loop(start, n_layers - 1, gem_step, (x, x))
    x, xg = gem_step(n_layers - 1, (x, xg), finish=with_ori)
    gem_tokens = vision.head(p, cfg, xg)
    return gem_tokens, (vision.head(p, cfg, x) if with_ori else None)


# ----------------------------------------------------------------------------- maps
def patch_similarity(tokens, text_emb, grid: tuple[int, int]):
    """Cosine similarity of patch tokens with text embeddings.

    tokens [B, 1+N, E] (class token first), text_emb [P, E] → [B, P, gh, gw].
    """
    img = layers.l2_normalize(tokens[:, 1:].astype(jnp.float32))
    txt = layers.l2_normalize(text_emb.astype(jnp.float32))
    s = jnp.einsum("bne,pe->bpn", img, txt, precision=jax.lax.Precision.HIGHEST)
    return s.reshape(s.shape[:2] + tuple(grid))


def upsample(maps, out_hw: tuple[int, int]):
    """Bilinear (align_corners=False) resize of [..., gh, gw] maps to out_hw, as torch."""
    return resize(maps, tuple(out_hw), "bilinear")


def min_max(maps):
    """Per-map (last two axes) min-max normalization; a constant map becomes zeros, never NaN."""
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    rng = hi - lo
    return jnp.where(rng > 0, (maps - lo) / jnp.where(rng > 0, rng, 1.0), 0.0)


def heatmaps(tokens, text_emb, grid, out_hw, normalize: bool = True):
    """GEM heatmaps [B, P, H, W] from image tokens and text embeddings."""
    m = upsample(patch_similarity(tokens, text_emb, grid), out_hw)
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
