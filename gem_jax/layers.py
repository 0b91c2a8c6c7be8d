"""Transformer building blocks shared by both CLIP towers, as pure functions of dict params.

Axes, named once:  B batch · N tokens · D width · H heads · K head_dim · M mlp width · L layers.

A residual block is split in two so callers (GEM) can use the block's intermediate values as data:

    h, q, k, v = block_qkv(p, x)          # h = LN1(x); q, k, v [B, H, N, K]
    x_out      = block_finish(p, x, q, k, v, mask)
        = x + out(softmax(q kᵀ/√K + mask) v)  then  + MLP(LN2(·))

LayerNorm statistics and softmax are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]

ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


@dataclass(frozen=True)
class Execution:
    """How to run (never what is computed); a static, hashable argument of the jitted functions.

    attention: "einsum" (explicit products, softmax in float32), or "xla" / "cudnn" through
        `jax.nn.dot_product_attention` (cuDNN flash attention on NVIDIA GPUs; needs bf16/fp16).
    heads_per_step: 0 runs all heads of GEM's self-self attention at once; k > 0 loops over groups
        of k heads (lax.map), keeping each N×N score matrix in cache (2x faster on CPU at 448 px);
        -1 chooses from the input size (one head at a time when all heads' scores exceed
        `cache_bytes`).
    microbatch: 0 runs the whole batch at once; k > 0 loops over chunks of k images (lax.map);
        -1 chooses the largest chunk whose attention scores fit in `cache_bytes`.
    dtype: compute dtype; LayerNorm statistics and softmax stay in float32.
    data_parallel: with several devices, shard the batch over all of them (params replicated).
    """
    attention: str = "einsum"
    heads_per_step: int = 0
    microbatch: int = 0
    dtype: str = "float32"
    data_parallel: bool = True
    cache_bytes: int = 16 << 20

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.heads_per_step < -1 or self.microbatch < -1:
            raise ValueError("heads_per_step and microbatch must be >= 0, or -1 for automatic")

    @classmethod
    def auto(cls, dtype: str = "float32", backend: str | None = None) -> "Execution":
        """CPU: chunk images and heads so attention matrices stay in cache (resolved per input
        size).  Accelerators: whole batch, all heads; cuDNN attention in half precision."""
        backend = backend or jax.default_backend()
        if backend == "cpu":
            return cls(heads_per_step=-1, microbatch=-1, dtype=dtype)
        fast = backend == "gpu" and dtype in ("bfloat16", "float16")
        return cls(attention="cudnn" if fast else "einsum", dtype=dtype)

    def resolve(self, batch: int, tokens: int, heads: int) -> "Execution":
        """Concrete chunk sizes for this input (shapes are static under jit)."""
        scores = heads * tokens * tokens * 4  # bytes of one image's attention scores, all heads
        hps, mb = self.heads_per_step, self.microbatch
        if hps == -1:
            hps = 1 if scores > self.cache_bytes else 0
        if mb == -1:
            mb = 1 if hps else max(1, min(batch, self.cache_bytes // scores))
        return dataclasses.replace(self, heads_per_step=hps, microbatch=mb)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)


DEFAULT = Execution()


def layer_norm(x, p, eps: float = 1e-5):
    """LayerNorm over the last axis (biased variance, as torch), statistics in float32."""
    xf = x.astype(jnp.float32)
    mu = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mu).mean(-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)).astype(x.dtype)


def activation(x, kind: str):
    if kind == "quick_gelu":  # OpenAI CLIP: x·σ(1.702x)
        return x * jax.nn.sigmoid(1.702 * x)
    if kind == "gelu":  # exact erf GELU, as torch.nn.GELU() and HF "gelu"
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {kind!r}")


def dense(x, p):
    y = x @ p["kernel"].astype(x.dtype)
    return y + p["bias"].astype(x.dtype) if "bias" in p else y


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / max(‖x‖, eps), as torch.nn.functional.normalize."""
    n = jnp.linalg.norm(x.astype(jnp.float32), axis=axis, keepdims=True)
    return (x / jnp.maximum(n, eps).astype(x.dtype))


def block_qkv(p: Params, x, eps: float = 1e-5):
    """h = LN1(x) and the attention projections of h.  x [B,N,D] → h [B,N,D], q,k,v [B,H,N,K]."""
    h = layer_norm(x, p["ln1"], eps)
    w = p["attn"]["qkv"]  # kernel [3, D, H, K], bias [3, H, K]
    qkv = jnp.einsum("bnd,tdhk->tbhnk", h, w["kernel"].astype(h.dtype))
    qkv = qkv + w["bias"].astype(h.dtype)[:, None, :, None, :]
    return h, qkv[0], qkv[1], qkv[2]


def dot_product_attention(q, k, v, scale: float, impl: str):
    """softmax(scale · q kᵀ) v through jax.nn.dot_product_attention.  q,k,v [B,H,N,K]."""
    t = lambda x: jnp.swapaxes(x, 1, 2)  # its layout is [B, N, H, K]
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), scale=scale, implementation=impl))


def attention(q, k, v, mask=None, impl: str = "einsum"):
    """softmax(q kᵀ / √K + mask) v, softmax in float32.  q,k,v [B,H,N,K] → [B,H,N,K]."""
    if impl != "einsum" and mask is None:
        return dot_product_attention(q, k, v, q.shape[-1] ** -0.5, impl)
    s = jnp.einsum("bhnk,bhmk->bhnm", q * (q.shape[-1] ** -0.5), k).astype(jnp.float32)
    if mask is not None:
        s = s + mask
    a = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhnm,bhmk->bhnk", a, v)


def out_proj(p: Params, o):
    """Merge heads and project: o [B,H,N,K] → [B,N,D]."""
    w = p["attn"]["out"]  # kernel [H, K, D], bias [D]
    return jnp.einsum("bhnk,hkd->bnd", o, w["kernel"].astype(o.dtype)) + w["bias"].astype(o.dtype)


def mlp(p: Params, x, act: str):
    return dense(activation(dense(x, p["fc1"]), act), p["fc2"])


def block_finish(p: Params, x, q, k, v, act: str, eps: float = 1e-5, mask=None,
                 impl: str = "einsum"):
    """The rest of a pre-LN residual block, given its q, k, v."""
    x = x + out_proj(p, attention(q, k, v, mask, impl))
    return x + mlp(p["mlp"], layer_norm(x, p["ln2"], eps), act)


def block(p: Params, x, act: str, eps: float = 1e-5, mask=None, impl: str = "einsum"):
    _, q, k, v = block_qkv(p, x, eps)
    return block_finish(p, x, q, k, v, act, eps, mask, impl)


def layer(stacked: Params, i):
    """Parameters of layer i from the stacked [L, ...] block params (i may be traced)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)


def run_blocks(stacked: Params, x, act: str, eps: float = 1e-5, mask=None):
    """All blocks under lax.scan, so compile time does not grow with depth."""
    def body(x, p):
        return block(p, x, act, eps, mask), None
    x, _ = jax.lax.scan(body, x, stacked)
    return x
