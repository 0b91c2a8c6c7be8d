"""gem_jax.viz: colormaps, overlays, grids, segmentation pictures (Pillow + numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gem_jax import viz


def _img(w=40, h=30, mode="RGB"):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _ramp(h=8, w=8):
    return np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)


# ----------------------------------------------------------------------------- colormaps
@pytest.mark.parametrize("name", viz.COLORMAPS)
def test_builtin_luts(name):
    lut = viz.colormap(name)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert len({tuple(c) for c in lut}) > 200  # a smooth ramp, no repeated entries


def test_viridis_endpoints_and_monotone_luminance():
    lut = viz.colormap("viridis").astype(float)
    assert tuple(lut[0]) == (68, 1, 84) and tuple(lut[-1]) == (253, 231, 37)
    lum = lut @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(lum) > -1.0)  # perceptual: (almost) monotone lightness


def test_colormap_array_and_errors():
    assert viz.colormap(np.array([[0, 0, 0], [1.0, 1.0, 1.0]])).tolist() == [[0, 0, 0], [255, 255, 255]]
    with pytest.raises(ValueError, match="unknown colormap"):
        viz.colormap("no-such-map")
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        viz.colormap(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        viz.colormap(np.full((4, 3), 2.0))


def test_matplotlib_colormap_optional():
    import matplotlib  # noqa: F401  (installed with the test extra, via gem_torch)
    assert viz.colormap("magma").shape == (256, 3)


def test_apply_colormap_clips_and_rejects_nan():
    out = viz.apply_colormap(np.array([[-1.0, 0.0], [1.0, 2.0]]))
    lut = viz.colormap("viridis")
    assert (out[0, 0] == lut[0]).all() and (out[1, 1] == lut[-1]).all()
    with pytest.raises(ValueError, match="NaN"):
        viz.apply_colormap(np.array([[np.nan, 0.0]]))


def test_resize_map_stays_in_range():
    m = _ramp(5, 7)
    r = viz.resize_map(m, (123, 3))
    assert r.shape == (3, 123) and r.min() >= 0 and r.max() <= 1
    assert viz.resize_map(m, (7, 5)) is m


# ----------------------------------------------------------------------------- overlay
def test_overlay_size_mode_and_alpha():
    img = _img(40, 30)
    hm = _ramp(8, 8)
    out = viz.overlay(img, hm)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.array_equal(np.asarray(viz.overlay(img, hm, alpha=0.0)), np.asarray(img))
    full = np.asarray(viz.overlay(img, np.zeros((30, 40)), alpha=1.0))
    assert (full == viz.colormap("viridis")[0]).all()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "I;16", "F"])
def test_overlay_any_image_mode(mode):
    if mode == "I;16":
        img = Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)
    elif mode == "F":
        img = Image.fromarray(np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30))
    else:
        img = _img(30, 20, mode)
    out = viz.overlay(img, _ramp(), cmap="turbo")
    assert out.mode == "RGB" and out.size == (30, 20)


def test_overlay_errors():
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(_img(), _ramp(), alpha=1.5)
    with pytest.raises(ValueError, match=r"2-D"):
        viz.overlay(_img(), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        viz.overlay(_img(), np.full((4, 4), np.nan))
    with pytest.raises(TypeError, match="PIL"):
        viz.overlay("cat.png", _ramp())


# ----------------------------------------------------------------------------- grid
def test_grid_layout_and_titles():
    img = _img(100, 50)
    maps = np.stack([_ramp(), 1 - _ramp(), _ramp() * 0])
    g = viz.grid(img, maps, titles=["cat", "a very long prompt " * 10, "猫 😺\nnew line"],
                 tile_size=64)
    assert g.mode == "RGB"
    # 4 cells (image + 3 maps) in one row; each cell 64 px wide, the fitted image is 64x32
    assert g.width == 6 + 4 * (64 + 6)
    assert 32 < g.height < 32 + 40
    g2 = viz.grid(img, maps, ncols=2, show_image=False, tile_size=64)
    assert g2.width == 6 + 2 * (64 + 6) and g2.height > g.height


def test_grid_extreme_aspect_and_errors():
    g = viz.grid(_img(1, 300), _ramp()[None], titles=["x"], tile_size=64)
    assert g.size[0] >= 96 and g.size[1] > 64
    with pytest.raises(ValueError, match="titles"):
        viz.grid(_img(), np.zeros((2, 4, 4)), titles=["one"])
    with pytest.raises(ValueError, match=r"\[P, H, W\]"):
        viz.grid(_img(), np.zeros((0, 4, 4)))


# ----------------------------------------------------------------------------- segmentation
def test_colorize_segmentation_palette_keeps_ids():
    ids = np.array([[0, 1, 2], [2, 1, 0]])
    img = viz.colorize_segmentation(ids, 3)
    assert img.mode == "P" and img.size == (3, 2)
    assert np.array_equal(np.asarray(img), ids)
    rgb = np.asarray(img.convert("RGB"))
    assert np.array_equal(rgb[0, 1], viz.class_colors(3)[1])
    bg = viz.colorize_segmentation(ids, 2, background=(0, 0, 0))
    assert tuple(np.asarray(bg.convert("RGB"))[0, 0]) == (0, 0, 0)


def test_colorize_segmentation_many_classes_and_errors():
    ids = np.arange(300).reshape(15, 20)
    img = viz.colorize_segmentation(ids, 300)
    assert img.mode == "RGB"
    cols = viz.class_colors(300)
    assert len({tuple(c) for c in cols[:20]}) == 20
    with pytest.raises(ValueError, match=r"ids must be in \[0, 1\]"):
        viz.colorize_segmentation(np.array([[0, 2]]), 2)
    with pytest.raises(ValueError, match="num_classes"):
        viz.colorize_segmentation(np.zeros((2, 2), int), 0)
    with pytest.raises(TypeError, match="integers"):
        viz.colorize_segmentation(np.zeros((2, 2)), 1)


def test_legend_and_segmentation_overlay():
    leg = viz.legend(["background", "cat", "猫"], viz.class_colors(2, background=(0, 0, 0)))
    assert leg.mode == "RGB" and leg.height > 3 * 10
    with pytest.raises(ValueError, match="one RGB colour per label"):
        viz.legend(["a", "b"], viz.class_colors(1))
    img = _img(40, 30)
    ids = np.zeros((8, 8), np.int32)
    ids[:4] = 1
    out = viz.segmentation_overlay(img, ids, ["cat"], background="background")
    assert out.mode == "RGB" and out.width > 40 and out.height >= 30
    # background pixels (id 0, bottom half) are left untinted
    assert np.array_equal(np.asarray(out)[29, :40], np.asarray(img)[29])
    plain = viz.segmentation_overlay(img, ids, ["a", "b"], show_legend=False)
    assert plain.size == (40, 30)
