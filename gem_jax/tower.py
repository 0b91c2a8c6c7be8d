r"""One block runner for both towers and every dense method.

    x_{i+1} = block_i(x_i)                                   the original stream, lax.scan over L
    s       = x_start at block `start`, then s ← method.block(bp_i, s, vars_i) for i ≥ start

`vars_i` are block i's intermediates on the original stream, handed to the method as data:
x (block input), h = LN1(x), and q, k, v [B, H, N, K].  A method never sees the loop: it says
where its stream starts (`start`, may be traced) and what it does to one block.

The scan always runs over all L layers and a `lax.cond` on the layer index decides whether the
method acts, so a traced `start` (GEM's depth knob) is a fixed-length loop: reverse-mode
differentiable, vmappable, and one compilation serves every depth.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import layers

Params = dict[str, Any]


def run(stacked: Params, x, cfg, *, mask=None, impl: str = "einsum", method=None, knobs=None,
        ex: layers.Execution = layers.DEFAULT, collect: bool = False, finish_last: bool = True,
        dtype=None):
    """Run the blocks on x [B, N, D].  Returns (x_out, stream, collected).

    x and the method's stream stay in x's dtype (the float32 residual stream); each block's
    matmul operands (h, q, k, v, ...) are in `dtype`, the compute dtype (default x's).
    cfg: the tower's config (layers, act, ln_eps, head_dim).  method: None (plain tower) or an
    object with `start(layers, knobs)` and `block(bp, s, vars, knobs, cfg, ex) -> s`; stream is
    its final state (None without a method).  collect: also return every block's vars stacked
    over layers ([L, ...]).  finish_last=False skips the last block's attention output and MLP on
    the original stream (a method that only needs that block's q, k, v); x_out is then the
    last block's input.
    """
    n = jax.tree.leaves(stacked)[0].shape[0]
    start = method.start(n, knobs) if method is not None else n

    def body(carry, xs):
        x, s = carry
        bp, i = xs
        h, q, k, v = layers.block_qkv(bp, x, cfg.ln_eps, dtype)
        blk = dict(x=x, h=h, q=q, k=k, v=v)
        if method is not None:
            # The stream is born as the input of block `start`; before that it just follows x.
            s = jax.lax.cond(
                i >= start,
                lambda s: method.block(bp, jnp.where(i == start, x, s), blk, knobs, cfg, ex),
                lambda s: x, s)

        def finish(x):
            return layers.block_finish(bp, x, q, k, v, cfg.act, cfg.ln_eps, mask, impl)
        x = finish(x) if finish_last else jax.lax.cond(i < n - 1, finish, lambda x: x, x)
        return (x, s), (blk if collect else None)

    (x, s), blocks = jax.lax.scan(body, (x, x), (stacked, jnp.arange(n)))
    return x, (s if method is not None else None), blocks
