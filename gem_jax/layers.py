"""Transformer building blocks shared by both CLIP towers, as pure functions of dict params.

Axes, named once:  B batch · N tokens · D width · H heads · K head_dim · M mlp width · L layers.

A residual block is split in two so callers (GEM) can use the block's intermediate values as data:

    h, q, k, v = block_qkv(p, x, dtype)   # h = LN1(x); q, k, v [B, H, N, K]
    x_out      = block_finish(p, x, q, k, v, mask)
        = x + out(softmax(q kᵀ/√K + mask) v)  then  + MLP(LN2(·))

Precision, whatever the compute dtype c (float32, or bfloat16/float16 for speed):
  - the residual streams x are float32 (`acc_dtype(c)`): each block adds a small update to a
    large stream, and rounding the stream to bf16 (8 bits of mantissa) after every block is the
    largest error of a naive half-precision tower;
  - matmul/einsum *operands* are in c (LN outputs, q, k, v, attention probabilities, MLP hidden
    activations) and every product accumulates in float32 (`preferred_element_type`);
  - projections (`linear`) return their float32 accumulator plus bias; LayerNorm statistics,
    activations and softmax are computed in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = dict[str, Any]

ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
MATMUL_PRECISIONS = (None, "default", "high", "highest")


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
    dtype: the matmul-operand dtype; accumulation, residual streams, LayerNorm statistics,
        activations and softmax stay in float32 (see the module docstring).
    data_parallel: with several devices, shard the batch over all of them (params replicated).
    precision: the image tower's matmul precision (`jax.default_matmul_precision` while it is
        traced): None follows JAX's setting, whose default runs float32 products as TF32 on
        NVIDIA GPUs and as one bf16 pass on TPUs (measured on an H200: maps 1.6e-3..2.6e-3 from
        gem_torch, normalized); "highest" computes true float32 products, as gem_torch does
        (4.1e-7 raw there); "high", "default" as in JAX.  CPUs compute float32 either way.
    """
    attention: str = "einsum"
    heads_per_step: int = 0
    microbatch: int = 0
    dtype: str = "float32"
    data_parallel: bool = True
    cache_bytes: int = 16 << 20
    precision: str | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or float64, "
                             f"got {self.dtype!r}")
        if self.precision not in MATMUL_PRECISIONS:
            raise ValueError(f"precision must be one of {MATMUL_PRECISIONS}, "
                             f"got {self.precision!r}")
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


def matmul_precision(precision: str | None):
    """The context that traces matmuls at `precision` (None: JAX's own setting, unchanged)."""
    return contextlib.nullcontext() if precision is None else \
        jax.default_matmul_precision(precision)


def acc_dtype(dtype):
    """The accumulation dtype for a compute dtype: float32, or float64 when computing in float64
    (the finite-difference gradient checks run in float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def layer_norm(x, p, eps: float = 1e-5, dtype=None):
    """LayerNorm over the last axis (biased variance, as torch), statistics in float32; the
    result in `dtype` (default x's: a compute dtype where it feeds a matmul)."""
    xf = x.astype(acc_dtype(x.dtype))
    mu = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mu).mean(-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(xf.dtype) + p["bias"].astype(xf.dtype)).astype(dtype or x.dtype)


def activation(x, kind: str):
    if kind == "quick_gelu":  # OpenAI CLIP: x·σ(1.702x)
        return x * jax.nn.sigmoid(1.702 * x)
    if kind == "gelu":  # exact erf GELU, as torch.nn.GELU() and HF "gelu"
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {kind!r}")


def einsum(eq: str, a, b):
    """einsum accumulating in float32 (float64 for float64 inputs), result in a's dtype.

    In bfloat16 this is what makes half precision both exact enough and fast: XLA's CPU and GPU
    kernels take bf16 operands with an f32 accumulator (`preferred_element_type`)."""
    return jnp.einsum(eq, a, b, preferred_element_type=acc_dtype(a.dtype)).astype(a.dtype)


# ----------------------------------------------------------------------------- dense layers
# Every learned projection goes through `linear`, the one place a user can intercept (LoRA,
# quantization, logging): see `intercept_linear`.
_INTERCEPTORS = threading.local()


def _default_linear(name: str, x, w: Params, eq: str):
    acc = acc_dtype(x.dtype)
    y = jnp.einsum(eq, x, w["kernel"].astype(x.dtype), preferred_element_type=acc)
    return y + w["bias"].astype(acc) if "bias" in w else y


def linear(name: str, x, w: Params, eq: str):
    """y = einsum(eq, x, w["kernel"]) + w["bias"] — unless an interceptor is installed.

    The kernel is cast to x's (compute) dtype; y is the float32 accumulator plus the bias
    (float64 for float64 x): callers cast it where it feeds the next matmul.

    `name` says which projection this is: "patch_embed", "attn.qkv", "attn.out", "mlp.fc1",
    "mlp.fc2" or "proj", and `w` is that layer's param dict (one layer's slice of the stacked
    block params), which may hold extra entries (e.g. LoRA factors) that only an interceptor uses.
    """
    stack = getattr(_INTERCEPTORS, "stack", ())
    fn = _default_linear
    for f in stack:  # innermost (last installed) is called first and may call `next_fn`
        fn = (lambda f, nxt: lambda *a: f(nxt, *a))(f, fn)
    return fn(name, x, w, eq)


@contextlib.contextmanager
def intercept_linear(fn: Callable):
    """Within the block, every projection calls `fn(next_fn, name, x, w, eq)` instead of the default
    `next_fn(name, x, w, eq)`.  Interception happens when a function is traced: wrap the call (or
    the first call of your own jitted function) in the context; a jit cache entry traced outside
    it is not re-traced.  LoRA on the MLP, with factors stored beside the kernels in the param
    tree (stacked over layers like every block param, so each layer sees its own slice):

        def lora(next_fn, name, x, w, eq):
            y = next_fn(name, x, w, eq)
            if "lora_a" in w:              # lora_a [D, r], lora_b [r, M] in this layer
                y = y + (x @ w["lora_a"]) @ w["lora_b"]
            return y

        with gem_jax.layers.intercept_linear(lora):
            maps = gem_jax.heatmaps_fn(params_with_lora, pixels, emb, cfg=cfg)
    """
    stack = getattr(_INTERCEPTORS, "stack", ())
    _INTERCEPTORS.stack = stack + (fn,)
    try:
        yield
    finally:
        _INTERCEPTORS.stack = stack


def interceptors() -> tuple:
    """The installed linear interceptors (a hashable tuple: part of our jitted functions' cache
    keys, so a function traced without an interceptor is never reused under one)."""
    return getattr(_INTERCEPTORS, "stack", ())


def dense(x, p, name: str = "dense"):
    return linear(name, x, p, "...d,dm->...m")


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / max(‖x‖, eps), as torch.nn.functional.normalize (norm accumulated in float32)."""
    n = jnp.linalg.norm(x.astype(acc_dtype(x.dtype)), axis=axis, keepdims=True)
    return (x / jnp.maximum(n, eps).astype(x.dtype))


def block_qkv(p: Params, x, eps: float = 1e-5, dtype=None):
    """h = LN1(x) and the attention projections of h, in the compute dtype (default x's).
    x [B,N,D] → h [B,N,D], q,k,v [B,H,N,K]."""
    dtype = dtype or x.dtype
    h = layer_norm(x, p["ln1"], eps, dtype)
    # kernel [3, D, H, K], bias [3, H, K]; broadcast the bias over batch and tokens.
    w = p["attn"]["qkv"]
    wb = dict(w, bias=w["bias"][:, None, :, None, :])
    qkv = linear("attn.qkv", h, wb, "bnd,tdhk->tbhnk").astype(dtype)
    return h, qkv[0], qkv[1], qkv[2]


def dot_product_attention(q, k, v, scale: float, impl: str):
    """softmax(scale · q kᵀ) v through jax.nn.dot_product_attention.  q,k,v [B,H,N,K]."""
    t = lambda x: jnp.swapaxes(x, 1, 2)  # its layout is [B, N, H, K]
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), scale=scale, implementation=impl))


def attention(q, k, v, mask=None, impl: str = "einsum"):
    """softmax(q kᵀ / √K + mask) v; scores and softmax in float32.  q,k,v [B,H,N,K] → [B,H,N,K]."""
    if impl != "einsum" and mask is None:
        return dot_product_attention(q, k, v, q.shape[-1] ** -0.5, impl)
    s = jnp.einsum("bhnk,bhmk->bhnm", q * (q.shape[-1] ** -0.5), k,
                   preferred_element_type=acc_dtype(q.dtype))
    if mask is not None:
        s = s + mask
    a = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return einsum("bhnm,bhmk->bhnk", a, v)


def out_proj(p: Params, o):
    """Merge heads and project: o [B,H,N,K] → [B,N,D]."""
    return linear("attn.out", o, p["attn"]["out"], "bhnk,hkd->bnd")


def mlp(p: Params, x, act: str):
    """fc2(act(fc1(x))): x in the compute dtype; the activation in float32, cast back to x's
    dtype for fc2; the result is fc2's float32 accumulator."""
    return dense(activation(dense(x, p["fc1"], "mlp.fc1"), act).astype(x.dtype), p["fc2"],
                 "mlp.fc2")


def residual_mlp(p: Params, x, o, act: str, eps: float = 1e-5, dtype=None):
    """The tail of a pre-LN block on an attention output o: y = x + o; y + MLP(LN2(y)), the MLP's
    operands in `dtype` (default x's)."""
    y = x + o
    return y + mlp(p["mlp"], layer_norm(y, p["ln2"], eps, dtype or x.dtype), act)


def block_finish(p: Params, x, q, k, v, act: str, eps: float = 1e-5, mask=None,
                 impl: str = "einsum"):
    """The rest of a pre-LN residual block, given its q, k, v (in the compute dtype)."""
    return residual_mlp(p, x, out_proj(p, attention(q, k, v, mask, impl)), act, eps, q.dtype)


def block(p: Params, x, act: str, eps: float = 1e-5, mask=None, impl: str = "einsum",
          dtype=None):
    _, q, k, v = block_qkv(p, x, eps, dtype)
    return block_finish(p, x, q, k, v, act, eps, mask, impl)


def layer(stacked: Params, i):
    """Parameters of layer i from the stacked [L, ...] block params (i may be traced)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stacked)
