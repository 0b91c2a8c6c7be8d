"""CLIP ViT image tower as pure functions:  `encode(params["vision"], cfg.vision, pixels)`.

pixels are NHWC float32 [B, H, W, 3], already normalized.  Any H, W ≥ patch size works: the patch
grid is (H // P, W // P) (trailing pixels dropped, as a stride-P convolution does) and the learned
positional embedding is resampled to it with torch's antialiased bicubic arithmetic.

    x = LN_pre([cls; patches·W_patch] + pos)        [B, 1+N, D]
    x = blocks(x)                                   gem_jax.tower.run (lax.scan over L)
    tokens = LN_post(x) · proj                      [B, 1+N, E]   (every token: GEM needs patches)
    pooled = tokens[:, 0]                           what CLIP calls the image embedding
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import layers, tower
from .config import VisionConfig
from .resample import pos_embed_by_size, pos_embed_scale_factor, resample_pos_embed


def patch_grid(cfg: VisionConfig, height: int, width: int) -> tuple[int, int]:
    p = cfg.patch_size
    if height < p or width < p:
        raise ValueError(f"image of {height}x{width} pixels is smaller than one {p}x{p} patch")
    return height // p, width // p


POS_EMBED_MODES = {
    "antialias": resample_pos_embed,          # GEM / open_clip: antialiased bicubic
    "scale_factor": pos_embed_scale_factor,   # SCLIP, ClearCLIP, NACLIP: bicubic, scale (g+0.1)/s
    "bilinear": lambda pe, g, n: pos_embed_by_size(pe, g, n, "bilinear"),          # CLIP Surgery
    "mmseg": lambda pe, g, n: pos_embed_by_size(pe, g, n, "bicubic", same_count=True),  # MaskCLIP
}


def pos_embed(p, cfg: VisionConfig, grid: tuple[int, int], mode: str = "antialias"):
    """The positional embedding for a patch grid: [1 + gh*gw, D].  `mode` names how a learned
    grid is resampled to another (methods differ: GEM/open_clip antialiased bicubic, ...)."""
    if mode not in POS_EMBED_MODES:
        raise ValueError(f"unknown positional-embedding resampling {mode!r}; "
                         f"known: {', '.join(POS_EMBED_MODES)}")
    return POS_EMBED_MODES[mode](p["pos_embed"], grid, (cfg.grid, cfg.grid))


def embed(p, cfg: VisionConfig, pixels, dtype=None, pos_mode: str = "antialias"):
    """Patchify, prepend the class token, add positions, LN_pre.  → the residual stream
    [B, 1+N, D] in float32 (`layers.acc_dtype`); the patch matmul's operands in `dtype`
    (default: the pixels' dtype)."""
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be NHWC [B, H, W, 3], got shape {tuple(pixels.shape)}")
    if dtype is not None:
        pixels = pixels.astype(dtype)
    b, hh, ww, _ = pixels.shape
    gh, gw = patch_grid(cfg, hh, ww)
    ps = cfg.patch_size
    x = pixels[:, : gh * ps, : gw * ps, :].reshape(b, gh, ps, gw, ps, 3)
    # A stride-P convolution is a matmul over (row-in-patch, col-in-patch, channel).
    x = layers.linear("patch_embed", x, {"kernel": p["patch_embed"]}, "bhpwqc,pqcd->bhwd")
    x = x.reshape(b, gh * gw, -1)                     # the float32 accumulator: the stream's dtype
    cls = jnp.broadcast_to(p["cls"].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + pos_embed(p, cfg, (gh, gw), pos_mode).astype(x.dtype)
    return layers.layer_norm(x, p["ln_pre"], cfg.ln_eps)


def head(p, cfg: VisionConfig, x):
    """LN_post then projection, on every token.  [B, 1+N, D] → [B, 1+N, E], in float32 (float64
    for a float64 stream) whatever the compute dtype: the projection is < 1% of the tower's FLOPs,
    and rounding its input to bf16 was the largest single error of bf16 heatmaps (max |Δ| of the
    normalized maps 0.021 → 0.010 on an attention-dominant ViT-B/16)."""
    acc = layers.acc_dtype(x.dtype)
    return layers.linear("proj", layers.layer_norm(x.astype(acc), p["ln_post"], cfg.ln_eps),
                         {"kernel": p["proj"]}, "bnd,de->bne")


def encode(p, cfg: VisionConfig, pixels, *, method=None, knobs=None, with_ori: bool = True,
           return_blocks: bool = False, ex: layers.Execution = layers.DEFAULT):
    """Run the tower (see `_encode`) at the matmul precision of `ex.precision`."""
    with layers.matmul_precision(ex.precision):
        return _encode(p, cfg, pixels, method=method, knobs=knobs, with_ori=with_ori,
                       return_blocks=return_blocks, ex=ex)


def _encode(p, cfg: VisionConfig, pixels, *, method, knobs, with_ori: bool, return_blocks: bool,
            ex: layers.Execution):
    """Run the tower, with an optional dense method (GEM, ...) beside the original stream.

    Returns a dict: tokens [B,1+N,E] (LN_post + proj of every original token), pooled [B,E]
    (= tokens[:, 0], CLIP's image embedding), hidden [B,1+N,D] (last block output); with a
    method, dense [B,1+N,E] (its stream through LN_post + proj; NaN where its traced knobs are
    out of range), and without `with_ori` no original tokens (the last block's attention output
    and MLP are skipped: the methods only need that block's q, k, v).  With `return_blocks`,
    blocks = the per-block values methods consume, stacked over layers: x (block input)
    [L,B,1+N,D], h (= LN1(x)) [L,B,1+N,D], q, k, v [L,B,H,1+N,K].
    """
    if hasattr(method, "for_grid"):  # methods that depend on the patch grid (NACLIP's Ω)
        method = method.for_grid(patch_grid(cfg, pixels.shape[1], pixels.shape[2]))
    x = embed(p, cfg, pixels, ex.jnp_dtype, getattr(method, "pos_embed", "antialias"))
    with_ori = with_ori or getattr(method, "needs_ori", False)
    finish_last = with_ori or method is None
    x, s, blocks = tower.run(p["blocks"], x, cfg, impl=ex.attention, method=method, knobs=knobs,
                             ex=ex, collect=return_blocks, finish_last=finish_last,
                             dtype=ex.jnp_dtype)
    out = {}
    if finish_last:
        out["tokens"] = head(p, cfg, x)
        out["pooled"] = out["tokens"][:, 0]
        out["hidden"] = x
    if method is not None:
        dense = head(p, cfg, s)
        if hasattr(method, "finish"):
            dense = method.finish(dense, out["tokens"])
        ok = method.valid(cfg.layers, knobs)
        out["dense"] = jnp.where(jnp.reshape(ok, jnp.shape(ok) + (1,) * (3 - jnp.ndim(ok))),
                                 dense, jnp.nan)
    if return_blocks:
        out["blocks"] = blocks
    return out
