"""Differentiable CLIP preprocessing against an independent float64 numpy reference.

The reference re-implements the resampling weights (Keys cubic a=-0.75, align_corners=False,
border-clamped taps; and the PIL-style antialiased filter a=-0.5 whose support widens with the
downscale factor), torchvision's Resize(int) / CenterCrop arithmetic, HPSv2's pad, and the
normalisation, loop by loop.
"""
import math

import numpy as np
import pytest
import torch

from nablagfn.rewards_service.rewards.preprocess import (CLIP_MEAN, CLIP_STD, center_crop,
                                                         clip_preprocess, longest_side_size,
                                                         shortest_side_size)


def _cubic(x, a):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _weights_plain(n_in, n_out):
    """(n_out, n_in) matrix of torch's non-antialiased bicubic (a = -0.75)."""
    W = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        x = scale * (i + 0.5) - 0.5
        x0 = math.floor(x)
        t = x - x0
        for k in range(-1, 3):
            W[i, min(max(x0 + k, 0), n_in - 1)] += _cubic(k - t, -0.75)
    return W


def _weights_aa(n_in, n_out):
    """(n_out, n_in) matrix of the antialiased (PIL-style) bicubic filter (a = -0.5)."""
    W = np.zeros((n_out, n_in))
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1.0 / scale if scale >= 1 else 1.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = np.array([_cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)])
        W[i, lo:hi] = w / w.sum()
    return W


def reference(img, size, antialias, mode):
    """img: float64 numpy (B, 3, H, W) -> (B, 3, size, size)."""
    _, _, h, w = img.shape
    nh, nw = shortest_side_size(h, w, size) if mode == "crop" else longest_side_size(h, w, size)
    wfun = _weights_aa if antialias else _weights_plain
    out = img if (nh, nw) == (h, w) else np.einsum("oh,bchw,pw->bcop", wfun(h, nh), img,
                                                   wfun(w, nw))
    if mode == "crop":
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        out = out[:, :, top:top + size, left:left + size]
    else:
        ph, pw = size - nh, size - nw
        padded = np.zeros(out.shape[:2] + (size, size))
        padded[:, :, ph // 2:ph // 2 + nh, pw // 2:pw // 2 + nw] = out
        out = padded
    mean = np.array(CLIP_MEAN).reshape(1, 3, 1, 1)
    std = np.array(CLIP_STD).reshape(1, 3, 1, 1)
    return (out - mean) / std


SHAPES = [(40, 56), (56, 40), (20, 14), (24, 24), (37, 29)]


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("hw", SHAPES)
def test_matches_float64_reference(hw, mode, antialias):
    img = np.random.default_rng(0).random((2, 3) + hw)
    ref = reference(img, 24, antialias, mode)
    ours64 = clip_preprocess(torch.from_numpy(img), 24, antialias=antialias, mode=mode).numpy()
    ours32 = clip_preprocess(torch.from_numpy(img).float(), 24, antialias=antialias, mode=mode)
    assert ours64.shape == ref.shape == (2, 3, 24, 24)
    # float64: only rounding differs (~1e-15 per op, values O(4)); 1e-10 catches any formula slip.
    np.testing.assert_allclose(ours64, ref, rtol=0, atol=1e-10)
    # float32: values are O(4) after normalisation, eps 6e-8 -> rounding ~1e-6; 2e-5 leaves margin.
    np.testing.assert_allclose(ours32.double().numpy(), ref, rtol=0, atol=2e-5)


def test_sizes_follow_torchvision_rules():
    assert shortest_side_size(512, 768, 224) == (224, 336)
    assert shortest_side_size(768, 512, 224) == (336, 224)
    assert shortest_side_size(333, 500, 224) == (224, int(224 * 500 / 333))
    assert longest_side_size(512, 768, 224) == (round(512 * 224 / 768), 224)
    x = torch.arange(7 * 10).view(1, 1, 7, 10)
    # torchvision CenterCrop: top = int(round((7 - 4) / 2)) = 2, left = int(round((10 - 4) / 2)) = 3
    assert torch.equal(center_crop(x, 4), x[..., 2:6, 3:7])


@pytest.mark.parametrize("antialias", [True, False])
def test_gradcheck(antialias):
    img = torch.rand(1, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    # gradcheck's own float64 finite differences (eps 1e-6, atol 1e-5): the map is linear.
    assert torch.autograd.gradcheck(lambda x: clip_preprocess(x, 5, antialias=antialias), (img,))
