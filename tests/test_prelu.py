"""PReLU: forward/backward vs numpy, slope gradients, channel_shared, in place, errors, Caffe interop."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer

import minicaffe
from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.net import Net, NetError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import GradientChecker, blobs_from_arrays, layer_from_prototxt

SHARED = "type: 'PReLU' prelu_param { channel_shared: true }"
CHANNELWISE = "type: 'PReLU'"
SHAPES = [(2, 3, 3, 2), (4, 3), (5, 37), (3, 4, 1, 1), (2, 3, 2, 1, 2)]  # 4-D, (N, C) and inner 1 (rows), 5-D


def reference(x: np.ndarray, slopes) -> np.ndarray:
    """Independent reference: slopes broadcast along axis 1 (or a scalar)."""
    a = np.asarray(slopes, dtype=np.float64)
    if a.ndim == 1:
        a = a.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x > 0, x, a * x)


def reference_backward(x, slopes, dy):
    """(dx, slope gradient) by plain loops over every element."""
    a = np.asarray(slopes, dtype=np.float64)
    dx = np.zeros_like(x, dtype=np.float64)
    da = np.zeros(a.shape)
    for index in np.ndindex(*x.shape):
        c = () if a.ndim == 0 else (index[1],)
        if x[index] > 0:
            dx[index] = dy[index]
        else:
            dx[index] = a[c] * dy[index]
            da[c] += dy[index] * x[index]
    return dx, da


def away_from_zero(rng, shape, low=0.05):
    """Inputs with |x| >= low, so finite differences do not straddle the kink at 0."""
    magnitude = rng.uniform(low, 1.0, shape)
    return magnitude * rng.choice([-1.0, 1.0], shape)


def make_layer(text, x, slopes=None, dtype=np.float64):
    """Set up a PReLU layer on bottom x; optionally overwrite its slopes."""
    layer = layer_from_prototxt(text, dtype=dtype)
    bottom = blobs_from_arrays(x, dtype=dtype)
    top = [Blob((), dtype)]
    layer.setup(bottom, top)
    if slopes is not None:
        layer.blobs[0].data[...] = slopes
    return layer, bottom, top


# -- forward ----------------------------------------------------------------------------------------

def test_hand_checked_values_channelwise():
    x = np.array([[1.0, -2.0], [-4.0, 3.0]])  # (N=2, C=2)
    for dtype in (np.float32, np.float64):
        layer, bottom, top = make_layer(CHANNELWISE, x, slopes=[0.25, -0.5], dtype=dtype)
        layer.run_forward(bottom, top)
        assert top[0].data.dtype == dtype
        np.testing.assert_array_equal(top[0].data, [[1.0, 1.0], [-1.0, 3.0]])


def test_hand_checked_values_shared():
    x = np.array([[[[-2.0, 0.0], [3.0, -8.0]]]])  # (1, 1, 2, 2)
    for dtype in (np.float32, np.float64):
        layer, bottom, top = make_layer(SHARED, x, slopes=0.5, dtype=dtype)
        layer.run_forward(bottom, top)
        np.testing.assert_array_equal(top[0].data, [[[[-1.0, 0.0], [3.0, -4.0]]]])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shared", [False, True])
def test_forward_matches_numpy(shape, dtype, shared):
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape)
    slopes = rng.normal(0.0, 0.5, size=()) if shared else rng.normal(0.0, 0.5, size=shape[1])
    layer, bottom, top = make_layer(SHARED if shared else CHANNELWISE, x, slopes, dtype)
    layer.run_forward(bottom, top)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(top[0].data, reference(x.astype(dtype).astype(np.float64), slopes),
                               rtol=tol, atol=tol)


def test_default_filler_and_slope_blob_shapes():
    x = np.zeros((2, 5, 3))
    layer, _, _ = make_layer(CHANNELWISE, x)
    assert layer.blobs[0].shape == (5,)
    np.testing.assert_array_equal(layer.blobs[0].data, np.full(5, 0.25))
    layer, _, _ = make_layer(SHARED, x)
    assert layer.blobs[0].shape == ()  # zero axes, as Caffe stores a channel-shared slope
    assert float(layer.blobs[0].data) == 0.25


def test_filler_from_param():
    layer, _, _ = make_layer("type: 'PReLU' prelu_param { filler { type: 'constant' value: -0.75 } }",
                             np.zeros((1, 3)))
    np.testing.assert_array_equal(layer.blobs[0].data, [-0.75] * 3)
    layer, _, _ = make_layer("type: 'PReLU' prelu_param { filler { type: 'uniform' min: 0.1 max: 0.2 } }",
                             np.zeros((1, 50)))
    values = layer.blobs[0].data
    assert values.min() >= 0.1 and values.max() <= 0.2 and np.unique(values).size > 40


# -- backward ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [False, True])
def test_backward_matches_loops_with_negative_slopes(shape, shared):
    """Learned slopes can be negative (MTCNN's are): sign(y) then differs from sign(x)."""
    rng = np.random.default_rng(5)
    x = away_from_zero(rng, shape)
    slopes = np.float64(-0.3) if shared else np.linspace(-0.6, 0.4, shape[1])
    dy = rng.normal(size=shape)
    layer, bottom, top = make_layer(SHARED if shared else CHANNELWISE, x, slopes)
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, reference(x, slopes), rtol=1e-14)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    want_dx, want_da = reference_backward(x, slopes, dy)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layer.blobs[0].diff, want_da, rtol=1e-12, atol=1e-14)


def test_backward_hand_checked():
    x = np.array([[2.0, -1.0], [-3.0, 0.0]])
    layer, bottom, top = make_layer(CHANNELWISE, x, slopes=[0.5, -2.0])
    layer.run_forward(bottom, top)
    (dx,) = backward_layer(layer, bottom, top, [np.array([[1.0, 2.0], [3.0, 4.0]])])
    # x > 0 passes dy; x <= 0 (0 included, as in Caffe) scales it by the slope.
    np.testing.assert_array_equal(dx, [[1.0, -4.0], [1.5, -8.0]])
    # slope c gets sum of dy * x over x <= 0: c0: 3 * -3 = -9; c1: 2 * -1 + 4 * 0 = -2.
    np.testing.assert_array_equal(layer.blobs[0].diff, [-9.0, -2.0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [False, True])
def test_gradient_check(shape, shared):
    rng = np.random.default_rng(7)
    x = away_from_zero(rng, shape)
    slopes = np.float64(0.3) if shared else rng.uniform(-0.5, 0.8, shape[1])
    layer, bottom, top = make_layer(SHARED if shared else CHANNELWISE, x, slopes)
    checker = GradientChecker(stepsize=1e-3, threshold=1e-6, kink=0.0, kink_range=1e-2)
    checker.check_gradient(layer, bottom, top)  # bottom and slopes, objective 0.5 * sum(y^2)
    checker.check_gradient_exhaustive(layer, bottom, top)  # one objective per top element


def test_gradient_check_catches_a_wrong_slope_gradient():
    """The checker must be able to fail on this layer: corrupt the slope gradient."""
    rng = np.random.default_rng(8)
    layer, bottom, top = make_layer(CHANNELWISE, away_from_zero(rng, (2, 3, 2)), [0.1, 0.2, 0.3])
    original = layer.backward

    def wrong(top_, propagate_down, bottom_):
        original(top_, propagate_down, bottom_)
        layer.blobs[0].diff[...] *= 1.01

    layer.backward = wrong
    with pytest.raises(AssertionError, match="param blob 0"):
        GradientChecker(stepsize=1e-3, threshold=1e-6, kink_range=1e-2).check_gradient(layer, bottom, top)


@pytest.mark.parametrize("shared", [False, True])
def test_slopes_at_zero_are_gradient_checked(shared):
    """The checker's kink skip (bottoms near 0) must not skip a slope that is 0 or near it."""
    rng = np.random.default_rng(10)
    x = away_from_zero(rng, (2, 3, 2))
    slopes = np.float64(0.0) if shared else [0.0, 1e-3, -1e-3]
    checker = GradientChecker(stepsize=1e-3, threshold=1e-6, kink=0.0, kink_range=1e-2)
    layer, bottom, top = make_layer(SHARED if shared else CHANNELWISE, x, slopes)
    checker.check_gradient(layer, bottom, top)
    original = layer.backward

    def wrong(top_, propagate_down, bottom_):
        original(top_, propagate_down, bottom_)
        layer.blobs[0].diff[...] *= 1.01

    layer.backward = wrong
    with pytest.raises(AssertionError, match="param blob 0 element 0 \\(value 0\\)"):
        checker.check_gradient(layer, bottom, top)


def test_slope_gradient_accumulates_and_respects_param_propagate_down():
    rng = np.random.default_rng(9)
    x = away_from_zero(rng, (3, 2, 4))
    dy = rng.normal(size=x.shape)
    layer, bottom, top = make_layer(CHANNELWISE, x)
    layer.run_forward(bottom, top)
    backward_layer(layer, bottom, top, [dy])
    once = np.array(layer.blobs[0].diff)
    assert np.all(once != 0)
    layer.run_backward(top, [True], bottom)  # adds, as Caffe's parameter gradients do
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once, rtol=1e-14)

    layer.param_propagate_down = [False]
    layer.blobs[0].diff[...] = 7.0
    bottom[0].diff[...] = 0.0
    layer.run_backward(top, [True], bottom)
    np.testing.assert_array_equal(layer.blobs[0].diff, [7.0, 7.0])
    assert np.any(bottom[0].diff != 0)


def test_no_bottom_diff_without_propagate_down():
    layer, bottom, top = make_layer(CHANNELWISE, np.array([[1.0, -1.0]]))
    layer.run_forward(bottom, top)
    bottom[0].diff[...] = 5.0
    top[0].diff[...] = 1.0
    layer.run_backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [[5.0, 5.0]])
    np.testing.assert_array_equal(layer.blobs[0].diff, [0.0, -1.0])  # slopes still learn


# -- in place ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [False, True])
def test_in_place_matches_not_in_place(shape, shared):
    """Caffe PR #1940: in place, y overwrites x; backward must use the saved x (negative slopes
    make the sign of y differ from that of x), for both the bottom and the slope gradient."""
    rng = np.random.default_rng(11)
    x = away_from_zero(rng, shape)
    dy = rng.normal(size=shape)
    slopes = np.float64(-0.4) if shared else np.linspace(-0.7, 0.5, shape[1])
    text = SHARED if shared else CHANNELWISE
    results = []
    for in_place in (False, True):
        layer = layer_from_prototxt(text)
        bottom = blobs_from_arrays(x)
        top = [bottom[0]] if in_place else [Blob((), np.float64)]
        layer.setup(bottom, top)
        layer.blobs[0].data[...] = slopes
        layer.reshape(bottom, top)
        layer.run_forward(bottom, top)
        y = np.array(top[0].data)
        (dx,) = backward_layer(layer, bottom, top, [dy])
        results.append((y, dx, np.array(layer.blobs[0].diff)))
    for got, want in zip(results[1], results[0]):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(results[0][1], reference_backward(x, slopes, dy)[0], rtol=1e-13)


# -- seed consistency with ReLU -------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
def test_default_slopes_equal_leaky_relu(shared):
    rng = np.random.default_rng(13)
    x = away_from_zero(rng, (2, 3, 2, 3))
    dy = rng.normal(size=x.shape)
    prelu, pb, pt = run_layer(SHARED if shared else CHANNELWISE, x)
    relu, rb, rt = run_layer("type: 'ReLU' relu_param { negative_slope: 0.25 }", x)
    np.testing.assert_array_equal(pt[0].data, rt[0].data)
    (pdx,) = backward_layer(prelu, pb, pt, [dy])
    (rdx,) = backward_layer(relu, rb, rt, [dy])
    np.testing.assert_array_equal(pdx, rdx)


# -- errors -----------------------------------------------------------------------------------------

def test_rejects_one_axis_bottom():
    with pytest.raises(LayerError, match=r"'prelu' \(PReLU\).*at least 2 axes.*\[6\]"):
        make_layer(CHANNELWISE, np.zeros(6))


def test_rejects_wrong_slope_blob_from_prototxt():
    text = CHANNELWISE + " blobs { shape { dim: 4 } data: [1, 2, 3, 4] }"
    with pytest.raises(LayerError, match=r"'prelu'.*\[4\].*\[3\]"):
        make_layer(text, np.zeros((2, 3)))
    text = SHARED + " blobs { shape { dim: 3 } data: [1, 2, 3] }"
    with pytest.raises(LayerError, match=r"'prelu'.*\[3\].*\[\]"):
        make_layer(text, np.zeros((2, 3)))


def test_slope_blob_from_prototxt_is_used():
    layer, bottom, top = make_layer(CHANNELWISE + " blobs { shape { dim: 2 } data: [0.5, -1] }",
                                    np.array([[-2.0, -2.0]]))
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, [[-1.0, 2.0]])


def test_rejects_slope_blob_changed_after_setup():
    layer, bottom, top = make_layer(CHANNELWISE, np.zeros((2, 3)))
    layer.blobs[0].reshape(5)  # e.g. replaced by code loading weights after setup
    with pytest.raises(LayerError, match=r"'prelu'.*slope blob has shape \[5\].*\[2, 3\].*shape \[3\]"):
        layer.reshape(bottom, top)


def test_rejects_bottom_with_other_channel_count_after_setup():
    layer, bottom, top = make_layer(CHANNELWISE, np.zeros((2, 3, 4)))
    bottom[0].reshape(2, 4, 4)
    with pytest.raises(LayerError, match=r"slope blob has shape \[3\].*\[2, 4, 4\]"):
        layer.reshape(bottom, top)
    shared, sbottom, stop = make_layer(SHARED, np.zeros((2, 3, 4)))
    sbottom[0].reshape(2, 4, 4)
    shared.reshape(sbottom, stop)  # one shared slope fits any channel count


# -- in a net: weights interchange --------------------------------------------------------------------

NET = """
name: 'p'
layer { name: 'in' type: 'Input' top: 'x' input_param { shape { dim: 2 dim: 3 dim: 2 } } }
layer { name: 'act' type: 'PReLU' bottom: 'x' top: 'y' %s }
"""


def net_from_text(text: str) -> Net:
    return Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TEST, dtype=np.float64)


@pytest.mark.parametrize("shared", [False, True])
def test_slopes_round_trip_through_caffemodel(tmp_path, shared):
    extra = "prelu_param { channel_shared: true }" if shared else ""
    net = net_from_text(NET % extra)
    net.params["act"][0].data[...] = -0.5 if shared else [-0.5, 0.1, 2.0]
    net.save(tmp_path / "p.caffemodel")
    other = net_from_text(NET % extra)
    other.copy_from(tmp_path / "p.caffemodel")
    assert other.params["act"][0].shape == (() if shared else (3,))
    np.testing.assert_array_equal(other.params["act"][0].data, net.params["act"][0].data)


def test_loads_channel_shared_slope_as_caffe_writes_it():
    """Caffe's Blob::ToProto sets no shape field at all for a blob with zero axes."""
    trained = caffe_pb2.NetParameter()
    layer = trained.layer.add(name="act", type="PReLU")
    layer.blobs.add().data.append(-0.125)
    assert not layer.blobs[0].HasField("shape")
    net = net_from_text(NET % "prelu_param { channel_shared: true }")
    net.copy_from_proto(trained)
    assert float(net.params["act"][0].data) == -0.125
    out = net.forward(x=-np.ones((2, 3, 2)))["y"]
    np.testing.assert_array_equal(out, np.full((2, 3, 2), 0.125))


def test_loading_slopes_of_wrong_size_fails_clearly():
    trained = caffe_pb2.NetParameter()
    layer = trained.layer.add(name="act", type="PReLU")
    blob = layer.blobs.add()
    blob.shape.dim.append(4)
    blob.data.extend([1, 2, 3, 4])
    net = net_from_text(NET % "")
    with pytest.raises(NetError, match=r"'act'.*\[4\].*\[3\]"):
        net.copy_from_proto(trained)


def test_net_forward_reports_slope_shape_changed_after_loading():
    net = net_from_text(NET % "")
    net.params["act"][0].reshape(2)
    with pytest.raises(NetError, match=r"'act' \(PReLU\).*slope blob has shape \[2\]"):
        net.forward()


def test_zero_slope_gives_positive_zero():
    """max(x, 0) + a * min(x, 0) is +0 for a = 0, as in Caffe (a * x alone would give -0)."""
    layer, bottom, top = make_layer(CHANNELWISE, np.array([[-3.0, 2.0]]), slopes=[0.0, 0.0])
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, [[0.0, 2.0]])
    assert not np.signbit(top[0].data[0, 0])


def test_in_place_in_a_net_matches_not_in_place():
    """top: 'x' (in place) in a prototxt gives the same output and gradients as a new top."""
    rng = np.random.default_rng(21)
    x = away_from_zero(rng, (2, 3, 2))
    dy = rng.normal(size=x.shape)
    results = []
    for top_name in ("y", "x"):
        text = (NET % "").replace("top: 'y'", f"top: '{top_name}'")
        net = net_from_text("force_backward: true " + text)
        net.params["act"][0].data[...] = [-0.5, 0.2, 1.3]
        out = np.array(net.forward(x=x)[top_name])
        net.blobs[top_name].diff[...] = dy
        net.backward()
        dx = np.array(net.blobs["x"].diff)
        results.append((out, dx, np.array(net.params["act"][0].diff)))
    for got, want in zip(results[1], results[0]):  # output, input gradient, slope gradient
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(results[0][1], reference_backward(x, [-0.5, 0.2, 1.3], dy)[0], rtol=1e-14)
