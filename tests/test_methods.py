"""MaskCLIP, CLIP Surgery, SCLIP, ClearCLIP and NACLIP (gem_jax.methods) against the torch
transcriptions of their upstream code in tests/upstream_methods.py, on the same open_clip 2.23.0
ViT-B-16 (random, perturbed weights made attention-dominant by `sharpen_attention_`, saved in the
OpenCLIP hub layout and loaded with `gem_jax.load`, as a user loads it).

Upstream code each reference transcribes (file @ commit):
  maskclip           mc-lan/ClearCLIP@ad68a404 open_clip/transformer.py L589-622 (MaskCLIP,
                     ignore_residual=True)
  maskclip residual  chongzhou96/MaskCLIP@245d31f8 mmseg/models/backbones/vit.py L94-108,
                     mmseg/models/decode_heads/maskclip_head.py L71-127
  surgery            xmed-lab/CLIP_Surgery@d4696d47 clip/clip_surgery_model.py L57-103, L253-355,
                     clip/clip.py L287-308 (feature surgery)
  sclip              wangf3014/SCLIP@b56bd301 clip/model.py L229-313
  clearclip          mc-lan/ClearCLIP@ad68a404 open_clip/transformer.py L500-622
  naclip             sinahmr/NACLIP@0cac3a65 clip/model.py L94-232

Compared: the method's projected tokens [B, 1+N, E] (`model.image_tokens(method=...)`, relative to
their scale) and its raw maps (those tokens through the heatmap path's own functions: prompts
padded to their bucket, the method's similarity, bilinear upsampling) against the reference's grid
maps upsampled by torch's ``F.interpolate(mode="bilinear")``, with the reference's text embeddings
from open_clip's own ``encode_text``.  TOL = 1e-5; observed errors are noted beside each test.
Each method's defining choice, changed in the reference, moves the maps >= 20 x TOL away from ours.
The `method=` entry points themselves (heatmaps, image_tokens, segment, the Flax module) and the
knob checks run on the bundled toy model at the end of this file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gem_jax
import upstream_methods as um
from conftest import make_openclip, nchw, random_pixels

TOL = 1e-5
SENS = 20 * TOL
PROMPTS = ["a photo of a cat.", "a remote control.", "a red square.", "sky", "dog"]

# name -> (gem_jax method, its keyword arguments, the reference, upstream file @ commit)
CASES = {
    "maskclip": ("maskclip", {}, um.maskclip,
                 "mc-lan/ClearCLIP@ad68a404 open_clip/transformer.py L589-622"),
    "maskclip_official": ("maskclip", dict(residual=True), um.maskclip_official,
                          "chongzhou96/MaskCLIP@245d31f8 mmseg/models/backbones/vit.py L94-108"),
    "surgery": ("surgery", {}, um.surgery,
                "xmed-lab/CLIP_Surgery@d4696d47 clip/clip_surgery_model.py L57-355, clip/clip.py "
                "L287-308"),
    "sclip": ("sclip", {}, um.sclip, "wangf3014/SCLIP@b56bd301 clip/model.py L229-313"),
    "clearclip": ("clearclip", {}, um.clearclip,
                  "mc-lan/ClearCLIP@ad68a404 open_clip/transformer.py L500-622"),
    "naclip": ("naclip", {}, um.naclip, "sinahmr/NACLIP@0cac3a65 clip/model.py L94-232"),
}
# native 224x224 (B = 2: feature surgery's weights are per image) and one resampled size (non-square
# where upstream allows it; CLIP Surgery's positional resampling is square-only upstream)
SIZES = {"native": (2, 224, 224), "resampled": (1, 224, 320)}
SURGERY_RESAMPLED = (1, 320, 320)


SHARPENED = 6  # blocks made attention-dominant: CLIP Surgery's 6, which include every method's last


@torch.no_grad()
def sharpen_last_(visual, n: int, gain: float = 2.0):
    """`upstream_methods.sharpen_attention_` on the last n blocks only: q, k projections x gain
    (logits x gain², peaked attention) and out_proj x gain, so the methods' attention pathways
    dominate their outputs.  The earlier blocks stay near-uniform random CLIP blocks: sharpening
    all 12 triples the float32 rounding of the trunk (both torch's and ours) without testing more
    of the methods."""
    for blk in visual.transformer.resblocks[-n:]:
        d = blk.attn.embed_dim
        blk.attn.in_proj_weight[: 2 * d] *= gain
        blk.attn.in_proj_bias[: 2 * d] *= gain
        blk.attn.out_proj.weight *= gain
        blk.attn.out_proj.bias *= gain


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    """(torch CLIP model, gem_jax model) from one attention-dominant checkpoint on disk."""
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("methods") / "ViT-B-16"
    model = make_openclip("ViT-B-16", path, 12)
    sharpen_last_(model.visual, SHARPENED)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(path / "open_clip_model.safetensors"))
    return model, gem_jax.load(path)


@pytest.fixture(scope="module")
def text(b16):
    import open_clip
    model, _ = b16
    with torch.no_grad():
        return model.encode_text(open_clip.get_tokenizer("ViT-B-16")(PROMPTS))


def size_of(case: str, which: str):
    return SURGERY_RESAMPLED if case == "surgery" and which == "resampled" else SIZES[which]


_REF: dict = {}


def reference(b16, text, case: str, which: str, **kw):
    """The torch reference's (tokens, maps upsampled to the input size) for a case (cached)."""
    key = (case, which, tuple(sorted(kw.items())))
    if key not in _REF:
        b, h, w = size_of(case, which)
        px = nchw(random_pixels(3, b, h, w))
        with torch.no_grad():
            out = CASES[case][2](b16[0].visual, px, text, **kw)
            maps = F.interpolate(out.maps, size=(h, w), mode="bilinear")
        _REF[key] = (out.tokens.double().numpy(), maps.double().numpy())
    return _REF[key]


_OURS: dict = {}


def our_maps(model, name, tokens, hw):
    """Raw maps [B, P, H, W] from our tokens along the public heatmaps path: prompts padded to
    their bucket with zero rows (as `GEMModel.heatmaps` does; CLIP Surgery must ignore them), the
    method's similarity, bilinear upsampling (`gem_jax.maps.heatmaps`, as `dense_heatmaps`)."""
    import jax.numpy as jnp
    from gem_jax import maps as maps_lib, model as model_lib
    emb = model.encode_text(PROMPTS)
    emb = jnp.pad(emb, ((0, model_lib.bucket(len(PROMPTS)) - len(PROMPTS)), (0, 0)))
    grid = gem_jax.vision.patch_grid(model.config.vision, *hw)
    sim = getattr(name, "similarity", maps_lib.patch_similarity)
    return maps_lib.heatmaps(jnp.asarray(tokens, jnp.float32), emb, grid, hw, False,
                             sim)[:, :len(PROMPTS)]


def ours(b16, case: str, which: str):
    """Our (tokens, maps) for a case: one compiled `image_tokens` call, maps from its tokens."""
    if (case, which) not in _OURS:
        model = b16[1]
        name, kw = CASES[case][:2]
        b, h, w = size_of(case, which)
        px = random_pixels(3, b, h, w)
        tok, _ = model.image_tokens(px, method=name, with_ori=False, **kw)
        method, _ = gem_jax.methods.build(name, **kw)
        _OURS[(case, which)] = (np.asarray(tok, np.float64),
                                np.asarray(our_maps(model, method, tok, (h, w)), np.float64))
    return _OURS[(case, which)]


def err(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def rel_err(a, b) -> float:
    """Max abs error over the reference's max abs value: projected tokens have an arbitrary scale
    (max |token| ~ 5 here), and float32 rounds them relatively: against a float64 run of the
    reference, our tokens are 1.6-1.9e-6 of that scale off (plain CLIP's tokens too: the trunk),
    torch's float32 run 0.7-1.1e-6."""
    return err(a, b) / float(np.abs(b).max())


# observed (CPU float32; tokens relative to their max |value| ~5, maps absolute), TOL 1e-5:
#   native:    maskclip 2.2e-6, 3.5e-7 · official 2.0e-6, 3.7e-7 · surgery 1.7e-6, 1.9e-7 ·
#              sclip 1.9e-6, 3.4e-7 · clearclip 1.9e-6, 4.0e-7 · naclip 1.9e-6, 4.0e-7
#   resampled: maskclip 2.1e-6, 3.6e-7 · official 2.1e-6, 4.4e-7 · surgery 1.7e-6, 2.0e-7 ·
#              sclip 2.2e-6, 3.7e-7 · clearclip 2.1e-6, 4.2e-7 · naclip 2.0e-6, 4.1e-7
# (the maps have the 10x margin; the tokens ~5x: float32 rounding of the 12-block trunk, see
# rel_err)
@pytest.mark.parametrize("which", list(SIZES))
@pytest.mark.parametrize("case", list(CASES))
def test_tokens_and_maps_equal_upstream_transcription(b16, text, case, which):
    """Each case transcribes CASES[case][3] (see the module docstring)."""
    ref_tok, ref_maps = reference(b16, text, case, which)
    tok, maps = ours(b16, case, which)
    e_tok, e_maps = rel_err(tok, ref_tok), err(maps, ref_maps)
    print(f"{case} {which}: tokens {e_tok:.2g}, maps {e_maps:.2g}")
    assert e_tok < TOL and e_maps < TOL, (CASES[case][3], e_tok, e_maps)
    assert np.isfinite(tok).all() and np.abs(maps).max() > 0.01  # maps are not trivially ~0


# name -> (case, reference keyword arguments that change the method's defining choice)
VARIANTS = {
    "maskclip: residual + FFN kept": ("maskclip", dict()),  # filled below: the official reference
    "maskclip official: no residual": ("maskclip_official", None),
    "surgery: feature surgery off": ("surgery", dict(use_feature_surgery=False)),
    "surgery: 5 blocks instead of 6": ("surgery", dict(blocks=5)),
    "sclip: kk term dropped": ("sclip", None),
    "sclip: plain q-k attention (csa off)": ("sclip", dict(csa=False)),
    "clearclip: k-k instead of q-q": ("clearclip", None),
    "clearclip: residual + FFN kept": ("clearclip", dict(ignore_residual=False)),
    "naclip: Ω dropped (k-k only)": ("naclip", dict(attn_strategy="kk")),
    "naclip: residual + FFN kept": ("naclip", dict(arch="vanilla")),
    "naclip: σ 5 -> 4": ("naclip", dict(gaussian_std=4.0)),
}


def _variant_maps(b16, text, name):
    """The reference maps with the defining choice changed (native size)."""
    case, kw = VARIANTS[name]
    v = b16[0].visual
    b, h, w = SIZES["native"]
    px = nchw(random_pixels(3, b, h, w))
    with torch.no_grad():
        if name.startswith("maskclip: "):
            out = um.maskclip_official(v, px, text, pos="sclip")
        elif name.startswith("maskclip official"):
            out = um.maskclip(v, px, text, pos="mmseg")
        elif name == "sclip: kk term dropped":
            out = um.clearclip(v, px, text, ignore_residual=False)  # q-q attention + residual + MLP
        elif name == "clearclip: k-k instead of q-q":
            out = um.naclip(v, px, text, attn_strategy="kk")
        else:
            out = CASES[case][2](v, px, text, **kw)
        return F.interpolate(out.maps, size=(h, w), mode="bilinear").double().numpy()


# observed distances from our maps (>= 20 x TOL = 2e-4): maskclip with residual+FFN 1.6e-1,
# official without them 1.6e-1, surgery without feature surgery 1.1e-1, with 5 blocks 2.1e-2,
# sclip without kk 3.0e-2, csa off 5.6e-2, clearclip k-k 3.6e-2, with residual+FFN 1.6e-1,
# naclip without Ω 8.5e-3, with residual+FFN 1.6e-1, σ 5 -> 4 1.4e-3
@pytest.mark.parametrize("name", list(VARIANTS))
def test_defining_choice_moves_the_maps(b16, text, name):
    case = VARIANTS[name][0]
    _, maps = ours(b16, case, "native")
    d = err(maps, _variant_maps(b16, text, name))
    print(f"{name}: {d:.2g}")
    assert d > SENS, (name, d)


def test_options_equal_their_references(b16, text):
    """Options and the traced knob against the reference with the same setting: CLIP Surgery
    without feature surgery (the same tokens, the plain cosine), NACLIP's σ (traced: no new
    compilation), ClearCLIP with its residual and FFN."""
    model = b16[1]
    b, h, w = SIZES["native"]
    px = random_pixels(3, b, h, w)
    v = b16[0].visual
    surgery_tok = ours(b16, "surgery", "native")[0]
    fs_off = gem_jax.methods.build("surgery", feature_surgery=False)[0]
    cases = [("surgery", our_maps(model, fs_off, surgery_tok, (h, w)), um.surgery,
              dict(use_feature_surgery=False))]
    for name, kw, ref_kw in [("naclip", dict(gaussian_std=4.0), dict(gaussian_std=4.0)),
                             ("clearclip", dict(residual=True), dict(ignore_residual=False))]:
        tok, _ = model.image_tokens(px, method=name, with_ori=False, **kw)
        method, _ = gem_jax.methods.build(name, **{k: v for k, v in kw.items()
                                                   if k != "gaussian_std"})
        cases.append((name, our_maps(model, method, tok, (h, w)), getattr(um, name), ref_kw))
    for name, maps, ref_fn, ref_kw in cases:
        with torch.no_grad():
            ref = F.interpolate(ref_fn(v, nchw(px), text, **ref_kw).maps, size=(h, w),
                                mode="bilinear").double().numpy()
        e = err(np.asarray(maps, np.float64), ref)
        print(name, ref_kw, f"{e:.2g}")
        assert e < TOL, (name, ref_kw, e)  # observed 2.5e-7, 3.3e-7, 3.5e-7


def test_sclip_family_skips_resampling_at_the_native_token_count(b16, text):
    """7x28 patches = 196 = 14x14: upstream adds the native table unresampled (kept quirk);
    the antialiased (GEM) rule resamples, so the two differ."""
    model = b16[1]
    px = random_pixels(4, 1, 112, 448)
    tok, _ = model.image_tokens(px, method="clearclip", with_ori=False)
    with torch.no_grad():
        ref = um.clearclip(b16[0].visual, nchw(px)).tokens.double().numpy()
        other = um.clearclip(b16[0].visual, nchw(px), pos="gem").tokens.double().numpy()
    assert rel_err(np.asarray(tok, np.float64), ref) < TOL  # observed 1.6e-6
    assert err(ref, other) > SENS  # observed 1.1e-1


# ----------------------------------------------------------------------------- entry points (toy)
ALL = ["gem", "maskclip", "surgery", "sclip", "clearclip", "naclip"]
TOY_PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def toy():
    from gem_jax import demo
    return demo.toy_model()


def toy_pixels(b=2, h=64, w=80):
    return random_pixels(5, b, h, w)


def test_every_method_through_every_entry_point(toy):
    """heatmaps (shared and ragged prompts), segment and the Flax module, for every registered
    method: shapes, finiteness, segment = the maps' ids, and the module equal to the model."""
    import gem_jax.nn as gnn
    from gem_jax.maps import min_max, segment_from_scores
    assert tuple(gem_jax.METHODS) == tuple(ALL)
    px = toy_pixels()
    clip = gnn.CLIP(toy.config)
    emb = toy.encode_text([f"a photo of a {p}." for p in TOY_PROMPTS])
    seen = {}
    for name in ALL:
        raw = np.asarray(toy.heatmaps(px, TOY_PROMPTS, method=name, normalize=False))
        assert raw.shape == (2, 3, 64, 80) and np.isfinite(raw).all(), name
        ids = np.asarray(toy.segment(px, TOY_PROMPTS, method=name, normalize=False,
                                     background_threshold=0.4))
        assert (ids == np.asarray(segment_from_scores(raw, 0.4))).all(), name
        # (image_tokens(method=...) runs for every method in the parity tests above)
        # Flax: `apply`'s own `method` names the module function; the dense method is
        # `dense_method`
        fl = clip.apply({"params": toy.params}, px, emb, method="heatmaps", dense_method=name,
                        normalize=False)
        assert np.abs(np.asarray(fl) - raw).max() < 1e-5, name  # raw cosines
        seen[name] = raw
    # a ragged call is each image's own call (shared prompts: the shared call's maps), except that
    # CLIP Surgery's feature surgery weighs each prompt against the image's other prompts
    maps = np.asarray(min_max(seen["naclip"]))
    ragged = toy.heatmaps(px, [TOY_PROMPTS[:1], TOY_PROMPTS[1:]], method="naclip")
    assert [r.shape for r in ragged] == [(1, 64, 80), (2, 64, 80)]
    assert np.abs(np.asarray(ragged[1]) - maps[1, 1:]).max() < 1e-5
    ragged = toy.heatmaps(px, [TOY_PROMPTS[:1], TOY_PROMPTS[1:]], method="surgery",
                          normalize=False)
    own = toy.heatmaps(px[1:], TOY_PROMPTS[1:], method="surgery", normalize=False)[0]
    assert np.abs(np.asarray(ragged[1]) - np.asarray(own)).max() < 1e-6
    assert np.abs(np.asarray(ragged[1]) - seen["surgery"][1, 1:]).max() > 1e-2
    # the methods are different maps of the same image
    for i, a in enumerate(ALL):
        for b in ALL[i + 1:]:
            assert np.abs(seen[a] - seen[b]).max() > 1e-3, (a, b)


def test_unknown_methods_and_knobs_are_clear_errors(toy):
    px = toy_pixels(1)
    with pytest.raises(ValueError, match="unknown method 'mask_clip'; choose one of: gem, "
                                         "maskclip, surgery, sclip, clearclip, naclip"):
        toy.heatmaps(px, ["x"], method="mask_clip")
    with pytest.raises(ValueError, match=r"gem_depth does not apply to method 'naclip' \(its "
                                         r"knobs: gaussian_std; options: arch, attn_strategy, pos\)"):
        toy.heatmaps(px, ["x"], method="naclip", gem_depth=3)
    with pytest.raises(ValueError, match="gaussian_std does not apply to method 'sclip'"):
        toy.image_tokens(px, method="sclip", gaussian_std=3.0)
    with pytest.raises(ValueError, match="residual does not apply to method 'gem'"):
        toy.segment(px, ["x"], residual=True)
    with pytest.raises(ValueError, match="gaussian_std must be a finite number > 0"):
        toy.heatmaps(px, ["x"], method="naclip", gaussian_std=0.0)
    with pytest.raises(ValueError, match=r"blocks must be in \[1, 6\] for a 6-layer tower"):
        toy.heatmaps(px, ["x"], method="surgery", blocks=7)
    with pytest.raises(TypeError, match="blocks must be an integer"):
        toy.heatmaps(px, ["x"], method="surgery", blocks=2.5)
    with pytest.raises(ValueError, match="attn_strategy must be one of 'naclip', 'kk', 'csa', "
                                         "'vanilla', got 'qq'"):
        toy.heatmaps(px, ["x"], method="naclip", attn_strategy="qq")
    with pytest.raises(ValueError, match="'csa' needs arch 'vanilla'"):
        toy.heatmaps(px, ["x"], method="naclip", attn_strategy="csa")
    with pytest.raises(ValueError, match="pos .*must be one of 'antialias', 'scale_factor', "
                                         "'bilinear', 'mmseg', got 'bicubic'"):
        toy.heatmaps(px, ["x"], method="sclip", pos="bicubic")


def test_traced_knobs_sweep_without_recompiling_and_nan_out_of_range(toy):
    """NACLIP's σ and CLIP Surgery's block count are traced: new values reuse the compilation;
    out-of-range traced values give NaN maps, never a clamped result; σ may be one per image."""
    import jax
    import jax.numpy as jnp
    from gem_jax.model import dense_heatmaps
    px = jnp.asarray(toy_pixels())
    emb = jnp.pad(toy.encode_text(TOY_PROMPTS), ((0, 5), (0, 0)))
    naclip, _ = gem_jax.methods.build("naclip")

    def f(std):
        return dense_heatmaps(toy.params, px, emb, dict(gaussian_std=std), cfg=toy.config,
                              method=naclip, normalize=False, ex=toy.execution)
    a = f(jnp.float32(5.0))
    n = dense_heatmaps._cache_size()
    b, c = f(jnp.float32(2.0)), f(jnp.float32(9.0))
    assert dense_heatmaps._cache_size() == n
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4  # σ matters on the toy model too
    # one σ per image equals each image run with its own σ
    per = f(jnp.asarray([5.0, 2.0], jnp.float32))
    assert np.abs(np.asarray(per[0]) - np.asarray(a[0])).max() < 1e-6
    assert np.abs(np.asarray(per[1]) - np.asarray(b[1])).max() < 1e-6
    bad = jax.jit(f)(jnp.float32(-1.0))
    assert np.isnan(np.asarray(bad)).all()
    surgery, _ = gem_jax.methods.build("surgery")

    def g(blocks):
        return dense_heatmaps(toy.params, px, emb, dict(blocks=blocks), cfg=toy.config,
                              method=surgery, normalize=False, ex=toy.execution)
    ok = g(jnp.int32(3))
    m = dense_heatmaps._cache_size()
    assert np.isfinite(np.asarray(ok)).all() and np.isfinite(np.asarray(g(jnp.int32(6)))).all()
    assert np.isnan(np.asarray(g(jnp.int32(7)))).all() and np.isnan(np.asarray(g(jnp.int32(0)))).all()
    assert dense_heatmaps._cache_size() == m
    # the traced knob gives what the keyword gives
    kw = toy.heatmaps(np.asarray(px), TOY_PROMPTS, method="surgery", blocks=3, normalize=False,
                      template=None)
    assert np.abs(np.asarray(kw) - np.asarray(ok)[:, :3]).max() < 1e-6


def test_feature_surgery_ignores_padded_prompts_and_is_per_image(toy):
    """Prompt padding (zero rows) must not enter feature surgery's softmax and means: the maps of 3
    prompts are the same whatever the bucket; and each image's weights are its own."""
    import jax.numpy as jnp
    from gem_jax.methods.surgery import feature_surgery
    rng = np.random.default_rng(0)
    tok = jnp.asarray(rng.standard_normal((2, 1 + 12, 16)), jnp.float32)
    txt = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    a = feature_surgery(tok, txt, (3, 4))
    b = feature_surgery(tok, jnp.pad(txt, ((0, 5), (0, 0))), (3, 4))[:, :3]
    assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-6
    per = feature_surgery(tok, jnp.broadcast_to(jnp.pad(txt, ((0, 1), (0, 0))), (2, 4, 16)), (3, 4))
    assert np.abs(np.asarray(per)[:, :3] - np.asarray(a)).max() < 1e-6
    # closed form (the upstream torch transcription's, numpy here)
    t = np.asarray(tok, np.float64)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    x = np.asarray(txt, np.float64)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    cos = t @ x.T                                               # [2, 13, 3]
    w = np.exp(2 * cos[:, :1]) / np.exp(2 * cos[:, :1]).sum(-1, keepdims=True)
    w = w / w.mean(-1, keepdims=True)
    want = (w * cos - (w * cos).mean(-1, keepdims=True))[:, 1:].transpose(0, 2, 1).reshape(2, 3, 3, 4)
    assert np.abs(np.asarray(a) - want).max() < 1e-6  # observed ~1e-7


def test_parse_knob_for_the_command_line():
    from gem_jax.methods import build, parse_knob
    assert parse_knob("gaussian_std=3") == ("gaussian_std", 3)
    assert parse_knob("gaussian-std=2.5") == ("gaussian_std", 2.5)
    assert parse_knob("residual=true") == ("residual", True)
    assert parse_knob("feature_surgery=off") == ("feature_surgery", False)
    assert parse_knob("ss_attn_temp=adaptive") == ("ss_attn_temp", None)
    assert parse_knob("branches=q,k") == ("branches", ("q", "k"))
    assert parse_knob("attn_strategy=kk") == ("attn_strategy", "kk")
    for bad in ("gaussian_std", "=3", "x="):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_knob(bad)
    m, kn = build("maskclip", **dict([parse_knob("residual=true")]))
    assert m.residual is True and kn == {}
