r"""GEM, the Grounding Everything Module (Bousselham et al., CVPR 2024; walbouss/GEM, `gem_torch`).

Self-self attention of one block, for each enabled branch x ∈ {q, k, v} (per head, τ the inverse
temperature, x̂ = x / ‖x‖):

    repeat ss_attn_iter times:   x ← softmax(τ · x̂ x̂ᵀ) x̂
    out = mean_x( softmax(τ · x̂ x̂ᵀ) · v )

The GEM stream starts at the input of block L-(gem_depth-1) and, in each of the last gem_depth-1
blocks, adds out_proj(out): residual, no MLP.  q, k, v are the original stream's (LN1 of its
block input).  Adaptive τ = mean_n ‖LN1(x)_n‖ · K^-½ per image; or a fixed `ss_attn_temp`
(scalar or one per image).

Knobs (traced: sweeps and vmaps never recompile): gem_depth ∈ [2, L+1], ss_attn_iter ∈
[0, max_iter], ss_attn_temp.  Static: `branches`, `max_iter`, and adaptive-vs-fixed τ.  Traced
knobs out of range give NaN tokens, never a silently clamped result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import layers

BRANCHES = ("q", "k", "v")
MAX_SS_ATTN_TEMP = 1e6
MAX_ITER = 8  # default static bound of the traced iteration count (a masked loop of this length)


def check_branches(branches: Sequence[str]) -> tuple[str, ...]:
    b = tuple(branches)
    if not b or any(x not in BRANCHES for x in b) or len(set(b)) != len(b):
        raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {branches!r}")
    return b


def adaptive_inv_temp(h, head_dim: int):
    """Mean token norm of the block's normalized input × K^-½.  h [B,N,D] → [B]."""
    return jnp.linalg.norm(h.astype(layers.acc_dtype(h.dtype)), axis=-1).mean(-1) * head_dim ** -0.5


def _nonneg(inv_temp):
    """True when τ is known (at trace time) to be ≥ 0; None when only the runtime knows."""
    if isinstance(inv_temp, jax.core.Tracer):
        return None
    return bool(np.all(np.asarray(inv_temp) >= 0))


def _ss_exp(x, tau, nonneg):
    r"""Unnormalized self-self attention E = exp(τ·c − shift), its row sums, and x̂.

    c_ij = x̂_i·x̂_j / (‖x̂_i‖‖x̂_j‖) are the cosines of the rows as stored (in bf16, x̂ is not
    exactly unit), accumulated in float32, so c_ij ≤ 1 up to float32 rounding whatever the
    compute dtype.  For τ ≥ 0 the row maximum is therefore known without a pass over the N×N
    matrix: c_ii = 1 (or 0 for a zero row), shift_i = τ·[x̂_i ≠ 0].  For τ < 0 the shift is the
    true row maximum.  Either way nothing overflows and each row keeps a term exp(≈0), so
    softmax(τ x̂x̂ᵀ) = E / rowsum(E) exactly for every finite τ.
    x [B,H,N,K], τ [B] or scalar; `nonneg` True (fast path), or None (decided at run time).
    """
    acc = layers.acc_dtype(x.dtype)
    xn = layers.l2_normalize(x)
    if xn.dtype != acc:
        # One rounded x̂ for both its norms and its products: otherwise XLA may elide the
        # rounding on one side, and the cosines exceed 1 by ~2^-8 (exp overflows for large τ).
        xn = jax.lax.optimization_barrier(xn)
    tau = jnp.reshape(tau, jnp.shape(tau) + (1, 1, 1)).astype(acc)
    n = jnp.linalg.norm(xn.astype(acc), axis=-1, keepdims=True)            # [B,H,N,1]
    r = jnp.where(n > 0, 1 / jnp.where(n > 0, n, 1), 0)
    c = jnp.einsum("bhnk,bhmk->bhnm", xn, xn, preferred_element_type=acc)
    c = c * r * jnp.swapaxes(r, -1, -2)
    fast = lambda: tau * (n > 0)                                            # max-free
    exact = lambda: jnp.max(tau * c, axis=-1, keepdims=True)                # a max pass
    shift = fast() if nonneg else jax.lax.cond(jnp.all(tau >= 0), fast, exact)
    e = jnp.exp(tau * c - shift)
    return e, e.sum(-1, keepdims=True), xn


def _apply(e, rowsum, y):
    """softmax-weighted sum (E y) / rowsum, accumulated in float32, in y's dtype."""
    out = jnp.einsum("bhnm,bhmk->bhnk", e.astype(y.dtype), y,
                     preferred_element_type=rowsum.dtype)
    return (out / jnp.maximum(rowsum, 1e-30)).astype(y.dtype)


def _repeat(f, x, iters, max_iter: int):
    """x ← f(x), `iters` times: a Python loop for a concrete count; otherwise a fixed-length scan
    of `max_iter` steps, each applied only while step < iters (reverse-mode differentiable)."""
    if not isinstance(iters, jax.core.Tracer):
        for _ in range(int(iters)):
            x = f(x)
        return x
    def step(x, j):
        return jax.lax.cond(j < iters, f, lambda x: x, x), None
    return jax.lax.scan(step, x, jnp.arange(max_iter))[0]


def self_self_attention(q, k, v, inv_temp, ss_attn_iter=1, branches=BRANCHES, *,
                        impl: str = "einsum", heads_per_step: int = 0, max_iter: int = MAX_ITER,
                        nonneg: bool | None = None):
    """GEM's attention output for one block.  q,k,v [B,H,N,K], inv_temp [B] or scalar → [B,H,N,K].

    impl "einsum": explicit products with an exact, mostly max-free softmax (see `_ss_exp`);
    "xla"/"cudnn": jax.nn.dot_product_attention with τ folded into the query (scale 1).
    heads_per_step > 0 loops over groups of heads so each N×N matrix stays in cache.
    A traced `ss_attn_iter` runs as a masked loop of `max_iter` steps (values above it are the
    caller's to reject; `GEM.valid` turns them into NaN).  nonneg=True promises τ ≥ 0 (the
    adaptive τ is a norm) so the max-free softmax is used without a run-time test; by default it
    is decided from τ when τ is concrete, at run time otherwise.
    """
    branches = check_branches(branches)
    h = q.shape[1]
    if heads_per_step and heads_per_step < h:
        if h % heads_per_step:
            raise ValueError(f"heads_per_step={heads_per_step} does not divide {h} heads")
        split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], h // heads_per_step, heads_per_step,
                                                 *x.shape[2:]), 1, 0)
        out = jax.lax.map(lambda a: self_self_attention(*a, inv_temp, ss_attn_iter, branches,
                                                        impl=impl, max_iter=max_iter,
                                                        nonneg=nonneg),
                          (split(q), split(k), split(v)))
        return jnp.moveaxis(out, 0, 1).reshape(q.shape)
    src = dict(q=q, k=k, v=v)
    if impl != "einsum":
        tau = jnp.reshape(inv_temp, jnp.shape(inv_temp) + (1, 1, 1))

        def attend(x, values=None):
            xn = layers.l2_normalize(x)
            return layers.dot_product_attention((tau * xn).astype(xn.dtype), xn,
                                                xn if values is None else values, 1.0, impl)
    else:
        nonneg = nonneg or _nonneg(inv_temp)

        def attend(x, values=None):
            e, r, xn = _ss_exp(x, inv_temp, nonneg)
            return _apply(e, r, xn if values is None else values)

    out = 0.0  # the branch mean accumulates in float32
    for name in branches:
        x = _repeat(attend, src[name], ss_attn_iter, max_iter)
        out = out + attend(x, v).astype(layers.acc_dtype(v.dtype))
    return (out / len(branches)).astype(v.dtype)


def check_depth(gem_depth, layers_: int):
    """Concrete depths are validated here; traced ones out of range give NaN (see `GEM.valid`)."""
    if isinstance(gem_depth, (int, np.integer)) and not 2 <= gem_depth <= layers_ + 1:
        raise ValueError(f"gem_depth must be in [2, {layers_ + 1}] for a {layers_}-layer tower "
                         f"(GEM modifies the last gem_depth-1 blocks), got {gem_depth}")


@dataclass(frozen=True)
class GEM:
    """GEM as a tower method (see `gem_jax.tower.run`).  Static options only; knobs are data:
    {"gem_depth": int, "ss_attn_iter": int, "ss_attn_temp": float, [B] or None (adaptive)}."""
    branches: tuple = BRANCHES
    max_iter: int = MAX_ITER
    name = "gem"
    knob_names = ("gem_depth", "ss_attn_iter", "ss_attn_temp")
    defaults = dict(gem_depth=7, ss_attn_iter=1, ss_attn_temp=None)
    per_image = ("ss_attn_temp",)  # knobs that may hold one value per image

    def check(self, n_layers: int, kn) -> None:
        """Clear errors for concrete out-of-range knobs (traced ones give NaN, see `valid`)."""
        d, it, t = kn["gem_depth"], kn["ss_attn_iter"], kn["ss_attn_temp"]
        check_depth(d, n_layers)
        if isinstance(it, float):
            raise TypeError(f"ss_attn_iter must be an integer, got {it!r}")
        if isinstance(it, (int, np.integer)) and it < 0:
            raise ValueError(f"ss_attn_iter must be >= 0, got {it}")
        if t is not None and not isinstance(t, jax.core.Tracer):
            try:
                a = np.asarray(t, dtype=np.float64)
            except (TypeError, ValueError):
                raise TypeError(f"ss_attn_temp must be a number or None, got {t!r}") from None
            if not np.isfinite(a).all() or (a < 0).any():
                raise ValueError(f"ss_attn_temp must be a finite inverse temperature >= 0, got {t}")
            # 1e3 is already a hard argmax; the bound keeps τ·cosine meaningful in float32.
            if a.size and np.abs(a).max() > MAX_SS_ATTN_TEMP:
                raise ValueError(f"ss_attn_temp must be within [-{MAX_SS_ATTN_TEMP:g}, "
                                 f"{MAX_SS_ATTN_TEMP:g}], got {t}")

    def for_knobs(self, kn) -> "GEM":
        """This method with `max_iter` raised to cover a concrete iteration count above it (the
        next power of two, so a sweep over counts compiles once)."""
        it = kn["ss_attn_iter"]
        if isinstance(it, (int, np.integer)) and it > self.max_iter:
            return dataclasses.replace(self, max_iter=1 << (int(it) - 1).bit_length())
        return self

    def start(self, n_layers: int, kn):
        return n_layers - (kn["gem_depth"] - 1)

    def valid(self, n_layers: int, kn):
        d, it = kn["gem_depth"], kn["ss_attn_iter"]
        return (d >= 2) & (d <= n_layers + 1) & (it >= 0) & (it <= self.max_iter)

    def block(self, bp, s, blk, kn, cfg, ex):
        tau = kn["ss_attn_temp"]
        adaptive = tau is None
        if adaptive:
            tau = adaptive_inv_temp(blk["h"], cfg.head_dim)
        o = self_self_attention(blk["q"], blk["k"], blk["v"], tau, kn["ss_attn_iter"],
                                self.branches, impl=ex.attention, heads_per_step=ex.heads_per_step,
                                max_iter=self.max_iter, nonneg=True if adaptive else None)
        return s + layers.out_proj(bp, o)
