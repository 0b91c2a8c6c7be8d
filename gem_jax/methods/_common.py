"""Pieces shared by the methods that change CLIP's last block(s) (MaskCLIP, CLIP Surgery, SCLIP,
ClearCLIP, NACLIP): attention probabilities in float32, their application to v, the static-option
checks, and the defaults of a method without traced knobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import layers


def probs(a, b, scale, bias=None):
    """softmax(scale · a bᵀ + bias) over the last axis, in float32 (float64 for float64 inputs).
    a [B,H,N,K], b [B,H,M,K]; bias broadcastable to [B,H,N,M] → [B,H,N,M]."""
    s = jnp.einsum("bhnk,bhmk->bhnm", a, b,
                   preferred_element_type=layers.acc_dtype(a.dtype)) * scale
    if bias is not None:
        s = s + bias
    return jax.nn.softmax(s, axis=-1)


def attend(p, v):
    """p [B,H,N,M] (probabilities, or sums of them) applied to v [B,H,M,K] → [B,H,N,K] in v's
    dtype, accumulated in float32."""
    return layers.einsum("bhnm,bhmk->bhnk", p.astype(v.dtype), v)


def residual_mlp(bp, blk, o, cfg):
    """CLIP's block tail on a modified attention output o: y = x + o; y + MLP(LN2(y)), with x the
    block's input (float32 stream) and the MLP's operands in the block's compute dtype."""
    return layers.residual_mlp(bp, blk["x"], o, cfg.act, cfg.ln_eps, blk["q"].dtype)


def check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_pos(pos) -> None:
    from ..vision import POS_EMBED_MODES
    check_choice("pos (positional-embedding resampling)", pos, tuple(POS_EMBED_MODES))


class LastBlockMethod:
    """Defaults of a method that changes only the last block and has no traced knobs."""
    knob_names = ()
    defaults = {}
    per_image = ()

    def check(self, n_layers: int, kn) -> None:
        pass

    def for_knobs(self, kn):
        return self

    def start(self, n_layers: int, kn):
        return n_layers - 1

    def valid(self, n_layers: int, kn):
        return jnp.asarray(True)

    @property
    def pos_embed(self) -> str:
        return self.pos
