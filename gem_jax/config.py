"""Frozen model configs, named presets, and readers for HF / OpenCLIP config files.

Numerically sensitive choices are explicit fields: the activation (QuickGELU for the OpenAI
weights, exact erf GELU for most LAION ones), the LayerNorm epsilon, and the text pooling rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = ("quick_gelu", "gelu")
TEXT_POOLING = ("argmax", "eos")


class ConfigError(ValueError):
    """A config that names an architecture or option this library does not implement."""


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224  # native resolution; the learned pos-embed grid is image_size // patch_size
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    ln_eps: float = 1e-5

    def __post_init__(self):
        _check_common(self, "vision")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    # "argmax": pool at the highest token id (OpenCLIP; end-of-text is the largest id).
    # "eos": pool at the first occurrence of eos_token_id (HF transformers' current rule).
    pooling: str = "argmax"
    eos_token_id: int = 49407

    def __post_init__(self):
        _check_common(self, "text")
        if self.pooling not in TEXT_POOLING:
            raise ConfigError(f"text pooling must be one of {TEXT_POOLING}, got {self.pooling!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class CLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    image_mean: tuple = OPENAI_MEAN
    image_std: tuple = OPENAI_STD
    name: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        d = dict(d)
        try:
            vision = VisionConfig(**d.pop("vision"))
            text = TextConfig(**d.pop("text"))
            d["image_mean"] = tuple(d.get("image_mean", OPENAI_MEAN))
            d["image_std"] = tuple(d.get("image_std", OPENAI_STD))
            return cls(vision=vision, text=text, **d)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"not a gem_jax config: {e}") from None

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)


def _check_common(c, tower: str):
    if c.act not in ACTIVATIONS:
        raise ConfigError(f"{tower} activation must be one of {ACTIVATIONS}, got {c.act!r}")
    if c.width % c.heads:
        raise ConfigError(f"{tower} width {c.width} is not divisible by heads {c.heads}")
    for name in ("width", "layers", "heads", "mlp_dim"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{tower} {name} must be >= 1, got {getattr(c, name)}")


# ----------------------------------------------------------------------------- presets
def _preset(name, *, patch, width, layers, heads, image_size=224, embed, twidth, tlayers, theads,
            act="gelu") -> CLIPConfig:
    return CLIPConfig(
        vision=VisionConfig(image_size=image_size, patch_size=patch, width=width, layers=layers,
                            heads=heads, mlp_dim=4 * width, act=act),
        text=TextConfig(width=twidth, layers=tlayers, heads=theads, mlp_dim=4 * twidth, act=act),
        embed_dim=embed, name=name)


_BASE = dict(width=768, layers=12, heads=12, embed=512, twidth=512, tlayers=12, theads=8)
_LARGE = dict(width=1024, layers=24, heads=16, embed=768, twidth=768, tlayers=12, theads=12)
_HUGE = dict(width=1280, layers=32, heads=16, embed=1024, twidth=1024, tlayers=24, theads=16)

PRESETS: dict[str, CLIPConfig] = {}
for _name, _kw in {
    "ViT-B-32": dict(patch=32, **_BASE),
    "ViT-B-16": dict(patch=16, **_BASE),
    "ViT-L-14": dict(patch=14, **_LARGE),
    "ViT-L-14-336": dict(patch=14, image_size=336, **_LARGE),
    "ViT-H-14": dict(patch=14, **_HUGE),
}.items():
    PRESETS[_name] = _preset(_name, **_kw)
    PRESETS[_name + "-quickgelu"] = _preset(_name + "-quickgelu", act="quick_gelu", **_kw)

# The OpenAI checkpoints were trained with QuickGELU; these aliases are what people usually mean.
PRESET_ALIASES = {
    "openai/clip-vit-base-patch32": "ViT-B-32-quickgelu",
    "openai/clip-vit-base-patch16": "ViT-B-16-quickgelu",
    "openai/clip-vit-large-patch14": "ViT-L-14-quickgelu",
    "openai/clip-vit-large-patch14-336": "ViT-L-14-336-quickgelu",
}


def preset(name: str) -> CLIPConfig:
    """A named architecture, e.g. "ViT-B-16" or "ViT-B/16-quickgelu" (random weights need init)."""
    key = name.replace("/", "-")
    key = PRESET_ALIASES.get(name, key)
    if key not in PRESETS:
        raise ConfigError(f"unknown architecture {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


# ----------------------------------------------------------------------------- file readers
def from_hf_config(d: Mapping[str, Any], name: str = "") -> CLIPConfig:
    """CLIPConfig from a Hugging Face transformers `config.json` (model_type "clip")."""
    mt = d.get("model_type", "clip")
    if mt != "clip":
        raise ConfigError(f"unknown architecture: HF model_type {mt!r} (only 'clip' is supported)")
    v, t = d.get("vision_config") or {}, d.get("text_config") or {}
    vd, td = VisionConfig(), TextConfig()

    def act(c):
        a = c.get("hidden_act", "quick_gelu")
        if a not in ACTIVATIONS:
            raise ConfigError(f"unsupported activation {a!r} in HF config (supported: {ACTIVATIONS})")
        return a

    vw = v.get("hidden_size", 768)
    tw = t.get("hidden_size", 512)
    eos = t.get("eos_token_id", 49407)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    image_size = v.get("image_size", 224)
    patch = v.get("patch_size", 32)
    if isinstance(image_size, (list, tuple)) or isinstance(patch, (list, tuple)):
        raise ConfigError("non-square image_size/patch_size in HF config is not supported")
    if v.get("num_channels", 3) != 3:
        raise ConfigError(f"vision num_channels must be 3, got {v.get('num_channels')}")
    return CLIPConfig(
        vision=VisionConfig(
            image_size=image_size, patch_size=patch, width=vw,
            layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
            mlp_dim=v.get("intermediate_size", 3072), act=act(v),
            ln_eps=v.get("layer_norm_eps", vd.ln_eps)),
        text=TextConfig(
            vocab_size=t.get("vocab_size", 49408), context_length=t.get("max_position_embeddings", 77),
            width=tw, layers=t.get("num_hidden_layers", 12), heads=t.get("num_attention_heads", 8),
            mlp_dim=t.get("intermediate_size", 2048), act=act(t),
            ln_eps=t.get("layer_norm_eps", td.ln_eps),
            # transformers keeps the argmax rule for legacy configs whose eos_token_id is 2.
            pooling="argmax" if eos == 2 else "eos", eos_token_id=eos if eos != 2 else 49407),
        embed_dim=d.get("projection_dim", 512), name=name or d.get("_name_or_path", ""))


_OC_VISION_UNSUPPORTED = {
    "timm_model_name": None, "attentional_pool": False, "no_ln_pre": False, "ls_init_value": None,
    "final_ln_after_pool": False, "pool_type": "tok", "pos_embed_type": "learnable",
    "patch_dropout": 0.0, "output_tokens": False, "act_kwargs": None, "norm_kwargs": None,
    "input_patchnorm": False, "global_average_pool": False,
}
_OC_TEXT_UNSUPPORTED = {
    "hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False, "act_kwargs": None,
    "norm_kwargs": None, "output_tokens": False,
}


def _off(x) -> bool:
    return x is None or x is False or x == 0 or x == {}


def from_openclip_config(d: Mapping[str, Any], name: str = "") -> CLIPConfig:
    """CLIPConfig from an OpenCLIP `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...})
    or from a bare model config (open_clip/model_configs/*.json)."""
    mc = d.get("model_cfg", d)
    v, t = dict(mc.get("vision_cfg") or {}), dict(mc.get("text_cfg") or {})
    problems = []
    if isinstance(v.get("layers", 12), (list, tuple)):
        problems.append("vision_cfg.layers is a tuple (a ModifiedResNet tower, not a ViT)")
    for cfg_name, cfg, table in (("vision_cfg", v, _OC_VISION_UNSUPPORTED),
                                 ("text_cfg", t, _OC_TEXT_UNSUPPORTED)):
        for k, ok in table.items():
            val = cfg.get(k, ok)
            if val != ok and not (_off(val) and _off(ok)):
                problems.append(f"{cfg_name}.{k}={val!r}")
    if mc.get("custom_text") and "hf_model_name" in t:
        problems.append("custom HF text tower")
    if problems:
        raise ConfigError("unknown architecture: this OpenCLIP config uses features gem_jax does not "
                          "implement: " + ", ".join(problems))
    act = "quick_gelu" if mc.get("quick_gelu", False) else "gelu"
    width = v.get("width", 768)
    head_width = v.get("head_width", 64)
    image_size = v.get("image_size", 224)
    patch = v.get("patch_size", 16)
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise ConfigError(f"non-square native image_size {image_size} is not supported")
        image_size = image_size[0]
    tw = t.get("width", 512)
    pp = d.get("preprocess_cfg") or {}
    return CLIPConfig(
        vision=VisionConfig(image_size=image_size, patch_size=patch, width=width,
                            layers=v.get("layers", 12), heads=width // head_width,
                            mlp_dim=int(width * v.get("mlp_ratio", 4.0)), act=act),
        text=TextConfig(vocab_size=t.get("vocab_size", 49408),
                        context_length=t.get("context_length", 77), width=tw,
                        layers=t.get("layers", 12), heads=t.get("heads", 8),
                        mlp_dim=int(tw * t.get("mlp_ratio", 4.0)), act=act, pooling="argmax"),
        embed_dim=mc.get("embed_dim", 512),
        image_mean=tuple(pp.get("mean", OPENAI_MEAN)), image_std=tuple(pp.get("std", OPENAI_STD)),
        name=name)
