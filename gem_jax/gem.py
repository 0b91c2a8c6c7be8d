r"""GEM (Grounding Everything Module, Bousselham et al., CVPR 2024): the maths lives in
`gem_jax.methods.gem` (one method among the dense methods) and the maps in `gem_jax.maps`; this
module keeps the GEM-named entry points.

    gem_tokens, ori_tokens = gem.encode(params["vision"], cfg.vision, pixels, gem_depth=7)
"""

from __future__ import annotations

from . import layers, vision
from .config import VisionConfig
from .maps import heatmaps, min_max, patch_similarity, segment_from_scores, upsample  # noqa: F401
from .methods.gem import (BRANCHES, GEM, MAX_ITER, MAX_SS_ATTN_TEMP, adaptive_inv_temp, check_branches,  # noqa: F401
                          check_depth, self_self_attention)


def encode(p, cfg: VisionConfig, pixels, *, gem_depth=7, ss_attn_iter=1, ss_attn_temp=None,
           branches=BRANCHES, with_ori: bool = True, max_iter: int = MAX_ITER,
           ex: layers.Execution = layers.DEFAULT):
    """Both token streams of the image tower: (gem_tokens, ori_tokens), each [B, 1+N, E] after
    LN_post and the projection; ori_tokens is None when `with_ori` is False.

    `ss_attn_temp` None means adaptive; otherwise a scalar (or [B]) inverse temperature.
    gem_depth, ss_attn_iter and ss_attn_temp may be traced (out-of-range values give NaN tokens).
    """
    check_depth(gem_depth, cfg.layers)
    method = GEM(branches=check_branches(branches), max_iter=max_iter)
    knobs = dict(gem_depth=gem_depth, ss_attn_iter=ss_attn_iter, ss_attn_temp=ss_attn_temp)
    out = vision.encode(p, cfg, pixels, method=method, knobs=knobs, with_ori=with_ori, ex=ex)
    return out["dense"], out.get("tokens")
