"""Shared fixtures: real-architecture checkpoints with random (perturbed) weights written to disk
by the PyTorch references themselves, so every parity test loads exactly what users load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

# Parity tests compare fp32 arithmetic: pin XLA's matmul precision (TPU/GPU default to bf16 or
# TF32 passes).  GEM_JAX_TEST_MATMUL_PRECISION=default measures what an unpinned user gets there.
jax.config.update("jax_default_matmul_precision",
                  os.environ.get("GEM_JAX_TEST_MATMUL_PRECISION", "highest"))

import torch  # noqa: E402  the reference (the [test] extra); a missing reference must fail, not skip
torch.set_num_threads(2)


def perturb_(module, seed: int, scale: float = 0.02):
    """Add noise to every parameter so none keeps a trivial init (LN = 1/0, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(float(np.log(1 / 0.07)) + 0.1)
                continue
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ----------------------------------------------------------------------------- HF transformers
TINY_HF = dict(
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu"),
    text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
    projection_dim=40,
)
B16_HF = dict(
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=16, hidden_act="quick_gelu"),
    text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, hidden_act="quick_gelu"),
    projection_dim=512,
)
B32_HF = dict(B16_HF, vision_config=dict(B16_HF["vision_config"], patch_size=32, hidden_act="gelu"),
              text_config=dict(B16_HF["text_config"], hidden_act="gelu"))


def make_hf(config_kwargs: dict, path: Path, seed: int):
    import transformers
    cfg = transformers.CLIPConfig(**config_kwargs)
    torch.manual_seed(seed)
    model = perturb_(transformers.CLIPModel(cfg).eval(), seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tiny")
    return make_hf(TINY_HF, path, 0), path


@pytest.fixture(scope="session")
def hf_b16(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_b16")
    return make_hf(B16_HF, path, 1), path


@pytest.fixture(scope="session")
def hf_b32(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_b32")
    return make_hf(B32_HF, path, 2), path


# ----------------------------------------------------------------------------- OpenCLIP
def make_openclip(name: str, path: Path, seed: int):
    """open_clip.create_model(name, pretrained=None), perturbed, saved in the OpenCLIP hub layout
    (open_clip_config.json + open_clip_model.safetensors), as open_clip's push_to_hf_hub does."""
    import open_clip
    torch.manual_seed(seed)
    model = perturb_(open_clip.create_model(name, pretrained=None).eval(), seed)
    save_openclip(model, name, path)
    return model


@pytest.fixture(scope="session")
def oc_b16(tmp_path_factory):
    path = tmp_path_factory.mktemp("oc") / "ViT-B-16"
    return make_openclip("ViT-B-16", path, 3), path


@pytest.fixture(scope="session")
def oc_b32q(tmp_path_factory):
    path = tmp_path_factory.mktemp("oc") / "ViT-B-32-quickgelu"
    return make_openclip("ViT-B-32-quickgelu", path, 4), path


def max_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b.astype(np.float64)).max())


def nchw(pixels) -> "torch.Tensor":
    return torch.from_numpy(np.asarray(pixels)).permute(0, 3, 1, 2).contiguous()


def random_pixels(seed, b, h, w):
    return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- attention-dominant
# Random checkpoints in which GEM's own maths moves the heatmaps (issue 11): on the plain random
# checkpoints above, a 1% change of τ moves the maps by less than the parity tolerance.  In the last
# ATTN_BLOCKS blocks (every GEM block for gem_depth <= 8):
#   * in_proj ×3 (weights and bias) and out_proj ×4: attention dominates the residual stream and
#     GEM's self-self attention dominates the GEM stream;
#   * LN1's gain and bias ×4 with in_proj's weight ÷4: q, k, v are unchanged, but the adaptive
#     τ (mean ‖LN1(x)‖ · K^-½) is 4x larger (≈ 14 instead of ≈ 3.5), where the softmax is neither
#     uniform nor one-hot, so τ matters.
# All weights are then rounded to bfloat16-representable values (stored as float32): bf16-vs-fp32
# tests then measure compute precision, not weight quantization (which alone moves these
# normalized maps by ~0.02).  Measured sensitivities are in tests/test_fidelity_e2e.py.
ATTN_BLOCKS, ATTN_IN, ATTN_OUT, ATTN_LN_GAIN = 7, 3.0, 4.0, 4.0


def save_openclip(model, name: str, path: Path):
    """Save an open_clip model in the OpenCLIP hub layout (open_clip_config.json +
    open_clip_model.safetensors), as open_clip's push_to_hf_hub does."""
    import open_clip
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "open_clip_model.safetensors"))
    cfg = {"model_cfg": open_clip.get_model_config(name),
           "preprocess_cfg": {"mean": list(model.visual.image_mean), "std": list(model.visual.image_std)}}
    (path / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))


def make_openclip_attn_dominant(name: str, path: Path, seed: int):
    """open_clip.create_model(name, pretrained=None), perturbed, with attention-dominant GEM blocks
    (see above), bf16-representable, saved in the OpenCLIP hub layout."""
    import open_clip
    torch.manual_seed(seed)
    model = perturb_(open_clip.create_model(name, pretrained=None).eval(), seed)
    with torch.no_grad():
        for blk in list(model.visual.transformer.resblocks)[-ATTN_BLOCKS:]:
            blk.ln_1.weight.mul_(ATTN_LN_GAIN)
            blk.ln_1.bias.mul_(ATTN_LN_GAIN)
            blk.attn.in_proj_weight.mul_(ATTN_IN / ATTN_LN_GAIN)
            blk.attn.in_proj_bias.mul_(ATTN_IN)
            blk.attn.out_proj.weight.mul_(ATTN_OUT)
            blk.attn.out_proj.bias.mul_(ATTN_OUT)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    save_openclip(model, name, path)
    return model


@pytest.fixture(scope="session")
def oc_b16_attn(tmp_path_factory):
    """ViT-B-16 with attention-dominant GEM blocks: the checkpoint directory (the torch model is
    not kept: references are rebuilt from the saved file, as users load it)."""
    path = tmp_path_factory.mktemp("oc_attn") / "ViT-B-16"
    make_openclip_attn_dominant("ViT-B-16", path, 11)
    return path


@pytest.fixture(scope="session")
def oc_b32q_attn(tmp_path_factory):
    path = tmp_path_factory.mktemp("oc_attn") / "ViT-B-32-quickgelu"
    make_openclip_attn_dominant("ViT-B-32-quickgelu", path, 12)
    return path


def scene_pixels(seed: int, b: int, h: int, w: int):
    """Normalized pixels [B, H, W, 3] of piecewise-constant scenes (a background and 6 rectangles of
    random colours) with mild noise: patch tokens form clusters, as on real images, so self-self
    attention has structure to find (on white noise every token is alike).  Values are rounded to
    bfloat16-representable floats (an exact input for bf16 runs too)."""
    rng = np.random.default_rng(seed)
    out = np.empty((b, h, w, 3), np.float32)
    for i in range(b):
        img = np.broadcast_to(rng.standard_normal(3), (h, w, 3)).copy()
        for _ in range(6):
            y0, x0 = rng.integers(0, h - 32), rng.integers(0, w - 32)
            y1, x1 = y0 + rng.integers(32, h // 2), x0 + rng.integers(32, w // 2)
            img[y0:y1, x0:x1] = 1.5 * rng.standard_normal(3)
        out[i] = img + 0.3 * rng.standard_normal((h, w, 3))
    return torch.from_numpy(out).to(torch.bfloat16).float().numpy()


def jaxpr_eqns(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, loops, maps, conds, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from jaxpr_eqns(inner)
                elif hasattr(sub, "eqns"):
                    yield from jaxpr_eqns(sub)
