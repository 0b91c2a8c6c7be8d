"""Bad input, over the public API and the CLI: every case gives a valid result (finite maps in
[0, 1]) or a clear error (ValueError/TypeError naming the problem; CLI exit 1/2 with `error:`),
never NaN and never a traceback from inside JAX.  Hypothesis runs derandomized with a bounded
number of examples."""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import gem_jax
from gem_jax import cli

from test_cli import tiny_checkpoint

SIZE = 32      # 4 x 4 patches of the tiny model
DEPTH = 3      # tiny model: 3 blocks, valid depths 2..4

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "F"]
ODD_SIZES = [(1, 1), (1, 2000), (2000, 1), (3, 700), (700, 2), (1, 8), (9, 1)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return gem_jax.load(tiny_checkpoint(tmp_path_factory))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def assert_valid_maps(maps, shape):
    m = np.asarray(maps)
    assert m.shape == shape
    assert np.isfinite(m).all(), "NaN or inf in the maps"
    assert m.min() >= 0.0 and m.max() <= 1.0


def make_image(mode: str, w: int, h: int, seed: int, f_scale: float = 1.0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray((rng.random((h, w)) * f_scale).astype(np.float32))
    channels = {"L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if mode in ("L", "P"):
        img = Image.fromarray(arr[..., 0])
        if mode == "P":
            img = img.convert("P")
            img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return img
    return Image.frombytes(mode, (w, h), arr.tobytes())


sizes = st.one_of(st.tuples(st.integers(1, 48), st.integers(1, 48)), st.sampled_from(ODD_SIZES))


# ----------------------------------------------------------------------------- image modes and sizes
@settings(max_examples=40, **SETTINGS)
@given(mode=st.sampled_from(MODES), wh=sizes, seed=st.integers(0, 2**16),
       f_scale=st.sampled_from([1.0, 255.0, 1000.0, -1.0]))
def test_any_mode_and_size(model, mode, wh, seed, f_scale):
    img = make_image(mode, *wh, seed, f_scale)
    assert img.mode == mode and img.size == wh
    if mode == "F" and f_scale in (1000.0, -1.0) and (np.asarray(img).max() > 255 or
                                                      np.asarray(img).min() < 0):
        with pytest.raises(ValueError, match="mode 'F'"):
            model.preprocess(img, size=SIZE)
        return
    pixels = model.preprocess(img, size=SIZE)
    assert pixels.shape == (1, SIZE, SIZE, 3) and np.isfinite(pixels).all()
    assert_valid_maps(model.heatmaps(pixels, ["a cat"], gem_depth=DEPTH), (1, 1, SIZE, SIZE))


def test_f_mode_nan_and_zero_sized_images(model):
    with pytest.raises(ValueError, match="NaN"):
        model.preprocess(Image.fromarray(np.full((4, 4), np.nan, np.float32)), size=SIZE)
    with pytest.raises(ValueError, match="zero size"):
        model.preprocess(Image.new("RGB", (0, 5)), size=SIZE)
    with pytest.raises(ValueError, match="empty"):
        model.preprocess([], size=SIZE)
    with pytest.raises(TypeError, match="PIL"):
        model.preprocess(np.zeros((4, 4, 3), np.uint8), size=SIZE)
    with pytest.raises(TypeError, match="PIL"):
        model.preprocess("cat.png", size=SIZE)


def test_size_smaller_than_patch_is_a_clear_error(model):
    img = Image.new("RGB", (50, 50))
    for size in (1, 7):
        with pytest.raises(ValueError, match="patch"):
            model.heatmaps(model.preprocess(img, size=size), ["x"], gem_depth=DEPTH)
    with pytest.raises(ValueError, match="size must be positive"):
        model.preprocess(img, size=0)
    with pytest.raises(TypeError, match="size"):
        model.preprocess(img, size=2.5)
    # Not a multiple of the patch: trailing pixels are dropped, maps still cover the image.
    assert_valid_maps(model.heatmaps(model.preprocess(img, size=(9, 17)), ["x"], gem_depth=DEPTH),
                      (1, 1, 9, 17))


# ----------------------------------------------------------------------------- pixels
def test_bad_pixels(model):
    good = model.preprocess(Image.new("RGB", (8, 8)), size=SIZE)
    cases = [
        ([[0.0]], TypeError, "array"),
        (np.zeros((1, 3, SIZE, SIZE), np.float32), ValueError, "channels-first"),
        (np.zeros((SIZE, SIZE, 3), np.float32), ValueError, r"\[B, H, W, 3\]"),
        (np.zeros((0, SIZE, SIZE, 3), np.float32), ValueError, "empty batch"),
        (np.zeros((1, SIZE, SIZE, 3), np.uint8), TypeError, "floating"),
        (np.where(np.arange(good.size).reshape(good.shape) == 5, np.nan, good).astype(np.float32),
         ValueError, "NaN"),
        (np.full(good.shape, np.inf, np.float32), ValueError, "infinite"),
    ]
    for pixels, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            model.heatmaps(pixels, ["x"], gem_depth=DEPTH)


# ----------------------------------------------------------------------------- prompts
@pytest.fixture(scope="module")
def pixels(model):
    return model.preprocess([make_image("RGB", 20, 30, 0), make_image("L", 7, 3, 1)], size=SIZE)


prompt_text = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", " ", "\t\n", "\u3000", "猫", "😺 a cat", "naïve café", "قطة",
                     "e\u0301\u200d", "\x00", "{}", "{0}", "a {} b", "<|endoftext|>"]))


@settings(max_examples=30, **SETTINGS)
@given(prompts=st.lists(prompt_text, max_size=3))
def test_prompts(model, pixels, prompts):
    blank = not prompts or any(not p.strip() for p in prompts)
    if blank:
        with pytest.raises(ValueError, match="empty"):
            model.heatmaps(pixels, prompts, gem_depth=DEPTH)
        return
    assert_valid_maps(model.heatmaps(pixels, prompts, gem_depth=DEPTH),
                      (2, len(prompts), SIZE, SIZE))


def test_prompt_types_and_ragged(model, pixels):
    with pytest.raises(ValueError, match="empty"):
        model.heatmaps(pixels, [], gem_depth=DEPTH)
    with pytest.raises(TypeError, match="string"):
        model.heatmaps(pixels, ["ok", 3], gem_depth=DEPTH)
    with pytest.raises(TypeError, match="list of strings"):
        model.heatmaps(pixels, None, gem_depth=DEPTH)
    with pytest.raises(ValueError, match="one list per image"):
        model.heatmaps(pixels, [["a"]], gem_depth=DEPTH)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        model.heatmaps(pixels, [["a"], []], gem_depth=DEPTH)
    with pytest.raises(ValueError, match="whitespace"):
        model.heatmaps(pixels, [["a"], [" "]], gem_depth=DEPTH)
    with pytest.raises(ValueError, match="template"):
        model.heatmaps(pixels, ["a"], gem_depth=DEPTH, template="no slot")
    out = model.heatmaps(pixels, [["猫"], ["a", "😺"]], gem_depth=DEPTH)
    assert_valid_maps(out[0], (1, SIZE, SIZE))
    assert_valid_maps(out[1], (2, SIZE, SIZE))
    # a bare string is one prompt
    assert_valid_maps(model.heatmaps(pixels, "a cat", gem_depth=DEPTH), (2, 1, SIZE, SIZE))


def test_long_prompt_is_truncated_with_a_warning(model, pixels):
    long = "a very very long description of a cat " * 20
    with pytest.warns(UserWarning, match="truncated"):
        maps = model.heatmaps(pixels, [long, "dog"], gem_depth=DEPTH)
    assert_valid_maps(maps, (2, 2, SIZE, SIZE))


# ----------------------------------------------------------------------------- knobs
temps = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                  st.sampled_from([0.0, -1.0, 1e-30, 1e6, -1e6, 1e30, 3e38, 1e39, -1e39]))


@settings(max_examples=40, **SETTINGS)
@given(depth=st.integers(-1, 6), iters=st.integers(-2, 3), temp=temps, normalize=st.booleans())
def test_knobs(model, pixels, depth, iters, temp, normalize):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            maps = model.heatmaps(pixels[:1], ["a cat", "a dog"], gem_depth=depth, ss_attn_iter=iters,
                                  ss_attn_temp=temp, normalize=normalize)
    except ValueError as e:
        msg = str(e)
        assert any(k in msg for k in ("gem_depth", "ss_attn_iter", "ss_attn_temp")), msg
        return
    m = np.asarray(maps)
    assert m.shape == (1, 2, SIZE, SIZE)
    assert np.isfinite(m).all(), f"non-finite maps for depth={depth} iters={iters} temp={temp}"
    if normalize:
        assert m.min() >= 0 and m.max() <= 1
    else:
        assert np.abs(m).max() <= 1 + 1e-5  # cosine similarities


def test_knob_types(model, pixels):
    with pytest.raises(TypeError, match="ss_attn_iter"):
        model.heatmaps(pixels, ["x"], gem_depth=DEPTH, ss_attn_iter=1.5)


@settings(max_examples=25, **SETTINGS)
@given(classes=st.lists(prompt_text, max_size=3),
       threshold=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                           st.sampled_from([0.0, 1.0, 0.5])))
def test_segment(model, pixels, classes, threshold):
    try:
        ids = model.segment(pixels, classes, background_threshold=threshold, gem_depth=DEPTH)
    except ValueError as e:
        assert "empty" in str(e) or "background_threshold" in str(e), str(e)
        return
    ids = np.asarray(ids)
    assert ids.shape == (2, SIZE, SIZE) and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() <= len(classes) - (threshold is None)


# ----------------------------------------------------------------------------- CLI
def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _png_bytes(mode="RGB", size=(20, 12)) -> bytes:
    buf = io.BytesIO()
    make_image(mode, *size, 3).save(buf, format="PNG")
    return buf.getvalue()


def test_cli_every_mode_and_odd_size(ckpt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = []
    for mode in ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]:
        files.append(src / f"m_{mode.replace(';', '')}.png")
        make_image(mode, 13, 9, 0).save(files[-1])
    files.append(src / "m_CMYK.jpg")
    make_image("CMYK", 13, 9, 0).save(files[-1])
    files.append(src / "m_F.tiff")
    make_image("F", 13, 9, 0).save(files[-1])
    for w, h in [(1, 1), (1, 300), (300, 1)]:
        files.append(src / f"s_{w}x{h}.png")
        make_image("RGB", w, h, 0).save(files[-1])
    out = tmp_path / "out"
    rc, so, err = run_cli("heatmap", *files, "-p", "x", "-p", "猫", "--model", ckpt,
                          "--gem-depth", DEPTH, "--size", SIZE, "--out", out, "--save-raw", "-q")
    assert rc == 0, err
    for f in files:
        with Image.open(f) as im:
            size = im.size
        assert Image.open(out / f"{f.stem}_x.png").size == size
        assert Image.open(out / f"{f.stem}_prompt1.png").size == size
        raw = np.load(out / f"{f.stem}_raw.npy")            # raw cosines, both prompts
        assert raw.shape == (2, SIZE, SIZE) and np.isfinite(raw).all()
        assert np.abs(raw).max() <= 1 + 1e-5


def test_cli_unreadable_files(ckpt, tmp_path):
    png = _png_bytes()
    jpg = io.BytesIO()
    make_image("RGB", 40, 30, 0).save(jpg, format="JPEG")
    bad = {"text.png": b"hello, not an image", "empty.jpg": b"",
           "trunc.png": png[: len(png) // 2], "header_only.png": png[:40],
           "trunc.jpg": jpg.getvalue()[:200]}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out_{name}"
        rc, so, err = run_cli("heatmap", tmp_path / name, "-p", "x", "--model", ckpt,
                              "--gem-depth", DEPTH, "--size", SIZE, "--out", out)
        assert rc == 1, (name, err)
        assert err.startswith("error:") and name in err and "Traceback" not in err, err
        # Only the manifest, which records the failure.
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json"], name
        assert name in (out / "manifest.json").read_text()


@settings(max_examples=12, **SETTINGS)
@given(data=st.one_of(st.binary(max_size=64),
                      st.integers(0, len(_png_bytes()) - 1).map(lambda n: _png_bytes()[:n]),
                      st.integers(0, len(_png_bytes()) - 1).map(
                          lambda n: _png_bytes()[:n] + b"\x00" + _png_bytes()[n + 1:])))
def test_cli_fuzzed_files(ckpt, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "f.png").write_bytes(data)
    out = d / "out"
    rc, so, err = run_cli("segment", d / "f.png", "-c", "x", "-c", "y", "--model", ckpt,
                          "--gem-depth", DEPTH, "--size", SIZE, "--out", out, "-q")
    assert "Traceback" not in err
    assert rc in (0, 1), err
    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if rc == 0:
        assert files == ["f_seg.png", "f_seg_overlay.png", "manifest.json"]
    else:
        assert err.startswith("error:") and files == ["manifest.json"]


@pytest.mark.parametrize("prompts, rc_want", [
    (["猫", "😺", "قطة"], 0),
    (["word " * 100], 0),
    (["ok", ""], 2),
    (["\t"], 2),
])
def test_cli_prompts(ckpt, tmp_path, prompts, rc_want):
    img = tmp_path / "i.png"
    make_image("RGB", 10, 10, 0).save(img)
    args = [a for p in prompts for a in ("-p", p)]
    long = len(prompts[0]) > 300
    with (pytest.warns(UserWarning, match="truncated") if long else warnings.catch_warnings()):
        rc, so, err = run_cli("heatmap", img, *args, "--model", ckpt, "--gem-depth", DEPTH,
                              "--size", SIZE, "--out", tmp_path / "o")
    assert rc == rc_want, err
    assert "Traceback" not in err
    if rc_want == 2:
        assert "error:" in err and "empty" in err
