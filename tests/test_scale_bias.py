"""Scale and Bias: broadcasting over axis / num_axes, one or two bottoms, bias_term, gradients,
in place, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer

import minicaffe
from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.layer import LayerError, create_layer
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.testing import GradientChecker, blobs_from_arrays, check_layer, layer_from_prototxt

X_SHAPE = (2, 3, 4, 2)
# (prototxt params, axis the learned blob starts at, its shape): covers num_axes 0 / 1 / 2 / -1,
# negative axes and the inner == 1 (row kernel) path.
CONFIGS = [
    ("", 1, (3,)),
    ("axis: 0", 0, (2,)),
    ("num_axes: 0", 0, ()),
    ("num_axes: 2", 1, (3, 4)),
    ("num_axes: -1", 1, (3, 4, 2)),
    ("axis: -1", 3, (2,)),
    ("axis: 2 num_axes: -1", 2, (4, 2)),
]


def expand(values, axis: int, ndim: int):
    """values (covering axes axis.. of an ndim array) reshaped to broadcast with numpy."""
    values = np.asarray(values, dtype=np.float64)
    return values.reshape((1,) * axis + values.shape + (1,) * (ndim - axis - values.ndim))


def make(text, arrays, dtype=np.float64, in_place=False, phase=minicaffe.TRAIN):
    layer = layer_from_prototxt(text, phase=phase, dtype=dtype)
    bottom = blobs_from_arrays(*arrays, dtype=dtype)
    top = [bottom[0]] if in_place else [Blob((), dtype)]
    layer.setup(bottom, top)
    return layer, bottom, top


def forward(layer, bottom, top):
    layer.reshape(bottom, top)
    layer.run_forward(bottom, top)
    return np.array(top[0].data)


# -- Scale ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("params, axis, shape", CONFIGS)
def test_scale_learned_forward(dtype, tol, params, axis, shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=X_SHAPE)
    layer, bottom, top = make(f'type: "Scale" scale_param {{ {params} }}', [x], dtype)
    assert layer.blobs[0].shape == shape
    np.testing.assert_array_equal(forward(layer, bottom, top), x.astype(dtype))  # filler default: ones
    s = rng.normal(size=shape)
    layer.blobs[0].data[...] = s
    expected = x.astype(dtype).astype(np.float64) * expand(s.astype(dtype), axis, x.ndim)
    np.testing.assert_allclose(forward(layer, bottom, top), expected, rtol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_hand_values(dtype):
    layer, bottom, top = make('type: "Scale"', [[[1.0, 2.0], [3.0, 4.0]]], dtype)  # (N=2, C=2)
    layer.blobs[0].data[...] = [2.0, -1.0]
    np.testing.assert_array_equal(forward(layer, bottom, top), [[2.0, -2.0], [6.0, -4.0]])
    # Two bottoms, the scale a scalar, bias_term: y = x * 3 + 0.5.
    layer, bottom, top = make('type: "Scale" scale_param { bias_term: true }',
                              [[[1.0, 2.0], [3.0, 4.0]], 3.0], dtype)
    layer.blobs[0].data[...] = 0.5
    np.testing.assert_array_equal(forward(layer, bottom, top), [[3.5, 6.5], [9.5, 12.5]])


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("axis, shape", [(1, (3,)), (1, (3, 4)), (0, ()), (2, (4, 2)), (0, X_SHAPE)])
def test_scale_two_bottoms_forward(dtype, tol, axis, shape):
    rng = np.random.default_rng(1)
    x, s = rng.normal(size=X_SHAPE), rng.normal(size=shape)
    layer, bottom, top = make(f'type: "Scale" scale_param {{ axis: {axis} }}', [x, s], dtype)
    assert layer.blobs == []
    expected = x.astype(dtype).astype(np.float64) * expand(s.astype(dtype), axis, x.ndim)
    np.testing.assert_allclose(forward(layer, bottom, top), expected, rtol=tol)


def test_scale_bias_term_blobs_and_forward():
    rng = np.random.default_rng(2)
    x = rng.normal(size=X_SHAPE)
    text = ('type: "Scale" scale_param { num_axes: 2 bias_term: true filler { type: "constant" value: 2 } '
            'bias_filler { type: "constant" value: -1 } }')
    layer, bottom, top = make(text, [x])
    assert [b.shape for b in layer.blobs] == [(3, 4), (3, 4)]
    np.testing.assert_array_equal(layer.blobs[0].data, 2.0)
    np.testing.assert_array_equal(layer.blobs[1].data, -1.0)
    s, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    layer.blobs[0].data[...], layer.blobs[1].data[...] = s, b
    np.testing.assert_allclose(forward(layer, bottom, top), x * expand(s, 1, 4) + expand(b, 1, 4), rtol=1e-14)
    # bias_filler unset: zeros.
    layer, _, _ = make('type: "Scale" scale_param { bias_term: true }', [x])
    np.testing.assert_array_equal(layer.blobs[1].data, 0.0)


def test_scale_bias_term_two_bottoms_has_only_the_bias_blob():
    rng = np.random.default_rng(3)
    x, s = rng.normal(size=X_SHAPE), rng.normal(size=(3, 4))
    layer, bottom, top = make('type: "Scale" scale_param { bias_term: true }', [x, s])
    assert [b.shape for b in layer.blobs] == [(3, 4)]  # num_axes taken from bottom[1]
    b = rng.normal(size=(3, 4))
    layer.blobs[0].data[...] = b
    np.testing.assert_allclose(forward(layer, bottom, top), x * expand(s, 1, 4) + expand(b, 1, 4), rtol=1e-14)


@pytest.mark.parametrize("params", ["", "axis: 2 num_axes: 2"])  # the _planes and (inner 1) _rows kernels
def test_scale_bias_term_in_one_pass_rounds_the_product_first(params):
    """Scale with bias_term runs one kernel, y = x * s + b, rounding x * s before adding b as two passes
    (and Caffe) do: in float32 (1 + 2^-12)^2 rounds to 1 + 2^-11 (its 2^-24 is half an ulp, ties to
    even), so adding b = -(1 + 2^-11) gives exactly 0, where a fused multiply-add would give 2^-24."""
    one = 1 + 2.0 ** -12
    x = np.full((2, 3, 4, 2), one)
    layer, bottom, top = make(f'type: "Scale" scale_param {{ bias_term: true {params} }}', [x], np.float32)
    layer.blobs[0].data[...] = one
    layer.blobs[1].data[...] = -(1 + 2.0 ** -11)
    np.testing.assert_array_equal(forward(layer, bottom, top), 0.0)
    layer.blobs[1].data[...] = 0.5  # and the bias is added: 1 + 2^-11 + 0.5
    np.testing.assert_array_equal(forward(layer, bottom, top), np.float32(1.5 + 2.0 ** -11))


def test_scale_random_filler_is_seeded():
    text = 'type: "Scale" scale_param { filler { type: "uniform" min: 1 max: 2 } }'
    first, _, _ = make(text, [np.ones(X_SHAPE)])
    again, _, _ = make(text, [np.ones(X_SHAPE)])
    np.testing.assert_array_equal(first.blobs[0].data, again.blobs[0].data)
    assert ((first.blobs[0].data >= 1) & (first.blobs[0].data <= 2)).all()
    assert len(np.unique(first.blobs[0].data)) == 3


@pytest.mark.parametrize("params, axis, shape", CONFIGS)
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_gradient_learned(params, axis, shape, bias_term):
    rng = np.random.default_rng(4)
    layer = layer_from_prototxt(f'type: "Scale" scale_param {{ {params} bias_term: {str(bias_term).lower()} '
                                'filler { type: "uniform" min: -2 max: 2 } '
                                'bias_filler { type: "uniform" min: -1 max: 1 } }')
    check_layer(layer, [rng.normal(size=(2, 3, 2, 2))], stepsize=1e-3, threshold=1e-6)


@pytest.mark.parametrize("axis, shape", [(1, (3,)), (1, (3, 2)), (0, ()), (0, (2, 3, 2, 2))])
@pytest.mark.parametrize("bias_term", [False, True])
def test_scale_gradient_two_bottoms(axis, shape, bias_term):
    rng = np.random.default_rng(5)
    bias = str(bias_term).lower()
    layer = layer_from_prototxt(f'type: "Scale" scale_param {{ axis: {axis} bias_term: {bias} '
                                'bias_filler { type: "uniform" min: -1 max: 1 } }')
    check_layer(layer, [rng.normal(size=(2, 3, 2, 2)), rng.normal(size=shape)], stepsize=1e-3, threshold=1e-6)


def test_scale_factors_at_zero_are_gradient_checked():
    """A checker told to skip inputs near 0 (kink_range) still checks scale factors that are 0."""
    rng = np.random.default_rng(12)
    layer, bottom, top = make('type: "Scale"', [rng.normal(size=(2, 3, 2))])
    layer.blobs[0].data[...] = [0.0, 1e-3, -2.0]
    checker = GradientChecker(stepsize=1e-3, threshold=1e-6, kink=0.0, kink_range=1e-2)
    checker.check_gradient(layer, bottom, top)
    original = layer.backward

    def wrong(top_, propagate_down, bottom_):
        original(top_, propagate_down, bottom_)
        layer.blobs[0].diff[:2] *= 1.01  # only the factors at and near 0 are wrong

    layer.backward = wrong
    with pytest.raises(AssertionError, match="param blob 0 element 0 \\(value 0\\)"):
        checker.check_gradient(layer, bottom, top)


def test_scale_gradient_values():
    """Hand-checkable: y = x * s, dx = dy * s, ds[c] = sum of dy * x over n and spatial."""
    rng = np.random.default_rng(6)
    x, dy, s = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4)), np.array([1.5, -2.0, 0.25])
    layer, bottom, top = make('type: "Scale"', [x])
    layer.blobs[0].data[...] = s
    forward(layer, bottom, top)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_allclose(dx, dy * s.reshape(1, 3, 1), rtol=1e-14)
    np.testing.assert_allclose(layer.blobs[0].diff, (dy * x).sum(axis=(0, 2)), rtol=1e-12)
    # Parameter diffs accumulate (Caffe adds into them) ...
    layer.run_backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * (dy * x).sum(axis=(0, 2)), rtol=1e-12)
    # ... a second bottom's diff is overwritten.
    layer, bottom, top = make('type: "Scale"', [x, s])
    forward(layer, bottom, top)
    for _ in range(2):
        backward_layer(layer, bottom, top, [dy])
        np.testing.assert_allclose(bottom[1].diff, (dy * x).sum(axis=(0, 2)), rtol=1e-12)


@pytest.mark.parametrize("params, x_shape", [(params, X_SHAPE) for params, _, _ in CONFIGS] +
                         [("", (2, 3, 40, 5))])  # inner 200: more than reduce.h's 32 lanes per plane
def test_scale_and_bias_gradients_from_one_read_equal_the_two_sums(params, x_shape):
    """With bias_term both gradients, and dx, come from one read of dy (broadcast.cu's
    scale_bias_backward_partials): the same bits as a Scale without bias and a Bias layer summing apart,
    and both accumulate."""
    rng = np.random.default_rng(11)
    x, dy = rng.normal(size=x_shape), rng.normal(size=x_shape)
    both, bottom, top = make(f'type: "Scale" scale_param {{ bias_term: true {params} }}', [x], np.float32)
    scale, scale_bottom, scale_top = make(f'type: "Scale" scale_param {{ {params} }}', [x], np.float32)
    bias, bias_bottom, bias_top = make(f'type: "Bias" bias_param {{ {params} }}', [x], np.float32)
    scale.blobs[0].data[...] = both.blobs[0].data[...] = rng.normal(size=both.blobs[0].shape)
    for layer, b, t in ((both, bottom, top), (scale, scale_bottom, scale_top), (bias, bias_bottom, bias_top)):
        forward(layer, b, t)
        backward_layer(layer, b, t, [dy])
        layer.run_backward(t, [True], b)  # parameter diffs accumulate
    np.testing.assert_array_equal(both.blobs[0].diff, scale.blobs[0].diff)
    np.testing.assert_array_equal(both.blobs[1].diff, bias.blobs[0].diff)
    np.testing.assert_array_equal(bottom[0].diff, scale_bottom[0].diff)


def test_scale_respects_propagate_down_flags():
    rng = np.random.default_rng(7)
    x, s, dy = rng.normal(size=(2, 3)), rng.normal(size=(3,)), rng.normal(size=(2, 3))
    layer, bottom, top = make('type: "Scale" scale_param { bias_term: true }', [x])
    forward(layer, bottom, top)
    layer.param_propagate_down = [False, False]
    bottom[0].diff[...] = 9.0
    backward_layer(layer, bottom, top, [dy], propagate_down=[False])
    assert (bottom[0].diff == 9.0).all()
    assert all((b.diff == 0).all() for b in layer.blobs)
    layer, bottom, top = make('type: "Scale"', [x, s])
    forward(layer, bottom, top)
    bottom[1].diff[...] = 9.0
    backward_layer(layer, bottom, top, [dy], propagate_down=[True, False])
    assert (bottom[1].diff == 9.0).all()
    np.testing.assert_allclose(bottom[0].diff, dy * s, rtol=1e-14)


@pytest.mark.parametrize("text, extra", [
    ('type: "Scale" scale_param { bias_term: true filler { type: "uniform" min: -2 max: 2 } '
     'bias_filler { type: "uniform" min: -1 max: 1 } }', []),
    # inner == 1: the rows kernel, which in place also writes the kept copy of x
    ('type: "Scale" scale_param { axis: -1 bias_term: true filler { type: "uniform" min: -2 max: 2 } '
     'bias_filler { type: "uniform" min: -1 max: 1 } }', []),
    ('type: "Scale" scale_param { num_axes: -1 filler { type: "uniform" min: -2 max: 2 } }', []),
    ('type: "Scale" scale_param { bias_term: true }', [(3, 2)]),
    ('type: "Bias" bias_param { filler { type: "uniform" min: -1 max: 1 } }', []),
    ('type: "Bias" bias_param { axis: 0 }', [(2, 3)]),
])
def test_in_place_matches_not_in_place(text, extra):
    rng = np.random.default_rng(8)
    x, dy = rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 3, 2))
    arrays = [x] + [rng.normal(size=shape) for shape in extra]
    results = []
    for in_place in (False, True):
        layer, bottom, top = make(text, arrays, in_place=in_place)
        y = forward(layer, bottom, top)
        diffs = backward_layer(layer, bottom, top, [dy])
        results.append((y, diffs, [np.array(b.diff) for b in layer.blobs]))
    (y0, d0, p0), (y1, d1, p1) = results
    np.testing.assert_array_equal(y1, y0)
    for a, b in zip(d0 + p0, d1 + p1):
        np.testing.assert_allclose(b, a, rtol=1e-14)
    assert p0 or len(d0) == 2


NET = """
name: "shared"
force_backward: true
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "s1" type: "Scale" bottom: "x" top: "a" param { name: "w" } param { name: "b" }
        scale_param { bias_term: true } }
layer { name: "s2" type: "Scale" bottom: "a" top: "y" param { name: "w" } param { name: "b" }
        scale_param { bias_term: true } }
"""


def test_shared_scale_and_bias_in_a_net():
    """Shared parameters are swapped in by the Net after setup; the internal Bias layer must use them."""
    net = Net(io.parse_text(NET, caffe_pb2.NetParameter()), minicaffe.TRAIN, dtype=np.float64)
    net.params["s1"][0].data[...] = [2.0, 3.0, -1.0]
    net.params["s1"][1].data[...] = [1.0, 0.0, 0.5]
    x = np.arange(6.0).reshape(2, 3)
    y = net.forward(x=x)["y"]
    w, b = np.array([2.0, 3.0, -1.0]), np.array([1.0, 0.0, 0.5])
    np.testing.assert_allclose(y, (x * w + b) * w + b, rtol=1e-14)
    net.clear_param_diffs()
    net.backward(y=np.ones((2, 3)))
    a = x * w + b
    # Both layers add into the shared diffs: db = 2 + w * 2 (per channel, summed over N = 2).
    np.testing.assert_allclose(net.params["s2"][1].diff, 2 + 2 * w, rtol=1e-14)
    np.testing.assert_allclose(net.params["s2"][0].diff, (a + x * w).sum(axis=0), rtol=1e-14)


def test_scale_loaded_blobs_are_used_and_checked():
    param = caffe_pb2.LayerParameter(name="sc", type="Scale")
    param.scale_param.bias_term = True
    for values in ([2.0, 3.0], [0.5, -0.5]):
        blob = param.blobs.add()
        blob.shape.dim.append(2)
        blob.data.extend(values)
    layer = create_layer(param, minicaffe.TEST, np.float64)
    bottom, top = blobs_from_arrays(np.ones((1, 2, 2))), [Blob((), np.float64)]
    layer.setup(bottom, top)
    np.testing.assert_array_equal(forward(layer, bottom, top), [[[2.5, 2.5], [2.5, 2.5]]])
    layer = create_layer(param, minicaffe.TEST, np.float64)
    with pytest.raises(LayerError, match=r"'sc' \(Scale\): parameter blob 0 has shape \[2\], expected \[3\]"):
        layer.setup(blobs_from_arrays(np.ones((1, 3, 2))), [Blob((), np.float64)])


# -- Bias -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("params, axis, shape", CONFIGS)
def test_bias_learned_forward(dtype, tol, params, axis, shape):
    rng = np.random.default_rng(10)
    x = rng.normal(size=X_SHAPE)
    layer, bottom, top = make(f'type: "Bias" bias_param {{ {params} }}', [x], dtype)
    assert layer.blobs[0].shape == shape
    np.testing.assert_array_equal(forward(layer, bottom, top), x.astype(dtype))  # filler default: zeros
    b = rng.normal(size=shape)
    layer.blobs[0].data[...] = b
    expected = x.astype(dtype).astype(np.float64) + expand(b.astype(dtype), axis, x.ndim)
    np.testing.assert_allclose(forward(layer, bottom, top), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_hand_values(dtype):
    _, _, top = run_layer('type: "Bias"', [[1.0, 2.0], [3.0, 4.0]], [10.0, -1.0], dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [[11.0, 1.0], [13.0, 3.0]])
    _, _, top = run_layer('type: "Bias" bias_param { axis: 0 }', [[1.0, 2.0], [3.0, 4.0]], [10.0, -1.0],
                          dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [[11.0, 12.0], [2.0, 3.0]])


@pytest.mark.parametrize("params, axis, shape", CONFIGS)
def test_bias_gradient_learned(params, axis, shape):
    layer = layer_from_prototxt(f'type: "Bias" bias_param {{ {params} filler {{ type: "gaussian" }} }}')
    check_layer(layer, [np.random.default_rng(11).normal(size=(2, 3, 2, 2))], stepsize=1e-3, threshold=1e-6)


@pytest.mark.parametrize("axis, shape", [(1, (3,)), (1, (3, 2)), (0, ()), (2, (2, 2))])
def test_bias_gradient_two_bottoms(axis, shape):
    rng = np.random.default_rng(12)
    layer = layer_from_prototxt(f'type: "Bias" bias_param {{ axis: {axis} }}')
    check_layer(layer, [rng.normal(size=(2, 3, 2, 2)), rng.normal(size=shape)], stepsize=1e-3, threshold=1e-6)


def test_bias_gradient_values_accumulate():
    dy = np.random.default_rng(13).normal(size=(2, 3, 4))
    layer, bottom, top = make('type: "Bias"', [np.zeros((2, 3, 4))])
    forward(layer, bottom, top)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_allclose(layer.blobs[0].diff, dy.sum(axis=(0, 2)), rtol=1e-14)
    layer.run_backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * dy.sum(axis=(0, 2)), rtol=1e-14)


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Scale", "Bias"])
@pytest.mark.parametrize("axis, shape", [(1, (4,)), (1, (3, 5)), (2, (3,)), (1, (3, 4, 2, 1))])
def test_second_bottom_shape_mismatch(kind, axis, shape):
    message = rf"\({kind}\): dimension mismatch between bottom\[0\] \[2, 3, 4, 2\]"
    with pytest.raises(LayerError, match=message):
        run_layer(f'type: "{kind}" {kind.lower()}_param {{ axis: {axis} }}', np.ones(X_SHAPE), np.ones(shape))


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_second_bottom_mismatch_after_reshape(kind):
    layer, bottom, top = run_layer(f'type: "{kind}"', np.ones((2, 3)), np.ones(3))
    bottom[0].reshape(2, 4)
    with pytest.raises(LayerError, match="dimension mismatch"):
        layer.reshape(bottom, top)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
@pytest.mark.parametrize("params, message", [
    ("num_axes: -2", "num_axes must be non-negative, or -1"),
    ("num_axes: 4", r"shape extends past bottom\[0\]'s shape \[2, 3, 4, 2\]"),
    ("axis: 2 num_axes: 3", r"starting with bottom\[0\] axis 2"),
    ("axis: 4", "axis 4 is out of range"),
    ("axis: -5", "axis -5 is out of range"),
])
def test_bad_axes(kind, params, message):
    with pytest.raises(LayerError, match=message):
        run_layer(f'type: "{kind}" {kind.lower()}_param {{ {params} }}', np.ones(X_SHAPE))


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_bottom_count(kind):
    with pytest.raises(LayerError, match="at most 2 bottom"):
        run_layer(f'type: "{kind}"', np.ones((2, 3)), np.ones(3), np.ones(3))
