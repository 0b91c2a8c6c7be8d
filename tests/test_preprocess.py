"""gem_jax.preprocess vs upstream gem.get_gem_img_transform (torchvision on PIL)."""

import io

import numpy as np
import pytest
from PIL import Image

from gem_jax.preprocess import OPENAI_MEAN, OPENAI_STD, preprocess, to_rgb

TOL = 1e-5  # max abs vs torchvision (observed: bit-exact, 0.0)


def _gem_ref(img, hw, mean=None, std=None):
    import gem

    t = gem.get_gem_img_transform(img_size=tuple(hw), mean=mean, std=std)
    return t(to_rgb(img)).permute(1, 2, 0).numpy()


def _random_image(mode, w, h, seed=0):
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "P")
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return img
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        assert img.mode == "I;16"
        return img
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32), "F")
    raise AssertionError(mode)


MODES = ["RGB", "RGBA", "L", "P", "I;16", "F"]
IN_SIZES = [(37, 91), (1, 1), (500, 3)]  # (w, h)
OUT_SIZES = [(448, 448), (448, 320), 224]


def _hw(size):
    return (size, size) if isinstance(size, int) else size


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wh", IN_SIZES)
def test_matches_gem_transform(mode, wh):
    img = _random_image(mode, *wh, seed=10 * MODES.index(mode) + IN_SIZES.index(wh))
    for size in OUT_SIZES:
        hw = _hw(size)
        out = preprocess(img, size=size)
        assert out.dtype == np.float32 and out.shape == (1, *hw, 3)
        ref = _gem_ref(img, hw)
        assert np.abs(out[0] - ref).max() <= TOL


def test_batch_and_same_size_and_custom_stats():
    imgs = [_random_image("RGB", 448, 448, 1), _random_image("RGBA", 60, 40, 2), _random_image("L", 10, 700, 3)]
    out = preprocess(imgs)  # default 448, first image needs no resize
    assert out.shape == (3, 448, 448, 3)
    for i, img in enumerate(imgs):
        assert np.abs(out[i] - _gem_ref(img, (448, 448))).max() <= TOL
    mean, std = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)
    out = preprocess(tuple(imgs[1:]), size=(64, 32), mean=mean, std=std)
    for i, img in enumerate(imgs[1:]):
        assert np.abs(out[i] - _gem_ref(img, (64, 32), mean, std)).max() <= TOL


def test_to_rgb_modes():
    rgb = _random_image("RGB", 5, 4)
    assert to_rgb(rgb) is rgb
    for mode in ["1", "L", "P", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"]:
        img = _random_image("RGB", 5, 4).convert(mode)
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (5, 4)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img.convert("RGB")))
    # alpha is dropped, not composited
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[10, 20, 30]] * 2] * 2


def _gray(v, mode, size=(3, 2)):
    return np.asarray(to_rgb(Image.new(mode, size, v)))


def test_to_rgb_16bit_rules():
    vals = np.array([[0, 128, 129, 257], [32896, 65278, 65407, 65535]], dtype=np.uint16)
    expect = np.rint(vals / 257.0).astype(np.uint8)
    assert expect.tolist() == [[0, 0, 1, 1], [128, 254, 255, 255]]
    variants = [Image.fromarray(vals)]  # I;16
    for mode, dt in [("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")]:
        variants.append(Image.frombytes(mode, (4, 2), vals.astype(dt).tobytes()))
    for img in variants:
        out = np.asarray(to_rgb(img))
        assert out.shape == (2, 4, 3), img.mode
        np.testing.assert_array_equal(out, np.repeat(expect[..., None], 3, -1), err_msg=img.mode)
    # 65535 in 16-bit == 255 in L, through the full pipeline
    a = preprocess(Image.fromarray(np.full((9, 7), 65535, np.uint16)), size=16)
    b = preprocess(Image.new("L", (7, 9), 255), size=16)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, preprocess(Image.new("RGB", (7, 9), (255, 255, 255)), size=16))


def test_to_rgb_I_and_F_rules():
    # I: within 0..255 used as is; within 0..65535 scaled like 16-bit
    assert (_gray(200, "I") == 200).all()
    assert (_gray(255, "I") == 255).all()
    assert (_gray(256, "I") == 1).all()
    assert (_gray(65535, "I") == 255).all()
    with pytest.raises(ValueError, match=r"mode 'I'.*\[0, 70000\]"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I"))
    with pytest.raises(ValueError, match=r"mode 'I'.*\[-1, 5\]"):
        to_rgb(Image.fromarray(np.array([[-1, 5]], dtype=np.int32), "I"))
    # F: [0,1] scaled x255; [0,255] used as is (rounded)
    assert (_gray(1.0, "F") == 255).all()
    assert (_gray(0.5, "F") == 128).all()  # 127.5 -> round half to even -> 128
    assert (_gray(1.5, "F") == 2).all()  # > 1, so used as is: round(1.5) == 2
    assert (_gray(254.7, "F") == 255).all()
    f = Image.fromarray(np.array([[0.0, 1.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(f))[..., 0].tolist() == [[0, 255]]
    for bad, match in [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (300.0, r"mode 'F'.*300"), (-0.5, "mode 'F'")]:
        with pytest.raises(ValueError, match=match):
            to_rgb(Image.fromarray(np.array([[0.5, bad]], dtype=np.float32), "F"))


def test_errors():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(TypeError, match=r"numpy\.ndarray.*PIL\.Image\.open"):
        preprocess(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match=r"str.*PIL\.Image\.open"):
        preprocess("cat.jpg")
    with pytest.raises(TypeError, match=r"images\[1\].*str.*PIL\.Image\.open"):
        preprocess([img, "cat.jpg"])
    with pytest.raises(TypeError, match="int"):
        preprocess(42)
    with pytest.raises(TypeError, match="PIL"):
        to_rgb(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="empty"):
        preprocess([])
    for wh in [(0, 5), (5, 0)]:
        with pytest.raises(ValueError, match="zero size"):
            preprocess(Image.new("RGB", wh))
    for size in [0, -3, (448, 0), (-1, 5)]:
        with pytest.raises(ValueError, match="size must be positive"):
            preprocess(img, size=size)
    for size in [448.0, "448", (448.0, 448), True, None]:
        with pytest.raises(TypeError, match="size must be an int"):
            preprocess(img, size=size)
    with pytest.raises(ValueError, match="pair"):
        preprocess(img, size=(1, 2, 3))
    with pytest.raises(ValueError, match="mean must have exactly 3"):
        preprocess(img, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must have exactly 3"):
        preprocess(img, std=(0.5,) * 4)
    with pytest.raises(ValueError, match="std must not contain zeros"):
        preprocess(img, std=(0.5, 0.0, 0.5))
    with pytest.raises(TypeError, match="mean must be a sequence"):
        preprocess(img, mean=("a", "b", "c"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt):
    buf = io.BytesIO()
    _random_image("RGB", 64, 64, 7).save(buf, format=fmt)
    data = buf.getvalue()
    img = Image.open(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="could not decode image"):
        preprocess(img)
    # the intact file works
    assert preprocess(Image.open(io.BytesIO(data)), size=8).shape == (1, 8, 8, 3)
