"""Sliding-window arithmetic, the classification rule, and one-window == whole-image inference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import gem_jax
from gem_jax import gem
from gem_jax.config import CLIPConfig, TextConfig, VisionConfig
from gem_jax.eval.protocols import (GEMProtocol, SlidingProtocol, classify, pad_amounts,
                                    rescale_size, resize_maps, slide_inference, window_boxes)


def tiny_model(seed=0, layers=3):
    """A tiny random CLIP built with numpy (jax.random init compiles per shape: slow on CPU);
    shared by the eval tests (test_eval_cli*, test_eval_methods, test_oiv7)."""
    cfg = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=layers,
                                         heads=4, mlp_dim=128),
                     text=TextConfig(width=32, layers=2, heads=4, mlp_dim=64), embed_dim=32)
    rng = np.random.default_rng(seed)
    shapes = gem_jax.params.param_shapes(cfg)

    def make(path, shape):
        key = jax.tree_util.keystr(path)
        if key.endswith("['scale']"):
            return np.ones(shape, np.float32) + 0.1 * rng.standard_normal(shape).astype(np.float32)
        if key == "['logit_scale']":
            return np.asarray(np.log(1 / 0.07), np.float32)
        std = 0.02 if key.endswith("['bias']") or "embed" in key or "cls" in key else 0.15
        return (std * rng.standard_normal(shape)).astype(np.float32)
    params = jax.tree_util.tree_map_with_path(make, shapes, is_leaf=gem_jax.params.is_shape)
    return gem_jax.GEMModel(cfg, params, gem_jax.CLIPTokenizer.from_bpe_gz(), source="tiny")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ----------------------------------------------------------------------------- geometry
def test_rescale_size_is_mmcv_rule():
    assert rescale_size(500, 375, 336) == (448, 336)       # VOC landscape
    assert rescale_size(375, 500, 336) == (336, 448)
    assert rescale_size(2048, 1024, 560) == (1120, 560)     # Cityscapes at 560
    assert rescale_size(5000, 100, 336) == (2048, 41)       # long side capped at 2048
    assert rescale_size(5000, 100, 336, None) == (16800, 336)


def test_window_boxes():
    assert window_boxes(336, 448, 336, 112) == [(0, 336, 0, 336), (0, 336, 112, 448)]
    # the last window is shifted back inside the image
    assert window_boxes(10, 23, 8, 6) == [(0, 8, 0, 8), (0, 8, 6, 14), (0, 8, 12, 20),
                                          (0, 8, 15, 23), (2, 10, 0, 8), (2, 10, 6, 14),
                                          (2, 10, 12, 20), (2, 10, 15, 23)]
    # an image smaller than the window: one window, the image itself
    assert window_boxes(5, 7, 8, 4) == [(0, 5, 0, 7)]
    # every pixel covered, every window inside
    for h, w, c, s in [(37, 51, 16, 5), (16, 16, 16, 16), (40, 17, 12, 12)]:
        cover = np.zeros((h, w), int)
        for y1, y2, x1, x2 in window_boxes(h, w, c, s):
            assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
            assert y2 - y1 == min(c, h) and x2 - x1 == min(c, w)
            cover[y1:y2, x1:x2] += 1
        assert cover.min() >= 1


def test_pad_amounts():
    assert pad_amounts(16, 16, 8) == (0, 0, 0, 0)
    assert pad_amounts(13, 10, 8) == (1, 2, 3, 3)


def _expected_average(h, w, crop, stride, value_fn):
    """Brute force: per pixel, the mean of value_fn(window) over the windows covering it
    (windows enumerated here with mmseg's loop, independently of window_boxes)."""
    total = np.zeros((h, w))
    count = np.zeros((h, w))
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * stride + crop, h)
            x2 = min(wi * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            for y in range(y1, y2):
                for x in range(x1, x2):
                    total[y, x] += value_fn(y1, x1, y, x)
                    count[y, x] += 1
    return total / count


@pytest.mark.parametrize("h,w,crop,stride,batch", [(20, 31, 8, 3, 1), (24, 24, 8, 8, 4),
                                                   (17, 40, 16, 5, 3)])
def test_overlapping_windows_are_averaged(h, w, crop, stride, batch):
    # pixel channel 0 encodes its position, so a fake window function knows where each window is
    yy, xx = np.mgrid[:h, :w]
    pixels = np.stack([yy * 1000 + xx, yy, xx], -1).astype(np.float32)

    def window_fn(crops):  # map 0: a per-window constant; map 1: position-dependent
        corner = crops[:, 0, 0, 0]
        y1, x1 = corner // 1000, corner % 1000
        b, hh, ww = crops.shape[:3]
        out = np.empty((b, 2, hh, ww), np.float32)
        out[:, 0] = (y1 * 7 + x1 * 3)[:, None, None]
        out[:, 1] = crops[..., 1] * (1 + x1[:, None, None]) + crops[..., 2]
        return out

    got = slide_inference(pixels, window_fn, crop, stride, batch_size=batch)
    exp0 = _expected_average(h, w, crop, stride, lambda y1, x1, y, x: y1 * 7 + x1 * 3)
    exp1 = _expected_average(h, w, crop, stride, lambda y1, x1, y, x: y * (1 + x1) + x)
    np.testing.assert_allclose(got[0], exp0, rtol=1e-6)
    np.testing.assert_allclose(got[1], exp1, rtol=1e-6)


def test_padding_is_cut_before_averaging():
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((13, 21, 3)).astype(np.float32)
    seen = []

    def identity(crops):  # padded windows come in; the result must not contain the padding
        seen.append(crops.shape[1:3])
        assert crops.shape[1] % 8 == 0 and crops.shape[2] % 8 == 0
        return np.moveaxis(crops, -1, 1)

    got = slide_inference(pixels, identity, 10, 4, multiple=8, batch_size=2)
    np.testing.assert_allclose(got, np.moveaxis(pixels, -1, 0), rtol=1e-6)
    assert set(seen) == {(16, 16)}


# ----------------------------------------------------------------------------- classification
def test_classify_equals_segment_from_scores():
    rng = np.random.default_rng(1)
    cos = rng.uniform(-0.2, 0.4, (5, 9, 11)).astype(np.float32)
    scale = 100.0
    for thr in (None, 0.5, 0.9):
        ref = np.asarray(gem.segment_from_scores(jnp.asarray(scale * cos)[None], thr))[0]
        if thr is None:  # no background: classes 0..4
            got = classify(cos, np.arange(5), scale)
        else:            # background (0) by threshold, classes 1..5 prompted
            got = classify(cos, np.arange(1, 6), scale, thr)
        np.testing.assert_array_equal(got, ref)


def test_classify_synonyms_take_the_max_probability():
    cos = np.zeros((4, 1, 3), np.float32)
    cos[:, 0, 0] = [0.9, 0.1, 0.2, 0.3]   # query 0 (class 0) wins
    cos[:, 0, 1] = [0.1, 0.5, 0.2, 0.6]   # query 3 (class 2) wins over class 1's best 0.5
    cos[:, 0, 2] = [0.0, 0.0, 0.0, 0.0]   # uniform: 1/4 each; threshold 0.3 → background 0
    owner = np.array([0, 1, 1, 2])        # class 1 has two prompts
    got = classify(cos, owner, 10.0, threshold=0.3)
    p = np.exp(10 * cos[:, 0, 1]) / np.exp(10 * cos[:, 0, 1]).sum()
    assert p[3] > p[1] and p[3] >= 0.3
    np.testing.assert_array_equal(got, [[0, 2, 0]])
    np.testing.assert_array_equal(classify(cos, owner, 10.0), [[0, 2, 0]])  # tie → lowest id


def test_resize_maps_matches_gem_upsample():
    x = np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(resize_maps(x, (13, 7)), np.asarray(gem.upsample(x, (13, 7))),
                               atol=1e-6)


# ----------------------------------------------------------------------------- with the model
def test_one_window_image_equals_whole_image_inference(model):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    prompts = [["cat"], ["dog"], ["a tree", "tree"], ["sky"]]
    kw = dict(has_background=False, gem_depth=3, ss_attn_iter=1)
    whole = GEMProtocol(model, prompts, size=32, **kw)
    slide = SlidingProtocol(model, prompts, size=32, crop=32, stride=16,
                            templates=["a photo of a {}."], **kw)
    a = whole.scores_batch([img], [(32, 32)])[0]
    b = slide.scores_batch([img], [(32, 32)])[0]
    assert a.shape == b.shape == (5, 32, 32)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(whole.classify(a), slide.classify(b))
    # and the GEM protocol's maps are the model's heatmaps (raw cosine), upsampled to the label
    ref = model.heatmaps(whole.model.preprocess(img, size=32), ["cat", "dog", "a tree", "tree", "sky"],
                         gem_depth=3, normalize=False)[0]
    np.testing.assert_allclose(a, np.asarray(ref), atol=1e-5)


def test_gem_protocol_resizes_to_the_label(model):
    img = Image.fromarray(np.full((20, 50, 3), 128, np.uint8))
    p = GEMProtocol(model, [["cat"], ["dog"]], has_background=False, size=32, gem_depth=2)
    (cos,) = p.scores_batch([img], [(20, 50)])
    assert cos.shape == (2, 20, 50) and np.isfinite(cos).all()
    assert p.predict_batch([img], [(7, 9)])[0].shape == (7, 9)


def test_protocol_argument_checks(model):
    with pytest.raises(ValueError, match="background class"):
        GEMProtocol(model, [["a"]], has_background=False, threshold=0.5, gem_depth=2)
    with pytest.raises(ValueError, match="needs a threshold"):
        GEMProtocol(model, [["bg"], ["a"]], has_background=True, background="both", gem_depth=2)
    with pytest.raises(ValueError, match="gem_depth"):
        GEMProtocol(model, [["a"]], has_background=False, gem_depth=9)
    with pytest.raises(ValueError, match="stride"):
        SlidingProtocol(model, [["a"]], has_background=False, size=32, crop=16, stride=20,
                        gem_depth=2, templates=["{}"])
