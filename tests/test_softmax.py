"""Softmax layer: forward against a numpy reference and hand values, gradients, in place, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from minicaffe.layer import LayerError
from minicaffe.testing import check_layer, layer_from_prototxt

DTYPES = [np.float32, np.float64]


def softmax_reference(x: np.ndarray, axis: int) -> np.ndarray:
    """Plain loops over every vector along `axis` (no shared code with the kernel's layout)."""
    x = np.asarray(x, np.float64)
    moved = np.moveaxis(x, axis, -1)
    out = np.empty_like(moved)
    for index in np.ndindex(moved.shape[:-1]):
        v = moved[index]
        e = np.exp(v - v.max())
        out[index] = e / e.sum()
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), -1),
                                         ((2, 3, 4, 5), 0), ((5, 7), 1), ((6,), 0), ((3, 1, 2), 1),
                                         ((4, 1000), 1), ((3, 37, 1), 1)])  # rows: SIMD lanes + a tail
def test_forward_matches_reference(dtype, shape, axis):
    x = np.random.default_rng(0).normal(scale=3, size=shape)
    _, _, top = run_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', x, dtype=dtype)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(top[0].data, softmax_reference(x.astype(dtype), axis), rtol=tol, atol=tol)
    assert top[0].data.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_hand_values(dtype):
    # softmax([0, ln 3]) = [1/4, 3/4]; softmax([1, 1, 1, 1]) = 1/4 each.
    x = np.array([[0.0, np.log(3.0)], [5.0, 5.0]])
    _, _, top = run_layer('type: "Softmax"', x, dtype=dtype)
    np.testing.assert_allclose(top[0].data, [[0.25, 0.75], [0.5, 0.5]], rtol=1e-6)
    # Along axis 1 of a (1, 2, 2) blob: pairs (x[0,0,j], x[0,1,j]).
    x = np.array([[[0.0, 2.0], [np.log(4.0), 2.0]]])
    _, _, top = run_layer('type: "Softmax"', x, dtype=dtype)
    np.testing.assert_allclose(top[0].data, [[[0.2, 0.5], [0.8, 0.5]]], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_stable_for_huge_scores(dtype):
    x = np.array([[1000.0, 1000.0 + np.log(3.0), -1000.0], [-1e4, -1e4, -1e4]])
    _, _, top = run_layer('type: "Softmax"', x, dtype=dtype)
    assert np.all(np.isfinite(top[0].data))
    # float32 cannot hold 1000 + ln 3 exactly (its spacing there is 6e-5), hence the looser rtol.
    rtol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(top[0].data, [[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]], rtol=rtol, atol=1e-30)


def test_backward_hand_values():
    # y = [1/4, 3/4], dy = [1, 0]: dot = 1/4, dx = y * (dy - dot) = [3/16, -3/16].
    layer, bottom, top = run_layer('type: "Softmax"', [[0.0, np.log(3.0)]])
    (dx,) = backward_layer(layer, bottom, top, [[[1.0, 0.0]]])
    np.testing.assert_allclose(dx, [[3 / 16, -3 / 16]], rtol=1e-12)


@pytest.mark.parametrize("shape, axis", [((2, 3, 2, 3), 1), ((2, 3, 4), 2), ((3, 4), 1), ((2, 3, 2), 0),
                                         ((2, 37), 1)])
def test_gradient(shape, axis):
    x = np.random.default_rng(1).normal(size=shape)
    layer = layer_from_prototxt(f'type: "Softmax" softmax_param {{ axis: {axis} }}')
    check_layer(layer, [x], exhaustive=True, stepsize=1e-3, threshold=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 4, 3), (3, 37)])
def test_in_place_matches_out_of_place(dtype, shape):
    x = np.random.default_rng(2).normal(size=shape)
    dy = np.random.default_rng(3).normal(size=x.shape)
    layer, bottom, top = run_layer('type: "Softmax"', x, dtype=dtype)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    layer2, bottom2, top2 = run_layer('type: "Softmax"', x, dtype=dtype, in_place=True)
    assert top2[0] is bottom2[0]
    np.testing.assert_array_equal(top2[0].data, top[0].data)
    (dx2,) = backward_layer(layer2, bottom2, top2, [dy])
    np.testing.assert_array_equal(dx2, dx)


def test_propagate_down_false_leaves_bottom_diff():
    layer, bottom, top = run_layer('type: "Softmax"', np.ones((2, 3)))
    bottom[0].diff[...] = 7.0
    top[0].diff[...] = 1.0
    layer.run_backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7.0)


def test_bad_axis_is_an_error():
    with pytest.raises(LayerError, match=r"Softmax.*axis 4 out of range.*\(2, 3\)"):
        run_layer('type: "Softmax" softmax_param { axis: 4 }', np.ones((2, 3)))


def test_wrong_blob_counts_are_errors():
    with pytest.raises(LayerError, match="takes 1 bottom"):
        run_layer('type: "Softmax"', np.ones((2, 3)), np.ones((2, 3)))


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_property_any_shape_and_axis(shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = np.random.default_rng(len(shape)).normal(scale=4, size=shape)
    _, _, top = run_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', x)
    np.testing.assert_allclose(top[0].data, softmax_reference(x, axis), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(top[0].data.sum(axis=axis), 1.0, rtol=1e-12)
