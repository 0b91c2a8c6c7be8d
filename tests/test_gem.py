"""GEM heatmaps against the PyTorch reference: gem_torch 1.0.1 (`gem.GEMWrapper`) around the
open_clip 2.23.0 model loaded from the same saved checkpoint.

Tolerance: max abs error <= 1e-4 (fp32) on normalized maps and on raw similarities."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gem_jax
from conftest import max_err, nchw, random_pixels

TOL = 1e-4
PROMPTS = ["cat", "remote control", "a red square"]


def reference(path, name, **gem_kwargs):
    """A fresh open_clip model from the saved checkpoint, wrapped by gem_torch (which mutates it)."""
    import gem as gem_torch
    import open_clip
    from safetensors.torch import load_file
    cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.create_model(name, pretrained=None)
    assert open_clip.get_model_config(name) == cfg
    model.load_state_dict(load_file(str(path / "open_clip_model.safetensors")))
    model.eval()
    plain_cls = None
    size = model.visual.image_size[0]
    px = torch.from_numpy(random_pixels(9, 1, size, size)).permute(0, 3, 1, 2)
    with torch.no_grad():
        plain_cls = model.encode_image(px)
    wrapper = gem_torch.GEMWrapper(model, open_clip.get_tokenizer(name), **gem_kwargs).eval()
    # Sanity-check the reference itself: its original path must still be CLIP (with open_clip 3.x
    # gem_torch feeds sequence-first tensors to batch-first blocks and this fails).
    with torch.no_grad():
        _, ori = wrapper.model.visual(px)
    assert max_err(ori[:, 0], plain_cls) < 1e-5, "gem_torch reference is broken (open_clip version?)"
    return wrapper


def ref_maps(wrapper, pixels, prompts, **kw):
    with torch.no_grad():
        return wrapper(nchw(pixels), prompts, **kw)


@pytest.fixture(scope="module")
def b16(oc_b16):
    return gem_jax.load(oc_b16[1]), oc_b16[1]


@pytest.fixture(scope="module")
def b32q(oc_b32q):
    return gem_jax.load(oc_b32q[1]), oc_b32q[1]


def test_b16_448_defaults(b16):
    model, path = b16
    ref = reference(path, "ViT-B-16")  # depth 7, 1 iteration, adaptive temperature
    pixels = random_pixels(0, 1, 448, 448)
    errs = {}
    for normalize in (True, False):
        ours = model.heatmaps(pixels, PROMPTS, normalize=normalize)
        theirs = ref_maps(ref, pixels, PROMPTS, normalize=normalize)
        errs[f"normalize={normalize}"] = max_err(ours, theirs)
    print("B16@448 defaults", errs)
    assert max(errs.values()) <= TOL, errs
    assert np.ptp(np.asarray(ours)) > 1e-3  # raw maps are not constant: the check has teeth


def test_b32q_nonsquare_depth5_iter3(b32q):
    model, path = b32q
    ref = reference(path, "ViT-B-32-quickgelu", depth=5, ss_attn_iter=3)
    pixels = random_pixels(1, 2, 448, 320)
    errs = {}
    for normalize in (True, False):
        ours = model.heatmaps(pixels, PROMPTS, gem_depth=5, ss_attn_iter=3, normalize=normalize)
        theirs = ref_maps(ref, pixels, PROMPTS, normalize=normalize)
        assert ours.shape == (2, 3, 448, 320)
        errs[f"normalize={normalize}"] = max_err(ours, theirs)
    print("B32q@448x320 depth5 iter3", errs)
    assert max(errs.values()) <= TOL, errs


def test_b32q_fixed_temperature_and_return_ori(b32q):
    model, path = b32q
    ref = reference(path, "ViT-B-32-quickgelu", ss_attn_temp=7.5)
    pixels = random_pixels(2, 1, 448, 448)
    errs = {}
    for return_ori in (False, True):
        for normalize in (True, False):
            ours = model.heatmaps(pixels, PROMPTS, ss_attn_temp=7.5, return_ori=return_ori,
                                  normalize=normalize)
            theirs = ref_maps(ref, pixels, PROMPTS, return_ori=return_ori, normalize=normalize)
            errs[f"ori={return_ori},norm={normalize}"] = max_err(ours, theirs)
    print("B32q fixed temp / return_ori", errs)
    assert max(errs.values()) <= TOL, errs
    # GEM and the original path differ (otherwise return_ori would test nothing).
    g = model.heatmaps(pixels, PROMPTS, ss_attn_temp=7.5, normalize=False)
    o = model.heatmaps(pixels, PROMPTS, ss_attn_temp=7.5, normalize=False, return_ori=True)
    assert float(jnp.abs(g - o).max()) > 1e-3


def test_ragged_prompts_match_batched_forward(b32q):
    model, path = b32q
    ref = reference(path, "ViT-B-32-quickgelu")
    pixels = random_pixels(3, 3, 224, 224)
    texts = [["cat", "dog"], ["a tree"], ["sky", "grass", "a long red car"]]
    ours = model.heatmaps(pixels, texts)
    with torch.no_grad():
        theirs = ref.batched_forward(nchw(pixels), texts)  # x100 before min-max: compare normalized
    assert len(ours) == 3
    errs = [max_err(o, t) for o, t in zip(ours, theirs)]
    print("ragged vs batched_forward", errs)
    assert max(errs) <= TOL, errs
    # Ragged equals the shared-prompt call restricted to each image's prompts.
    for i, ps in enumerate(texts):
        shared = model.heatmaps(pixels[i:i + 1], ps)[0]
        assert max_err(ours[i], np.asarray(shared)) <= 1e-5


def test_hf_and_openclip_layouts_same_heatmaps(b32q, tmp_path):
    """The same weights in the HF transformers layout give the same heatmaps as the OpenCLIP dir."""
    import transformers
    from gem_jax.convert import save_hf
    model, _ = b32q
    hf_dir = save_hf(tmp_path / "hf", model.config, model.params, model.tokenizer)
    hf_ref = transformers.CLIPModel.from_pretrained(hf_dir).eval()  # transformers reads it too
    hf_model = gem_jax.load(hf_dir)
    pixels = random_pixels(4, 1, 448, 448)
    a = model.heatmaps(pixels, PROMPTS, normalize=False)
    b = hf_model.heatmaps(pixels, PROMPTS, normalize=False)
    assert max_err(a, np.asarray(b)) <= TOL
    px224 = random_pixels(5, 1, 224, 224)
    with torch.no_grad():
        feats = hf_ref.get_image_features(pixel_values=nchw(px224))
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    assert max_err(model.encode_image(px224), feats) <= TOL


def test_knob_sweeps_do_not_recompile(b32q):
    model, _ = b32q
    pixels = random_pixels(6, 1, 64, 64)
    model.heatmaps(pixels, PROMPTS, ss_attn_temp=2.0)
    model.heatmaps(pixels, PROMPTS)
    before = gem_jax.model.dense_heatmaps._cache_size()
    for depth, iters, temp in [(3, 0, 1.0), (5, 2, 3.0), (13, 4, 10.0), (2, 1, 0.5)]:
        model.heatmaps(pixels, PROMPTS, gem_depth=depth, ss_attn_iter=iters, ss_attn_temp=temp)
    for depth in (4, 9):
        model.heatmaps(pixels, PROMPTS, gem_depth=depth)
    assert gem_jax.model.dense_heatmaps._cache_size() == before


def test_vmap_over_temperature_equals_loop(b32q):
    model, _ = b32q
    pixels = jnp.asarray(random_pixels(7, 1, 96, 64))
    emb = model.encode_text([f"a photo of a {p}." for p in PROMPTS])
    temps = jnp.asarray([0.5, 2.0, 8.0])

    def f(t):
        return gem_jax.heatmaps_fn(model.params, pixels, emb, 7, 1, t, cfg=model.config)
    batched = jax.vmap(f)(temps)
    looped = jnp.stack([f(t) for t in temps])
    assert batched.shape == (3, 1, 3, 96, 64)
    assert float(jnp.abs(batched - looped).max()) <= 1e-5
    assert float(jnp.abs(batched[0] - batched[2]).max()) > 1e-3  # temperature matters


def test_value_value_branch_differs_and_is_finite(b32q):
    model, _ = b32q
    pixels = random_pixels(8, 1, 64, 64)
    qkv = model.heatmaps(pixels, PROMPTS, normalize=False)
    vv = model.heatmaps(pixels, PROMPTS, normalize=False, branches=("v",))
    assert np.isfinite(np.asarray(vv)).all()
    assert float(jnp.abs(qkv - vv).max()) > 1e-4
