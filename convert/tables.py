"""Checkpoint layouts as data: one row per checkpoint key -> (param path, slot, transform).

A row `Rule(key, dst, slot, tf)` says: the checkpoint tensor `key` ("{i}" = layer index) becomes
`params[dst][slot]` after transform `tf`.  Each transform knows the source shape it expects from
the target shape, so a misshaped tensor is reported instead of silently reshaped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Transform:
    src_shape: Callable[[tuple], tuple]  # expected checkpoint shape, from the target shape
    fn: Callable[[np.ndarray, tuple], np.ndarray]
    # Inverse (our param -> checkpoint tensor), for export.  None: a reshape to src_shape suffices.
    inv: Callable[[np.ndarray], np.ndarray] | None = None


def _prod(s):
    return int(np.prod(s, dtype=np.int64))


TRANSFORMS: dict[str, Transform] = {
    # as stored
    "id": Transform(lambda t: t, lambda w, t: w),
    # torch Linear [out, in] -> kernel [in, out]
    "T": Transform(lambda t: t[::-1], lambda w, t: w.T, lambda p: p.T),
    # torch Conv2d [D, 3, P, P] -> HWIO [P, P, 3, D]
    "conv": Transform(lambda t: (t[3], t[2], t[0], t[1]), lambda w, t: w.transpose(2, 3, 1, 0),
                      lambda p: p.transpose(3, 2, 0, 1)),
    # torch Linear [H*K, D] -> [D, H, K]   (q, k or v projection)
    "heads_in": Transform(lambda t: (t[1] * t[2], t[0]), lambda w, t: w.T.reshape(t),
                          lambda p: p.reshape(p.shape[0], -1).T),
    # bias [H*K] -> [H, K]  (also OpenCLIP's fused [3*H*K] -> [3, H, K])
    "heads_bias": Transform(lambda t: (_prod(t),), lambda w, t: w.reshape(t)),
    # torch Linear [D, H*K] -> [H, K, D]   (attention output projection)
    "heads_out": Transform(lambda t: (t[2], t[0] * t[1]), lambda w, t: w.T.reshape(t),
                           lambda p: p.reshape(-1, p.shape[-1]).T),
    # nn.MultiheadAttention in_proj_weight [3*H*K, D] -> [3, D, H, K]
    "qkv_in": Transform(lambda t: (t[0] * t[2] * t[3], t[1]),
                        lambda w, t: w.reshape(t[0], t[2] * t[3], t[1]).transpose(0, 2, 1).reshape(t),
                        lambda p: p.reshape(p.shape[0], p.shape[1], -1).transpose(0, 2, 1)
                        .reshape(-1, p.shape[1])),
    # Flax Dense kernels are already [in, out]; only the head axes need splitting / merging.
    "flax_heads_in": Transform(lambda t: (t[0], t[1] * t[2]), lambda w, t: w.reshape(t)),
    "flax_heads_out": Transform(lambda t: (t[0] * t[1], t[2]), lambda w, t: w.reshape(t)),
}


@dataclass(frozen=True)
class Rule:
    key: str
    dst: str
    slot: tuple = ()
    tf: str = "id"


def _tower_rules(src: str, dst: str, *, ln: str, names: dict, qkv: str) -> list[Rule]:
    """Per-layer rows of one tower.  `names` maps our block param names to checkpoint suffixes."""
    b = f"{src}{{i}}."
    d = f"{dst}.blocks."
    rows = [
        Rule(b + names["ln1"] + ".weight" if ln == "torch" else b + names["ln1"] + ".scale",
             d + "ln1.scale", ("i",)),
        Rule(b + names["ln1"] + ".bias", d + "ln1.bias", ("i",)),
        Rule(b + names["ln2"] + (".weight" if ln == "torch" else ".scale"), d + "ln2.scale", ("i",)),
        Rule(b + names["ln2"] + ".bias", d + "ln2.bias", ("i",)),
    ]
    w = ".weight" if ln == "torch" else ".kernel"
    lin = "T" if ln == "torch" else "id"
    rows += [Rule(b + names["fc1"] + w, d + "mlp.fc1.kernel", ("i",), lin),
             Rule(b + names["fc1"] + ".bias", d + "mlp.fc1.bias", ("i",)),
             Rule(b + names["fc2"] + w, d + "mlp.fc2.kernel", ("i",), lin),
             Rule(b + names["fc2"] + ".bias", d + "mlp.fc2.bias", ("i",)),
             Rule(b + names["out"] + w, d + "attn.out.kernel", ("i",),
                  "heads_out" if ln == "torch" else "flax_heads_out"),
             Rule(b + names["out"] + ".bias", d + "attn.out.bias", ("i",))]
    if qkv == "separate":
        for slot, n in enumerate(("q", "k", "v")):
            rows += [Rule(b + names[n] + w, d + "attn.qkv.kernel", ("i", slot),
                          "heads_in" if ln == "torch" else "flax_heads_in"),
                     Rule(b + names[n] + ".bias", d + "attn.qkv.bias", ("i", slot), "heads_bias")]
    else:  # nn.MultiheadAttention's fused in_proj
        rows += [Rule(b + names["in_proj"] + "_weight", d + "attn.qkv.kernel", ("i",), "qkv_in"),
                 Rule(b + names["in_proj"] + "_bias", d + "attn.qkv.bias", ("i",), "heads_bias")]
    return rows


def _hf_rows(flax: bool) -> list[Rule]:
    ln = "flax" if flax else "torch"
    names = dict(ln1="layer_norm1", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2",
                 out="self_attn.out_proj", q="self_attn.q_proj", k="self_attn.k_proj",
                 v="self_attn.v_proj")
    lnw = ".scale" if flax else ".weight"
    emb = ".embedding" if flax else ".weight"
    lin, proj_w = ("id", ".kernel") if flax else ("T", ".weight")
    rows = [
        Rule("vision_model.embeddings.class_embedding", "vision.cls"),
        Rule("vision_model.embeddings.patch_embedding" + (".kernel" if flax else ".weight"),
             "vision.patch_embed", (), "id" if flax else "conv"),
        Rule("vision_model.embeddings.position_embedding" + emb, "vision.pos_embed"),
        Rule("vision_model.pre_layrnorm" + lnw, "vision.ln_pre.scale"),
        Rule("vision_model.pre_layrnorm.bias", "vision.ln_pre.bias"),
        Rule("vision_model.post_layernorm" + lnw, "vision.ln_post.scale"),
        Rule("vision_model.post_layernorm.bias", "vision.ln_post.bias"),
        Rule("visual_projection" + proj_w, "vision.proj", (), lin),
        Rule("text_model.embeddings.token_embedding" + emb, "text.token_embed"),
        Rule("text_model.embeddings.position_embedding" + emb, "text.pos_embed"),
        Rule("text_model.final_layer_norm" + lnw, "text.ln_final.scale"),
        Rule("text_model.final_layer_norm.bias", "text.ln_final.bias"),
        Rule("text_projection" + proj_w, "text.proj", (), lin),
        Rule("logit_scale", "logit_scale"),
    ]
    for tower, dst in (("vision_model", "vision"), ("text_model", "text")):
        rows += _tower_rules(f"{tower}.encoder.layers.", dst, ln=ln, names=names, qkv="separate")
    return rows


def _openclip_rows() -> list[Rule]:
    names = dict(ln1="ln_1", ln2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj", out="attn.out_proj",
                 in_proj="attn.in_proj")
    rows = [
        Rule("visual.class_embedding", "vision.cls"),
        Rule("visual.conv1.weight", "vision.patch_embed", (), "conv"),
        Rule("visual.positional_embedding", "vision.pos_embed"),
        Rule("visual.ln_pre.weight", "vision.ln_pre.scale"),
        Rule("visual.ln_pre.bias", "vision.ln_pre.bias"),
        Rule("visual.ln_post.weight", "vision.ln_post.scale"),
        Rule("visual.ln_post.bias", "vision.ln_post.bias"),
        Rule("visual.proj", "vision.proj"),
        Rule("token_embedding.weight", "text.token_embed"),
        Rule("positional_embedding", "text.pos_embed"),
        Rule("ln_final.weight", "text.ln_final.scale"),
        Rule("ln_final.bias", "text.ln_final.bias"),
        Rule("text_projection", "text.proj"),
        Rule("logit_scale", "logit_scale"),
    ]
    rows += _tower_rules("visual.transformer.resblocks.", "vision", ln="torch", names=names, qkv="fused")
    rows += _tower_rules("transformer.resblocks.", "text", ln="torch", names=names, qkv="fused")
    return rows


# Keys that carry no parameters (buffers some writers persist) and are skipped silently.
IGNORED = {
    "hf": (r".*position_ids$",),
    "hf_flax": (),
    "openclip": (r"^attn_mask$", r".*\.attn_mask$"),
    "native": (),
}

LAYOUTS: dict[str, list[Rule]] = {
    "hf": _hf_rows(flax=False),
    "hf_flax": _hf_rows(flax=True),
    "openclip": _openclip_rows(),
}
