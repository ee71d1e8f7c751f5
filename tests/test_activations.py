"""Sigmoid, TanH and AbsVal: forward against numpy and hand values, gradients, in place."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import backward_layer, run_layer

from minicaffe.layer import LayerError
from minicaffe.testing import check_layer, layer_from_prototxt

DTYPES = [np.float32, np.float64]


def sigmoid_reference(x):
    return np.array([1 / (1 + math.exp(-v)) if v > -700 else 0.0 for v in np.ravel(x)]).reshape(np.shape(x))


REFERENCES = {
    # forward, derivative as a function of x
    "Sigmoid": (sigmoid_reference, lambda x: sigmoid_reference(x) * (1 - sigmoid_reference(x))),
    "TanH": (lambda x: np.vectorize(math.tanh)(x), lambda x: 1 - np.vectorize(math.tanh)(x) ** 2),
    "AbsVal": (lambda x: np.vectorize(abs)(x),
               lambda x: np.vectorize(lambda v: float(int(v > 0) - int(v < 0)))(x)),
}
HAND = {
    # x = [0, ln 3, -ln 3, 2]
    "Sigmoid": [0.5, 0.75, 0.25, 1 / (1 + math.exp(-2))],
    "TanH": [0.0, 0.8, -0.8, math.tanh(2)],  # tanh(ln 3) = (3 - 1/3) / (3 + 1/3)
    "AbsVal": [0.0, math.log(3), math.log(3), 2.0],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_forward_backward_match_reference(kind, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(scale=2, size=(2, 3, 4, 5)).astype(dtype)
    dy = rng.normal(size=x.shape)
    layer, bottom, top = run_layer(f'type: "{kind}"', x, dtype=dtype)
    forward, derivative = REFERENCES[kind]
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(top[0].data, forward(x), rtol=tol, atol=tol)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_allclose(dx, derivative(x) * dy.astype(dtype), rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(HAND))
def test_hand_values(kind, dtype):
    x = [0.0, math.log(3), -math.log(3), 2.0]
    _, _, top = run_layer(f'type: "{kind}"', x, dtype=dtype)
    np.testing.assert_allclose(top[0].data, HAND[kind], rtol=1e-6, atol=1e-7)


def test_hand_derivatives():
    x = [0.0, math.log(3), -1.5]
    layer, bottom, top = run_layer('type: "Sigmoid"', x)
    np.testing.assert_allclose(backward_layer(layer, bottom, top, [[1, 2, 0]])[0], [0.25, 2 * 3 / 16, 0])
    layer, bottom, top = run_layer('type: "TanH"', x)
    np.testing.assert_allclose(backward_layer(layer, bottom, top, [[1, 2, 1]])[0],
                               [1.0, 2 * (1 - 0.64), 1 - math.tanh(1.5) ** 2])
    layer, bottom, top = run_layer('type: "AbsVal"', x)
    np.testing.assert_allclose(backward_layer(layer, bottom, top, [[5, 2, 3]])[0], [0.0, 2.0, -3.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_saturation_is_finite(dtype):
    x = [-1e4, -100.0, 100.0, 1e4]
    _, _, top = run_layer('type: "Sigmoid"', x, dtype=dtype)
    np.testing.assert_allclose(top[0].data, [0.0, 0.0, 1.0, 1.0], atol=1e-30)
    _, _, top = run_layer('type: "TanH"', x, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [-1.0, -1.0, 1.0, 1.0])


def float32_sweep(low: float, high: float, step: int = 1009) -> np.ndarray:
    """Every `step`-th float32 in [low, high] (by bit pattern: as dense near 0 as far from it), with 0."""
    def magnitudes(top):
        return np.arange(0, np.float32(top).view(np.int32), step, dtype=np.int32).view(np.float32)
    return np.concatenate([-magnitudes(-low), magnitudes(high)])


def ulps(got, want):
    """|got - want| in units of the float32 spacing at want (at least the smallest subnormal)."""
    with np.errstate(over="ignore"):
        spacing = np.maximum(np.spacing(np.abs(want.astype(np.float32))).astype(np.float64), 2.0 ** -149)
    return np.abs(got.astype(np.float64) - want) / spacing


# float32 exp and tanh on the CPU are kernels/shim.h's own (faster than libmvec's); checked over about two
# million values each against float64, and at the edges: overflow to inf, subnormal results, NaN, -0.
@pytest.mark.parametrize("kind, low, high, bound", [
    ("Exp", -104.0, 88.7, 1.5),  # up to the largest float's exponent; subnormals below -87.3
    ("TanH", -20.0, 20.0, 3.0),
    ("Sigmoid", -87.0, 100.0, 3.0),  # results normal floats (below -87.3 they are subnormal)
])
def test_float32_exponentials_within_a_few_ulp_of_float64(kind, low, high, bound):
    x = float32_sweep(low, high)
    _, _, top = run_layer(f'type: "{kind}"', x, dtype=np.float32)
    x64 = x.astype(np.float64)
    want = {"Exp": np.exp, "TanH": np.tanh, "Sigmoid": lambda v: 1 / (1 + np.exp(-v))}[kind](x64)
    errors = ulps(top[0].data, want)
    assert errors.max() <= bound, (kind, x[np.argmax(errors)], errors.max())


def test_float32_exponentials_at_the_edges():
    edges = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72283, 88.7229, 1000.0, -87.3365, -103.97,
                      -104.0, -1000.0, 1e-30, -1e-30], np.float32)
    _, _, top = run_layer('type: "Exp"', edges, dtype=np.float32)
    y = top[0].data
    assert np.isnan(y[0]) and y[1] == np.inf and y[2] == 0.0 and y[3] == y[4] == 1.0
    assert y[5] == np.float32(3.4027985e38) and y[6] == y[7] == np.inf  # the largest float, then inf
    assert y[8] == np.float32(1.1755445e-38) and y[9] == np.float32(1.4e-45)  # near FLT_MIN; a subnormal
    assert y[10] == y[11] == 0.0 and y[12] == y[13] == 1.0
    _, _, top = run_layer('type: "TanH"', edges, dtype=np.float32)
    y = top[0].data
    assert np.isnan(y[0]) and y[1] == 1.0 and y[2] == -1.0
    assert y[3] == 0.0 and np.signbit(y[4]) and y[4] == 0.0  # tanh(-0) = -0
    assert (y[5:8] == 1.0).all() and (y[8:12] == -1.0).all()
    assert y[12] == np.float32(1e-30) and y[13] == np.float32(-1e-30)


@pytest.mark.parametrize("kind", ["Sigmoid", "TanH"])
def test_gradient(kind):
    x = np.random.default_rng(1).normal(scale=2, size=(2, 3, 2, 2))
    check_layer(layer_from_prototxt(f'type: "{kind}"'), [x], exhaustive=True, stepsize=1e-3, threshold=1e-6)


def test_absval_gradient_away_from_the_kink():
    x = np.random.default_rng(2).normal(size=(2, 3, 2, 2))
    check_layer(layer_from_prototxt('type: "AbsVal"'), [x], exhaustive=True, stepsize=1e-3,
                threshold=1e-6, kink=0.0, kink_range=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_in_place_matches_out_of_place(kind, dtype):
    # AbsVal is refused in place by Caffe (backward needs sign(x)); here it keeps a copy of x instead.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 4, 2))
    dy = rng.normal(size=x.shape)
    layer, bottom, top = run_layer(f'type: "{kind}"', x, dtype=dtype)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    layer2, bottom2, top2 = run_layer(f'type: "{kind}"', x, dtype=dtype, in_place=True)
    assert top2[0] is bottom2[0]
    np.testing.assert_array_equal(top2[0].data, top[0].data)
    (dx2,) = backward_layer(layer2, bottom2, top2, [dy])
    np.testing.assert_array_equal(dx2, dx)
    if kind == "AbsVal":
        assert np.any(dx < 0)  # the sign really came through, so the copy of x was used


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_propagate_down_false_and_blob_counts(kind):
    layer, bottom, top = run_layer(f'type: "{kind}"', np.ones(3))
    bottom[0].diff[...] = 7.0
    top[0].diff[...] = 1.0
    layer.run_backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7.0)
    with pytest.raises(LayerError, match="takes 1 bottom"):
        run_layer(f'type: "{kind}"', np.ones(3), np.ones(3))
