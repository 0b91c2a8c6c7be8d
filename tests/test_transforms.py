"""GEMModel and the jitted functions under JAX transforms: jit, vmap, grad; the text cache; per-image
temperatures under every Execution; out-of-range traced knobs; prompt buckets (no recompiles).

Each of these failed on v0.1 (40696ea): UnexpectedTracerError after encode_text inside jit,
stale embeddings after a params swap, TypeError / broadcast error for per-image temperatures
with microbatch 1 / 2, a traced depth 0 silently clamped to 2, one compilation per prompt count,
and "Reverse-mode differentiation does not work for lax.while_loop" for grad with traced knobs.
Tolerances: 1e-5 for equalities of different batchings of the same fp32 computation (observed
≤ 1e-6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gem_jax
from gem_jax import Execution
from conftest import random_pixels

TOL = 1e-5
PROMPTS = ["cat", "dog", "a red car"]


@pytest.fixture(scope="module")
def model(hf_tiny):
    return gem_jax.load(hf_tiny[1])


def test_encode_text_inside_jit_then_heatmaps(model):
    px = random_pixels(0, 1, 32, 32)
    f = jax.jit(lambda x: model.encode_text(["a photo of a cat."]).sum() + x.sum())
    f(jnp.asarray(px))
    out = model.heatmaps(px, ["cat"], gem_depth=3)  # v0.1: UnexpectedTracerError
    assert out.shape == (1, 1, 32, 32) and np.isfinite(np.asarray(out)).all()


def test_params_swap_never_returns_stale_text_embeddings(model):
    texts = ["a photo of a cat."]
    old = np.asarray(model.encode_text(texts))
    saved = model.params
    try:
        swapped = jax.tree.map(lambda a: a, saved)
        swapped["text"] = dict(saved["text"], proj=2.0 * saved["text"]["proj"])
        model.params = swapped                            # a new tree
        np.testing.assert_allclose(np.asarray(model.encode_text(texts)), 2 * old, rtol=1e-5)
        model.params["text"]["proj"] = 3.0 * saved["text"]["proj"]   # edited in place
        np.testing.assert_allclose(np.asarray(model.encode_text(texts)), 3 * old, rtol=1e-5)
    finally:
        model.params = saved
    np.testing.assert_allclose(np.asarray(model.encode_text(texts)), old, rtol=1e-6)


@pytest.mark.parametrize("ex", [Execution(), Execution(microbatch=1), Execution(microbatch=2),
                                Execution(heads_per_step=1, microbatch=2)])
def test_per_image_temperatures_under_every_execution(model, ex):
    px = random_pixels(1, 3, 40, 32)
    temps = np.asarray([0.5, 4.0, 20.0], np.float32)
    out = model.heatmaps(px, PROMPTS, gem_depth=3, ss_attn_temp=temps, normalize=False,
                         execution=ex)
    loop = np.concatenate([model.heatmaps(px[i:i + 1], PROMPTS, gem_depth=3,
                                          ss_attn_temp=float(t), normalize=False)
                           for i, t in enumerate(temps)])
    assert float(np.abs(np.asarray(out) - loop).max()) <= TOL
    assert float(np.abs(loop[0] - model.heatmaps(px[:1], PROMPTS, gem_depth=3, ss_attn_temp=20.0,
                                                  normalize=False)[0]).max()) > 1e-3
    with pytest.raises(ValueError, match="one value per image"):
        model.heatmaps(px, PROMPTS, gem_depth=3, ss_attn_temp=temps[:2], execution=ex)


def test_vmap_over_prompts_and_knobs_equals_the_loop(model):
    px = jnp.asarray(random_pixels(2, 2, 40, 32))
    emb = model.encode_text([f"a photo of a {p}." for p in PROMPTS])
    f = lambda e, d=3, it=1, t=2.0: gem_jax.heatmaps_fn(model.params, px, e, d, it, t,
                                                        cfg=model.config, normalize=False)
    # Prompts: vmap over text embeddings, one prompt per call.
    per_prompt = jax.vmap(lambda e: f(e[None]))(emb)               # [P, B, 1, H, W]
    together = f(emb)                                              # [B, P, H, W]
    assert float(jnp.abs(jnp.moveaxis(per_prompt[:, :, 0], 0, 1) - together).max()) <= TOL
    # Knobs: temperature, depth, iterations.
    for name, values, call in (
            ("temp", jnp.asarray([0.5, 3.0, 9.0]), lambda v: f(emb, t=v)),
            ("depth", jnp.asarray([2, 3, 4]), lambda v: f(emb, d=v)),
            ("iters", jnp.asarray([0, 1, 3]), lambda v: f(emb, it=v))):
        batched = jax.vmap(call)(values)
        looped = jnp.stack([call(v) for v in values])
        assert float(jnp.abs(batched - looped).max()) <= TOL, name
        assert float(jnp.abs(looped[0] - looped[-1]).max()) > 1e-4, name  # the knob matters


def test_grad_through_model_heatmaps_with_traced_knobs(model):
    px = jnp.asarray(random_pixels(3, 1, 32, 32))

    @jax.jit
    def loss(px, temp, depth, iters):
        return model.heatmaps(px, ["cat", "dog"], gem_depth=depth, ss_attn_iter=iters,
                              ss_attn_temp=temp, normalize=False)[:, 0].mean()

    g_px, g_t = jax.grad(loss, argnums=(0, 1))(px, 2.0, 3, 2)  # v0.1: while_loop error
    assert np.isfinite(np.asarray(g_px)).all() and float(jnp.abs(g_px).max()) > 0
    assert np.isfinite(float(g_t)) and g_t != 0
    # Different knob values reuse the compiled gradient.
    size = loss._cache_size()
    jax.grad(loss, argnums=(0, 1))(px, 5.0, 4, 1)
    assert loss._cache_size() == size


def test_out_of_range_traced_knobs_give_nan(model):
    px = random_pixels(4, 1, 32, 32)
    emb = model.encode_text(["a photo of a cat."])
    L = model.config.vision.layers  # 3: valid depths 2..4
    run = jax.jit(lambda d, it: gem_jax.heatmaps_fn(model.params, px, emb, d, it, 2.0,
                                                    cfg=model.config))
    assert np.isfinite(np.asarray(run(2, 0))).all() and np.isfinite(np.asarray(run(L + 1, 8))).all()
    for depth, iters in ((0, 1), (1, 1), (L + 2, 1), (3, -1), (3, gem_jax.gem.MAX_ITER + 1)):
        out = np.asarray(run(depth, iters))
        assert np.isnan(out).all(), (depth, iters)
    # Concrete values keep their clear errors.
    with pytest.raises(ValueError, match=r"gem_depth must be in \[2, 4\]"):
        model.heatmaps(px, ["cat"], gem_depth=0)
    with pytest.raises(ValueError, match="ss_attn_iter must be >= 0"):
        model.heatmaps(px, ["cat"], gem_depth=3, ss_attn_iter=-1)


def test_large_concrete_iteration_counts_still_run(model):
    px = random_pixels(5, 1, 32, 32)
    a = model.heatmaps(px, ["cat"], gem_depth=3, ss_attn_iter=11, normalize=False)
    emb = model.encode_text(["a photo of a cat."])
    b = gem_jax.heatmaps_fn(model.params, px, emb, 3, 11, cfg=model.config, normalize=False,
                            max_iter=16)
    assert np.isfinite(np.asarray(a)).all() and float(jnp.abs(a - b).max()) <= TOL


def test_prompt_counts_one_to_eight_share_one_compilation(model):
    px = random_pixels(6, 2, 32, 32)
    words = ["cat", "dog", "car", "tree", "sky", "road", "house", "boat"]
    model.heatmaps(px, words[:1], gem_depth=3)                 # warm-up: shared prompts
    model.heatmaps(px, [words[:1], words[:2]], gem_depth=3)    # warm-up: ragged prompts
    hm, tx = gem_jax.model.dense_heatmaps._cache_size(), gem_jax.encode_text._cache_size()
    for n in range(1, 9):
        out = model.heatmaps(px, words[:n], gem_depth=3)
        assert out.shape == (2, n, 32, 32)
        rag = model.heatmaps(px, [words[:n], words[:9 - n]], gem_depth=3)
        assert [r.shape[0] for r in rag] == [n, 9 - n]
    assert gem_jax.model.dense_heatmaps._cache_size() == hm
    assert gem_jax.encode_text._cache_size() == tx
    # Ragged equals each image's shared-prompt maps (padding and masks change nothing).
    rag = model.heatmaps(px, [words[:3], words[3:8]], gem_depth=3)
    for i, ps in enumerate([words[:3], words[3:8]]):
        assert float(jnp.abs(rag[i] - model.heatmaps(px[i:i + 1], ps, gem_depth=3)[0]).max()) <= TOL
