"""Evaluation per method (issue 12): each method's protocol defaults from its upstream configs
(`gem_jax.eval.protocols.METHOD_PROTOCOLS`), the eval scores coming from the model's method path,
PAMR as a post-processing step, SCLIP's area threshold, whole-image and unpadded windows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gem_jax.eval import protocols as P
from gem_jax.eval.runner import evaluate
from test_eval_cli import make_dataset
from test_eval_protocols import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


def image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- the table
# (method, dataset) -> what the upstream config says, by file
EXPECTED = {
    # wangf3014/SCLIP@b56bd301 configs/cfg_voc21.py: logit_scale=65, prob_thd=0.1, area_thd=0.1,
    # Resize scale=(2048, 336); clip_segmentor.py: slide_crop=224, slide_stride=112, pamr_steps=0
    ("sclip", "voc21"): dict(kind="sliding", size=336, crop=224, stride=112, logit_scale=65.0,
                             background="both", threshold=0.1, area_threshold=0.1, pamr_steps=0,
                             pad=False, max_long_side=2048),
    # cfg_coco_stuff164k.py: scale (2048, 448); cfg_city_scapes.py: (2048, 560); logit_scale 40
    ("sclip", "coco_stuff"): dict(size=448, logit_scale=40.0),
    ("sclip", "cityscapes"): dict(size=560, crop=224, stride=112),
    ("sclip", "context60"): dict(logit_scale=50.0, threshold=0.1),
    # mc-lan/ClearCLIP@ad68a404 clearclip_segmentor.py: slide_crop=448, slide_stride=224,
    # logit_scale=50; configs/cfg_voc21.py prob_thd=0.5; cfg_city_scapes.py slide_crop=224
    ("clearclip", "voc21"): dict(kind="sliding", size=448, crop=448, stride=224, logit_scale=50.0,
                                 threshold=0.5, pad=True, pamr_steps=0),
    ("clearclip", "context60"): dict(threshold=0.15),
    ("clearclip", "coco_object"): dict(threshold=0.4),
    ("clearclip", "cityscapes"): dict(size=448, crop=224, stride=224),
    ("maskclip", "coco_object"): dict(threshold=0.4, logit_scale=50.0, crop=448),
    # sinahmr/NACLIP@0cac3a65 naclip.py: logit_scale=40, pamr_steps=10, slide 224/112;
    # configs/cfg_voc21.py prob_thd=0.1, slide_crop=0; cfg_city_scapes.py (2048, 560)
    ("naclip", "voc21"): dict(kind="sliding", size=336, crop=0, logit_scale=40.0, threshold=0.1,
                              pamr_steps=10, pad=False),
    ("naclip", "voc20"): dict(crop=0, pamr_steps=10),
    ("naclip", "ade20k"): dict(size=336, crop=224, stride=112, pamr_steps=10),
    ("naclip", "cityscapes"): dict(size=560, crop=224),
    # upstream GEM (docs/reproduce.md): 448x448, one template, threshold 0.85
    ("gem", "voc21"): dict(kind="gem", size=448, background="threshold", threshold=0.85,
                           logit_scale=None, pamr_steps=0),
    # CLIP Surgery's demo: 512x512 bicubic, 85 templates
    ("surgery", "context59"): dict(kind="gem", size=512, pamr_steps=0),
}


@pytest.mark.parametrize("method,dataset", list(EXPECTED))
def test_defaults_follow_the_upstream_configs(method, dataset):
    kw = P.protocol_defaults(method, dataset)
    for k, v in EXPECTED[(method, dataset)].items():
        assert kw[k] == v, (method, dataset, k, kw[k], v)


def test_templates_and_names_per_method():
    from gem_jax.eval.classnames import IMAGENET_TEMPLATES, names_for
    assert P.protocol_defaults("sclip", "voc20")["templates"] == IMAGENET_TEMPLATES
    assert len(P.protocol_defaults("surgery", "voc20")["templates"]) == 85
    assert P.protocol_defaults("maskclip", "voc20", {"residual": True})["templates"] == \
        P.MASKCLIP_TEMPLATES
    assert P.protocol_defaults("gem", "voc20")["templates"] == ("a photo of a {}.",)
    # SCLIP and NACLIP share cls_voc21.txt (the background prompted with "stuff" words);
    # ClearCLIP's prompts "background" and renames two VOC classes
    assert P.protocol_defaults("naclip", "voc21")["class_prompts"] == names_for("voc21", "sclip")
    cc = P.protocol_defaults("clearclip", "voc21")["class_prompts"]
    assert cc[0] == ["background"] and ["ship"] in cc and ["table"] in cc and len(cc) == 21
    # official MaskCLIP: whole image, mmseg's (520, 520) on PASCAL Context
    off = P.protocol_defaults("maskclip", "context59", {"residual": True})
    assert (off["crop"], off["size"], off["max_long_side"]) == (0, 520, 520)
    with pytest.raises(ValueError, match="unknown method 'mask'"):
        P.protocol_defaults("mask", "voc21")


# ----------------------------------------------------------------------------- method path
@pytest.mark.parametrize("method,knobs", [("gem", dict(gem_depth=3)), ("maskclip", {}),
                                          ("surgery", dict(blocks=2)), ("sclip", {}),
                                          ("clearclip", {}), ("naclip", dict(gaussian_std=3.0))])
def test_eval_scores_are_the_models_method_maps(model, method, knobs):
    """The protocol's scores are `model.heatmaps(method=...)` raw maps (upsampled to the label):
    eval and the API share one tokens → maps path, CLIP Surgery's similarity included."""
    prompts = [["cat"], ["dog"], ["sky"]]
    p = P.GEMProtocol(model, prompts, has_background=False, size=32, method=method, knobs=knobs)
    img = image(32, 32, 1)
    (a,) = p.scores_batch([img], [(32, 32)])
    ref = model.heatmaps(model.preprocess(img, size=32), ["cat", "dog", "sky"], method=method,
                         normalize=False, **knobs)[0]
    assert np.abs(a - np.asarray(ref)).max() < 1e-5, method  # observed <= 1e-7
    rec = p.knobs()
    if method == "gem":
        assert rec["gem_depth"] == 3 and "method" not in rec  # GEM's result keys unchanged
    else:
        assert rec["method"]["method"] == method and rec["tokens"] == method
        assert all(rec["method"][k] == v for k, v in knobs.items())


def test_method_protocol_errors(model):
    with pytest.raises(ValueError, match="gem_depth does not apply to method 'sclip'"):
        P.method_protocol(model, "sclip", "voc20", knobs=dict(gem_depth=3), size=32, crop=32)
    with pytest.raises(ValueError, match="gem_depth does not apply to method 'naclip'"):
        P.SlidingProtocol(model, [["a"]], has_background=False, size=32, method="naclip",
                          gem_depth=3)
    with pytest.raises(ValueError, match="unknown method 'mask_clip'"):
        P.GEMProtocol(model, [["a"]], has_background=False, size=32, method="mask_clip")
    with pytest.raises(ValueError, match="pamr_steps must be an integer >= 0"):
        P.GEMProtocol(model, [["a"]], has_background=False, size=32, gem_depth=3, pamr_steps=-1)
    with pytest.raises(ValueError, match="area threshold applies only to datasets with a "
                                         "background"):
        P.GEMProtocol(model, [["a"]], has_background=False, size=32, gem_depth=3,
                      area_threshold=0.1)
    with pytest.raises(ValueError, match="blocks must be in"):
        P.method_protocol(model, "surgery", "voc20", size=32)  # 6 blocks on a 3-layer tower


# ----------------------------------------------------------------------------- post-processing
def test_pamr_refines_the_label_size_maps(model):
    """PAMR on: the scores are `gem_jax.pamr.pamr` of the unrefined label-size maps with the
    normalized input resized (bilinear) to the label size, in chunks of classes."""
    from gem_jax import pamr
    prompts = [[c] for c in ["cat", "dog", "sky", "tree", "car"]]
    kw = dict(has_background=False, size=32, crop=0, pad=False, method="naclip",
              templates=["a photo of a {}."])
    off = P.SlidingProtocol(model, prompts, **kw)
    on = P.SlidingProtocol(model, prompts, pamr_steps=10, **kw)
    img = image(29, 43, 2)
    hw = (40, 55)
    (raw,) = off.scores_batch([img], [hw])
    (ref,) = on.scores_batch([img], [hw])
    resized = off.resize(img)
    px = model.preprocess(resized, size=(resized.height, resized.width))[0]
    small = P.resize_maps(np.moveaxis(px, -1, 0), hw)
    want = np.asarray(pamr.pamr(np.moveaxis(small, 0, -1)[None], raw[None], 10, (8, 16)))[0]
    assert np.abs(ref - want).max() < 1e-6
    assert np.abs(ref - raw).max() > 1e-3  # PAMR changes the maps
    # chunked over classes = all classes at once
    chunked = P.refine(raw, px, 10, (8, 16), chunk=2)
    assert np.abs(chunked - want).max() < 1e-6
    assert on.knobs()["pamr"] == {"steps": 10, "dilations": [8, 16]} and "pamr" not in off.knobs()


def test_whole_image_unpadded_window_is_the_model_map(model):
    """crop=0, pad=False (NACLIP on VOC): one window, the whole resized image, the trailing pixels
    dropped by the patch embedding and the grid maps stretched over the image."""
    prompts = [["cat"], ["dog"]]
    p = P.SlidingProtocol(model, prompts, has_background=False, size=36, crop=0, pad=False,
                          method="clearclip", templates=["{}"], resample="bilinear")
    img = image(30, 50, 3)
    resized = p.resize(img)
    assert (resized.width, resized.height) == (60, 36)
    (a,) = p.scores_batch([img], [(36, 60)])
    px = model.preprocess(resized, size=(36, 60))
    from gem_jax.maps import patch_similarity, upsample
    tok, _ = model.image_tokens(px[:, :32, :56], method="clearclip")  # the 4x7 whole patches
    g = patch_similarity(tok, model.encode_text(["cat", "dog"]), (4, 7))
    want = np.asarray(upsample(g, (36, 60)))[0]
    assert np.abs(a - want).max() < 1e-5
    assert p.knobs()["crop"] == "whole image" and p.knobs()["stride"] is None


def test_area_threshold_matches_sclip_rule():
    """SCLIP's area_thd, written out: classes (not background) whose argmax area is at most
    thd x the non-background argmax area are zeroed before the argmax and prob threshold."""
    rng = np.random.default_rng(4)
    cos = rng.uniform(0, 0.3, (4, 30, 40)).astype(np.float32)
    cos[3, :2, :2] += 0.5            # class 3 wins a tiny area only
    cos[1, 5:, :] += 0.3             # class 1 wins most
    owner = np.arange(4)
    z = np.exp(50 * cos)
    prob = z / z.sum(0)
    arg = prob.argmax(0)
    area = np.bincount(arg.ravel(), minlength=4)
    keep = np.r_[True, area[1:] > 0.1 * area[1:].sum()]
    assert not keep[3] and keep[1]
    prob2 = prob * keep[:, None, None]
    want = prob2.argmax(0)
    want[prob2.max(0) < 0.2] = 0
    got = P.classify(cos, owner, 50.0, threshold=0.2, area_threshold=0.1)
    np.testing.assert_array_equal(got, want)
    assert (P.classify(cos, owner, 50.0, threshold=0.2) == 3).any()  # without it class 3 shows


# ----------------------------------------------------------------------------- end to end
def test_naclip_protocol_end_to_end(model, tmp_path):
    """`evaluate` with NACLIP's VOC21 defaults (whole image, threshold 0.1, PAMR), only the size
    shrunk for the tiny model (and one template instead of 80, for speed): runs and records the
    method and its protocol."""
    make_dataset("voc21", tmp_path / "data", n=2)
    proto = P.method_protocol(model, "naclip", "voc21", size=32, templates=["{}"])
    res = evaluate(model, "voc21", tmp_path / "data", proto, out=tmp_path / "r.json", quiet=True)
    assert res["status"] == "complete" and res["counts"]["images"] == 2
    k = res["protocol"]
    assert k["method"] == {"method": "naclip", "gaussian_std": 5.0}
    assert k["pamr"]["steps"] == 10 and k["crop"] == "whole image"
    assert k["logit_scale"] == 40.0 and k["background_threshold"] == 0.1
    assert "NACLIP" in k["defaults_from"]
    assert res["metrics"]["mIoU"] is not None


def test_point_protocol_takes_a_method(model):
    """OIv7 points (`PointProtocol`) with another method: its maps are the method's heatmaps and
    the results record the method."""
    img = image(40, 40, 5)
    p = P.PointProtocol(model, size=32, method="sclip")
    (m,) = p.maps_batch([img], [["Cat", "Dog"]])
    ref = model.heatmaps(model.preprocess(img, size=32), ["Cat", "Dog"], method="sclip")[0]
    assert np.abs(m - np.asarray(ref)).max() < 1e-6
    assert p.knobs()["method"] == {"method": "sclip"} and p.knobs()["tokens"] == "sclip"
    g = P.PointProtocol(model, size=32, gem_depth=3).knobs()
    assert g["gem_depth"] == 3 and "method" not in g  # GEM's result keys unchanged
    with pytest.raises(ValueError, match="gem_depth does not apply to method 'sclip'"):
        P.PointProtocol(model, size=32, method="sclip", gem_depth=3)
