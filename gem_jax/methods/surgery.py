r"""CLIP Surgery (Li et al., arXiv 2304.05653; Pattern Recognition 2025), ViT path.

Architecture surgery, in each of the last `blocks` (6) blocks, beside the unchanged original
stream (q, k, v from LN1 of the ORIGINAL stream's block input, s = head_dim^-½, no L2 norm):

    x_new ← x_new + out_proj(softmax(s·v vᵀ) · v)        residual, no FFN

x_new starts as the input of the first surgery block; at the end its class token is replaced by
the original stream's.  Tokens LN_post(x_new)·proj.

Feature surgery (on by default, `feature_surgery`), per image, on the L2-normalized tokens and
texts, c = cos(token, text):

    w_t = softmax_t(2·c[cls, t]) / mean_t(...);   sim[i, t] = w_t·c[i, t] − mean_t'(w_t'·c[i, t'])

(padded, all-zero text rows are left out of the softmax and the means).

Knob (traced): ``blocks`` = 6 (the method starts at block L − blocks; valid 1..L).  Static
options: ``feature_surgery`` (True), ``pos`` (default "bilinear": ``F.interpolate(pe, (g, g),
mode='bilinear')``; upstream handles square grids only, non-square ones here get the same
size-based bilinear resize).  Not implemented: upstream's optional redundant features
(``sim = img·(text − r)ᵀ``), and its overwriting of the positional table in place.

Source: xmed-lab/CLIP_Surgery@d4696d47f49cfe70f49140afe5eb94f94c5f59bc clip/clip_surgery_model.py
``Attention`` L57-103, ``ResidualAttentionBlock.forward`` L253-280, ``VisionTransformer.forward``
L314-355; clip/clip.py ``clip_feature_surgery`` L287-308.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .. import layers
from ..maps import patch_similarity
from ._common import attend, check_pos, probs


def feature_surgery(tokens, text_emb, grid: tuple[int, int]):
    """CLIP Surgery's similarity [B, P, gh, gw] of tokens [B, 1+N, E] (class token first) with text
    [P, E] or [B, P, E]; all-zero text rows (prompt padding) take no part."""
    acc = layers.acc_dtype(tokens.dtype)
    img = layers.l2_normalize(tokens.astype(acc))
    txt = layers.l2_normalize(text_emb.astype(acc))
    eq = "bne,pe->bnp" if txt.ndim == 2 else "bne,bpe->bnp"
    cos = jnp.einsum(eq, img, txt, precision=jax.lax.Precision.HIGHEST)       # [B, 1+N, P]
    ok = jnp.linalg.norm(text_emb.astype(acc), axis=-1) > 0                   # [P] or [B, P]
    ok = jnp.broadcast_to(ok if ok.ndim == 2 else ok[None], (cos.shape[0], cos.shape[2]))[:, None]
    count = ok.sum(-1, keepdims=True)
    w = jax.nn.softmax(jnp.where(ok, 2 * cos[:, :1], -jnp.inf), axis=-1) * count  # / mean
    wc = w * cos
    sim = wc - jnp.where(ok, wc, 0).sum(-1, keepdims=True) / count
    sim = jnp.swapaxes(sim[:, 1:], 1, 2)                                       # [B, P, N]
    return sim.reshape(sim.shape[:2] + tuple(grid))


@dataclass(frozen=True)
class Surgery:
    feature_surgery: bool = True
    pos: str = "bilinear"
    name = "surgery"
    knob_names = ("blocks",)
    defaults = dict(blocks=6)
    per_image = ()
    needs_ori = True

    def __post_init__(self):
        if not isinstance(self.feature_surgery, bool):
            raise TypeError(f"feature_surgery must be True or False, got {self.feature_surgery!r}")
        check_pos(self.pos)

    @property
    def pos_embed(self) -> str:
        return self.pos

    def check(self, n_layers: int, kn) -> None:
        b = kn["blocks"]
        if isinstance(b, jax.core.Tracer):
            return
        if isinstance(b, (bool, float, np.floating)) or np.ndim(b) != 0 \
                or not np.issubdtype(np.asarray(b).dtype, np.integer):
            raise TypeError(f"blocks must be an integer, got {b!r}")
        if not 1 <= int(b) <= n_layers:
            raise ValueError(f"blocks must be in [1, {n_layers}] for a {n_layers}-layer tower "
                             f"(CLIP Surgery modifies the last `blocks` blocks), got {b}")

    def for_knobs(self, kn) -> "Surgery":
        return self

    def start(self, n_layers: int, kn):
        return n_layers - kn["blocks"]

    def valid(self, n_layers: int, kn):
        b = kn["blocks"]
        return (b >= 1) & (b <= n_layers)

    def block(self, bp, s, blk, kn, cfg, ex):
        v = blk["v"]
        return s + layers.out_proj(bp, attend(probs(v, v, cfg.head_dim ** -0.5), v))

    def finish(self, dense, ori):
        """The class token of the original stream (upstream ``x[0] = x_ori[0]``)."""
        return jnp.concatenate([ori[:, :1], dense[:, 1:]], axis=1)

    def similarity(self, tokens, text_emb, grid):
        if self.feature_surgery:
            return feature_surgery(tokens, text_emb, grid)
        return patch_similarity(tokens, text_emb, grid)
