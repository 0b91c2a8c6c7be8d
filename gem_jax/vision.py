"""CLIP ViT image tower as pure functions:  `encode(params["vision"], cfg.vision, pixels)`.

pixels are NHWC float32 [B, H, W, 3], already normalized.  Any H, W ≥ patch size works: the patch
grid is (H // P, W // P) (trailing pixels dropped, as a stride-P convolution does) and the learned
positional embedding is resampled to it with torch's antialiased bicubic arithmetic.

    x = LN_pre([cls; patches·W_patch] + pos)        [B, 1+N, D]
    x = blocks(x)                                   lax.scan over L
    tokens = LN_post(x) · proj                      [B, 1+N, E]   (every token: GEM needs patches)
    pooled = tokens[:, 0]                           what CLIP calls the image embedding
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import layers
from .config import VisionConfig
from .resample import resample_pos_embed


def patch_grid(cfg: VisionConfig, height: int, width: int) -> tuple[int, int]:
    p = cfg.patch_size
    if height < p or width < p:
        raise ValueError(f"image of {height}x{width} pixels is smaller than one {p}x{p} patch")
    return height // p, width // p


def pos_embed(p, cfg: VisionConfig, grid: tuple[int, int]):
    """The positional embedding for a patch grid: [1 + gh*gw, D]."""
    return resample_pos_embed(p["pos_embed"], grid, (cfg.grid, cfg.grid))


def embed(p, cfg: VisionConfig, pixels, dtype=None):
    """Patchify, prepend the class token, add positions, LN_pre.  → [B, 1+N, D] in `dtype`
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
    x = jnp.einsum("bhpwqc,pqcd->bhwd", x, p["patch_embed"].astype(x.dtype)).reshape(b, gh * gw, -1)
    cls = jnp.broadcast_to(p["cls"].astype(x.dtype), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + pos_embed(p, cfg, (gh, gw)).astype(x.dtype)
    return layers.layer_norm(x, p["ln_pre"], cfg.ln_eps)


def head(p, cfg: VisionConfig, x):
    """LN_post then projection, on every token.  [B, 1+N, D] → [B, 1+N, E]."""
    return layers.layer_norm(x, p["ln_post"], cfg.ln_eps) @ p["proj"].astype(x.dtype)


def encode(p, cfg: VisionConfig, pixels, *, return_blocks: bool = False,
           ex: layers.Execution = layers.DEFAULT):
    """Run the tower.  Returns a dict:

    tokens [B,1+N,E] (LN_post + proj of every token), pooled [B,E] (= tokens[:, 0]),
    hidden [B,1+N,D] (last block output), and with `return_blocks` the per-block
    values GEM-style methods consume, stacked over layers: x (block input) [L,B,1+N,D],
    h (= LN1(x)) [L,B,1+N,D], q, k, v [L,B,H,1+N,K].
    """
    x = embed(p, cfg, pixels, ex.jnp_dtype)

    def body(x, bp):
        h, q, k, v = layers.block_qkv(bp, x, cfg.ln_eps)
        out = layers.block_finish(bp, x, q, k, v, cfg.act, cfg.ln_eps, impl=ex.attention)
        return out, (dict(x=x, h=h, q=q, k=k, v=v) if return_blocks else None)

    x, blocks = jax.lax.scan(body, x, p["blocks"])
    tokens = head(p, cfg, x)
    out = dict(tokens=tokens, pooled=tokens[:, 0], hidden=x)
    if return_blocks:
        out["blocks"] = blocks
    return out
