"""CLIP text tower as pure functions:  `encode(params["text"], cfg.text, ids)`.

ids are int [T, C] (C ≤ context_length), as produced by `gem_jax.tokenizer.CLIPTokenizer`.

    x = tok[ids] + pos[:C];  x = blocks(x, causal mask);  x = LN_final(x)
    pooled = x[t, eot_t] · proj        eot_t = argmax(ids) (OpenCLIP) or first eos (HF)
"""

from __future__ import annotations

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


def encode(p, cfg: TextConfig, ids, *, return_tokens: bool = False):
    """Projected text embeddings [T, E] (not normalized); with return_tokens also LN_final(x)."""
    if ids.ndim != 2:
        raise ValueError(f"token ids must be [T, C], got shape {tuple(ids.shape)}")
    c = ids.shape[1]
    if c > cfg.context_length:
        raise ValueError(f"{c} tokens exceed the text context length {cfg.context_length}")
    x = p["token_embed"][ids] + p["pos_embed"][:c]
    x, _, _ = tower.run(p["blocks"], x, cfg, mask=causal_mask(c))
    x = layers.layer_norm(x, p["ln_final"], cfg.ln_eps)
    pooled = layers.linear("proj", x[jnp.arange(x.shape[0]), eot_index(cfg, ids)],
                           {"kernel": p["proj"]}, "td,de->te")
    return (pooled, x) if return_tokens else pooled
