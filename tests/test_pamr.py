"""gem_jax.pamr equals a torch transcription of upstream's pamr.py.

Upstream: wangf3014/SCLIP @ b56bd3014b9e8a3ee3450bcfc53700a67d627b7a, pamr.py (LocalAffinity
L13-58, LocalAffinityCopy L60-78, LocalStDev L80-106, LocalAffinityAbs L108-112, PAMR L117-146;
itself visinf/1-stage-wseg's models/mods/pamr.py).  sinahmr/NACLIP @ 0cac3a65 pamr.py is the same
computation (reformatted; it fills a preallocated tensor instead of torch.cat).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gem_jax.pamr import DEFAULT_DILATIONS, DEFAULT_ITERATIONS, pamr

TOL = 1e-5


# ----------------------------------------------------------------------------- torch transcription
def _kernel(kind: str) -> torch.Tensor:
    """The fixed 3x3 kernels: 'abs' (centre − neighbour, 8), 'copy' (neighbour, 8),
    'std' (all 9 positions)."""
    pos8 = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]
    if kind == "std":
        w = torch.zeros(9, 1, 3, 3)
        for i, (r, c) in enumerate([(r, c) for r in range(3) for c in range(3)]):
            w[i, 0, r, c] = 1
        return w
    w = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate(pos8):
        if kind == "abs":
            w[i, 0, 1, 1] = 1
            w[i, 0, r, c] = -1
        else:
            w[i, 0, r, c] = 1
    return w


def _local(x: torch.Tensor, kernel: torch.Tensor, dilations) -> torch.Tensor:
    """LocalAffinity.forward: per channel, replicate-pad by d, dilated conv, concat over d."""
    b, k, h, w = x.size()
    x = x.view(b * k, 1, h, w)
    outs = []
    for d in dilations:
        x_pad = F.pad(x, [d] * 4, mode="replicate")
        outs.append(F.conv2d(x_pad, kernel.to(x.dtype), dilation=d))
    return torch.cat(outs, 1).view(b, k, -1, h, w)


def torch_pamr(x: torch.Tensor, mask: torch.Tensor, num_iter=10, dilations=(8, 16)) -> torch.Tensor:
    """PAMR.forward (SCLIP pamr.py L127-146): x [B, K, H, W] image, mask [B, C, h, w]."""
    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = _local(x, _kernel("std"), dilations).std(2, keepdim=True)      # LocalStDev
    x = -torch.abs(_local(x, _kernel("abs"), dilations)) / (1e-8 + 0.1 * x_std)  # LocalAffinityAbs
    x = x.mean(1, keepdim=True)
    x = F.softmax(x, 2)
    for _ in range(num_iter):
        m = _local(mask, _kernel("copy"), dilations)                        # LocalAffinityCopy
        mask = (m * x).sum(2)
    return mask


# ----------------------------------------------------------------------------- tests
def _inputs(seed, b, k, h, w, c, mh, mw, logit_range=(-0.1, 0.4)):
    """A normalized-looking image and masks like the ones SCLIP/NACLIP refine: patch-text cosine
    similarities (PAMR runs before the logit scale and the softmax)."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((b, h, w, k)).astype(np.float32)
    masks = rng.uniform(*logit_range, (b, c, mh, mw)).astype(np.float32)
    return img, masks


def _both(img, masks, num_iter, dilations):
    ours = np.asarray(pamr(img, masks, num_iter, dilations))
    ref = torch_pamr(torch.from_numpy(img).permute(0, 3, 1, 2).contiguous(),
                     torch.from_numpy(masks), num_iter, dilations).numpy()
    return ours, ref


CASES = [  # (b, k, h, w, c, mask h, mask w): same size (as SCLIP/NACLIP call it) and upsampled
    (2, 3, 37, 45, 4, 37, 45),
    (1, 3, 64, 50, 6, 16, 13),
]


@pytest.mark.parametrize("case", CASES)
def test_pamr_equals_upstream(case):
    img, masks = _inputs(0, *case)
    ours, ref = _both(img, masks, DEFAULT_ITERATIONS, DEFAULT_DILATIONS)
    assert ours.shape == ref.shape == (case[0], case[4], case[2], case[3])
    err = np.abs(ours - ref).max()
    assert err < TOL, err  # observed 1.0e-6 and 1.0e-6
    # sensitivity: one dilation changed (16 -> 15) moves the output >= 20x the tolerance
    moved, _ = _both(img, masks, DEFAULT_ITERATIONS, (8, 15))
    assert np.abs(moved - ours).max() > 20 * TOL  # observed 0.40 and 0.32
    # and one iteration fewer
    fewer, _ = _both(img, masks, DEFAULT_ITERATIONS - 1, DEFAULT_DILATIONS)
    assert np.abs(fewer - ours).max() > 20 * TOL  # observed 0.40 and 0.28


def test_pamr_large_logits_no_worse_than_upstream_float32():
    """On logits of size ~10 float32 itself limits agreement (torch float32 is ~3e-5 from torch
    float64 there): ours stays within upstream's own float32 error of the float64 result."""
    img, _ = _inputs(3, 2, 3, 37, 45, 4, 37, 45)
    masks = (3 * np.random.default_rng(4).standard_normal((2, 4, 37, 45))).astype(np.float32)
    ours = np.asarray(pamr(img, masks))
    ti = torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()
    r32 = torch_pamr(ti, torch.from_numpy(masks)).numpy()
    r64 = torch_pamr(ti.double(), torch.from_numpy(masks).double()).numpy()
    up = np.abs(r32 - r64).max()
    assert np.abs(ours - r64).max() <= 1.5 * up, (np.abs(ours - r64).max(), up)  # observed 1.7e-5 vs 1.9e-5


def test_pamr_other_settings():
    # NACLIP's visualisation setting (eval.py: 50 steps, dilations 1, 2, 4, 8, 12, 24)
    img, masks = _inputs(1, 1, 3, 40, 33, 3, 40, 33)
    ours, ref = _both(img, masks, 50, (1, 2, 4, 8, 12, 24))
    assert np.abs(ours - ref).max() < 5e-5  # observed 5.6e-6 (50 steps, 6 dilations)
    # zero iterations: only the align-corners resize of the masks
    img, masks = _inputs(2, 2, 3, 21, 30, 2, 7, 9)
    ours, ref = _both(img, masks, 0, (8,))
    assert np.abs(ours - ref).max() < 2e-6  # observed 1.6e-7


def test_pamr_rejects_bad_input():
    img, masks = _inputs(0, 1, 3, 16, 16, 2, 16, 16)
    with pytest.raises(ValueError, match="channels last"):
        pamr(img[0], masks)
    with pytest.raises(ValueError, match="classes"):
        pamr(img, masks[0])
    with pytest.raises(ValueError, match="batch"):
        pamr(np.concatenate([img, img]), masks)
    with pytest.raises(ValueError, match="num_iter"):
        pamr(img, masks, -1)
    with pytest.raises(ValueError, match="num_iter"):
        pamr(img, masks, 2.5)
    with pytest.raises(ValueError, match="dilations"):
        pamr(img, masks, 1, ())
    with pytest.raises(ValueError, match="dilations"):
        pamr(img, masks, 1, (8, 0))
