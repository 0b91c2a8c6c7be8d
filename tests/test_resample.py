"""gem_jax.resample vs torch.nn.functional.interpolate / gem.gem_utils.

Tolerances: float64 matrices reproduce torch to ~1e-15, checked at 1e-10.
float32 paths (jax vs torch, both float32) are checked at 1e-5 max abs on
O(1) random data; observed max errors are ~3.6e-6 (torch computes its
weights in float32).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

jax.config.update("jax_default_matmul_precision", "highest")

from gem_jax.resample import MODES, interp_matrix, resample_pos_embed, resize  # noqa: E402

TORCH_MODE = {
    "bilinear": ("bilinear", False),
    "bicubic": ("bicubic", False),
    "bicubic_aa": ("bicubic", True),
    "bilinear_aa": ("bilinear", True),
}
GRIDS = [
    ((14, 14), (28, 20)),
    ((24, 24), (16, 16)),
    ((7, 7), (32, 32)),
    ((16, 16), (7, 9)),
    ((1, 1), (5, 5)),
    ((5, 5), (1, 1)),
    ((14, 14), (14, 14)),  # identity
    ((5, 1), (1, 5)),  # mixed 1<->5 per axis
]
TOL32 = 1e-5  # float32 max abs error vs torch float32


def _torch_interp(x: np.ndarray, out_hw, mode):
    tmode, aa = TORCH_MODE[mode]
    return F.interpolate(torch.from_numpy(x), size=tuple(out_hw), mode=tmode, antialias=aa, align_corners=False).numpy()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_hw,out_hw", GRIDS)
def test_matrix_float64_vs_torch(mode, in_hw, out_hw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, *in_hw))
    mh = interp_matrix(in_hw[0], out_hw[0], mode)
    mw = interp_matrix(in_hw[1], out_hw[1], mode)
    assert mh.dtype == np.float64 and mh.shape == (out_hw[0], in_hw[0])
    y = np.einsum("oh,bchw,pw->bcop", mh, x, mw)
    ref = _torch_interp(x, out_hw, mode)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_hw,out_hw", GRIDS)
def test_resize_float32_vs_torch(mode, in_hw, out_hw):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, *in_hw)).astype(np.float32)
    y = resize(jnp.asarray(x), out_hw, mode)
    assert y.dtype == jnp.float32 and y.shape == (2, 3, *out_hw)
    ref = _torch_interp(x, out_hw, mode)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=TOL32)


def test_matrix_1d_sweep_vs_torch():
    # wider sweep of 1-D sizes through a single axis, float64
    sizes = [1, 2, 3, 4, 7, 9, 13, 16, 31, 64]
    rng = np.random.default_rng(2)
    for mode in MODES:
        for n_in in sizes:
            x = rng.standard_normal((1, 1, n_in, 2))
            for n_out in sizes:
                y = np.einsum("oi,bcij->bcoj", interp_matrix(n_in, n_out, mode), x)
                np.testing.assert_allclose(y, _torch_interp(x, (n_out, 2), mode), rtol=0, atol=1e-10)


def test_resize_custom_axes_and_jit_and_grad():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 14, 14, 5)).astype(np.float32)  # NHWC
    f = jax.jit(lambda a: resize(a, (28, 20), "bicubic_aa", axes=(1, 2)))
    y = f(x)
    ref = _torch_interp(x.transpose(0, 3, 1, 2), (28, 20), "bicubic_aa").transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=TOL32)
    # differentiable: grad of sum = column sums of the separable operator
    g = jax.grad(lambda a: resize(a, (7, 9), "bicubic", axes=(1, 2)).sum())(jnp.asarray(x))
    mh, mw = interp_matrix(14, 7, "bicubic"), interp_matrix(14, 9, "bicubic")
    expect = np.outer(mh.sum(0), mw.sum(0))[None, :, :, None] * np.ones_like(x)
    np.testing.assert_allclose(np.asarray(g), expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize("old,new", [g for g in GRIDS if g[0][0] == g[0][1]])
def test_resample_pos_embed_vs_gem(old, new):
    from gem.gem_utils import resample_abs_pos_embed

    rng = np.random.default_rng(4)
    d = 64
    pos = rng.standard_normal((1 + old[0] * old[1], d)).astype(np.float32)
    ref = resample_abs_pos_embed(torch.from_numpy(pos)[None], list(new), num_prefix_tokens=1)[0].numpy()
    out = resample_pos_embed(jnp.asarray(pos), new)  # old_grid defaults to square
    assert out.shape == ref.shape == (1 + new[0] * new[1], d)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=TOL32)
    np.testing.assert_array_equal(np.asarray(out)[:1], pos[:1])  # class row untouched
    out_np = resample_pos_embed(pos, new, old_grid=old)  # numpy input, explicit grid
    np.testing.assert_allclose(np.asarray(out_np), ref, rtol=0, atol=TOL32)


def test_resample_pos_embed_non_square_old_grid_and_no_prefix():
    from gem.gem_utils import resample_abs_pos_embed

    rng = np.random.default_rng(5)
    pos = rng.standard_normal((7 * 9, 64)).astype(np.float32)
    ref = resample_abs_pos_embed(torch.from_numpy(pos)[None], [16, 12], old_size=[7, 9], num_prefix_tokens=0)[0]
    out = resample_pos_embed(pos, (16, 12), old_grid=(7, 9), num_prefix_tokens=0)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), rtol=0, atol=TOL32)


def test_resample_pos_embed_identity_and_jit():
    pos = jnp.asarray(np.random.default_rng(6).standard_normal((1 + 16 * 16, 8)), dtype=jnp.float32)
    assert resample_pos_embed(pos, (16, 16)) is pos
    f = jax.jit(lambda p: resample_pos_embed(p, (32, 32)))
    eager = resample_pos_embed(pos, (32, 32))
    np.testing.assert_allclose(np.asarray(f(pos)), np.asarray(eager), rtol=0, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="bicubic_aa"):
        interp_matrix(4, 4, "nearest")
    with pytest.raises(ValueError, match="bicubic_aa"):
        resize(jnp.ones((4, 4)), (2, 2), "area")
    with pytest.raises(ValueError, match=">= 1"):
        interp_matrix(0, 4, "bilinear")
    with pytest.raises(ValueError, match=">= 1"):
        interp_matrix(4, 0, "bicubic")
    with pytest.raises(ValueError, match="old_grid"):
        resample_pos_embed(jnp.ones((1 + 15, 4)), (4, 4), old_grid=(4, 5))
    with pytest.raises(ValueError, match="not a square"):
        resample_pos_embed(jnp.ones((1 + 15, 4)), (4, 4))
