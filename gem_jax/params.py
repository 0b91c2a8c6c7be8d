"""The parameter layout (a plain nested dict) and a random initializer.

Names are flat and stable (big_vision style); per-layer tensors are stacked on a leading L axis
so the towers can `lax.scan` over them.

    vision: patch_embed [P,P,3,D] · cls [D] · pos_embed [1+G², D] · ln_pre · blocks · ln_post · proj [D,E]
    text:   token_embed [V,W] · pos_embed [C,W] · blocks · ln_final · proj [W,E]
    blocks: ln1, attn.qkv.kernel [L,3,D,H,K], attn.qkv.bias [L,3,H,K], attn.out.kernel [L,H,K,D],
            attn.out.bias [L,D], ln2, mlp.fc1 [L,D,M]+[L,M], mlp.fc2 [L,M,D]+[L,D]
    logit_scale []  (log of the CLIP temperature, as stored by both HF and OpenCLIP)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import CLIPConfig


def _ln(*lead, d):
    return {"scale": (*lead, d), "bias": (*lead, d)}


def _blocks(L, d, h, m):
    k = d // h
    return {
        "ln1": _ln(L, d=d),
        "attn": {"qkv": {"kernel": (L, 3, d, h, k), "bias": (L, 3, h, k)},
                 "out": {"kernel": (L, h, k, d), "bias": (L, d)}},
        "ln2": _ln(L, d=d),
        "mlp": {"fc1": {"kernel": (L, d, m), "bias": (L, m)},
                "fc2": {"kernel": (L, m, d), "bias": (L, d)}},
    }


def param_shapes(cfg: CLIPConfig) -> dict:
    """Nested dict of shape tuples; the single source of truth for the layout."""
    v, t, e = cfg.vision, cfg.text, cfg.embed_dim
    p = v.patch_size
    return {
        "vision": {
            "patch_embed": (p, p, 3, v.width),
            "cls": (v.width,),
            "pos_embed": (1 + v.grid * v.grid, v.width),
            "ln_pre": _ln(d=v.width),
            "blocks": _blocks(v.layers, v.width, v.heads, v.mlp_dim),
            "ln_post": _ln(d=v.width),
            "proj": (v.width, e),
        },
        "text": {
            "token_embed": (t.vocab_size, t.width),
            "pos_embed": (t.context_length, t.width),
            "blocks": _blocks(t.layers, t.width, t.heads, t.mlp_dim),
            "ln_final": _ln(d=t.width),
            "proj": (t.width, e),
        },
        "logit_scale": (),
    }


def is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def init_leaf(path: str, shape: tuple, key, dtype=jnp.float32):
    """One parameter with CLIP's initialization scale, from its path (e.g.
    "['vision']['blocks']['attn']['qkv']['kernel']"): LN at identity, zero biases."""
    if path.endswith("['scale']"):
        return jnp.ones(shape, dtype)
    if path.endswith("['bias']"):
        return jnp.zeros(shape, dtype)
    if path.endswith("['logit_scale']"):
        return jnp.asarray(np.log(1 / 0.07), dtype)
    fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
    if "qkv" in path:
        fan_in = shape[-3]
    std = 0.02 if ("embed" in path or "cls" in path) else fan_in ** -0.5
    return std * jax.random.normal(key, shape, dtype)


def init_tree(shapes, key: jax.Array, dtype=jnp.float32, prefix: str = "") -> dict:
    """Random parameters for a (sub)tree of shapes; `prefix` is its path in the full tree."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)
    keys = jax.random.split(key, max(len(flat), 1))
    out = [init_leaf(prefix + jax.tree_util.keystr(pth), shape, k, dtype)
           for (pth, shape), k in zip(flat, keys)]
    return jax.tree.unflatten(treedef, out)


def init(cfg: CLIPConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Random parameters with CLIP's initialization scales (LN at identity, zero biases)."""
    return init_tree(param_shapes(cfg), key, dtype)
