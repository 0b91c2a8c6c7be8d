r"""NACLIP (Hajimiri, Ben Ayed & Dolz, WACV 2025): neighbourhood-aware key-key attention, no
residual, no FFN, in the last block.

    x_L = out_proj(softmax(s·k kᵀ + Ω) · v),   Ω[p,q] = exp(−‖p − q‖² / (2σ²))

k, v from LN1 of the last block's input x (the original stream), s = head_dim^-½.  Ω is a
Gaussian of the distance between patches p, q on this input's patch grid (in patches, row-major),
peak 1, unnormalized, added unscaled to the scaled logits, the same for every head; its class-token
row and column are zero (the class token gets no neighbourhood bonus and gives none).  Tokens
LN_post(x_L)·proj; maps the patch-text cosines.

Knob (traced): ``gaussian_std`` σ = 5 (a scalar, or one per image [B]; σ ≤ 0 or non-finite gives
NaN when traced, a ValueError when concrete).  Static options, upstream's names:
``attn_strategy`` "naclip" (default: k-k + Ω), "kk" (k-k only), "csa" (SCLIP's q-q + k-k; needs
arch "vanilla", as upstream asserts), "vanilla" (q-k); ``arch`` "reduced" (default: no residual,
no FFN) or "vanilla" (y = x + out_proj(·); x_L = y + MLP(LN2(y))); ``pos`` (default
"scale_factor", as SCLIP).  Upstream's "nonly" strategy (Ω only, batch size 1) is not implemented.

Source: sinahmr/NACLIP@0cac3a651f753b11315ea799cfbfabf79da1bd76 clip/model.py ``forward``
L94-132, ``interpolate_pos_encoding`` L134-151, ``gaussian_window`` L153-165,
``get_attention_addition`` L167-176, ``custom_attn`` L178-232; naclip.py L20-22 (defaults).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .. import layers
from ._common import LastBlockMethod, attend, check_choice, check_pos, probs, residual_mlp

STRATEGIES = ("naclip", "kk", "csa", "vanilla")
ARCHS = ("reduced", "vanilla")


def omega(grid: tuple[int, int], std, dtype=jnp.float32):
    """Ω [1+N, 1+N] (σ scalar) or [B, 1, 1+N, 1+N] (σ one per image) for a (gh, gw) patch grid."""
    gh, gw = grid
    yy, xx = jnp.meshgrid(jnp.arange(gh, dtype=dtype), jnp.arange(gw, dtype=dtype), indexing="ij")
    p = jnp.stack([yy.reshape(-1), xx.reshape(-1)], -1)                       # [N, 2]
    d2 = jnp.sum(jnp.square(p[:, None] - p[None]), -1)                       # [N, N]
    std = jnp.asarray(std, dtype)
    sig2 = jnp.reshape(2 * jnp.square(std), jnp.shape(std) + (1,) * (2 + (jnp.ndim(std) > 0)))
    om = jnp.exp(-d2 / sig2)
    pad = ((0, 0),) * (om.ndim - 2) + ((1, 0), (1, 0))
    return jnp.pad(om, pad)


@dataclass(frozen=True)
class NACLIP(LastBlockMethod):
    attn_strategy: str = "naclip"
    arch: str = "reduced"
    pos: str = "scale_factor"
    _grid: tuple = ()          # the patch grid, set by `for_grid` (vision.encode calls it)
    name = "naclip"
    knob_names = ("gaussian_std",)
    defaults = dict(gaussian_std=5.0)
    per_image = ("gaussian_std",)

    def __post_init__(self):
        check_choice("attn_strategy", self.attn_strategy, STRATEGIES)
        check_choice("arch", self.arch, ARCHS)
        if self.attn_strategy == "csa" and self.arch != "vanilla":
            raise ValueError("attn_strategy 'csa' needs arch 'vanilla' (SCLIP keeps the residual "
                             "and the FFN; upstream asserts this)")
        check_pos(self.pos)

    def for_grid(self, grid) -> "NACLIP":
        return dataclasses.replace(self, _grid=tuple(int(g) for g in grid))

    def check(self, n_layers: int, kn) -> None:
        std = kn["gaussian_std"]
        if isinstance(std, jax.core.Tracer):
            return
        try:
            a = np.asarray(std, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"gaussian_std must be a number, got {std!r}") from None
        if a.ndim > 1 or not np.isfinite(a).all() or (a <= 0).any():
            raise ValueError(f"gaussian_std must be a finite number > 0 (in patches), or one per "
                             f"image, got {std}")

    def valid(self, n_layers: int, kn):
        std = jnp.asarray(kn["gaussian_std"])
        return (std > 0) & jnp.isfinite(std)

    def _grid_for(self, n_tokens: int) -> tuple[int, int]:
        if self._grid:
            if self._grid[0] * self._grid[1] + 1 != n_tokens:
                raise ValueError(f"patch grid {self._grid} does not match {n_tokens} tokens")
            return self._grid
        side = math.isqrt(n_tokens - 1)
        if side * side != n_tokens - 1:
            raise ValueError("NACLIP needs the patch grid of a non-square input: run it through "
                             "gem_jax.vision.encode, or call method.for_grid((gh, gw)) first")
        return side, side

    def block(self, bp, s, blk, kn, cfg, ex):
        q, k, v = blk["q"], blk["k"], blk["v"]
        sc = cfg.head_dim ** -0.5
        if self.attn_strategy == "naclip":
            om = omega(self._grid_for(k.shape[2]), kn["gaussian_std"],
                       layers.acc_dtype(k.dtype))
            a = probs(k, k, sc, om)
        elif self.attn_strategy == "kk":
            a = probs(k, k, sc)
        elif self.attn_strategy == "csa":
            a = probs(q, q, sc) + probs(k, k, sc)
        else:
            a = probs(q, k, sc)
        o = layers.out_proj(bp, attend(a, v))
        return residual_mlp(bp, blk, o, cfg) if self.arch == "vanilla" else o
