"""Power: y = (shift + scale * x)^power, its special cases, gradients and in-place use."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import backward_layer, run_layer

from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import GradientChecker, blobs_from_arrays, layer_from_prototxt


def text(power=1.0, scale=1.0, shift=0.0) -> str:
    return f"type: 'Power' power_param {{ power: {power} scale: {scale} shift: {shift} }}"


def inputs(rng, shape, power, scale, shift):
    """x with shift + scale * x away from 0 (and positive where the power is fractional)."""
    base = rng.uniform(0.5, 1.5, shape)
    if float(power).is_integer():
        base *= rng.choice([-1.0, 1.0], shape)
    if scale == 0:
        return rng.normal(size=shape)
    return (base - shift) / scale


def reference(x, power, scale, shift):
    """Independent reference (float64): y and dy/dx from the textbook formulas."""
    base = shift + scale * np.asarray(x, np.float64)
    y = base ** power
    grad = power * scale * base ** (power - 1) if power != 0 else np.zeros_like(base)
    return y, grad


CONFIGS = [  # (power, scale, shift): general, the special cases, negative and fractional powers
    (1.0, 1.0, 0.0), (1.0, -2.0, 0.5), (2.0, 1.0, 0.0), (2.0, -1.5, 1.0), (3.0, 0.5, -0.25),
    (0.5, 2.0, 0.0), (0.5, 1.0, 2.0), (-1.5, 1.0, 0.0), (-2.0, 0.5, 1.0), (0.0, 3.0, 1.0),
    (2.0, 0.0, 1.5), (-1.0, 0.0, 2.0),
]


def test_hand_checked_values():
    for dtype in (np.float32, np.float64):
        _, _, top = run_layer(text(2, 3, 1), [0.0, 1.0, -1.0], dtype=dtype)
        np.testing.assert_array_equal(top[0].data, [1.0, 16.0, 4.0])
        _, _, top = run_layer(text(0.5), [4.0, 9.0, 0.25], dtype=dtype)
        np.testing.assert_array_equal(top[0].data, [2.0, 3.0, 0.5])
        _, _, top = run_layer(text(1, -2, 0.5), [1.0, -1.0], dtype=dtype)
        np.testing.assert_array_equal(top[0].data, [-1.5, 2.5])
        _, _, top = run_layer(text(-1, 1, 1), [1.0, 3.0], dtype=dtype)
        np.testing.assert_array_equal(top[0].data, [0.5, 0.25])
        _, _, top = run_layer(text(0, 5, -9), [[7.0, -1.0]], dtype=dtype)  # power 0: all ones
        np.testing.assert_array_equal(top[0].data, [[1.0, 1.0]])
        _, _, top = run_layer(text(3, 0, 2), [7.0, -1.0], dtype=dtype)  # scale 0: shift^power
        np.testing.assert_array_equal(top[0].data, [8.0, 8.0])
        assert top[0].data.dtype == dtype


def test_defaults_are_identity():
    x = np.array([[-1.5, 0.0], [2.0, 3.25]])
    layer, bottom, top = run_layer("type: 'Power'", x)
    np.testing.assert_array_equal(top[0].data, x)
    (dx,) = backward_layer(layer, bottom, top, [np.array([[1.0, 2.0], [3.0, 4.0]])])
    np.testing.assert_array_equal(dx, [[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_and_backward_match_numpy(config, dtype):
    power, scale, shift = config
    rng = np.random.default_rng(1)
    x = inputs(rng, (2, 3, 4), *config).astype(dtype)
    dy = rng.normal(size=x.shape)
    layer, bottom, top = run_layer(text(*config), x, dtype=dtype)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    y_ref, grad_ref = reference(x, *config)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(top[0].data, y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, dy.astype(dtype) * grad_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("config", CONFIGS)
def test_gradient_check(config):
    rng = np.random.default_rng(2)
    x = inputs(rng, (2, 3, 2), *config)
    layer = layer_from_prototxt(text(*config))
    bottom = blobs_from_arrays(x)
    checker = GradientChecker(stepsize=1e-3, threshold=1e-4)
    checker.check_gradient_eltwise(layer, bottom, [Blob((), np.float64)])
    checker.check_gradient(layer, bottom, [Blob((), np.float64)])


def test_gradient_at_zero_base_is_finite():
    """Caffe computes power * y / x when shift is 0, which is nan at x = 0; the true gradient is 0."""
    layer, bottom, top = run_layer(text(3, 2, 0), [0.0, 1.0])
    (dx,) = backward_layer(layer, bottom, top, [np.ones(2)])
    np.testing.assert_array_equal(dx, [0.0, 24.0])  # 3 * 2 * (2x)^2


@pytest.mark.parametrize("config", [(1.0, -2.0, 0.5), (2.0, -1.5, 1.0), (3.0, 0.5, 0.0), (0.5, 2.0, 0.0),
                                    (-1.5, 1.0, 0.0), (0.0, 3.0, 1.0), (2.0, 0.0, 1.5)])
def test_in_place_matches_not_in_place(config):
    rng = np.random.default_rng(4)
    x = inputs(rng, (2, 3, 3), *config)
    dy = rng.normal(size=x.shape)
    results = []
    for in_place in (False, True):
        layer, bottom, top = run_layer(text(*config), x, in_place=in_place)
        assert (top[0] is bottom[0]) == in_place
        y = np.array(top[0].data)
        (dx,) = backward_layer(layer, bottom, top, [dy])
        results.append((y, dx))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])
    np.testing.assert_allclose(results[0][1], dy * reference(x, *config)[1], rtol=1e-13)


def test_in_place_backward_after_repeated_forward():
    """In place, each forward must refresh the saved input (the bottom changes between passes)."""
    layer, bottom, top = run_layer(text(2), [1.0, 2.0], in_place=True)
    bottom[0].data[...] = [3.0, -4.0]
    layer.reshape(bottom, top)
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, [9.0, 16.0])
    (dx,) = backward_layer(layer, bottom, top, [np.ones(2)])
    np.testing.assert_array_equal(dx, [6.0, -8.0])


def test_constant_cases_have_zero_gradient():
    for config in [(0.0, 2.0, 1.0), (2.0, 0.0, 3.0)]:
        layer, bottom, top = run_layer(text(*config), [1.0, -2.0, 5.0])
        bottom[0].diff[...] = 9.0
        (dx,) = backward_layer(layer, bottom, top, [np.ones(3)])
        np.testing.assert_array_equal(dx, [0.0, 0.0, 0.0])


def test_no_bottom_diff_without_propagate_down():
    layer, bottom, top = run_layer(text(2), [1.0, 2.0])
    bottom[0].diff[...] = 5.0
    top[0].diff[...] = 1.0
    layer.run_backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [5.0, 5.0])


def test_reshape_follows_bottom():
    layer, bottom, top = run_layer(text(2), np.ones((2, 3)))
    for shape in itertools.product([1, 4], [2, 5]):
        bottom[0].reshape(shape)
        bottom[0].data[...] = 2.0
        layer.reshape(bottom, top)
        layer.run_forward(bottom, top)
        assert top[0].shape == shape
        np.testing.assert_array_equal(top[0].data, np.full(shape, 4.0))


def test_rejects_wrong_blob_counts():
    layer = layer_from_prototxt(text(2))
    a, b = blobs_from_arrays(np.ones(2), np.ones(2))
    with pytest.raises(LayerError, match=r"'power' \(Power\): takes 1 bottom blob\(s\), got 2"):
        layer.setup([a, b], [Blob()])
