"""Acceptance ("Core engine" items 5 and 6): PReLU composed from existing layers.

    PReLU_a(x) = ReLU(x) + Conv1x1[group=C, weights -a](ReLU(Power[scale=-1](x)))      (Eltwise SUM)

since ReLU(x) - a * ReLU(-x) = max(x, 0) + a * min(x, 0). A net built that way and a net with a PReLU
layer of slopes a must give the same top and the same gradients. `x` feeds two layers there (ReLU and
Power), so the Net inserts a Split whose backward must sum both gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

import minicaffe
from minicaffe import io
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2

C = 4
INPUT = f"""
force_backward: true
layer {{ name: 'in' type: 'Input' top: 'x'
        input_param {{ shape {{ dim: 2 dim: {C} dim: 3 dim: 2 }} }} }}
"""
# The negative part: ReLU(-x) scaled per channel by a 1x1 depthwise convolution with weights -a.
DECOMPOSED_LAYERS = f"""
layer {{ name: 'pos' type: 'ReLU' bottom: 'x' top: 'pos' }}
layer {{ name: 'negate' type: 'Power' bottom: 'x' top: 'negx' power_param {{ scale: -1 }} }}
layer {{ name: 'relu_negx' type: 'ReLU' bottom: 'negx' top: 'negx' }}
layer {{ name: 'slopes' type: 'Convolution' bottom: 'negx' top: 'neg'
        convolution_param {{ num_output: {C} kernel_size: 1 group: {C} bias_term: false }} }}
layer {{ name: 'sum' type: 'Eltwise' bottom: 'pos' bottom: 'neg' top: 'y'
        eltwise_param {{ operation: SUM }} }}
"""
PRELU_LAYER = "layer { name: 'prelu' type: 'PReLU' bottom: 'x' top: '%s' }"
SLOPES = np.array([0.25, -0.5, 1.5, 0.0])  # negative slopes too: learned MTCNN slopes can be


def build(text: str) -> Net:
    return Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TEST, dtype=np.float64)


def decomposed_net(slopes=SLOPES) -> Net:
    net = build(INPUT + DECOMPOSED_LAYERS)
    net.params["slopes"][0].data[...] = -np.asarray(slopes).reshape(C, 1, 1, 1)
    return net


def prelu_net(slopes=SLOPES) -> Net:
    net = build(INPUT + PRELU_LAYER % "y")
    net.params["prelu"][0].data[...] = slopes
    return net


def inputs(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # |x| >= 0.05: at exactly 0 the two nets' subgradients legitimately differ.
    return rng.uniform(0.05, 2.0, (2, C, 3, 2)) * rng.choice([-1.0, 1.0], (2, C, 3, 2))


def reference(x: np.ndarray, slopes=SLOPES) -> np.ndarray:
    a = np.asarray(slopes).reshape(1, C, 1, 1)
    return np.where(x > 0, x, a * x)


@pytest.mark.parametrize("seed", [0, 1])
def test_decomposition_equals_prelu(seed):
    x = inputs(seed)
    dy = np.random.default_rng(seed + 10).normal(size=x.shape)
    results = []
    for net in (decomposed_net(), prelu_net()):
        y = np.array(net.forward(x=x)["y"])
        dx = np.array(net.backward(y=dy)["x"])
        results.append((y, dx, net))
    (y1, dx1, net1), (y2, dx2, net2) = results
    np.testing.assert_allclose(y1, reference(x), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(y1, y2, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dx2, np.where(x > 0, dy, SLOPES.reshape(1, C, 1, 1) * dy), rtol=1e-14)
    # Parameter gradients agree too: the conv weights are -a, so d/da = -d/dw.
    np.testing.assert_allclose(net2.params["prelu"][0].diff, -net1.params["slopes"][0].diff.ravel(),
                               rtol=1e-13, atol=1e-14)
    assert np.all(net2.params["prelu"][0].diff != 0)


def test_x_feeding_several_layers_goes_through_a_split():
    net = decomposed_net()
    splits = [layer for layer in net.layers if layer.type == "Split"]
    assert len(splits) == 1 and splits[0].param.bottom == ["x"] and len(splits[0].param.top) == 2
    x = inputs(2)
    net.forward(x=x)
    # Gradient of sum(y): 1 where x > 0 (through ReLU), a where x < 0 (through Power, ReLU, conv).
    # Either path alone would give 1 or a only on its own side, 0 on the other.
    dx = net.backward(y=np.ones_like(x))["x"]
    np.testing.assert_allclose(dx, np.where(x > 0, 1.0, np.broadcast_to(SLOPES.reshape(1, C, 1, 1), x.shape)),
                               rtol=1e-14)


def test_both_forms_in_one_net_sum_gradients_over_three_consumers():
    """x feeds ReLU, Power and PReLU in one net; out = decomposition - PReLU must be 0 everywhere, and
    with coeffs (1, 1) the gradient is twice PReLU's: the Split sums all three consumers' gradients."""
    for coeffs, factor in (((1, -1), 0.0), ((1, 1), 2.0)):
        text = (INPUT + DECOMPOSED_LAYERS + PRELU_LAYER % "p"
                + " layer { name: 'out' type: 'Eltwise' bottom: 'y' bottom: 'p' top: 'out'"
                + f" eltwise_param {{ operation: SUM coeff: {coeffs[0]} coeff: {coeffs[1]} }} }}")
        net = build(text)
        net.params["slopes"][0].data[...] = -SLOPES.reshape(C, 1, 1, 1)
        net.params["prelu"][0].data[...] = SLOPES
        split = next(layer for layer in net.layers if layer.type == "Split")
        assert len(split.param.top) == 3
        x = inputs(3)
        dy = np.random.default_rng(4).normal(size=x.shape)
        out = net.forward(x=x)["out"]
        np.testing.assert_allclose(out, (1 + coeffs[1]) * reference(x), rtol=1e-14, atol=1e-15)
        dx = net.backward(out=dy)["x"]
        prelu_dx = np.where(x > 0, dy, SLOPES.reshape(1, C, 1, 1) * dy)
        np.testing.assert_allclose(dx, factor * prelu_dx, rtol=1e-13, atol=1e-14)


def test_decomposition_with_float32():
    x = inputs(5).astype(np.float32)
    nets = []
    for text in (INPUT + DECOMPOSED_LAYERS, INPUT + PRELU_LAYER % "y"):
        net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TEST, dtype=np.float32)
        if "slopes" in net.params:
            net.params["slopes"][0].data[...] = -SLOPES.reshape(C, 1, 1, 1)
        else:
            net.params["prelu"][0].data[...] = SLOPES
        nets.append(np.array(net.forward(x=x)["y"]))
    np.testing.assert_allclose(nets[0], nets[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(nets[0], reference(x.astype(np.float64)), rtol=1e-6, atol=1e-7)
