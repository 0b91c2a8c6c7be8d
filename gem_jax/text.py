"""CLIP text tower as pure functions:  `encode(params["text"], cfg.text, ids)`.

ids are int [T, C] (C ≤ context_length), as produced by `gem_jax.tokenizer.CLIPTokenizer`.

    x = tok[ids] + pos[:C];  x = blocks(x, causal mask);  x = LN_final(x)
    pooled = x[t, eot_t] · proj        eot_t = argmax(ids) (OpenCLIP) or first eos (HF)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import layers, tower
from .config import TextConfig


def causal_mask(n: int):
    """Additive mask [N, N]: 0 on and below the diagonal, -inf above (as torch's triu mask)."""
    return jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -jnp.inf).astype(jnp.float32)


def eot_index(cfg: TextConfig, ids):
    if cfg.pooling == "argmax":
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == cfg.eos_token_id, axis=-1)  # first occurrence


def encode(p, cfg: TextConfig, ids, *, return_tokens: bool = False, dtype=None):
    """Projected text embeddings [T, E] (not normalized), float32; with return_tokens also
    LN_final(x).  dtype: the matmul operands' dtype, default float32 whatever the params' dtype
    (float64 for float64 params): prompts are encoded once and cached, the tower is ~1% of a
    448-px image's FLOPs, and bf16 text embeddings alone moved bf16 heatmaps by up to 4e-3
    (normalized, attention-dominant ViT-B/16 fixture at 448); pass jnp.bfloat16 to compute in
    bf16 anyway.  Float32 products are true float32 on every backend (matmul precision
    "highest": not TF32 or one bf16 pass on GPUs/TPUs), for the same reason."""
    with jax.default_matmul_precision("highest"):
        return _encode(p, cfg, ids, return_tokens=return_tokens, dtype=dtype)


def _encode(p, cfg: TextConfig, ids, *, return_tokens: bool, dtype):
    if ids.ndim != 2:
        raise ValueError(f"token ids must be [T, C], got shape {tuple(ids.shape)}")
    c = ids.shape[1]
    if c > cfg.context_length:
        raise ValueError(f"{c} tokens exceed the text context length {cfg.context_length}")
    x = p["token_embed"][ids] + p["pos_embed"][:c]
    acc = layers.acc_dtype(x.dtype)
    x, _, _ = tower.run(p["blocks"], x.astype(acc), cfg, mask=causal_mask(c), dtype=dtype or acc)
    x = layers.layer_norm(x, p["ln_final"], cfg.ln_eps)  # float32, as the vision head (why there)
    pooled = layers.linear("proj", x[jnp.arange(x.shape[0]), eot_index(cfg, ids)],
                           {"kernel": p["proj"]}, "td,de->te")
    return (pooled, x) if return_tokens else pooled
