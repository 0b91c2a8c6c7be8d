"""Half precision on the bundled toy CLIP (a real trained model): bfloat16 matmul operands with
float32 accumulation, float32 residual streams, LayerNorm statistics, softmax, final projection
and text tower keeps the per-pixel argmax of the toy benchmark's maps, and never gives NaN/Inf
for any accepted knob value.

Observed (toy model, 32 held-out scenes, each scene's own object prompts, the benchmark's relative
maps `toy_heatmaps`): argmax agreement 99.8% (bound 99%, the issue's); max |Δ| of the normalized
maps 4.0e-2, 90th percentile ~8e-3, median 3.1e-3 (before the float32 streams: 7.1e-2 / 7.4e-3,
99.5%).  Issue 15's 2e-2 *max* bound is NOT met on this model, and cannot be with bf16 matmul
operands: rounding its weights to bf16 alone, with every operation in float32, already gives a
max of 2.5e-2 (relative maps subtract the mean over 30 class prompts, and min-max then divides
by a small range).  Asserted: max <= 0.08 (2x observed) and median <= 1e-2 (3x observed).  (The
bf16 NaN at τ >= 1e5 found while writing this test is fixed: x̂ is materialized once, so its
norms and its products use the same rounded values.)"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax import scenes
from gem_jax.demo import TOY_SIZE, toy_model


@pytest.fixture(scope="module")
def models():
    return toy_model(), toy_model(jnp.bfloat16)


@pytest.fixture(scope="module")
def pixels(models):
    return models[0].preprocess([s.pil() for s in scenes.scenes(2, split="test")], size=TOY_SIZE)


def test_bf16_keeps_the_toy_benchmark_argmax(models):
    from gem_jax.demo import toy_heatmaps
    f32, bf16 = models
    assert bf16.params["vision"]["proj"].dtype == jnp.bfloat16  # stored in bf16: half the memory
    diffs, agree = [], []
    for s in scenes.scenes(32, split="test"):
        px = f32.preprocess([s.pil()], size=TOY_SIZE)
        prompts = [scenes.caption([o]) for o in s.objects]
        a, b = toy_heatmaps(f32, px, prompts), toy_heatmaps(bf16, px, prompts)
        assert np.isfinite(b).all()
        diffs.append(float(np.abs(a - b).max()))
        agree.append(float((a.argmax(1) == b.argmax(1)).mean()))
    print(f"bf16 vs fp32: max |d| {max(diffs):.2e}, median {np.median(diffs):.2e}, "
          f"argmax agreement {np.mean(agree):.4f}")
    assert np.mean(agree) >= 0.99
    assert np.median(diffs) <= 1e-2 and max(diffs) <= 0.08


@pytest.mark.parametrize("temp", [0.0, 0.5, None, 1e3, 1e5, 1e6])
def test_bf16_finite_for_every_accepted_temperature(models, pixels, temp):
    _, bf16 = models
    for depth, iters in ((2, 0), (4, 3), (bf16.config.vision.layers + 1, 1)):
        out = np.asarray(bf16.heatmaps(pixels[:2], ["a photo of a red circle."], template=None,
                                       gem_depth=depth, ss_attn_iter=iters, ss_attn_temp=temp,
                                       normalize=False))
        assert np.isfinite(out).all(), (temp, depth, iters)
