"""Flax modules (gem_jax.nn) over the pure functions: same param tree as `gem_jax.load`, same
outputs as the GEMModel API (≤ 1e-6: they run the same functions, observed 0.0), the NNX bridge
with one optimizer step, towers inside a user's module, and Dense interception (LoRA)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gem_jax
from gem_jax import layers
from gem_jax import nn as gnn
from conftest import random_pixels

TOL = 1e-6


@pytest.fixture(scope="module")
def tiny(hf_tiny):
    return gem_jax.load(hf_tiny[1])


def _shapes(tree):
    return jax.tree_util.tree_map_with_path(lambda p, a: (jax.tree_util.keystr(p), a.shape), tree)


def test_init_tree_equals_loaded_tree_tiny(tiny):
    px = random_pixels(0, 1, 32, 32)
    ids = jnp.asarray(tiny.tokenize(["a cat"]))
    v = gnn.CLIP(tiny.config).init(jax.random.PRNGKey(0), px, ids)
    assert set(v) == {"params"}
    assert _shapes(v["params"]) == _shapes(tiny.params)
    # CLIP's initialization scales, not zeros: LN at identity, random kernels.
    assert float(jnp.std(v["params"]["vision"]["blocks"]["attn"]["qkv"]["kernel"])) > 0.01
    assert float(v["params"]["text"]["ln_final"]["scale"].mean()) == 1.0


@pytest.mark.slow
def test_init_tree_equals_loaded_tree_b16(oc_b16):
    model = gem_jax.load(oc_b16[1])
    px = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, 77), jnp.int32)
    v = jax.eval_shape(gnn.CLIP(model.config).init, jax.random.PRNGKey(0), px, ids)
    assert _shapes(v["params"]) == _shapes(model.params)


def test_apply_equals_model_api(tiny):
    clip = gnn.CLIP(tiny.config, execution=tiny.execution)
    variables = {"params": tiny.params}
    px = random_pixels(1, 2, 48, 40)
    texts = ["a photo of a cat.", "a photo of a dog."]
    ids = jnp.asarray(tiny.tokenize(texts))
    errs = {}
    errs["encode_image"] = jnp.abs(clip.apply(variables, px, method="encode_image")
                                   - tiny.encode_image(px)).max()
    emb = clip.apply(variables, ids, method="encode_text")
    errs["encode_text"] = jnp.abs(emb - tiny.encode_text(texts)).max()
    g, o = clip.apply(variables, px, method="image_tokens", gem_depth=3, ss_attn_iter=2)
    g2, o2 = tiny.image_tokens(px, gem_depth=3, ss_attn_iter=2)
    errs["image_tokens"] = max(jnp.abs(g - g2).max(), jnp.abs(o - o2).max())
    for normalize in (True, False):
        h = clip.apply(variables, px, emb, method="heatmaps", gem_depth=3, ss_attn_temp=2.0,
                       normalize=normalize)
        h2 = tiny.heatmaps(px, ["cat", "dog"], gem_depth=3, ss_attn_temp=2.0, normalize=normalize)
        errs[f"heatmaps normalize={normalize}"] = jnp.abs(h - h2).max()
    errs = {k: float(v) for k, v in errs.items()}
    print(errs)
    assert max(errs.values()) <= TOL, errs
    # Knob names that do not apply to the method are an error in the user's terms.
    with pytest.raises(ValueError, match="gem_dept do.*not apply to method 'gem'"):
        clip.apply(variables, px, emb, method="heatmaps", gem_dept=3)


def test_towers_inside_a_user_module(tiny):
    """A linear probe on the image tower: the tower's subtree is the loaded one, unchanged."""
    cfg = tiny.config

    class Probe(nn.Module):
        @nn.compact
        def __call__(self, pixels):
            feats = gnn.VisionTower(cfg.vision, cfg.embed_dim, name="tower")(pixels)["pooled"]
            return nn.Dense(3, name="head")(feats)

    px = random_pixels(2, 2, 32, 32)
    v = Probe().init(jax.random.PRNGKey(0), px)
    assert _shapes(v["params"]["tower"]) == _shapes(tiny.params["vision"])
    v = {"params": dict(v["params"], tower=tiny.params["vision"])}
    out = Probe().apply(v, px)
    head = v["params"]["head"]
    want = tiny.encode_image(px) @ head["kernel"] + head["bias"]
    assert float(jnp.abs(out - want).max()) <= 1e-5
    t = gnn.TextTower(cfg.text, cfg.embed_dim)
    ids = jnp.asarray(tiny.tokenize(["a cat"]))
    assert _shapes(t.init(jax.random.PRNGKey(0), ids)["params"]) == _shapes(tiny.params["text"])


def _contrastive(logits):
    labels = jnp.arange(logits.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(logits, labels).mean() + ce(logits.T, labels).mean()) / 2


def test_nnx_bridge_one_optimizer_step_lowers_the_loss(tiny):
    px = jnp.asarray(random_pixels(3, 4, 32, 32))
    ids = jnp.asarray(tiny.tokenize(["a cat", "a dog", "a red car", "a tree"]))
    model = nnx.bridge.ToNNX(gnn.CLIP(tiny.config), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, px, ids)
    # Load the pretrained tree into the NNX model: same paths, no conversion.
    state = nnx.state(model, nnx.Param)
    assert _shapes(nnx.to_pure_dict(state)) == _shapes(tiny.params)
    nnx.replace_by_pure_dict(state, tiny.params)
    nnx.update(model, state)
    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    loss_fn = lambda m: _contrastive(m(px, ids))
    l0 = float(loss_fn(model))
    opt = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    assert abs(float(step(model, opt)) - l0) < 1e-5
    l1 = float(loss_fn(model))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), before, after)
    print("loss", l0, "->", l1)
    assert l1 < l0 - 1e-4
    assert moved["vision"]["blocks"]["attn"]["qkv"]["kernel"] > 0
    assert moved["text"]["proj"] > 0


def _lora(next_fn, name, x, w, eq):
    y = next_fn(name, x, w, eq)
    if "lora_a" in w:  # this layer's [D, r] and [r, M] factors, stored beside its kernel
        y = y + (x @ w["lora_a"]) @ w["lora_b"]
    return y


def test_linear_interceptor_sees_every_projection_and_runs_lora(tiny):
    seen = set()

    def spy(next_fn, name, x, w, eq):
        seen.add(name)
        return next_fn(name, x, w, eq)

    px = random_pixels(4, 2, 32, 32)
    with layers.intercept_linear(spy):
        ref = gem_jax.heatmaps_fn(tiny.params, px, tiny.encode_text(["a cat"]), 3,
                                  cfg=tiny.config, normalize=False)
    assert seen == {"patch_embed", "attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2", "proj"}, seen

    # The Flax module's own interceptor field sees them too.
    seen.clear()
    gnn.CLIP(tiny.config, linear_interceptor=spy).apply({"params": tiny.params}, px,
                                                        method="encode_image")
    assert seen == {"patch_embed", "attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2", "proj"}, seen

    # LoRA on the vision MLP's fc1: factors stacked over layers like every block param, so the
    # runner hands each layer its own slice; trained with optax, the base weights frozen.
    cfg = tiny.config.vision
    r = 2
    a = 0.1 * jax.random.normal(jax.random.PRNGKey(0), (cfg.layers, cfg.width, r))
    b0 = jnp.zeros((cfg.layers, r, cfg.mlp_dim))

    def with_lora(lb):
        p = jax.tree.map(lambda x: x, tiny.params)
        fc1 = dict(p["vision"]["blocks"]["mlp"]["fc1"], lora_a=a, lora_b=lb)
        p["vision"]["blocks"]["mlp"] = dict(p["vision"]["blocks"]["mlp"], fc1=fc1)
        return p

    emb = tiny.encode_text(["a cat", "a dog"])
    target = jnp.zeros((2, 2, 32, 32)).at[:, 0, :16].set(1.0)

    def heat(lb):
        with layers.intercept_linear(_lora):
            return gem_jax.heatmaps_fn(with_lora(lb), px, emb, 3, cfg=tiny.config, normalize=False)

    loss = lambda lb: jnp.mean((heat(lb) - target) ** 2)
    plain = tiny.heatmaps(px, ["a cat", "a dog"], gem_depth=3, normalize=False, template=None)
    assert float(jnp.abs(heat(b0) - plain).max()) <= TOL  # zero-initialized LoRA changes nothing
    tx = optax.adam(1e-2)
    lb, state = b0, tx.init(b0)
    l0 = float(loss(lb))
    for _ in range(3):
        g = jax.grad(loss)(lb)
        upd, state = tx.update(g, state)
        lb = optax.apply_updates(lb, upd)
    print("lora loss", l0, "->", float(loss(lb)))
    assert float(loss(lb)) < l0
    # A function traced under an interceptor is not reused without it (and vice versa).
    assert float(jnp.abs(heat(lb) - plain).max()) > 1e-4
    no_lora = gem_jax.heatmaps_fn(with_lora(lb), px, emb, 3, cfg=tiny.config, normalize=False)
    assert float(jnp.abs(no_lora - plain).max()) <= TOL
