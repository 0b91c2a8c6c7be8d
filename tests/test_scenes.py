"""The scene generator (gem_jax.scenes): deterministic, masks consistent with pixels and captions."""

from __future__ import annotations

import numpy as np
import pytest

from gem_jax import scenes


def test_deterministic_by_seed_and_index():
    a = scenes.scene(5, seed=3)
    b = scenes.scenes(3, seed=3, start=4)[1]
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.caption == b.caption and a.objects == b.objects
    # Other indices, seeds and splits give other scenes.
    for other in (scenes.scene(6, seed=3), scenes.scene(5, seed=4), scenes.scene(5, seed=3, split="test")):
        assert not np.array_equal(a.image, other.image)
    with pytest.raises(ValueError, match="split"):
        scenes.scene(0, split="val")


def test_scene_contents():
    counts = set()
    for s in scenes.scenes(40, seed=0, split="test"):
        k = len(s.objects)
        counts.add(k)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.masks.shape == (k, 64, 64) and s.masks.dtype == bool
        assert (s.masks.sum(0) <= 1).all()  # disjoint
        assert len({c for c, _ in s.objects}) == k  # distinct colours
        for (color, shape), m in zip(s.objects, s.masks):
            assert color in scenes.COLORS and shape in scenes.SHAPES
            assert m.sum() > 20
            # The object's pixels are close to its (jittered) colour; the background is dull.
            mean = s.image[m].astype(float).mean(0)
            assert np.abs(mean - scenes.COLORS[color]).max() < 40, (color, mean)
            assert scenes.prompt(color, shape) in s.caption
        assert s.caption.startswith("a photo of ") and s.caption.endswith(".")
    assert counts == {1, 2, 3}


def test_captions_and_classes():
    assert scenes.caption([("red", "circle")]) == "a photo of a red circle."
    assert scenes.caption([("red", "circle"), ("orange", "star")]) == \
        "a photo of a red circle and an orange star."
    assert scenes.caption([("red", "circle"), ("blue", "square"), ("green", "cross")]) == \
        "a photo of a red circle, a blue square and a green cross."
    assert len(scenes.CLASS_NAMES) == 30 and len(set(scenes.CLASS_NAMES)) == 30


@pytest.mark.parametrize("shape", scenes.SHAPES)
def test_shapes_have_expected_area(shape):
    a = scenes.shape_alpha(shape, 64, 32.0, 32.0, 12.0, 0.3)
    area = a.sum() / (np.pi * 12 ** 2)  # relative to the circumscribed circle
    w = 2 * 0.36  # cross bar width / r
    expected = dict(circle=1.0, square=(2 * 0.82) ** 2, triangle=3 * np.sqrt(3) / 4,
                    star=5 * 0.45 * np.sin(np.pi / 5), cross=2 * 2 * w - w * w)[shape]
    if shape != "circle":
        expected /= np.pi
    assert abs(area - expected) < 0.02, (shape, area, expected)
    assert a.max() == 1.0 and a[0, 0] == 0.0


def test_batch_groups():
    b = scenes.batch(64, seed=0)
    assert b["images"].shape == (64, 64, 64, 3) and len(b["captions"]) == 64
    g = b["groups"]
    for i in range(64):
        for j in range(64):
            assert (g[i] == g[j]) == (set(b["objects"][i]) == set(b["objects"][j]))
