"""Pooling layer: forward/backward vs an independent loop reference of Caffe's PoolingLayer (CPU code),
hand-checked values, Caffe's output-size rules (CEIL/FLOOR, last window inside the image), gradient
checks and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import backward_layer, run_layer
from hypothesis import given, settings
from hypothesis import strategies as st

import minicaffe
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import check_layer, layer_from_prototxt

FLT_MAX = float(np.finfo(np.float32).max)


# -- independent reference (plain loops, after Caffe's pooling_layer.cpp) ---------------------------

def ref_pooled(size: int, k: int, s: int, pad: int, floor: bool = False) -> int:
    span = size + 2 * pad - k
    pooled = (span // s if floor else -(-span // s)) + 1
    if pad and (pooled - 1) * s >= size + pad:
        pooled -= 1
    return pooled


def ref_pool(x, method, kh, kw, sh=1, sw=1, ph=0, pw=0, floor=False):
    """Returns (top, mask-or-None)."""
    n, c, h, w = x.shape
    oh, ow = ref_pooled(h, kh, sh, ph, floor), ref_pooled(w, kw, sw, pw, floor)
    top = np.zeros((n, c, oh, ow), x.dtype)
    mask = np.full((n, c, oh, ow), -1, np.int64)
    for a in range(n):
        for b in range(c):
            for i in range(oh):
                for j in range(ow):
                    h0, w0 = i * sh - ph, j * sw - pw
                    if method == "MAX":
                        best, arg = -FLT_MAX, -1
                        for r in range(max(h0, 0), min(h0 + kh, h)):
                            for q in range(max(w0, 0), min(w0 + kw, w)):
                                if x[a, b, r, q] > best:
                                    best, arg = x[a, b, r, q], r * w + q
                        top[a, b, i, j], mask[a, b, i, j] = best, arg
                    else:
                        h1, w1 = min(h0 + kh, h + ph), min(w0 + kw, w + pw)
                        size = (h1 - h0) * (w1 - w0)
                        total = x.dtype.type(0)
                        for r in range(max(h0, 0), min(h1, h)):
                            for q in range(max(w0, 0), min(w1, w)):
                                total += x[a, b, r, q]
                        top[a, b, i, j] = total / size
    return top, (mask if method == "MAX" else None)


def ref_pool_backward(x_shape, dy, mask, method, kh, kw, sh=1, sw=1, ph=0, pw=0):
    """Caffe's CPU backward: a scatter over the output cells."""
    n, c, h, w = x_shape
    dx = np.zeros(x_shape, dy.dtype)
    oh, ow = dy.shape[2:]
    for a in range(n):
        for b in range(c):
            for i in range(oh):
                for j in range(ow):
                    if method == "MAX":
                        index = mask[a, b, i, j]
                        if index >= 0:
                            dx[a, b, index // w, index % w] += dy[a, b, i, j]
                        continue
                    h0, w0 = i * sh - ph, j * sw - pw
                    h1, w1 = min(h0 + kh, h + ph), min(w0 + kw, w + pw)
                    size = (h1 - h0) * (w1 - w0)
                    for r in range(max(h0, 0), min(h1, h)):
                        for q in range(max(w0, 0), min(w1, w)):
                            dx[a, b, r, q] += dy[a, b, i, j] / size
    return dx


def prototxt(method, kh, kw, sh, sw, ph, pw, floor=False) -> str:
    mode = " round_mode: FLOOR" if floor else ""
    return (f'type: "Pooling" pooling_param {{ pool: {method} kernel_h: {kh} kernel_w: {kw} '
            f'stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw}{mode} }}')


def distinct(shape, seed=0, dtype=np.float64):
    """Distinct values (no ties) spaced 0.1 apart, shuffled."""
    count = int(np.prod(shape))
    values = np.random.default_rng(seed).permutation(count) * 0.1 - count * 0.05
    return values.reshape(shape).astype(dtype)


# (H, W, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, floor)
CASES = {
    "mtcnn_k3s2_47x61": (47, 61, 3, 3, 2, 2, 0, 0, False),
    "mtcnn_k3s2_ceil_matters": (46, 60, 3, 3, 2, 2, 0, 0, False),
    "k2s2_odd": (47, 61, 2, 2, 2, 2, 0, 0, False),
    "k2s2_odd_floor": (47, 61, 2, 2, 2, 2, 0, 0, True),
    # 2 wide, 3 tall, rows of >= 16 cells: MAX backward's gather (pool_max_backward_2x2), the last
    # window clipped at the bottom and at the right
    "k3x2_s3x2_wide": (10, 41, 3, 2, 3, 2, 0, 0, False),
    "k3s2_floor": (46, 60, 3, 3, 2, 2, 0, 0, True),
    "pad_last_window_dropped": (3, 7, 2, 2, 2, 2, 1, 1, False),
    "pad_k3s2": (9, 10, 3, 3, 2, 2, 1, 1, False),
    "pad_nonsquare": (8, 11, 3, 4, 1, 3, 2, 1, False),
    "overlap_s1": (6, 5, 3, 3, 1, 1, 0, 0, False),
    "stride_above_kernel_empty_window": (5, 7, 1, 2, 3, 3, 0, 0, False),
}


# -- output size rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("h, k, s, pad, floor, expected", [
    (47, 3, 2, 0, False, 23), (46, 3, 2, 0, False, 23), (46, 3, 2, 0, True, 22),
    (47, 2, 2, 0, False, 24), (47, 2, 2, 0, True, 23), (24, 2, 2, 0, False, 12),
    (3, 2, 2, 1, False, 2),  # ceil gives 3, but the 3rd window would start in the padding
    (3, 2, 2, 1, True, 2), (9, 3, 2, 1, False, 5), (5, 1, 3, 0, False, 3), (1, 2, 2, 0, False, 1),
])
def test_output_size(h, k, s, pad, floor, expected):
    layer, _, top = run_layer(prototxt("MAX", k, k, s, s, pad, pad, floor), np.zeros((1, 1, h, h)))
    assert top[0].shape == (1, 1, expected, expected)
    assert ref_pooled(h, k, s, pad, floor) == expected


# -- hand-checked values ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_checked_max_and_ave(dtype):
    x = np.arange(16).reshape(1, 1, 4, 4)
    _, _, top = run_layer('type: "Pooling" pooling_param { kernel_size: 2 stride: 2 }', x,
                          num_top=2, dtype=dtype)
    np.testing.assert_array_equal(top[0].data[0, 0], [[5, 7], [13, 15]])
    np.testing.assert_array_equal(top[1].data[0, 0], [[5, 7], [13, 15]])  # indices h*4+w
    assert top[1].data.dtype == dtype
    _, _, top = run_layer('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 2 }', x,
                          dtype=dtype)
    np.testing.assert_array_equal(top[0].data[0, 0], [[2.5, 4.5], [10.5, 12.5]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_checked_ave_padding_counts_in_divisor(dtype):
    # 3x3 input, k=3 s=2 pad=1: each window holds 2x2 real cells but Caffe divides by 9.
    x = np.arange(9).reshape(1, 1, 3, 3)
    _, _, top = run_layer('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }',
                          x, dtype=dtype)
    expected = np.array([[0 + 1 + 3 + 4, 1 + 2 + 4 + 5], [3 + 4 + 6 + 7, 4 + 5 + 7 + 8]]) / 9
    np.testing.assert_allclose(top[0].data[0, 0], expected, rtol=1e-6)


def test_hand_checked_ave_window_clipped_at_padded_edge():
    # W=4, k=3, s=2, pad=1: windows [-1,2), [1,4), [3,6)->clipped to [3,5) (padded edge is 5):
    # divisors 3, 3, 2 along w; the last window holds one real cell.
    x = np.array([[[[1.0, 2.0, 4.0, 8.0]]]])
    _, _, top = run_layer('type: "Pooling" pooling_param { pool: AVE kernel_h: 1 kernel_w: 3 '
                          'stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1 }', x)
    np.testing.assert_allclose(top[0].data[0, 0, 0], [(1 + 2) / 3, (2 + 4 + 8) / 3, 8 / 2])


def test_max_ties_take_first_in_row_major_order():
    x = np.array([[[[1.0, 3.0], [3.0, 3.0]]]])
    _, _, top = run_layer('type: "Pooling" pooling_param { kernel_size: 2 }', x, num_top=2)
    assert top[1].data.item() == 1  # (0, 1), not (1, 0) or (1, 1)


def test_max_padding_is_not_a_candidate():
    x = -np.ones((1, 1, 2, 2)) * np.array([[1, 2], [3, 4]])
    _, _, top = run_layer('type: "Pooling" pooling_param { kernel_size: 2 stride: 1 pad: 1 }', x,
                          num_top=2)
    # If padding (0) took part every output would be 0.
    np.testing.assert_array_equal(top[0].data[0, 0], [[-1, -1, -2], [-1, -1, -2], [-3, -3, -4]])
    np.testing.assert_array_equal(top[1].data[0, 0], [[0, 0, 1], [0, 0, 1], [2, 2, 3]])


# -- against the reference -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_vs_reference(case, method, dtype):
    h, w, kh, kw, sh, sw, ph, pw, floor = CASES[case]
    x = np.random.default_rng(3).standard_normal((2, 2, h, w)).astype(dtype)
    layer, bottom, top = run_layer(prototxt(method, kh, kw, sh, sw, ph, pw, floor), x,
                                   num_top=2 if method == "MAX" else 1, dtype=dtype)
    expected, mask = ref_pool(x, method, kh, kw, sh, sw, ph, pw, floor)
    assert top[0].shape == expected.shape
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(top[0].data, expected, rtol=tol, atol=tol)
    if method == "MAX":
        np.testing.assert_array_equal(top[1].data, mask)
    dy = np.random.default_rng(4).standard_normal(expected.shape).astype(dtype)
    (dx,) = backward_layer(layer, bottom, top, [dy] + ([np.zeros_like(dy)] if method == "MAX" else []))
    np.testing.assert_allclose(dx, ref_pool_backward(x.shape, dy, mask, method, kh, kw, sh, sw, ph, pw),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("spec", ["kernel_size: 2 stride: 2", "kernel_size: 2 stride: 3 pad: 1",
                                  "kernel_h: 1 kernel_w: 2 stride: 2", "global_pooling: true",
                                  "kernel_size: 3 stride: 2", "kernel_size: 3 stride: 1 pad: 1",
                                  "kernel_h: 3 kernel_w: 5 stride_h: 1 stride_w: 2 pad: 1",
                                  "kernel_size: 4 stride: 1"])
def test_max_backward_adds_dy_at_each_windows_argmax(spec):
    """Caffe's CPU backward, dx[argmax] += dy over the output cells in order, with ties and clipped and
    overlapping windows (the kernel scatters one class of non-overlapping windows per launch). The dy
    values are small integers, so every sum is exact whatever the order."""
    x = np.round(np.random.default_rng(5).standard_normal((2, 3, 7, 9)), 1).astype(np.float32)  # ties
    text = f'type: "Pooling" pooling_param {{ pool: MAX {spec} }}'
    layer, bottom, top = run_layer(text, x, dtype=np.float32, num_top=2)
    dy = np.random.default_rng(6).integers(-8, 9, size=top[0].shape).astype(np.float32)
    (dx,) = backward_layer(layer, bottom, top, [dy, np.zeros_like(dy)])
    expected = np.zeros(x.shape, np.float32)
    argmax = top[1].data.astype(int)
    for n, c, ph, pw in np.ndindex(*dy.shape):
        if argmax[n, c, ph, pw] >= 0:
            expected[n, c].reshape(-1)[argmax[n, c, ph, pw]] += dy[n, c, ph, pw]
    np.testing.assert_array_equal(dx, expected)
    assert np.count_nonzero(dx) > 0


def test_empty_window_gives_caffe_values():
    # stride 3 > kernel 1 without padding: the 3rd window starts past the image (Caffe allows it).
    x = np.random.default_rng(0).standard_normal((1, 1, 5, 5))
    _, _, top = run_layer('type: "Pooling" pooling_param { kernel_size: 1 stride: 3 }', x, num_top=2)
    assert top[0].data[0, 0, 2, 0] == -FLT_MAX and top[1].data[0, 0, 2, 0] == -1
    _, _, top = run_layer('type: "Pooling" pooling_param { pool: AVE kernel_size: 1 stride: 3 }', x)
    assert top[0].data[0, 0, 2, 0] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_pooling(dtype):
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 7)).astype(dtype)
    _, _, top = run_layer('type: "Pooling" pooling_param { global_pooling: true }', x, dtype=dtype)
    assert top[0].shape == (2, 3, 1, 1)
    np.testing.assert_array_equal(top[0].data[:, :, 0, 0], x.max(axis=(2, 3)))
    layer, bottom, top = run_layer('type: "Pooling" pooling_param { pool: AVE global_pooling: true }',
                                   x, dtype=dtype)
    np.testing.assert_allclose(top[0].data[:, :, 0, 0], x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    # The kernel follows the input on reshape.
    bottom[0].reshape(2, 3, 4, 4)
    bottom[0].data[...] = 1.0
    layer.reshape(bottom, top)
    layer.run_forward(bottom, top)
    assert top[0].shape == (2, 3, 1, 1)
    np.testing.assert_allclose(top[0].data, 1.0)


def test_reshape_to_new_size_recomputes_tables():
    layer, bottom, top = run_layer(prototxt("AVE", 3, 3, 2, 2, 1, 1), np.zeros((1, 1, 7, 9)))
    x = np.random.default_rng(5).standard_normal((1, 2, 6, 11))
    bottom[0].reshape(x.shape)
    bottom[0].data[...] = x
    layer.reshape(bottom, top)
    layer.run_forward(bottom, top)
    dy = np.random.default_rng(6).standard_normal(top[0].shape)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_allclose(dx, ref_pool_backward(x.shape, dy, None, "AVE", 3, 3, 2, 2, 1, 1),
                               atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), k=st.integers(1, 4), s=st.integers(1, 3),
       pad=st.integers(0, 3), ave=st.booleans(), floor=st.booleans())
def test_property_vs_reference(h, w, k, s, pad, ave, floor):
    method = "AVE" if ave else "MAX"
    if pad >= k or ref_pooled(h, k, s, pad, floor) <= 0 or ref_pooled(w, k, s, pad, floor) <= 0:
        return
    x = distinct((1, 2, h, w), seed=h * 10 + w)
    layer, bottom, top = run_layer(prototxt(method, k, k, s, s, pad, pad, floor), x)
    expected, mask = ref_pool(x, method, k, k, s, s, pad, pad, floor)
    np.testing.assert_allclose(top[0].data, expected, atol=1e-13)
    dy = np.random.default_rng(7).standard_normal(expected.shape)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_allclose(dx, ref_pool_backward(x.shape, dy, mask, method, k, k, s, s, pad, pad),
                               atol=1e-13)


# -- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["mtcnn_k3s2_ceil_matters", "k2s2_odd", "pad_k3s2", "pad_nonsquare",
                                  "overlap_s1", "pad_last_window_dropped"])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_gradient(case, method):
    h, w, kh, kw, sh, sw, ph, pw, floor = CASES[case]
    h, w = min(h, 9), min(w, 9)  # keep the finite-difference loop small
    layer = layer_from_prototxt(prototxt(method, kh, kw, sh, sw, ph, pw, floor))
    # Distinct values 0.1 apart: a step of 1e-3 never changes which element is the max.
    check_layer(layer, [distinct((1, 2, h, w), seed=h + w)], stepsize=1e-3, threshold=1e-6)


def test_gradient_exhaustive_ave_with_padding():
    layer = layer_from_prototxt(prototxt("AVE", 3, 3, 2, 2, 1, 1))
    check_layer(layer, [distinct((1, 1, 5, 4))], exhaustive=True, stepsize=1e-2, threshold=1e-6)


def test_gradient_exhaustive_max():
    layer = layer_from_prototxt(prototxt("MAX", 3, 2, 2, 1, 1, 1))
    check_layer(layer, [distinct((1, 1, 5, 4), seed=2)], exhaustive=True, stepsize=1e-3,
                threshold=1e-6)


def test_propagate_down_false_leaves_bottom_diff():
    layer, bottom, top = run_layer(prototxt("MAX", 2, 2, 2, 2, 0, 0), distinct((1, 1, 4, 4)))
    bottom[0].diff[...] = 7.0
    top[0].diff[...] = 1.0
    layer.run_backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 7.0)


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, message", [
    ("pool: STOCHASTIC kernel_size: 2", "STOCHASTIC is not supported"),
    ("kernel_size: 2 pad: 2", "pad must be less than kernel"),
    ("kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 2", "pad must be less than kernel"),
    ("global_pooling: true kernel_size: 2", "global_pooling"),
    ("global_pooling: true stride: 2", "only pad 0 and stride 1"),
    ("stride: 2", "needs kernel_size"),
    ("kernel_h: 2", "needs kernel_size"),
    ("kernel_size: 2 kernel_h: 2 kernel_w: 2", "not both"),
    ("kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", "pad is pad OR"),
    ("kernel_size: 2 stride_h: 1", "stride_h and stride_w"),
    ("kernel_size: 0", "kernel size must be positive"),
    ("kernel_size: 2 stride: 0", "stride must be positive"),
    ("kernel_size: 9", "does not fit"),
])
def test_bad_params(params, message):
    with pytest.raises(LayerError, match=message):
        run_layer(f'type: "Pooling" pooling_param {{ {params} }}', np.zeros((1, 1, 4, 4)))


def test_bad_shapes_and_tops():
    with pytest.raises(LayerError, match="4 axes"):
        run_layer('type: "Pooling" pooling_param { kernel_size: 2 }', np.zeros((1, 4, 4)))
    with pytest.raises(LayerError, match="at most 1 top"):
        run_layer('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 }', np.zeros((1, 1, 4, 4)),
                  num_top=2)
    with pytest.raises(LayerError, match="in place"):
        run_layer('type: "Pooling" pooling_param { kernel_size: 2 }', np.zeros((1, 1, 4, 4)),
                  in_place=True)


# -- GPU agrees with CPU (skipped without a GPU) -----------------------------------------------------

@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_gpu_matches_cpu(method):
    pytest.importorskip("cupy")
    try:
        minicaffe.set_mode_gpu()
    except minicaffe.backend.BackendError as error:
        pytest.skip(str(error))
    minicaffe.set_mode_cpu()
    x = np.random.default_rng(8).standard_normal((2, 3, 23, 17))
    dy = None
    results = []
    for gpu in (False, True):
        minicaffe.set_mode_gpu() if gpu else minicaffe.set_mode_cpu()
        layer = layer_from_prototxt(prototxt(method, 3, 3, 2, 2, 1, 1))
        bottom, top = [Blob(x.shape, np.float64)], [Blob((), np.float64)]
        bottom[0].data[...] = x
        layer.setup(bottom, top)
        layer.run_forward(bottom, top)
        if dy is None:
            dy = np.random.default_rng(9).standard_normal(top[0].shape)
        top[0].diff[...] = dy
        layer.run_backward(top, [True], bottom)
        results.append((np.array(top[0].data), np.array(bottom[0].diff)))
    minicaffe.set_mode_cpu()
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-12, atol=1e-12)
    assert math.isfinite(results[0][0].sum())
