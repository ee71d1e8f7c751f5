"""BatchNorm: batch and global statistics vs numpy, running-stat updates, gradients, in place, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer

import minicaffe
from minicaffe import io, kernel
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.testing import GradientChecker, blobs_from_arrays, layer_from_prototxt

BN = 'type: "BatchNorm"'
EPS = float(np.float32(1e-5))  # the proto field is a float
TRAIN, TEST = minicaffe.TRAIN, minicaffe.TEST
SHAPES = [(2, 3, 2, 3), (5, 3), (2, 3, 4), (2, 3, 2, 1, 2)]  # 4-d, 2-d (N, C), 3-d, 5-d


def channel_view(x):
    """x as (num, channels, spatial)."""
    return x.reshape(x.shape[0], x.shape[1] if x.ndim > 1 else 1, -1)


def reference_batch(x, eps=EPS):
    """Normalise with the batch mean and biased variance of each channel (axis 1)."""
    v = channel_view(x.astype(np.float64))
    mean = v.mean(axis=(0, 2), keepdims=True)
    var = ((v - mean) ** 2).mean(axis=(0, 2), keepdims=True)
    return ((v - mean) / np.sqrt(var + eps)).reshape(x.shape), mean.ravel(), var.ravel()


def reference_global(x, mean_sum, var_sum, weight, eps=EPS):
    factor = 0.0 if weight == 0 else 1.0 / weight
    mean = (np.asarray(mean_sum) * factor).reshape(1, -1, 1)
    var = (np.asarray(var_sum) * factor).reshape(1, -1, 1)
    return ((channel_view(x.astype(np.float64)) - mean) / np.sqrt(var + eps)).reshape(x.shape)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("shape", SHAPES)
def test_train_forward_uses_batch_statistics(dtype, tol, shape):
    x = np.random.default_rng(0).normal(2.0, 3.0, size=shape)
    _, _, top = run_layer(BN, x, dtype=dtype, phase=TRAIN)
    expected, _, _ = reference_batch(x.astype(dtype))
    np.testing.assert_allclose(top[0].data, expected, rtol=tol, atol=tol)
    # Each channel of the output has mean 0 and (biased) variance ~1.
    v = channel_view(top[0].data.astype(np.float64))
    np.testing.assert_allclose(v.mean(axis=(0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(v.var(axis=(0, 2)), 1, rtol=1e-3)


def test_one_axis_bottom_is_one_channel():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    _, _, top = run_layer('type: "BatchNorm" batch_norm_param { eps: 0.75 }', x, phase=TRAIN)
    np.testing.assert_allclose(top[0].data, (x - 2.5) / np.sqrt(2.0), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hand_values_and_running_stats_after_two_forwards(dtype):
    text = 'type: "BatchNorm" batch_norm_param { eps: 0.75 moving_average_fraction: 0.5 }'
    x1 = np.array([[1.0], [2.0], [3.0], [4.0]])  # (N=4, C=1): mean 2.5, biased var 1.25
    layer, bottom, top = run_layer(text, x1, dtype=dtype, phase=TRAIN)
    # (x - 2.5) / sqrt(1.25 + 0.75)
    np.testing.assert_allclose(top[0].data.ravel(), [-1.0606602, -0.3535534, 0.3535534, 1.0606602], rtol=1e-6)
    # weight 0 * 0.5 + 1; mean 0 * 0.5 + 2.5; var 0 * 0.5 + 4/3 * 1.25 (unbiased)
    np.testing.assert_allclose(layer.blobs[2].data, [1.0])
    np.testing.assert_allclose(layer.blobs[0].data, [2.5])
    np.testing.assert_allclose(layer.blobs[1].data, [5 / 3], rtol=1e-6)

    bottom[0].data[...] = np.array([[0.0], [0.0], [2.0], [2.0]])  # mean 1, biased var 1
    layer.reshape(bottom, top)
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data.ravel(), [-1, -1, 1, 1] / np.sqrt(1.75), rtol=1e-6)
    # weight 1 * 0.5 + 1 = 1.5; mean 2.5 * 0.5 + 1 = 2.25; var 5/3 * 0.5 + 4/3 * 1 = 13/6
    np.testing.assert_allclose(layer.blobs[2].data, [1.5])
    np.testing.assert_allclose(layer.blobs[0].data, [2.25])
    np.testing.assert_allclose(layer.blobs[1].data, [13 / 6], rtol=1e-6)

    # The same layer in global mode normalises with mean 2.25 / 1.5 = 1.5, var 13/6 / 1.5 = 13/9.
    layer.use_global_stats = True
    bottom[0].data[...] = np.array([[1.5], [2.5], [0.5], [4.0]])
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data.ravel(), np.array([0, 1, -1, 2.5]) / np.sqrt(13 / 9 + 0.75),
                               rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[2].data, [1.5])  # global mode leaves the statistics alone


def test_running_stats_multichannel_default_fraction():
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(1, 2, size=(2, 3, 2, 2)), rng.normal(-1, 0.5, size=(2, 3, 2, 2))
    layer, bottom, top = run_layer(BN, x1, phase=TRAIN)
    bottom[0].data[...] = x2
    layer.run_forward(bottom, top)
    f = np.float64(np.float32(0.999))  # the proto field is a float
    m = 2 * 2 * 2
    _, mean1, var1 = reference_batch(x1)
    _, mean2, var2 = reference_batch(x2)
    np.testing.assert_allclose(layer.blobs[2].data, [f + 1], rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[0].data, mean1 * f + mean2, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, (var1 * f + var2) * m / (m - 1), rtol=1e-12)


def test_global_forward_matches_reference():
    x = np.random.default_rng(2).normal(size=(2, 3, 2, 2))
    layer = layer_from_prototxt(BN, phase=TEST)
    bottom, top = blobs_from_arrays(x), [Blob((), np.float64)]
    layer.setup(bottom, top)
    layer.blobs[0].data[...] = [2.0, -4.0, 0.0]
    layer.blobs[1].data[...] = [8.0, 2.0, 0.5]
    layer.blobs[2].data[...] = [2.0]
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, reference_global(x, [2, -4, 0], [8, 2, 0.5], 2.0), rtol=1e-12)
    # Hand value: channel 0 mean 1, var 4: (x - 1) / sqrt(4 + 1e-5).
    np.testing.assert_allclose(top[0].data[0, 0, 0, 0], (x[0, 0, 0, 0] - 1) / np.sqrt(4 + 1e-5), rtol=1e-7)
    # A zero weight means "no statistics yet": mean 0, var 0 (Caffe's scale factor 0).
    layer.blobs[2].data[...] = 0
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, x / np.sqrt(EPS), rtol=1e-12)


@pytest.mark.parametrize("phase, text, global_stats", [
    (TEST, BN, True),
    (TRAIN, BN, False),
    (TRAIN, 'type: "BatchNorm" batch_norm_param { use_global_stats: true }', True),
    (TEST, 'type: "BatchNorm" batch_norm_param { use_global_stats: false }', False),
])
def test_use_global_stats_default_by_phase(phase, text, global_stats):
    x = np.random.default_rng(3).normal(3.0, 2.0, size=(3, 2, 2))
    layer, _, top = run_layer(text, x, phase=phase)
    assert layer.use_global_stats is global_stats
    if global_stats:  # fresh statistics (weight 0): x / sqrt(eps), blobs untouched
        np.testing.assert_allclose(top[0].data, x / np.sqrt(EPS), rtol=1e-12)
        assert all((b.data == 0).all() for b in layer.blobs)
    else:
        np.testing.assert_allclose(top[0].data, reference_batch(x)[0], rtol=1e-12)
        assert layer.blobs[2].data[0] == 1.0


def test_blobs_are_caffe_layout_and_never_learned():
    layer, _, _ = run_layer(BN, np.ones((2, 4, 3)), phase=TRAIN)
    assert [b.shape for b in layer.blobs] == [(4,), (4,), (1,)]
    assert [spec.lr_mult for spec in layer.param.param] == [0, 0, 0]
    assert layer.param_propagate_down == [False, False, False]


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (4, 2)])
def test_gradient_batch_statistics(shape):
    x = np.random.default_rng(4).normal(size=shape)
    layer = layer_from_prototxt(BN, phase=TRAIN)
    bottom, top = blobs_from_arrays(x), [Blob((), np.float64)]
    # Exhaustive: the sum-of-squares objective of a normalised output is nearly constant.
    GradientChecker(stepsize=1e-3, threshold=1e-4).check_gradient_exhaustive(layer, bottom, top)
    # The checker seeds parameter diffs with PARAM_DIFF_SEED; backward never touches the statistics'.
    assert all((b.diff == GradientChecker.PARAM_DIFF_SEED).all() for b in layer.blobs)


def numeric_gradient(layer, bottom, top, dy, step=1e-4):
    """Central differences of sum(dy * y) with respect to the bottom (the blobs held fixed)."""
    x = bottom[0].data
    grad = np.zeros_like(x)
    for i in range(x.size):
        value = x.flat[i]
        results = []
        for delta in (step, -step):
            x.flat[i] = value + delta
            layer.run_forward(bottom, top)
            results.append(float((dy * top[0].data).sum()))
        x.flat[i] = value
        grad.flat[i] = (results[0] - results[1]) / (2 * step)
    layer.run_forward(bottom, top)
    return grad


def test_gradient_global_statistics():
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    layer = layer_from_prototxt(BN, phase=TEST)
    bottom, top = blobs_from_arrays(x), [Blob((), np.float64)]
    layer.setup(bottom, top)
    layer.blobs[0].data[...] = [1.0, -2.0, 0.5]
    layer.blobs[1].data[...] = [3.0, 0.5, 2.0]
    layer.blobs[2].data[...] = [2.0]
    layer.run_forward(bottom, top)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_allclose(dx, numeric_gradient(layer, bottom, top, dy), rtol=1e-6, atol=1e-8)
    inv_std = 1 / np.sqrt(np.array([1.5, 0.25, 1.0]) + EPS)
    np.testing.assert_allclose(dx, dy * inv_std.reshape(1, 3, 1, 1), rtol=1e-12)
    assert all((b.diff == 0).all() for b in layer.blobs)


def test_batch_gradient_matches_closed_form():
    """dx = (dy - mean(dy) - y * mean(dy * y)) / sqrt(var + eps), per channel (written independently)."""
    rng = np.random.default_rng(6)
    x, dy = rng.normal(size=(3, 2, 5)), rng.normal(size=(3, 2, 5))
    layer, bottom, top = run_layer(BN, x, phase=TRAIN)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    y, _, var = reference_batch(x)
    mean_dy = dy.mean(axis=(0, 2), keepdims=True)
    mean_dyy = (dy * y).mean(axis=(0, 2), keepdims=True)
    expected = (dy - mean_dy - y * mean_dyy) / np.sqrt(var.reshape(1, 2, 1) + EPS)
    np.testing.assert_allclose(dx, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_in_place_matches_not_in_place(phase):
    rng = np.random.default_rng(7)
    x, dy = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    results = []
    for in_place in (False, True):
        layer, bottom, top = run_layer(BN, x, phase=phase, in_place=in_place)
        y = np.array(top[0].data)
        (dx,) = backward_layer(layer, bottom, top, [dy])
        results.append((y, dx, [np.array(b.data) for b in layer.blobs]))
    (y0, dx0, blobs0), (y1, dx1, blobs1) = results
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(dx1, dx0)
    for b0, b1 in zip(blobs0, blobs1):
        np.testing.assert_array_equal(b1, b0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_big_blob_in_channel_groups_gives_the_same_bits(monkeypatch, dtype):
    """A blob over STATS_CACHE_LIMIT goes through a group of channels at a time (statistics, then
    normalization); each channel's sums are those of the whole-blob pass, so every result is the same,
    in place too, and the groups cover every channel once."""
    from minicaffe.layers import batch_norm

    rng = np.random.default_rng(11)
    x, dy = rng.normal(1.5, 2.0, size=(3, 6, 5, 7)), rng.normal(size=(3, 6, 5, 7))
    channel_bytes = 3 * 5 * 7 * np.dtype(dtype).itemsize
    results = {}
    # (room for how many channels, in place, channels per group): 6 fit; 4 fit, 3 divides 6; 2 fit
    for room, in_place, group in [(6, False, 6), (4, False, 3), (2, True, 2)]:
        monkeypatch.setattr(batch_norm, "STATS_CACHE_LIMIT", room * channel_bytes)
        layer, bottom, top = run_layer(BN, x, dtype=dtype, phase=TRAIN, in_place=in_place)
        assert layer._group_channels((3, 6, 35)) == group
        y = np.array(top[0].data)
        (dx,) = backward_layer(layer, bottom, top, [dy])
        results[group] = (y, dx, [np.array(b.data) for b in layer.blobs])
    expected, _, _ = reference_batch(x.astype(dtype))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    whole = results.pop(6)
    np.testing.assert_allclose(whole[0], expected, rtol=tol, atol=tol)
    for y, dx, blobs in results.values():
        np.testing.assert_array_equal(y, whole[0])
        np.testing.assert_array_equal(dx, whole[1])
        for got, want in zip(blobs, whole[2]):
            np.testing.assert_array_equal(got, want)


def test_channel_groups_divide_the_channels(monkeypatch):
    from minicaffe.layers import batch_norm

    layer = layer_from_prototxt(BN, phase=TRAIN, dtype=np.float32)
    layer.setup([Blob((2, 7, 4), np.float32)], [Blob((), np.float32)])
    monkeypatch.setattr(batch_norm, "STATS_CACHE_LIMIT", 2 * 4 * 4 * 3)  # room for 3 channels of 32 bytes
    assert layer._group_channels((2, 7, 4)) == 1  # 7 is prime: no group of 2 or 3 divides it
    assert layer._group_channels((2, 6, 4)) == 3
    assert layer._group_channels((2, 8, 4)) == 2
    assert layer._group_channels((2, 3, 4)) == 3  # the whole blob fits
    assert layer._group_channels((64, 8, 4)) == 1  # one channel is over the limit: one at a time


def test_backward_survives_top_overwritten_by_later_in_place_layer():
    rng = np.random.default_rng(8)
    x, dy = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    layer, bottom, top = run_layer(BN, x, phase=TRAIN)
    (expected,) = backward_layer(layer, bottom, top, [dy])
    top[0].data[...] = 5.0  # e.g. Scale in place on this top
    (got,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_array_equal(got, expected)


NET = """
name: "bn"
force_backward: true
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 dim: 2 dim: 2 } } }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "%s" }
layer { name: "sc" type: "Scale" bottom: "%s" top: "%s"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 2 }
                      bias_filler { type: "uniform" min: -1 max: 1 } } }
"""


def test_net_bn_scale_in_place_matches_separate_blobs():
    """The usual Caffe pattern: BatchNorm and Scale both in place on one blob, in a TRAIN net."""
    rng = np.random.default_rng(9)
    x, dy = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 3, 2, 2))
    outputs = []
    for bn_top, out in (("x1", "y"), ("x", "x")):  # separate blobs, then both layers in place on x
        net = Net(io.parse_text(NET % (bn_top, bn_top, out), caffe_pb2.NetParameter()), TRAIN,
                  dtype=np.float64)
        net.forward(x=x)
        y = np.array(net.blobs[out].data)
        net.clear_param_diffs()
        net.blobs[out].diff[...] = dy
        net.backward_range(len(net.layers) - 1, 0)
        specs = [(p.layer_name, p.lr_mult) for p in net.learnable_params]
        outputs.append((y, np.array(net.blobs["x"].diff), [np.array(b.diff) for b in net.params["sc"]],
                        [np.array(b.data) for b in net.params["bn"]], specs))
        assert all((b.diff == 0).all() for b in net.params["bn"])  # even with force_backward
    (y0, dx0, p0, s0, specs0), (y1, dx1, p1, s1, specs1) = outputs
    assert specs0 == specs1 == [("bn", 0), ("bn", 0), ("bn", 0), ("sc", 1), ("sc", 1)]
    np.testing.assert_allclose(y1, y0, rtol=1e-12)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-10, atol=1e-12)
    for a, b in zip(p0 + s0, p1 + s1):
        np.testing.assert_allclose(b, a, rtol=1e-12)
    assert np.abs(dx0).max() > 0.01 and np.abs(p0[0]).max() > 0.01
    # The running statistics saw the batch: weight 1, mean = the batch mean.
    np.testing.assert_allclose(s0[0], x.mean(axis=(0, 2, 3)), rtol=1e-12)


def test_learned_statistics_are_rejected():
    text = 'type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }'
    with pytest.raises(LayerError, match="cannot configure batch normalization statistics.*param 1"):
        run_layer(text, np.ones((2, 3)), phase=TRAIN)


def test_channel_change_is_rejected():
    layer, bottom, top = run_layer(BN, np.ones((2, 3, 2)), phase=TRAIN)
    bottom[0].reshape(2, 4, 2)
    with pytest.raises(LayerError, match=r"\[2, 4, 2\] does not have the 3 channels"):
        layer.reshape(bottom, top)


def test_loaded_blob_of_wrong_shape_is_rejected():
    param = caffe_pb2.LayerParameter(name="bn", type="BatchNorm")
    for shape in ((3,), (4,), (1,)):
        param.blobs.add().shape.dim.extend(shape)
    layer = minicaffe.layer.create_layer(param, TEST, np.float64)
    with pytest.raises(LayerError, match=r"parameter blob 1 has shape \[4\], expected \[3\]"):
        layer.setup(blobs_from_arrays(np.ones((2, 3))), [Blob((), np.float64)])


def test_scalar_bottom_is_rejected():
    with pytest.raises(LayerError, match="scalar"):
        run_layer(BN, np.float64(1.0), phase=TRAIN)


@pytest.mark.parametrize("shape", [(4, 3, 8, 9), (64, 2)])  # stage-1 partials of 32 lanes; of one
def test_train_statistics_keep_their_precision_when_the_mean_dwarfs_the_spread(shape):
    """The batch variance comes from one read of x (sums of x - shift and its square), shifted by a value
    of the channel: with a mean of 1e4 and a standard deviation of 1, float32 sums of x and x^2 would
    leave no correct digit of the variance (x^2 ~ 1e8 has an ulp of 8); shifted, it stays accurate."""
    rng = np.random.default_rng(7)
    spread = np.array([1.0, 0.5, 2.0][:shape[1]]).reshape(1, -1, *[1] * (len(shape) - 2))
    x = (1e4 + rng.normal(size=shape) * spread).astype(np.float32)
    layer, _, top = run_layer(BN, x, phase=TRAIN, dtype=np.float32)
    expected, mean, var = reference_batch(x)
    m = x.size // x.shape[1]
    np.testing.assert_allclose(layer.blobs[0].data, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].data, var * m / (m - 1), rtol=1e-4)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-3, atol=1e-3)



# -- a BatchNorm with global statistics and the in-place Scale after it, run as one pass (net.py) ------

FUSABLE = """
name: "fusable" force_backward: true
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 3 dim: 4 dim: 5 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
        convolution_param { num_output: 5 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" } } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "%s" batch_norm_param { use_global_stats: true } }
layer { name: "sc" type: "Scale" bottom: "%s" top: "%s"
        scale_param { bias_term: %s filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "%s" top: "%s" }
layer { name: "ip" type: "InnerProduct" bottom: "%s" top: "out"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
"""


def fusable_net(monkeypatch, fuse: bool, dtype=np.float32, bn_top="c", scale_top="c",
                bias_term="true") -> Net:
    from minicaffe import net as net_module

    monkeypatch.setattr(net_module, "FUSE_BATCH_NORM_SCALE", fuse)
    text = FUSABLE % (bn_top, bn_top, scale_top, bias_term, scale_top, scale_top, scale_top)
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), TEST, dtype=dtype)
    rng = np.random.default_rng(5)
    for name in ("conv", "sc", "ip"):
        for blob in net.params[name]:
            blob.data[...] = rng.normal(size=blob.shape)
    mean, var = rng.normal(size=5), rng.uniform(0.5, 2.0, size=5)
    bn = net.params["bn"]
    bn[0].data[...], bn[1].data[...], bn[2].data[...] = 2.5 * mean, 2.5 * var, 2.5  # weight 2.5
    net.blobs["x"].data[...] = rng.normal(size=net.blobs["x"].shape)
    return net


def run_all(net: Net, dy) -> dict:
    net.clear_param_diffs()
    net.forward()
    net.blobs["out"].diff[...] = dy
    net.backward()
    return {"out": np.array(net.blobs["out"].data), "dx": np.array(net.blobs["x"].diff),
            **{f"{name} {i}": np.array(blob.diff) for name, blobs in net.params.items()
               for i, blob in enumerate(blobs)}}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm_and_scale_in_one_pass_give_the_bits_of_the_two_layers(dtype, monkeypatch):
    """The Net runs an in-place BatchNorm (global statistics) and the in-place Scale with a bias term
    after it as one pass each way: the output, the input gradient and every parameter gradient are the
    same bits as with the two layers run apart (and the gradients are not zero)."""
    dy = np.random.default_rng(6).normal(size=(3, 3))
    fused_net = fusable_net(monkeypatch, True, dtype)
    assert fused_net._batch_norm_scales == [(2, 3)]
    launched = []
    launch = kernel.KernelFile.launch
    monkeypatch.setattr(kernel.KernelFile, "launch", lambda self, name, *args, **kwargs: (
        launched.append(name), launch(self, name, *args, **kwargs))[1])
    fused = run_all(fused_net, dy)
    assert "normalize_mul_add_planes" in launched and "bn_normalize" not in launched  # the fused kernels ran
    assert fused_net.layers[3].normalizing is None and not fused_net.layers[2].scale_normalizes  # reset after
    apart_net = fusable_net(monkeypatch, False, dtype)
    assert apart_net._batch_norm_scales == []
    apart = run_all(apart_net, dy)
    assert fused.keys() == apart.keys()
    for name in fused:
        np.testing.assert_array_equal(fused[name], apart[name], err_msg=name)
    assert all(np.abs(apart[name]).max() > 1e-3 for name in ("dx", "sc 0", "sc 1", "conv 0"))


def test_batch_norm_and_scale_fuse_only_when_one_range_runs_both(monkeypatch):
    """net.forward(end="bn") must leave BatchNorm's own output in the blob, and a backward over the
    Scale alone must leave the BatchNorm's gradient to the BatchNorm: the pair is fused per range."""
    net = fusable_net(monkeypatch, True)
    reference = fusable_net(monkeypatch, False)
    for n in (net, reference):
        n.forward(end="bn")
    np.testing.assert_array_equal(net.blobs["c"].data, reference.blobs["c"].data)
    mean, var, weight = (np.array(b.data, np.float64) for b in net.params["bn"])
    reference.forward_range(1, 1)  # the convolution's output again, normalized here by numpy
    expected = reference_global(np.array(reference.blobs["c"].data), mean, var, weight[0])
    np.testing.assert_allclose(net.blobs["c"].data, expected, rtol=1e-5, atol=1e-6)
    dy = np.random.default_rng(8).normal(size=(3, 3))
    for n in (net, reference):
        n.forward()
        n.clear_param_diffs()
        n.blobs["out"].diff[...] = dy
        n.backward_range(len(n.layers) - 1, 3)  # down to the Scale: not the BatchNorm
        n.backward_range(2, 0)
    assert not net.layers[2].scale_propagates and net.layers[3].propagating_for is None
    np.testing.assert_array_equal(net.blobs["x"].diff, reference.blobs["x"].diff)
    for a, b in zip(net.params["sc"], reference.params["sc"]):
        np.testing.assert_array_equal(a.diff, b.diff)


@pytest.mark.parametrize("change", ["bn not in place", "scale not in place", "no bias term", "train"])
def test_batch_norm_and_scale_that_are_not_the_pattern_stay_apart(change, monkeypatch):
    from minicaffe import net as net_module

    monkeypatch.setattr(net_module, "FUSE_BATCH_NORM_SCALE", True)
    bn_top, scale_top, bias_term, phase = "c", "c", "true", TEST
    if change == "bn not in place":
        bn_top = scale_top = "n"  # BatchNorm writes a blob of its own, the Scale is in place on it
    elif change == "scale not in place":
        scale_top = "s"
    elif change == "no bias term":
        bias_term = "false"
    text = FUSABLE % (bn_top, bn_top, scale_top, bias_term, scale_top, scale_top, scale_top)
    if change == "train":
        text, phase = text.replace("use_global_stats: true", "use_global_stats: false"), TRAIN
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), phase)
    assert net._batch_norm_scales == []
