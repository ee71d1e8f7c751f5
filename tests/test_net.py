"""Net semantics that span layers: lr_mult 0, shared parameters, force_backward, loss weights."""

from __future__ import annotations

import numpy as np
import pytest

import minicaffe
from minicaffe import io
from minicaffe.net import Net, NetError, insert_splits
from minicaffe.proto import caffe_pb2

INPUTS = """
layer { name: "in" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 3 dim: 4 } shape { dim: 3 dim: 2 } } }
"""


def ip(name, bottom, top, param="", filler='weight_filler { type: "gaussian" std: 0.5 }'):
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {param}\n'
            f'  inner_product_param {{ num_output: 2 {filler} bias_filler {{ type: "gaussian" }} }} }}\n')


def make(text, **kwargs) -> Net:
    return Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TRAIN, dtype=np.float64, **kwargs)


def feed(net, seed=0):
    rng = np.random.default_rng(seed)
    net.blobs["x"].data[...] = rng.normal(size=(3, 4))
    net.blobs["t"].data[...] = rng.normal(size=(3, 2))


def test_lr_mult_zero_leaves_that_diff_untouched():
    net = make(INPUTS + ip("fc", "x", "y", 'param { lr_mult: 0 } param { lr_mult: 1 }')
               + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }')
    feed(net)
    weights, bias = net.params["fc"]
    weights.diff[...] = 7.0
    bias.diff[...] = 0.0
    net.forward()
    net.backward()
    assert (weights.diff == 7.0).all()  # not computed, not cleared
    assert np.abs(bias.diff).sum() > 0
    assert [p.lr_mult for p in net.learnable_params] == [0.0, 1.0]


def test_force_backward_computes_every_gradient_as_caffe():
    frozen = 'param { lr_mult: 0 } param { lr_mult: 0 }'
    net = make("force_backward: true\n" + INPUTS + ip("fc", "x", "y", frozen)
               + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }')
    feed(net)
    net.forward()
    net.backward()
    assert np.abs(net.params["fc"][0].diff).sum() > 0
    assert np.abs(net.blobs["x"].diff).sum() > 0


def test_layers_not_leading_to_a_loss_skip_backward():
    net = make(INPUTS + ip("fc", "x", "y") + ip("side", "x", "z")
               + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }')
    feed(net)
    net.forward()
    net.backward()
    assert np.abs(net.params["fc"][0].diff).sum() > 0
    assert (net.params["side"][0].diff == 0).all()


def test_shared_parameters_accumulate_both_gradients():
    loss = ('layer { name: "sum" type: "Eltwise" bottom: "y1" bottom: "y2" top: "y" }\n'
            'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }')
    shared = make(INPUTS + ip("fc1", "x", "y1", 'param { name: "w" } param { name: "b" }')
                  + ip("fc2", "x", "y2", 'param { name: "w" } param { name: "b" }') + loss)
    separate = make(INPUTS + ip("fc1", "x", "y1") + ip("fc2", "x", "y2") + loss)
    assert shared.params["fc1"][0] is shared.params["fc2"][0]
    assert len(shared.learnable_params) == 2 and len(separate.learnable_params) == 4
    for net in (shared, separate):
        feed(net)
        values = [blob.data for blob in shared.params["fc1"]]
        for layer in ("fc1", "fc2"):
            for blob, value in zip(net.params[layer], values):
                blob.data[...] = value
        net.forward()
        net.backward()
    for i in range(2):
        expected = separate.params["fc1"][i].diff + separate.params["fc2"][i].diff
        np.testing.assert_allclose(shared.params["fc1"][i].diff, expected, rtol=1e-12)


def test_shared_parameter_shape_mismatch_is_an_error():
    text = INPUTS + ip("fc1", "x", "y1", 'param { name: "w" }') + \
        'layer { name: "fc2" type: "InnerProduct" bottom: "x" top: "y2" param { name: "w" }\n' \
        '        inner_product_param { num_output: 3 } }'
    with pytest.raises(NetError, match="shared parameter 'w' has shape \\[3, 4\\], its owner \\[2, 4\\]"):
        make(text)


def test_loss_weight_scales_loss_and_gradient():
    base = INPUTS + ip("fc", "x", "y")
    plain = make(base + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }')
    weighted = make(base + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss"'
                    ' loss_weight: 3 }')
    results = []
    for net in (plain, weighted):
        feed(net)
        net.params["fc"][0].data[...] = plain.params["fc"][0].data
        net.params["fc"][1].data[...] = plain.params["fc"][1].data
        results.append((net.forward_backward(), np.array(net.params["fc"][0].diff)))
    assert results[1][0] == pytest.approx(3 * results[0][0])
    np.testing.assert_allclose(results[1][1], 3 * results[0][1])


def test_propagate_down_false_stops_the_bottom_gradient():
    net = make("force_backward: true\n" + INPUTS + ip("fc", "x", "y")
               + 'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss"'
               ' propagate_down: true propagate_down: false }')
    feed(net)
    net.blobs["t"].diff[...] = 5.0
    net.forward()
    net.backward()
    assert (net.blobs["t"].diff == 5.0).all()
    assert np.abs(net.blobs["y"].diff).sum() > 0


@pytest.mark.parametrize("slopes", [(0.0, 0.1, 0.3), (0.2, -0.5, 0.1)])
def test_relu_chain_in_place_equals_not_in_place(slopes):
    """A chain of in-place ReLUs (as Caffe nets write them) gives the same top and input gradient."""
    def chain(in_place: bool) -> Net:
        text = 'force_backward: true\nlayer { name: "in" type: "Input" top: "x" ' \
               'input_param { shape { dim: 2 dim: 3 dim: 4 } } }\n'
        previous = "x"
        for i, slope in enumerate(slopes):
            top = "x" if in_place else f"r{i}"
            text += (f'layer {{ name: "relu{i}" type: "ReLU" bottom: "{previous}" top: "{top}" '
                     f'relu_param {{ negative_slope: {slope} }} }}\n')
            previous = top
        return make(text)

    x = np.random.default_rng(5).normal(size=(2, 3, 4))
    dy = np.random.default_rng(6).normal(size=(2, 3, 4))
    results = []
    for in_place in (False, True):
        net = chain(in_place)
        out = net.forward(x=x)
        (name,) = out
        top = np.array(out[name])
        results.append((top, np.array(net.backward(**{name: dy})["x"])))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    # hand-derived: each leaky ReLU multiplies negatives by its slope (a negative slope flips the sign)
    expected, grad = x.copy(), np.ones_like(x)
    for slope in slopes:
        s = float(np.float32(slope))
        grad = np.where(expected > 0, grad, s * grad)
        expected = np.where(expected > 0, expected, s * expected)
    np.testing.assert_allclose(results[0][0], expected)
    np.testing.assert_allclose(results[0][1], grad * dy)


@pytest.mark.parametrize("first", ['type: "Sigmoid"', 'type: "TanH"', 'type: "ReLU"',
                                   'type: "PReLU"', 'type: "AbsVal"'])
def test_in_place_layer_followed_by_a_sign_changing_in_place_layer(first):
    """Backward of an in-place layer must not read the shared blob, which later in-place layers change."""
    def net(in_place: bool) -> Net:
        mid, out = ("x", "x") if in_place else ("a", "b")
        return make('force_backward: true\nlayer { name: "in" type: "Input" top: "x" '
                    'input_param { shape { dim: 2 dim: 3 } } }\n'
                    f'layer {{ name: "first" {first} bottom: "x" top: "{mid}" }}\n'
                    f'layer {{ name: "flip" type: "Power" bottom: "{mid}" top: "{out}" '
                    'power_param { scale: -2 shift: 0.1 } }')

    x = np.random.default_rng(7).normal(size=(2, 3))
    dy = np.random.default_rng(8).normal(size=(2, 3))
    grads = []
    for in_place in (False, True):
        n = net(in_place)
        (name,) = n.forward(x=x)
        grads.append(np.array(n.backward(**{name: dy})["x"]))
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12)


def test_insert_splits_reports_which_blob_each_split_top_copies():
    param = io.parse_text(INPUTS + ip("fc1", "x", "y1") + ip("fc2", "x", "y2"), caffe_pb2.NetParameter())
    split_net, split_sources = insert_splits(param)
    assert split_sources == {"x_in_0_split_0": "x", "x_in_0_split_1": "x"}
    assert [list(layer.bottom) for layer in split_net.layer[2:]] == [["x_in_0_split_0"], ["x_in_0_split_1"]]


def test_a_user_blob_named_like_a_split_top_does_not_rebind():
    """Only a real automatic split lets an in-place layer write a blob again; a look-alike name is a clash."""
    text = ('layer { name: "in" type: "Input" top: "x" top: "x_user_0_split_0"\n'
            '        input_param { shape { dim: 1 dim: 2 } shape { dim: 1 dim: 2 } } }\n'
            'layer { name: "r" type: "ReLU" bottom: "x_user_0_split_0" top: "x" }\n')
    with pytest.raises(NetError, match="top blob 'x' is produced by two layers"):
        make(text)


@pytest.mark.parametrize("tops", [1, 2, 3])
def test_split_backward_adds_the_top_diffs_in_order(tops):
    """dx = dy0 + dy1 + ... summed left to right (float32 bits), data shared with every top."""
    from minicaffe.blob import Blob
    from minicaffe.layer import create_layer

    param = caffe_pb2.LayerParameter(name="split", type="Split")
    layer = create_layer(param, minicaffe.TRAIN, np.float32)
    rng = np.random.default_rng(3)
    bottom, top = [Blob((2, 3, 5), np.float32)], [Blob((), np.float32) for _ in range(tops)]
    bottom[0].data[...] = rng.normal(size=(2, 3, 5))
    layer.setup(bottom, top)
    layer.run_forward(bottom, top)
    diffs = [rng.normal(size=(2, 3, 5)).astype(np.float32) * 10.0 ** i for i in range(tops)]
    for blob, diff in zip(top, diffs):
        assert np.shares_memory(blob.data, bottom[0].data)
        blob.diff[...] = diff
    layer.run_backward(top, [True], bottom)
    expected = diffs[0].copy()
    for diff in diffs[1:]:
        expected += diff
    np.testing.assert_array_equal(bottom[0].diff, expected)
