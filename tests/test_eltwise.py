"""Eltwise: PROD (both gradient modes), SUM with coefficients, MAX with Caffe's tie rule; errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import GradientChecker, blobs_from_arrays, layer_from_prototxt

SUM = "type: 'Eltwise'"
PROD = "type: 'Eltwise' eltwise_param { operation: PROD }"
PROD_UNSTABLE = "type: 'Eltwise' eltwise_param { operation: PROD stable_prod_grad: false }"
MAX = "type: 'Eltwise' eltwise_param { operation: MAX }"


def sum_text(coeffs) -> str:
    values = " ".join(f"coeff: {c}" for c in coeffs)
    return f"type: 'Eltwise' eltwise_param {{ operation: SUM {values} }}"


def caffe_max(xs):
    """Caffe's CPU MAX, element by element: bottom 0 wins over 1 only when strictly greater; a later
    bottom takes over only when strictly greater. Returns (top, index of the winning bottom)."""
    flat = [np.asarray(x, np.float64).ravel() for x in xs]
    top = np.empty_like(flat[0])
    mask = np.empty(top.size, np.int64)
    for i in range(top.size):
        best, arg = (flat[0][i], 0) if flat[0][i] > flat[1][i] else (flat[1][i], 1)
        for k in range(2, len(flat)):
            if flat[k][i] > best:
                best, arg = flat[k][i], k
        top[i], mask[i] = best, arg
    shape = np.shape(xs[0])
    return top.reshape(shape), mask.reshape(shape)


def backward_all(layer, bottom, top, dy):
    return backward_layer(layer, bottom, top, [dy])


# -- forward ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_checked_values(dtype):
    a, b, c = [1.0, 2.0, -3.0], [3.0, -4.0, 0.5], [0.5, 2.0, 4.0]
    _, _, top = run_layer(SUM, a, b, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [4.0, -2.0, -2.5])
    assert top[0].data.dtype == dtype
    _, _, top = run_layer(sum_text([2, -1, 0.5]), a, b, c, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [-0.75, 9.0, -4.5])
    _, _, top = run_layer(PROD, a, b, c, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [1.5, -16.0, -6.0])
    _, _, top = run_layer(MAX, a, b, c, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [3.0, 2.0, 4.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("num", [2, 3, 4])
def test_forward_matches_numpy(dtype, num):
    rng = np.random.default_rng(num)
    xs = [rng.normal(size=(2, 3, 2, 3)).astype(dtype) for _ in range(num)]
    coeffs = list(rng.uniform(-2, 2, num).round(3))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    _, _, top = run_layer(SUM, *xs, dtype=dtype)
    np.testing.assert_allclose(top[0].data, np.sum(xs, axis=0, dtype=np.float64), rtol=tol, atol=tol)
    _, _, top = run_layer(sum_text(coeffs), *xs, dtype=dtype)
    # coeff is a float field in caffe.proto: the layer sees the float32-rounded values.
    want = sum(np.float64(np.float32(c)) * x.astype(np.float64) for c, x in zip(coeffs, xs))
    np.testing.assert_allclose(top[0].data, want, rtol=tol, atol=tol)
    _, _, top = run_layer(PROD, *xs, dtype=dtype)
    np.testing.assert_allclose(top[0].data, np.prod(np.array(xs, np.float64), axis=0), rtol=tol, atol=tol)
    layer, _, top = run_layer(MAX, *xs, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, np.max(xs, axis=0))
    np.testing.assert_array_equal(layer.buffers["max_index"], np.argmax(xs, axis=0))  # no ties here


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=5), num=st.integers(2, 4),
       seed=st.integers(0, 1000))
def test_any_shape_sum_and_max(shape, num, seed):
    rng = np.random.default_rng(seed)
    xs = [rng.integers(-3, 4, size=shape).astype(np.float64) for _ in range(num)]  # many ties
    _, _, top = run_layer(SUM, *xs)
    np.testing.assert_array_equal(top[0].data, np.sum(xs, axis=0))
    layer, bottom, top = run_layer(MAX, *xs)
    want_top, want_mask = caffe_max(xs)
    np.testing.assert_array_equal(top[0].data, want_top)
    np.testing.assert_array_equal(layer.buffers["max_index"], want_mask)
    dy = rng.normal(size=shape)
    for i, dx in enumerate(backward_all(layer, bottom, top, dy)):
        np.testing.assert_array_equal(dx, np.where(want_mask == i, dy, 0.0))


# -- MAX ties ---------------------------------------------------------------------------------------

def test_max_ties_follow_caffe_cpu():
    a = [1.0, 1.0, 0.0, 2.0]
    b = [1.0, 0.0, 1.0, 2.0]
    c = [0.0, 1.0, 1.0, 2.0]
    layer, bottom, top = run_layer(MAX, a, b, c)
    np.testing.assert_array_equal(top[0].data, [1.0, 1.0, 1.0, 2.0])
    # Tie of bottoms 0 and 1 -> 1; tie of the current winner with bottom 2 -> the winner stays.
    np.testing.assert_array_equal(layer.buffers["max_index"], [1, 0, 1, 1])
    da, db, dc = backward_all(layer, bottom, top, np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(da, [0.0, 2.0, 0.0, 0.0])
    np.testing.assert_array_equal(db, [1.0, 0.0, 3.0, 4.0])
    np.testing.assert_array_equal(dc, [0.0, 0.0, 0.0, 0.0])
    # The gradient goes to exactly one bottom per element.
    np.testing.assert_array_equal(da + db + dc, [1.0, 2.0, 3.0, 4.0])


def test_max_two_bottoms_tie_goes_to_second():
    layer, bottom, top = run_layer(MAX, [[5.0, -1.0]], [[5.0, -1.0]])
    da, db = backward_all(layer, bottom, top, np.array([[1.0, 1.0]]))
    np.testing.assert_array_equal(da, [[0.0, 0.0]])
    np.testing.assert_array_equal(db, [[1.0, 1.0]])


# -- backward ---------------------------------------------------------------------------------------

def test_backward_hand_checked():
    a, b, c = np.array([1.0, -2.0]), np.array([3.0, 0.5]), np.array([-1.0, 4.0])
    dy = np.array([2.0, -1.0])
    layer, bottom, top = run_layer(sum_text([2, -3, 0.5]), a, b, c)
    da, db, dc = backward_all(layer, bottom, top, dy)
    np.testing.assert_array_equal(da, [4.0, -2.0])
    np.testing.assert_array_equal(db, [-6.0, 3.0])
    np.testing.assert_array_equal(dc, [1.0, -0.5])
    for text in (PROD, PROD_UNSTABLE):
        layer, bottom, top = run_layer(text, a, b, c)
        da, db, dc = backward_all(layer, bottom, top, dy)
        np.testing.assert_array_equal(da, [-6.0, -2.0])  # dy * b * c
        np.testing.assert_array_equal(db, [-2.0, 8.0])   # dy * a * c
        np.testing.assert_array_equal(dc, [6.0, 1.0])    # dy * a * b


def test_prod_gradient_with_a_zero_input():
    """Stable: the product of the other inputs. Caffe's unstable dy * top / x is nan at x == 0."""
    a, b = np.array([0.0, 2.0]), np.array([3.0, 4.0])
    layer, bottom, top = run_layer(PROD, a, b)
    da, db = backward_all(layer, bottom, top, np.ones(2))
    np.testing.assert_array_equal(da, [3.0, 4.0])
    np.testing.assert_array_equal(db, [0.0, 2.0])
    layer, bottom, top = run_layer(PROD_UNSTABLE, a, b)
    with np.errstate(all="ignore"):
        da, db = backward_all(layer, bottom, top, np.ones(2))
    assert np.isnan(da[0]) and da[1] == 4.0
    np.testing.assert_array_equal(db, [0.0, 2.0])


@pytest.mark.parametrize("text, coeffs", [
    # SUM's expected coefficients are the prototxt's numbers (1 each by default), not the layer's.
    (SUM, [1.0, 1.0, 1.0]), (sum_text([0.5, -2.0, 1.5]), [0.5, -2.0, 1.5]),
    (PROD, None), (PROD_UNSTABLE, None), (MAX, None)])
def test_backward_matches_numpy(text, coeffs):
    rng = np.random.default_rng(6)
    xs = [rng.uniform(0.5, 2.0, (2, 3, 4)) * rng.choice([-1, 1], (2, 3, 4)) for _ in range(3)]
    dy = rng.normal(size=xs[0].shape)
    layer, bottom, top = run_layer(text, *xs)
    got = backward_all(layer, bottom, top, dy)
    if "MAX" in text:
        mask = np.argmax(xs, axis=0)
        want = [np.where(mask == i, dy, 0.0) for i in range(3)]
    elif "PROD" in text:
        want = [dy * np.prod([x for j, x in enumerate(xs) if j != i], axis=0) for i in range(3)]
    else:
        want = [c * dy for c in coeffs]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("text", [SUM, sum_text([0.5, -2.0, 1.5]), PROD, PROD_UNSTABLE, MAX])
def test_gradient_check(text):
    rng = np.random.default_rng(7)
    if "MAX" in text:
        # Distinct values, far apart compared with the step, so no perturbation changes the winner.
        values = rng.permutation(3 * 12) * 0.1
        xs = values.reshape(3, 2, 3, 2)
    else:
        xs = [rng.uniform(0.5, 1.5, (2, 3, 2)) * rng.choice([-1, 1], (2, 3, 2)) for _ in range(3)]
    layer = layer_from_prototxt(text)
    bottom = blobs_from_arrays(*xs)
    checker = GradientChecker(stepsize=1e-3, threshold=1e-6)
    checker.check_gradient(layer, bottom, [Blob((), np.float64)])
    checker.check_gradient_exhaustive(layer, bottom, [Blob((), np.float64)])


def test_only_propagated_bottoms_get_a_gradient():
    xs = [np.array([1.0, 2.0]), np.array([3.0, 4.0]), np.array([5.0, 6.0])]
    for text in (SUM, PROD, MAX):
        layer, bottom, top = run_layer(text, *xs)
        for blob in bottom:
            blob.diff[...] = -7.0
        top[0].diff[...] = 1.0
        layer.run_backward(top, [False, True, False], bottom)
        np.testing.assert_array_equal(bottom[0].diff, [-7.0, -7.0])
        np.testing.assert_array_equal(bottom[2].diff, [-7.0, -7.0])
        assert not np.array_equal(bottom[1].diff, [-7.0, -7.0])


def test_reshape_follows_bottoms():
    layer, bottom, top = run_layer(MAX, np.zeros((2, 3)), np.ones((2, 3)))
    for blob, value in zip(bottom, (4.0, -1.0)):
        blob.reshape(3, 1, 2)
        blob.data[...] = value
    layer.reshape(bottom, top)
    layer.run_forward(bottom, top)
    assert top[0].shape == (3, 1, 2) and layer.buffers["max_index"].shape == (3, 1, 2)
    np.testing.assert_array_equal(top[0].data, np.full((3, 1, 2), 4.0))


# -- errors -----------------------------------------------------------------------------------------

def test_rejects_one_bottom():
    with pytest.raises(LayerError, match=r"'eltwise' \(Eltwise\): takes at least 2 bottom"):
        run_layer(SUM, [1.0])


def test_rejects_different_shapes():
    with pytest.raises(LayerError, match=r"identical shape.*\[\[2, 3\], \[2, 3\], \[3, 2\]\]"):
        run_layer(SUM, np.ones((2, 3)), np.ones((2, 3)), np.ones((3, 2)))
    layer, bottom, top = run_layer(PROD, np.ones((2, 3)), np.ones((2, 3)))
    bottom[1].reshape(2, 4)
    with pytest.raises(LayerError, match=r"'eltwise'.*\[\[2, 3\], \[2, 4\]\]"):
        layer.reshape(bottom, top)


def test_rejects_bad_coeffs():
    with pytest.raises(LayerError, match="coeff is only for operation SUM.*PROD"):
        run_layer("type: 'Eltwise' eltwise_param { operation: PROD coeff: 1 coeff: 2 }", [1.0], [2.0])
    with pytest.raises(LayerError, match="coeff is only for operation SUM.*MAX"):
        run_layer("type: 'Eltwise' eltwise_param { operation: MAX coeff: 1 coeff: 2 }", [1.0], [2.0])
    with pytest.raises(LayerError, match="one coeff per bottom: 3 coeff values for 2 bottoms"):
        run_layer(sum_text([1, 2, 3]), [1.0], [2.0])


def test_rejects_in_place():
    layer = layer_from_prototxt(SUM)
    a, b = blobs_from_arrays([1.0], [2.0])
    with pytest.raises(LayerError, match="in place"):
        layer.setup([a, b], [a])
