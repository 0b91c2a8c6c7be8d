"""Contrastive training step (gem_jax.train): gradients against PyTorch CLIP's, purity, the
optimizer recipe, and the HF export round trip of our params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gem_jax
from gem_jax import params as P, train
from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
from gem_jax.convert import flatten_params, save_hf, tensors_from_params

from conftest import max_err, nchw, perturb_, random_pixels

CAPTIONS = ["a photo of a red circle.", "a photo of a blue square and a green star.",
            "a photo of an orange cross.", "a photo of a purple triangle and a red star."]

# A tiny CLIP with the full CLIP vocabulary (token ids come from the real tokenizer).
GRAD_HF = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu"),
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=20, hidden_act="quick_gelu"),
    projection_dim=24,
)
# fp32 on both sides: relative to each tensor's largest gradient entry, the worst element differs
# by < 1e-4 (observed ~5e-6).  The key-projection biases have an exactly zero gradient (softmax is
# shift invariant), where both sides hold float noise: hence the absolute floor.
GRAD_RTOL = 1e-4
GRAD_ATOL = 1e-7


@pytest.fixture(scope="module")
def hf_grad_model(tmp_path_factory):
    import transformers
    path = tmp_path_factory.mktemp("hf_grad")
    torch.manual_seed(7)
    model = perturb_(transformers.CLIPModel(transformers.CLIPConfig(**GRAD_HF)).eval(), 7)
    model.save_pretrained(path, safe_serialization=True)
    return model, gem_jax.load(path)


def test_loss_and_grads_match_pytorch_clip(hf_grad_model):
    """d(loss)/d(params) of CLIP's symmetric cross-entropy equals transformers' autograd, for every
    tensor, mapped through the conversion table (its transforms are linear reshapes/transposes,
    so they map gradients exactly as they map weights)."""
    ref, model = hf_grad_model
    cfg = model.config
    pixels = random_pixels(11, len(CAPTIONS), 32, 32)
    ids = model.tokenize(CAPTIONS)
    assert ids.shape == (4, 20)
    ref.zero_grad()
    out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=nchw(pixels),
              return_loss=True)
    out.loss.backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}

    (loss, _), grads = jax.value_and_grad(train.contrastive_loss, has_aux=True)(
        model.params, cfg, jnp.asarray(pixels), jnp.asarray(ids))
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    ours = tensors_from_params(grads, "hf", cfg)
    assert set(ours) == set(ref_grads)  # every parameter, nothing left out
    worst = {}
    for name, g in ours.items():
        r = ref_grads[name]
        scale = float(r.abs().max())
        assert scale > 0 or "k_proj.bias" in name, name
        worst[name] = max_err(g, r) / (scale + GRAD_ATOL / GRAD_RTOL)
    assert max(worst.values()) <= GRAD_RTOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    # Named checks the brief asks for: projection, one q_proj, the token-embedding rows used.
    for name in ("visual_projection.weight", "vision_model.encoder.layers.0.self_attn.q_proj.weight",
                 "text_model.embeddings.token_embedding.weight", "logit_scale"):
        assert worst[name] <= GRAD_RTOL
    used = np.unique(ids)
    tok = ours["text_model.embeddings.token_embedding.weight"]
    assert np.abs(tok[used]).max() > 0
    unused = np.setdiff1d(np.arange(tok.shape[0]), used)
    assert np.abs(tok[unused]).max() == 0


def _tiny_cfg():
    return CLIPConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64,
                            act="gelu"),
        text=TextConfig(context_length=20, width=32, layers=2, heads=4, mlp_dim=64, act="gelu"),
        embed_dim=24, name="tiny-train")


def _batch(cfg, n=8, seed=0):
    from gem_jax import scenes
    tok = gem_jax.CLIPTokenizer.from_bpe_gz(context_length=cfg.text.context_length)
    b = scenes.batch(n, seed=seed, size=cfg.vision.image_size)
    return dict(pixels=jnp.asarray(train.normalize_pixels(b["images"], cfg)),
                ids=jnp.asarray(tok(b["captions"]), jnp.int32), groups=jnp.asarray(b["groups"]))


def test_train_step_is_pure_and_learns():
    cfg = _tiny_cfg()
    params = P.init(cfg, jax.random.PRNGKey(0))
    tx = train.make_optimizer(lr=5e-3, steps=20, warmup=2)
    step = train.make_train_step(cfg, tx, flip=True, donate=False)
    batch = _batch(cfg)
    opt_state = tx.init(params)
    key = jax.random.PRNGKey(1)
    p1, s1, m1 = step(params, opt_state, batch, key)
    p2, s2, m2 = step(params, opt_state, batch, key)  # same inputs, same outputs
    for a, b in zip(jax.tree.leaves((p1, s1, m1)), jax.tree.leaves((p2, s2, m2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert set(m1) >= {"loss", "acc_i2t", "grad_norm", "logit_scale"}
    # The schedule starts at lr 0 (warmup): the first step leaves the weights, the second moves them.
    np.testing.assert_array_equal(np.asarray(p1["vision"]["proj"]), np.asarray(params["vision"]["proj"]))
    p3, _, _ = step(p1, s1, batch, key)
    assert not np.array_equal(np.asarray(p3["vision"]["proj"]), np.asarray(params["vision"]["proj"]))
    first = float(m1["loss"])
    p, s = params, opt_state
    for i in range(20):
        p, s, m = step(p, s, batch, jax.random.PRNGKey(i))
    assert float(m["loss"]) < 0.5 * first, (first, float(m["loss"]))  # overfits one batch
    assert float(p["logit_scale"]) <= train.MAX_LOGIT_SCALE + 1e-6


def test_groups_targets_and_flip():
    cfg = _tiny_cfg()
    params = P.init(cfg, jax.random.PRNGKey(0))
    batch = _batch(cfg, n=6)
    # All-distinct groups are CLIP's diagonal targets.
    loss = jax.jit(train.contrastive_loss, static_argnums=1)
    l_diag, _ = loss(params, cfg, batch["pixels"], batch["ids"])
    l_grp, _ = loss(params, cfg, batch["pixels"], batch["ids"], jnp.arange(6))
    assert abs(float(l_diag) - float(l_grp)) < 1e-6
    t = np.asarray(train._targets(jnp.asarray([0, 1, 0, 2]), 4))
    np.testing.assert_allclose(t.sum(1), 1.0)
    np.testing.assert_allclose(t[0], [0.5, 0, 0.5, 0])
    px = jnp.asarray(random_pixels(0, 64, 4, 4))
    f = np.asarray(train._flip(px, jax.random.PRNGKey(3)))
    flipped = [np.array_equal(f[i], np.asarray(px[i, :, ::-1])) for i in range(64)]
    kept = [np.array_equal(f[i], np.asarray(px[i])) for i in range(64)]
    assert all(a or b for a, b in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_optimizer_recipe():
    cfg = _tiny_cfg()
    params = P.init(cfg, jax.random.PRNGKey(0))
    mask = flatten_params(train.decay_mask(params))
    assert mask["vision.proj"] and mask["text.token_embed"] and mask["vision.blocks.attn.qkv.kernel"]
    for k in ("logit_scale", "vision.cls", "vision.pos_embed", "vision.ln_pre.scale",
              "vision.blocks.mlp.fc1.bias", "text.ln_final.bias"):
        assert not mask[k], k
    sched = train.schedule(1e-3, 100, 10)
    assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1e-3) < 1e-9
    assert float(sched(55)) < 1e-3 and float(sched(100)) < 1e-6
    # Gradient clipping: a huge gradient gives a first Adam update no larger than lr.
    tx = train.make_optimizer(lr=1e-2, steps=10, warmup=0, weight_decay=0.0, clip_norm=1e-3)
    small = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    g = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), small)
    upd, _ = tx.update(g, tx.init(small), small)
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(upd)) <= 1e-2 * 1.001


def test_hf_export_round_trip(tmp_path):
    """our params → save_hf → transformers.CLIPModel: same features within 1e-4; → gem_jax.load:
    identical params."""
    import transformers
    cfg = _tiny_cfg()
    params = P.init(cfg, jax.random.PRNGKey(5))
    # No trivial tensors: perturb LN gains/biases and biases too.
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
    params = jax.tree.unflatten(tdef, [np.asarray(x + 0.05 * jax.random.normal(k, x.shape), np.float32)
                                       for x, k in zip(leaves, keys)])
    tok = gem_jax.CLIPTokenizer.from_bpe_gz(context_length=cfg.text.context_length)
    out = save_hf(tmp_path / "hf", cfg, params, tok)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}
    ref = transformers.CLIPModel.from_pretrained(out).eval()
    model = gem_jax.GEMModel(cfg, params, tok)
    pixels = random_pixels(3, 3, 32, 32)
    ids = model.tokenize(CAPTIONS)
    with torch.no_grad():
        fi = ref.get_image_features(pixel_values=nchw(pixels))
        ft = ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    fi = fi.pooler_output if hasattr(fi, "pooler_output") else fi
    ft = ft.pooler_output if hasattr(ft, "pooler_output") else ft
    assert max_err(model.encode_image(pixels), fi) <= 1e-4
    assert max_err(model.encode_text(CAPTIONS), ft) <= 1e-4
    back = gem_jax.load(out)
    assert back.config.vision == cfg.vision and back.config.embed_dim == cfg.embed_dim
    a, b = flatten_params(params), flatten_params(back.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert back.tokenizer(CAPTIONS).tolist() == ids.tolist()
