"""Parity with transformers.CLIPModel (PyTorch) on checkpoints it saved itself.

Tolerance: max abs error <= 1e-4 in fp32 on every compared output."""

import numpy as np
import pytest
import torch

import gem_jax
from gem_jax import vision
from conftest import max_err, nchw, random_pixels

TOL = 1e-4
PROMPTS = ["a photo of a cat.", "a diagram", "Été à Paris: 東京 & ☕!", "x " * 100]


def hf_reference(model, pixels, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), pixel_values=nchw(pixels))
        vm = model.vision_model(pixel_values=nchw(pixels))
        tokens = model.visual_projection(model.vision_model.post_layernorm(vm.last_hidden_state))
    return dict(tokens=tokens, pooled=model.get_image_features(pixel_values=nchw(pixels)),
                text=model.get_text_features(input_ids=torch.from_numpy(ids).long()),
                logits=out.logits_per_image)


def _features(x):
    # transformers 5 returns a ModelOutput from get_*_features; older versions a tensor.
    return x.pooler_output if hasattr(x, "pooler_output") else x


@pytest.mark.parametrize("fixture", ["hf_tiny", "hf_b16", "hf_b32"])
@pytest.mark.filterwarnings("ignore:1 of 4 prompt")
def test_hf_parity(fixture, request):
    ref_model, path = request.getfixturevalue(fixture)
    model = gem_jax.load(path)
    size = model.config.vision.image_size
    pixels = random_pixels(0, 2, size, size)
    ids = model.tokenize(PROMPTS)
    ref = hf_reference(ref_model, pixels, ids)

    out = vision.encode(model.params["vision"], model.config.vision, pixels)
    errs = {
        "tokens": max_err(out["tokens"], ref["tokens"]),
        "pooled": max_err(model.encode_image(pixels), _features(ref["pooled"])),
        "text": max_err(model.encode_text(PROMPTS), _features(ref["text"])),
    }
    img = model.encode_image(pixels)
    txt = model.encode_text(PROMPTS)
    img = img / np.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    logits = model.logit_scale * img @ txt.T
    # logits are ~100x cosines: compare at the cosine scale the 1e-4 budget is stated for.
    errs["logits/scale"] = max_err(logits, ref["logits"]) / model.logit_scale
    print(fixture, errs)
    assert all(e <= TOL for e in errs.values()), errs
    # A sanity check that the comparison is not vacuous.
    assert float(np.abs(np.asarray(out["tokens"])).max()) > 1e-2
