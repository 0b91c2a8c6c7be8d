r"""MaskCLIP (Zhou, Loy & Dai, ECCV 2022): the last block's value embeddings as dense features.

    default (the later papers' MaskCLIP):  x_L = out_proj(v)            no residual, no FFN
    residual=True (the official code):     y = x + out_proj(v);  x_L = y + MLP(LN2(y))

v = LN1(x) W_vᵀ + b_v of the last block's input x (its attention is replaced by the identity).
Tokens are LN_post(x_L)·proj; maps the patch-text cosines.

Knobs: none (upstream's key smoothing and prompt denoising refinements are off by default and not
implemented).  Static options: `residual` (False), `pos` (positional resampling; default
"scale_factor" as ClearCLIP's re-implementation, "mmseg" — size-based bicubic — with
residual=True, as the official code).

Sources: mc-lan/ClearCLIP@ad68a404d55d48d27330b93554eb64a234ff717f open_clip/transformer.py
L589-622 (model_type 'MaskCLIP', ignore_residual=True) — the default; chongzhou96/MaskCLIP@
245d31f809be9c1938f8f30561b6bf9ed033d746 mmseg/models/backbones/vit.py L94-108 (return_qkv: v =
out_proj(v) + x, then the FFN), mmseg/models/decode_heads/maskclip_head.py L71-127 — residual=True.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import layers
from ._common import LastBlockMethod, check_pos, residual_mlp


@dataclass(frozen=True)
class MaskCLIP(LastBlockMethod):
    residual: bool = False
    pos: Optional[str] = None
    name = "maskclip"

    def __post_init__(self):
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        if self.pos is not None:
            check_pos(self.pos)

    @property
    def pos_embed(self) -> str:
        return self.pos or ("mmseg" if self.residual else "scale_factor")

    def block(self, bp, s, blk, kn, cfg, ex):
        o = layers.out_proj(bp, blk["v"])
        return residual_mlp(bp, blk, o, cfg) if self.residual else o
