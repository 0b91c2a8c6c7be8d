"""How things run (Execution) must never change what is computed: attention implementations,
head/image chunking, data-parallel sharding over several devices, bf16 compute, compile cache."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import gem_jax
from gem_jax import Execution, gem
from conftest import random_pixels

PROMPTS = ["cat", "dog", "a red car"]


@pytest.fixture(scope="module")
def model(oc_b32q):
    return gem_jax.load(oc_b32q[1])


def _maps(model, ex, pixels, **kw):
    return np.asarray(model.heatmaps(pixels, PROMPTS, normalize=False, execution=ex, **kw))


@pytest.mark.parametrize("ex", [
    Execution(),                                   # all heads, whole batch
    Execution(heads_per_step=3, microbatch=2),
    Execution(attention="xla"),                    # jax.nn.dot_product_attention, CPU implementation
    Execution(attention="xla", heads_per_step=1, microbatch=1),
])
def test_execution_variants_equal_cpu_default(model, ex):
    pixels = random_pixels(0, 3, 224, 160)
    ref = _maps(model, Execution.auto(backend="cpu"), pixels, ss_attn_iter=2)
    out = _maps(model, ex, pixels, ss_attn_iter=2)
    assert np.abs(out - ref).max() <= 1e-5


def test_self_self_attention_matches_naive_softmax():
    """The max-free softmax equals the textbook formula, for the einsum and xla paths."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 4, 50, 16)), jnp.float32) for _ in range(3))
    tau = jnp.asarray([0.7, 20.0])

    def naive(x, t):
        xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        import jax
        return jax.nn.softmax(t[:, None, None, None] * xn @ jnp.swapaxes(xn, -1, -2), -1), xn

    def reference(iters):
        out = 0
        for x in (q, k, v):
            for _ in range(iters):
                a, xn = naive(x, tau)
                x = a @ xn
            out = out + naive(x, tau)[0] @ v
        return out / 3
    for iters in (0, 1, 3):
        want = reference(iters)
        for impl in ("einsum", "xla"):
            got = gem.self_self_attention(q, k, v, tau, iters, impl=impl)
            assert float(jnp.abs(got - want).max()) <= 1e-5, (iters, impl)


def test_bfloat16_compute_is_close_and_finite(model):
    pixels = random_pixels(1, 1, 224, 224)
    ref = np.asarray(model.heatmaps(pixels, PROMPTS))
    bf = gem_jax.GEMModel(model.config, model.params, model.tokenizer,
                          execution=Execution.auto(dtype="bfloat16", backend="cpu"))
    out = np.asarray(bf.heatmaps(pixels, PROMPTS))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    # bf16 has ~3 significant digits: normalized maps agree to a few percent, and in shape.
    assert np.abs(out - ref).mean() < 0.05
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.95


def test_automatic_chunking_follows_the_working_set():
    auto = Execution.auto(backend="cpu")
    # ViT-B/16 @448: 12 heads x 785^2 fp32 scores = 30 MB per image -> one image, one head a time.
    assert auto.resolve(8, 785, 12) == Execution(heads_per_step=1, microbatch=1)
    # @224: 1.9 MB per image -> all heads, 8 images per step (15 MB).
    assert auto.resolve(8, 197, 12) == Execution(heads_per_step=0, microbatch=8)
    assert auto.resolve(3, 197, 12).microbatch == 3
    gpu = Execution.auto(dtype="bfloat16", backend="gpu")
    assert gpu.attention == "cudnn" and gpu.resolve(64, 785, 12).microbatch == 0


def test_invalid_execution():
    with pytest.raises(ValueError, match="attention must be one of"):
        Execution(attention="flash")
    with pytest.raises(ValueError, match="dtype"):
        Execution(dtype="int8")
    q = jnp.zeros((1, 12, 5, 4))
    with pytest.raises(ValueError, match="does not divide"):
        gem.self_self_attention(q, q, q, 1.0, heads_per_step=5)


def _run(code: str, **env):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", **env))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_data_parallel_over_four_devices_equals_single_device(oc_b32q):
    """Batches sharded over 4 (forced host) devices give the single-device results."""
    out = _run(f"""
import jax, numpy as np, gem_jax
from gem_jax import Execution
assert jax.device_count() == 4
m = gem_jax.load({str(oc_b32q[1])!r})
px = np.random.default_rng(0).standard_normal((6, 96, 64, 3)).astype(np.float32)  # 6: padded to 8
sharded = m.heatmaps(px, ['cat', 'dog'], normalize=False)
single = m.heatmaps(px, ['cat', 'dog'], normalize=False,
                    execution=Execution(heads_per_step=1, microbatch=1, data_parallel=False))
assert sharded.shape == (6, 2, 96, 64)
err = float(np.abs(np.asarray(sharded) - np.asarray(single)).max())
assert err <= 1e-5, err
hlo = jax.jit(lambda p, x: gem_jax.image_tokens(p, x, cfg=m.config, ex=m.execution)[0]).lower(
    m.params, px).as_text()
assert 'shard_map' in hlo or 'sdy.manual_computation' in hlo or 'num_partitions = 4' in hlo, 'not sharded'
print('ok', err)
""", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert out.startswith("ok")


def test_persistent_compilation_cache(tmp_path, hf_tiny):
    code = f"""
import numpy as np, gem_jax
gem_jax.enable_compilation_cache({str(tmp_path / 'xla')!r})
m = gem_jax.load({str(hf_tiny[1])!r})
m.heatmaps(np.zeros((1, 32, 32, 3), np.float32), ['a'], gem_depth=3).block_until_ready()
print('ok')
"""
    assert _run(code).startswith("ok")
    files = list((tmp_path / "xla").rglob("*"))
    assert files, "nothing was cached"
    assert _run(code).startswith("ok")  # a second process reads the cache


def _dot_precisions(fn, *args):
    import jax
    from conftest import jaxpr_eqns
    return [eqn.params["precision"] for eqn in jaxpr_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
            if eqn.primitive.name == "dot_general"]


def test_matmul_precision_is_explicit(model):
    """Execution(precision="highest") traces every matmul of the image tower at HIGHEST (true
    float32 on GPUs/TPUs, where JAX's default is TF32 / one bf16 pass: 1.6e-3..2.6e-3 normalized
    from gem_torch on an H200) whatever the ambient `jax_default_matmul_precision`; None follows
    the ambient setting; the text tower always runs at HIGHEST.  On CPU the maps are the same."""
    import jax
    from jax.lax import Precision
    highest = (Precision.HIGHEST, Precision.HIGHEST)
    pixels = jnp.asarray(random_pixels(1, 1, 64, 64))
    emb = model.encode_text(PROMPTS)
    fn = lambda ex: (lambda px: gem_jax.heatmaps_fn(model.params, px, emb, 7, 1, None,
                                                    cfg=model.config, ex=ex))
    with jax.default_matmul_precision("default"):  # the tests pin "highest" globally (conftest)
        pinned = _dot_precisions(fn(Execution(precision="highest")), pixels)
        ambient = _dot_precisions(fn(Execution()), pixels)
        ids = jnp.asarray(model.tokenize(PROMPTS))
        text = _dot_precisions(lambda i: gem_jax.text.encode(model.params["text"],
                                                             model.config.text, i), ids)
        a = _maps(model, Execution(precision="highest"), np.asarray(pixels))
        b = _maps(model, Execution(), np.asarray(pixels))
    assert len(pinned) > 20 and all(p == highest for p in pinned), set(map(str, pinned))
    # Ambient "default": the tower's products are not HIGHEST (only the maps' cosines and
    # upsampling, which are HIGHEST by construction).
    assert sum(p != highest for p in ambient) > 20
    assert text and all(p == highest for p in text), set(map(str, text))
    assert np.abs(a - b).max() <= 1e-6   # CPU: float32 products either way (observed 0.0)
    with pytest.raises(ValueError, match="precision must be one of"):
        Execution(precision="float32")
