"""In place, PReLU, ReLU and AbsVal keep at most a byte per element for backward (Layer.lean_keep), and
give the same bits as not in place; the Net tells a layer whether its top survives until backward."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer

import minicaffe
from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.testing import blobs_from_arrays, layer_from_prototxt

DTYPES = [np.float32, np.float64]
SHAPE = (3, 4, 5, 13)  # inner 65: two rows of 32 lanes and a tail of 1


def hard_inputs(dtype, shape=SHAPE) -> np.ndarray:
    """Normal values and the awkward ones: zeros of both signs, tiny (subnormal) and huge magnitudes."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape).astype(dtype)
    info = np.finfo(dtype)
    flat = x.reshape(-1)
    special = np.array([0.0, -0.0, info.tiny, -info.tiny, info.smallest_subnormal, -info.smallest_subnormal,
                        -info.max / 4, info.max / 4, -1e-30, -3.0], dtype)
    flat[rng.choice(flat.size, 200, replace=False)] = np.resize(special, 200)
    return x


def run(text: str, x, dtype, in_place: bool, slopes=None, survives: bool = True):
    """Forward then backward; returns (layer, top data, bottom diff, parameter diffs, kept bytes)."""
    layer = layer_from_prototxt(text, dtype=dtype)
    bottom = blobs_from_arrays(x, dtype=dtype)
    top = [bottom[0]] if in_place else [Blob((), dtype)]
    layer.setup(bottom, top)
    layer.top_data_survives = survives  # as a Net sets it (tested below)
    if slopes is not None:
        layer.blobs[0].data[...] = slopes
    layer.run_forward(bottom, top)
    y = np.array(top[0].data)
    kept = layer.kept_bytes()
    buffers_after_forward = sum(b.nbytes for b in layer.buffers.values())
    dy = np.random.default_rng(5).normal(size=x.shape).astype(dtype)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    return layer, y, dx, [np.array(b.diff) for b in layer.blobs], kept, buffers_after_forward


def assert_same_bits(a, b):
    for got, want in zip(a, b):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


# Slopes per channel: negative, tiny, one that makes (a * x) / a != x, large.
SLOPES = [-0.7, 1e-3, 0.1, 3.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_prelu_in_place_keeps_a_byte_per_element_and_matches_not_in_place(dtype):
    x = hard_inputs(dtype)
    slopes = np.array(SLOPES, dtype)
    # The data is such that y / a does not give x back everywhere: a design that used x not in place
    # and y / a in place would differ.
    a = slopes.reshape(1, -1, 1, 1)
    with np.errstate(all="ignore"):
        assert ((a * x) / a != x)[x <= 0].any()
    lean = run("name: 'p' type: 'PReLU'", x, dtype, True, slopes)
    plain = run("name: 'p' type: 'PReLU'", x, dtype, False, slopes)
    assert lean[0].kept_lean and not plain[0].kept_lean
    assert lean[4] == x.size  # one byte per element
    assert lean[5] <= x.size  # and no other buffer after forward
    assert plain[4] == 0
    assert_same_bits(lean[1:4], plain[1:4])
    # The slope gradient is Caffe's sum of dy * x (for x <= 0) up to rounding.
    dy = np.random.default_rng(5).normal(size=x.shape).astype(dtype)
    want = np.where(x > 0, 0, dy.astype(np.float64) * x).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(lean[3][0], want, rtol=1e-4 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_prelu_with_a_zero_slope_keeps_a_full_copy_and_matches(dtype, shared):
    x = hard_inputs(dtype)
    text = "name: 'p' type: 'PReLU'" + (" prelu_param { channel_shared: true }" if shared else "")
    slopes = np.array(0.0 if shared else [-0.7, 0.0, 0.1, 3.0], dtype)
    lean = run(text, x, dtype, True, slopes)
    plain = run(text, x, dtype, False, slopes)
    assert not lean[0].kept_lean and lean[4] == x.size * np.dtype(dtype).itemsize  # the full copy
    assert_same_bits(lean[1:4], plain[1:4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_prelu_whose_top_is_overwritten_later_keeps_a_full_copy(dtype):
    x = hard_inputs(dtype)
    lean = run("name: 'p' type: 'PReLU'", x, dtype, True, np.array(SLOPES, dtype), survives=False)
    plain = run("name: 'p' type: 'PReLU'", x, dtype, False, np.array(SLOPES, dtype))
    assert not lean[0].kept_lean and lean[4] == x.nbytes
    assert_same_bits(lean[1:4], plain[1:4])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("text", ["type: 'ReLU'", "type: 'ReLU' relu_param { negative_slope: 0.1 }",
                                  "type: 'ReLU' relu_param { negative_slope: -0.5 }", "type: 'AbsVal'"])
def test_relu_and_absval_in_place_keep_a_byte_per_element_and_match(dtype, text):
    x = hard_inputs(dtype)
    # The Net's flag does not matter: these read nothing back from the top.
    lean = run("name: 'r' " + text, x, dtype, True, survives=False)
    plain = run("name: 'r' " + text, x, dtype, False)
    assert lean[0].kept_lean and lean[4] == x.size and lean[5] == x.size
    assert_same_bits(lean[1:3], plain[1:3])


NET = """
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "act" type: "PReLU" bottom: "x" top: "x"
        prelu_param { filler { type: "constant" value: -0.3 } } }
%s
layer { name: "pool" type: "Pooling" bottom: "x" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
"""


@pytest.mark.parametrize("later", ["", 'layer { name: "s" type: "Scale" bottom: "x" top: "x" }'])
def test_net_tells_in_place_layers_whether_their_top_survives(later):
    net = Net(io.parse_text(NET % later, caffe_pb2.NetParameter()), minicaffe.TRAIN)
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4))
    net.forward(x=x)
    act = net.layers[net._layer_ids["act"]]
    assert act.top_data_survives == (not later) and act.kept_lean == (not later)
    assert act.kept_bytes() == (x.size if not later else x.size * 4)
    assert net.layers[net._layer_ids["pool"]].top_data_survives  # not in place: nothing writes "pool"
    net.blobs["pool"].diff[...] = 1
    net.backward()
    want = np.where(x > 0, 1.0, -0.3) * 0.25  # AVE 2x2 pooling spreads a quarter of each diff
    if not later:
        np.testing.assert_allclose(net.blobs["x"].diff, want, rtol=1e-6)


VIEWS = """
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "act" type: "PReLU" bottom: "x" top: "%s" prelu_param { filler { type: "gaussian" } } }
layer { name: "flat" type: "Flatten" bottom: "%s" top: "flat" }
layer { name: "flip" type: "Power" bottom: "flat" top: "%s" power_param { scale: -1 shift: 0.5 } }
layer { name: "split_a" type: "ReLU" bottom: "flat" top: "a" }
layer { name: "split_b" type: "AbsVal" bottom: "flat" top: "b" }
"""


@pytest.mark.parametrize("flip_in_place", [False, True])
def test_a_later_in_place_layer_on_a_view_of_the_top_counts_as_a_writer(flip_in_place):
    """Flatten's top (and the automatic Split's) share PReLU's output: an in-place Power on it overwrites
    that output, so PReLU must keep a full copy; its gradients match the not-in-place net's."""
    results = []
    x = np.random.default_rng(4).normal(size=(2, 3, 4, 4))
    for act_top in ("y", "x"):
        text = VIEWS % (act_top, act_top, "flat" if flip_in_place else "flipped")
        net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TRAIN, dtype=np.float64)
        net.forward(x=x)
        act = net.layers[net._layer_ids["act"]]
        assert act.kept_lean == (act_top == "x" and not flip_in_place)
        for name in net.outputs:
            net.blobs[name].diff[...] = 1
        net.backward()
        results.append([np.array(net.blobs["x"].diff), np.array(net.params["act"][0].diff)])
    assert_same_bits(results[1], results[0])


def test_reductions_give_the_same_bits_every_run():
    x = np.random.default_rng(2).normal(size=(4, 6, 33, 17)).astype(np.float32)
    runs = [run("name: 'p' type: 'PReLU'", x, np.float32, False, np.linspace(-1, 1, 6))[3][0]
            for _ in range(3)]
    assert_same_bits(runs[1:], runs[:1] * 2)


KEEPERS = """
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
layer { name: "prelu" type: "PReLU" bottom: "x" top: "x" }
layer { name: "scale" type: "Scale" bottom: "x" top: "x" }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "bn" }
layer { name: "abs" type: "AbsVal" bottom: "bn" top: "bn" }
layer { name: "sig" type: "Sigmoid" bottom: "bn" top: "sig" }
"""


def test_summary_reports_what_each_layer_keeps_as_a_forward_keeps_it():
    from minicaffe.commands.summary import format_summary, summarize

    net = Net(io.parse_text(KEEPERS, caffe_pb2.NetParameter()), minicaffe.TRAIN)
    info = summarize(net)
    count = 2 * 3 * 4 * 4
    kept = {row["name"]: row["kept_bytes"] for row in info["rows"]}
    # ReLU: a mask; PReLU: a full copy, as Scale overwrites its top later; Scale: a copy of x; BatchNorm:
    # its output (not in place) and inv_std; AbsVal: signs; Sigmoid: its output.
    assert kept == {"in": 0, "relu": count, "prelu": 4 * count, "scale": 4 * count, "bn": 4 * count + 4 * 3,
                    "abs": count, "sig": 4 * count}
    assert info["kept_bytes"] == sum(kept.values())
    text = format_summary(net, info)
    assert "Kept for backward" in text and f"Kept for backward: {(18 * count + 12) / 1024:.1f} KB" in text
    net.forward(x=np.random.default_rng(0).normal(size=(2, 3, 4, 4)))
    assert {name: layer.kept_bytes() for name, layer in zip(net._layer_names, net.layers)} == kept
