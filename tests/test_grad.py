"""Gradients through GEM: reverse mode (jax.grad / vjp) w.r.t. pixels, params, text embeddings
and the temperature equal central finite differences in float64, with the knobs traced.

Runs in a subprocess with JAX_ENABLE_X64=1 (float64 must not leak into the other tests).
Directional derivatives: for a random direction d, ⟨∇f, d⟩ (reverse mode) vs the fourth-order
central difference (8[f(x+εd) − f(x−εd)] − [f(x+2εd) − f(x−2εd)]) / 12ε with ε = 1e-5
(truncation ~ε⁴·f⁽⁵⁾ ≈ 1e-20·f⁽⁵⁾, rounding ~1e-16·|f|/ε ≈ 1e-9 absolute). A second-order
difference is not enough: the attention-dominant fixture is strongly curved, and in CI a direction
with a small derivative (0.0079) showed a 1e-4 relative truncation error though reverse mode was
right. Tolerance 1e-6 relative to max(|fd|, 1e-3) (printed by the subprocess; observed ≤ ~1e-8).
The fixture is deterministic: perturbation keys come from crc32 of the param path, not hash(),
which Python salts per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CODE = textwrap.dedent(r"""
    import json, sys, zlib
    import jax, jax.numpy as jnp, numpy as np
    assert jax.config.jax_enable_x64
    import gem_jax
    from gem_jax import Execution, params as P, nn as gnn
    from gem_jax.config import CLIPConfig, TextConfig, VisionConfig

    cfg = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=4,
                                         mlp_dim=64, act="quick_gelu"),
                     text=TextConfig(width=32, layers=2, heads=4, mlp_dim=64), embed_dim=24)
    ex = Execution(dtype="float64", heads_per_step=2, microbatch=1)  # chunked paths too
    params = P.init(cfg, jax.random.PRNGKey(0), jnp.float64)
    # Attention-dominant and non-trivial: scaled projections, perturbed LayerNorms.
    def perturb(path, a):
        k = jax.random.fold_in(jax.random.PRNGKey(1),
                               zlib.crc32(jax.tree_util.keystr(path).encode()) % 2**31)
        a = a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
        return a * 2.0 if "qkv" in jax.tree_util.keystr(path) else a
    params = jax.tree_util.tree_map_with_path(perturb, params)
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.standard_normal((2, 40, 32, 3)))
    ids = jnp.asarray(np.stack([np.r_[49406, rng.integers(300, 5000, 5), 49407, np.zeros(9, int)]
                                for _ in range(3)]))
    W = jnp.asarray(rng.standard_normal((2, 3, 40, 32)))

    def f(params, pixels, depth, iters, temp):
        emb = gem_jax.text.encode(params["text"], cfg.text, ids)
        maps = gem_jax.heatmaps_fn(params, pixels, emb, depth, iters, temp, cfg=cfg,
                                   normalize=False, ex=ex)
        return jnp.sum(W * maps)

    def check(name, fn, x, grad=None, eps=1e-5):
        # fn: jitted; grad: reverse-mode gradient at x (jax.grad(fn)(x) when not given).
        d = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), x)
        g = jax.grad(fn)(x) if grad is None else grad
        ad = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
        step = lambda s: jax.tree.map(lambda a, b: a + s * eps * b, x, d)
        d1 = float(fn(step(1))) - float(fn(step(-1)))
        d2 = float(fn(step(2))) - float(fn(step(-2)))
        fd = (8 * d1 - d2) / (12 * eps)
        rel = abs(ad - fd) / max(abs(fd), 1e-3)
        res[name] = dict(ad=ad, fd=fd, rel=rel)

    res = {}
    # Traced knobs: depth 3 (GEM in the last 2 of 3 blocks), 2 iterations, fixed and adaptive τ.
    depth, iters, t3 = jnp.asarray(3), jnp.asarray(2), jnp.asarray(3.0)
    for tname, temp in (("fixed", t3), ("adaptive", None)):
        check(f"pixels/{tname}", jax.jit(lambda px: f(params, px, depth, iters, temp)), pixels)
    # Every param leaf: one reverse pass for the whole tree (then one leaf's part of it), one
    # compiled forward; each leaf is perturbed alone.
    f_params = jax.jit(lambda p: f(p, pixels, depth, iters, t3))
    g_params = jax.jit(jax.grad(f_params))(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    g_flat = dict((jax.tree_util.keystr(p), g) for p, g in
                  jax.tree_util.tree_flatten_with_path(g_params)[0])
    for path, leaf in flat:
        key = jax.tree_util.keystr(path)
        if key == "['logit_scale']":
            continue  # not in the maps; checked through CLIP's logits below
        def fp(a, path=path):
            return f_params(jax.tree_util.tree_map_with_path(
                lambda q, b: a if q == path else b, params))
        check("params" + key, fp, leaf, grad=g_flat[key])
    check("ss_attn_temp", jax.jit(lambda t: f(params, pixels, depth, iters, t)), t3)
    # Flax module: reverse mode through apply, w.r.t. all params at once (logit_scale included).
    clip = gnn.CLIP(cfg, execution=ex)
    check("nn.CLIP logits", jax.jit(lambda p: jnp.sum(
        clip.apply({"params": p}, pixels[:, :32], ids[:2])
        * jnp.asarray([[1.0, -2.0], [0.5, 3.0]]))), params)
    check("nn.CLIP heatmaps", jax.jit(lambda p: jnp.sum(W[:, :2] * clip.apply(
        {"params": p}, pixels, jnp.ones((2, 24)), method="heatmaps", gem_depth=depth,
        ss_attn_iter=iters, normalize=False))), params)
    print(json.dumps(res))
""")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_param_kind_pixels_and_temperature_match_finite_differences(results):
    kinds = {k for k in results if k.startswith("params")}
    # One param of every kind of both towers (all leaves of the tree but logit_scale).
    for must in ("patch_embed", "cls", "pos_embed", "ln_pre", "['ln1']", "['qkv']['kernel']",
                 "['qkv']['bias']", "['out']['kernel']", "['out']['bias']", "['ln2']", "fc1",
                 "fc2", "ln_post", "['vision']['proj']", "token_embed", "ln_final",
                 "['text']['proj']"):
        assert any(must in k for k in kinds), must
    worst = max(results.items(), key=lambda kv: kv[1]["rel"])
    print("worst", worst, "count", len(results))
    for name, r in results.items():
        assert abs(r["fd"]) > 1e-8, f"{name}: zero derivative, the check would have no teeth"
        assert r["rel"] <= 1e-6, (name, r)
