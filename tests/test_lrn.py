"""LRN: both norm regions vs plain-loop references and hand values, gradients, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import GradientChecker, blobs_from_arrays, check_layer, layer_from_prototxt


def lrn_text(size=5, alpha=1.0, beta=0.75, k=1.0, region="ACROSS_CHANNELS") -> str:
    return (f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} '
            f"norm_region: {region} }}")


def reference_across(x, size, alpha, beta, k):
    """Plain loops: scale = k + alpha / size * sum of x^2 over the channels c - size//2 .. c + size//2."""
    n, c, h, w = x.shape
    y = np.zeros_like(x, dtype=np.float64)
    half = size // 2
    for i, j, r, s in np.ndindex(n, c, h, w):
        total = sum(float(x[i, q, r, s]) ** 2 for q in range(max(0, j - half), min(c, j + half + 1)))
        y[i, j, r, s] = x[i, j, r, s] * (k + alpha / size * total) ** -beta
    return y


def reference_within(x, size, alpha, beta):
    """Plain loops: average of x^2 over a size x size box (zero padded, divisor size^2), k unused."""
    n, c, h, w = x.shape
    y = np.zeros_like(x, dtype=np.float64)
    half = size // 2
    for i, j, r, s in np.ndindex(n, c, h, w):
        total = 0.0
        for rr in range(r - half, r + half + 1):
            for ss in range(s - half, s + half + 1):
                if 0 <= rr < h and 0 <= ss < w:
                    total += float(x[i, j, rr, ss]) ** 2
        y[i, j, r, s] = x[i, j, r, s] * (1 + alpha * total / size**2) ** -beta
    return y


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_across_channels_matches_reference(dtype, tol, size):
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 4))
    _, _, top = run_layer(lrn_text(size, alpha=2.0, beta=0.625, k=1.5), x, dtype=dtype)
    assert top[0].shape == x.shape and top[0].dtype == dtype
    expected = reference_across(x.astype(dtype), size, 2.0, 0.625, 1.5)
    np.testing.assert_allclose(top[0].data, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_within_channel_matches_reference(dtype, tol, size):
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 5))
    # k is ignored in WITHIN_CHANNEL (Caffe's power layer shifts by 1): a k of 7 must change nothing.
    text = lrn_text(size, alpha=2.0, beta=0.625, k=7.0, region="WITHIN_CHANNEL")
    _, _, top = run_layer(text, x, dtype=dtype)
    expected = reference_within(x.astype(dtype), size, 2.0, 0.625)
    np.testing.assert_allclose(top[0].data, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_values_across(dtype):
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    # Defaults, local_size 5 covers all 3 channels: scale = 1 + (1 + 4 + 9) / 5 = 3.8, 3.8^-0.75 = 0.3674196.
    _, _, top = run_layer('type: "LRN"', x, dtype=dtype)
    np.testing.assert_allclose(top[0].data.ravel(), [0.3674196, 0.7348392, 1.1022588], rtol=1e-6)
    # local_size 3, alpha 3 (alpha / n = 1), beta 1: scales 1+5, 1+14, 1+13.
    _, _, top = run_layer(lrn_text(3, alpha=3.0, beta=1.0), x, dtype=dtype)
    np.testing.assert_allclose(top[0].data.ravel(), [1 / 6, 2 / 15, 3 / 14], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_values_within(dtype):
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    # 3x3 box on a 1x3 row, alpha 9 (alpha / 3^2 = 1), beta 1, k 5 ignored: scales 1+5, 1+14, 1+13.
    _, _, top = run_layer(lrn_text(3, alpha=9.0, beta=1.0, k=5.0, region="WITHIN_CHANNEL"), x, dtype=dtype)
    np.testing.assert_allclose(top[0].data.ravel(), [1 / 6, 2 / 15, 3 / 14], rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 6), h=st.integers(1, 4), w=st.integers(1, 4),
       size=st.sampled_from([1, 3, 5, 7]), within=st.booleans())
def test_forward_property_any_shape(n, c, h, w, size, within):
    x = np.random.default_rng(n * 1000 + c * 100 + h * 10 + w).normal(size=(n, c, h, w))
    region = "WITHIN_CHANNEL" if within else "ACROSS_CHANNELS"
    _, _, top = run_layer(lrn_text(size, alpha=1.5, beta=0.75, k=2.0, region=region), x)
    expected = reference_within(x, size, 1.5, 0.75) if within else reference_across(x, size, 1.5, 0.75, 2.0)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
@pytest.mark.parametrize("size, beta", [(3, 0.75), (5, 0.75), (3, 0.625)])  # the kernel's two power forms
def test_gradient(region, size, beta):
    x = np.random.default_rng(2).normal(size=(2, 6, 3, 4))
    layer = layer_from_prototxt(lrn_text(size, alpha=2.0, beta=beta, k=1.5, region=region))
    check_layer(layer, [x], stepsize=1e-3, threshold=1e-4)


@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_gradient_exhaustive(region):
    """One objective per top element, so every cross term (window neighbours) is checked separately."""
    x = np.random.default_rng(3).normal(size=(1, 4, 2, 3))
    layer = layer_from_prototxt(lrn_text(3, alpha=1.5, beta=0.75, k=1.0, region=region))
    bottom, top = blobs_from_arrays(x), [Blob((), np.float64)]
    GradientChecker(stepsize=1e-3, threshold=1e-4).check_gradient_exhaustive(layer, bottom, top)


# The kernel's two power forms (square roots, exp/log); betas exact in float32, the proto field's type.
@pytest.mark.parametrize("beta", [0.75, 1.25])
def test_backward_matches_caffe_formula(beta):
    """Caffe's closed form: dx = dy * scale^-beta - 2 alpha beta / n * x * sum_window(dy * y / scale)."""
    rng = np.random.default_rng(4)
    x, dy = rng.normal(size=(2, 5, 2, 3)), rng.normal(size=(2, 5, 2, 3))
    size, alpha, k = 3, 2.0, 1.5
    layer, bottom, top = run_layer(lrn_text(size, alpha, beta, k), x)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    padded = np.pad(x**2, ((0, 0), (1, 1), (0, 0), (0, 0)))
    scale = k + alpha / size * sum(padded[:, q:q + 5] for q in range(3))
    y = x * scale**-beta
    ratio = np.pad(dy * y / scale, ((0, 0), (1, 1), (0, 0), (0, 0)))
    expected = dy * scale**-beta - 2 * alpha * beta / size * x * sum(ratio[:, q:q + 5] for q in range(3))
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-12)


def test_backward_survives_top_overwritten():
    """A later in-place layer may overwrite the top before backward; the gradient must not change."""
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(1, 4, 2, 2)), rng.normal(size=(1, 4, 2, 2))
    layer, bottom, top = run_layer(lrn_text(3), x)
    (expected,) = backward_layer(layer, bottom, top, [dy])
    top[0].data[...] = 123.0
    (got,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_array_equal(got, expected)


def test_no_propagate_down_leaves_bottom_diff():
    x = np.random.default_rng(6).normal(size=(1, 3, 2, 2))
    layer, bottom, top = run_layer(lrn_text(3), x)
    bottom[0].diff[...] = 7.0
    backward_layer(layer, bottom, top, [np.ones_like(x)], propagate_down=[False])
    assert (bottom[0].diff == 7.0).all()


def test_reshape_follows_bottom():
    layer, bottom, top = run_layer(lrn_text(3), np.ones((1, 3, 2, 2)))
    bottom[0].reshape(2, 5, 3, 1)
    bottom[0].data[...] = np.random.default_rng(7).normal(size=(2, 5, 3, 1))
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, reference_across(bottom[0].data, 3, 1.0, 0.75, 1.0), rtol=1e-12)


@pytest.mark.parametrize("size", [0, 2, 4])
def test_even_local_size_is_rejected(size):
    with pytest.raises(LayerError, match=f"odd values for local_size, got {size}"):
        run_layer(lrn_text(size), np.ones((1, 3, 2, 2)))


def test_in_place_is_rejected():
    with pytest.raises(LayerError, match="cannot run in place"):
        run_layer(lrn_text(3), np.ones((1, 3, 2, 2)), in_place=True)


@pytest.mark.parametrize("shape", [(2, 3), (1, 2, 3, 4, 5)])
def test_non_4d_bottom_is_rejected(shape):
    with pytest.raises(LayerError, match=r"4-d bottom.*" + str(list(shape)).replace("[", r"\[")):
        run_layer(lrn_text(3), np.ones(shape))
