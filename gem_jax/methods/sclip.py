r"""SCLIP (Wang, Mei & Yuille, ECCV 2024): correlative self-attention in the last block.

    x_L = x + out_proj((softmax(s·q qᵀ) + softmax(s·k kᵀ)) · v);   x_L ← x_L + MLP(LN2(x_L))

q, k, v from LN1 of the last block's input x (the original stream), s = head_dim^-½; the two
softmaxes are summed, not averaged; residual and FFN kept.  The class token is a key/value like
any patch.  Tokens LN_post(x_L)·proj; maps the patch-text cosines.

Knobs: none (upstream exposes no number).  Static option: `pos` (default "scale_factor":
``F.interpolate(pe, scale_factor=((gh+0.1)/√N, (gw+0.1)/√N), mode='bicubic')``, nothing
resampled at the native token count).

Source: wangf3014/SCLIP@b56bd3014b9e8a3ee3450bcfc53700a67d627b7a clip/model.py
``VisionTransformer.forward`` L229-261, ``custom_attn`` L283-313, ``interpolate_pos_encoding``
L263-281.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import layers
from ._common import LastBlockMethod, attend, check_pos, probs, residual_mlp


@dataclass(frozen=True)
class SCLIP(LastBlockMethod):
    pos: str = "scale_factor"
    name = "sclip"

    def __post_init__(self):
        check_pos(self.pos)

    def block(self, bp, s, blk, kn, cfg, ex):
        sc = cfg.head_dim ** -0.5
        a = probs(blk["q"], blk["q"], sc) + probs(blk["k"], blk["k"], sc)
        return residual_mlp(bp, blk, layers.out_proj(bp, attend(a, blk["v"])), cfg)
