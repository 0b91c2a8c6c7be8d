"""Checkpoint discovery, every supported file layout, error collection, and the converter CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gem_jax
from gem_jax.config import ConfigError
from gem_jax.convert import CheckpointError, flatten_params, tensors_from_params
from conftest import TINY_HF, make_hf, random_pixels


def same_params(a, b, tol=0.0):
    fa, fb = flatten_params(a), flatten_params(b)
    assert fa.keys() == fb.keys()
    return max(float(np.abs(fa[k] - fb[k]).max()) for k in fa) <= tol


def test_missing_extra_misshaped_reported_together(oc_b32q, tmp_path):
    _, src = oc_b32q
    d = tmp_path / "broken"
    shutil.copytree(src, d)
    t = load_file(str(d / "open_clip_model.safetensors"))
    del t["visual.transformer.resblocks.3.mlp.c_fc.bias"]
    t["visual.extra_head.weight"] = np.zeros((4, 4), np.float32)
    t["text_projection"] = t["text_projection"][:, :100].copy()
    save_file(t, str(d / "open_clip_model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        gem_jax.load(d)
    msg = str(e.value)
    assert "1 missing" in msg and "visual.transformer.resblocks.3.mlp.c_fc.bias" in msg
    assert "1 unexpected" in msg and "visual.extra_head.weight" in msg
    assert "1 misshaped" in msg and "text_projection: shape (512, 100), expected (512, 512)" in msg


def test_unrecognized_directory_says_what_was_looked_for(tmp_path):
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no recognizable CLIP checkpoint") as e:
        gem_jax.load(tmp_path)
    for name in ("open_clip_config.json", "model.safetensors", "config.json", "weights.ckpt"):
        assert name in str(e.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights: looked for model.safetensors"):
        gem_jax.load(tmp_path)


def test_not_a_directory_or_hub_id(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        gem_jax.load(f)
    with pytest.raises(CheckpointError, match="neither an existing directory nor"):
        gem_jax.load("./no/such/dir")


def test_uncached_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="local Hugging Face cache.*offline.*local checkpoint"):
        gem_jax.load("nobody-here/no-such-model")


def test_unknown_architectures(tmp_path):
    with pytest.raises(ConfigError, match="unknown architecture.*siglip"):
        gem_jax.config.from_hf_config({"model_type": "siglip"})
    with pytest.raises(ConfigError, match="timm_model_name"):
        gem_jax.config.from_openclip_config(
            {"model_cfg": {"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}}})
    with pytest.raises(ConfigError, match="ModifiedResNet"):
        gem_jax.config.from_openclip_config({"model_cfg": {"vision_cfg": {"layers": [3, 4, 6, 3]}}})
    with pytest.raises(ConfigError, match="unknown architecture 'ViT-Q-99'"):
        gem_jax.preset("ViT-Q-99")


def test_hf_file_variants_load_identically(hf_tiny, tmp_path):
    """safetensors, sharded safetensors, torch .bin (weights_only) and Flax msgpack layouts."""
    ref_model, path = hf_tiny
    base = gem_jax.load(path)
    sharded = tmp_path / "sharded"
    ref_model.save_pretrained(sharded, safe_serialization=True, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    import torch
    binary.mkdir()
    shutil.copy(path / "config.json", binary / "config.json")
    torch.save(ref_model.state_dict(), binary / "pytorch_model.bin")
    flax_dir = tmp_path / "flax"
    flax_dir.mkdir()
    shutil.copy(path / "config.json", flax_dir / "config.json")
    nested: dict = {}
    for k, v in tensors_from_params(base.params, "hf_flax", base.config).items():
        node = nested
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    from flax.serialization import msgpack_serialize
    (flax_dir / "flax_model.msgpack").write_bytes(msgpack_serialize(nested))
    for d in (sharded, binary, flax_dir):
        assert same_params(gem_jax.load(d).params, base.params), d


def test_openclip_bin_layout(oc_b32q, tmp_path):
    import torch
    ref, path = oc_b32q
    d = tmp_path / "ocbin"
    d.mkdir()
    shutil.copy(path / "open_clip_config.json", d)
    torch.save(ref.state_dict(), d / "open_clip_pytorch_model.bin")
    assert same_params(gem_jax.load(d).params, gem_jax.load(path).params)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gem_jax.convert", *map(str, args)],
                          capture_output=True, text=True, env=env)


def test_convert_cli_native_round_trip_and_force(hf_tiny, tmp_path):
    _, path = hf_tiny
    out = tmp_path / "native"
    r = _cli(path, out)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in out.iterdir()} >= {"gem_jax_config.json", "params.safetensors",
                                               "vocab.json", "merges.txt"}
    a, b = gem_jax.load(path), gem_jax.load(out)
    assert a.config == b.config and same_params(a.params, b.params)
    pixels = random_pixels(0, 1, 64, 48)
    np.testing.assert_array_equal(np.asarray(a.heatmaps(pixels, ["x", "y"], gem_depth=3)),
                                  np.asarray(b.heatmaps(pixels, ["x", "y"], gem_depth=3)))
    before = (out / "params.safetensors").read_bytes()
    r = _cli(path, out)
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert (out / "params.safetensors").read_bytes() == before
    r = _cli(path, out, "--force", "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    assert load_file(str(out / "params.safetensors"))["vision.proj"].dtype == np.float16
    assert same_params(gem_jax.load(out).params, a.params, tol=1e-2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    r = _cli(path)
    assert r.returncode == 2  # usage error


def test_native_checkpoint_from_init(tmp_path):
    cfg = gem_jax.config.CLIPConfig(
        vision=gem_jax.VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64),
        text=gem_jax.TextConfig(width=32, layers=1, heads=2, mlp_dim=64, context_length=16), embed_dim=16)
    params = gem_jax.params.init(cfg, jax.random.PRNGKey(0))
    gem_jax.convert.save_native(tmp_path / "n", cfg, params, gem_jax.CLIPTokenizer.from_bpe_gz())
    with pytest.raises(FileExistsError):
        gem_jax.convert.save_native(tmp_path / "n", cfg, params)
    m = gem_jax.load(tmp_path / "n")
    assert m.config == cfg and m.tokenizer.context_length == 16
    assert same_params(m.params, params)
    meta = json.loads((tmp_path / "n" / "gem_jax_config.json").read_text())
    assert meta["format"] == "gem_jax" and meta["version"] == 1


def test_config_readers_match_presets():
    import open_clip
    for name in ("ViT-B-16", "ViT-B-32-quickgelu", "ViT-L-14", "ViT-L-14-336", "ViT-H-14"):
        cfg = gem_jax.config.from_openclip_config({"model_cfg": open_clip.get_model_config(name)})
        assert cfg.replace(name=name) == gem_jax.preset(name), name
    hf = gem_jax.config.from_hf_config(TINY_HF | {"model_type": "clip"})
    assert hf.vision.act == "quick_gelu" and hf.text.pooling == "eos"
    legacy = gem_jax.config.from_hf_config({"text_config": {"eos_token_id": 2}})
    assert legacy.text.pooling == "argmax"
    assert gem_jax.preset("ViT-B/16") == gem_jax.preset("ViT-B-16")
    assert gem_jax.preset("openai/clip-vit-base-patch16").vision.act == "quick_gelu"
    with pytest.raises(ConfigError, match="divisible"):
        gem_jax.VisionConfig(width=100, heads=3)
    with pytest.raises(ConfigError, match="activation"):
        gem_jax.VisionConfig(act="relu")


def test_library_runs_without_torch(hf_tiny, tmp_path):
    """import gem_jax and a full forward pass with torch (and transformers, open_clip) blocked."""
    _, path = hf_tiny
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'open_clip', 'gem', 'torchvision'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np, gem_jax
from PIL import Image
m = gem_jax.load({str(path)!r})
px = m.preprocess([Image.new('RGB', (50, 40), 'red')], size=64)
maps = np.asarray(m.heatmaps(px, ['cat', 'dog'], gem_depth=4))
assert maps.shape == (1, 2, 64, 64) and np.isfinite(maps).all()
emb = np.asarray(m.encode_image(px))
assert emb.shape == (1, 40)
leaked = [k for k in sys.modules if k.split('.')[0] in ('torch', 'transformers', 'open_clip')]
assert not leaked, leaked
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
