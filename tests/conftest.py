"""Shared fixtures: real-architecture checkpoints with random (perturbed) weights written to disk
by the PyTorch references themselves, so every parity test loads exactly what users load."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

# Parity tests compare fp32 arithmetic: pin XLA's matmul precision (TPU/GPU default to bf16 passes).
jax.config.update("jax_default_matmul_precision", "highest")

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
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = perturb_(open_clip.create_model(name, pretrained=None).eval(), seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "open_clip_model.safetensors"))
    cfg = {"model_cfg": open_clip.get_model_config(name),
           "preprocess_cfg": {"mean": list(model.visual.image_mean), "std": list(model.visual.image_std)}}
    (path / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
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
