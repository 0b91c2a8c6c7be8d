r"""ClearCLIP (Lan et al., ECCV 2024): query-query attention, no residual, no FFN, in the last block.

    x_L = out_proj(softmax(s·q qᵀ) · v)                      (default)
    residual=True:  y = x + out_proj(softmax(s·q qᵀ) · v);  x_L = y + MLP(LN2(y))

q, v from LN1 of the last block's input x (the original stream), s = head_dim^-½; the class
token is a key/value like any patch.  Tokens LN_post(x_L)·proj; maps the patch-text cosines.

Knobs: none (upstream exposes no number).  Static options: `residual` (False = upstream's
``ignore_residual=True``), `pos` (default "scale_factor", as SCLIP).  Upstream's
``last_n_layers`` (sum of the last n blocks' attention outputs; default 1) is not implemented
beyond its default.

Source: mc-lan/ClearCLIP@ad68a404d55d48d27330b93554eb64a234ff717f open_clip/transformer.py
``VisionTransformer.forward`` L500-567, ``custom_attn`` L589-622 (model_type 'ClearCLIP'),
``interpolate_pos_encoding`` L569-587.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import layers
from ._common import LastBlockMethod, attend, check_pos, probs, residual_mlp


@dataclass(frozen=True)
class ClearCLIP(LastBlockMethod):
    residual: bool = False
    pos: str = "scale_factor"
    name = "clearclip"

    def __post_init__(self):
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        check_pos(self.pos)

    def block(self, bp, s, blk, kn, cfg, ex):
        o = layers.out_proj(bp, attend(probs(blk["q"], blk["q"], cfg.head_dim ** -0.5), blk["v"]))
        return residual_mlp(bp, blk, o, cfg) if self.residual else o
