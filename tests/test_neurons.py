"""ELU, Exp, Log, BNLL, Threshold, Clip and Swish (Caffe's neuron layers): forward against plain numpy
formulas and hand-checked values (PyTorch as an optional oracle), fp64 gradient checks, in place ==
not in place bit for bit, what each keeps for backward, and bad parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import backward_layer, run_layer

import minicaffe
from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.testing import blobs_from_arrays, check_layer, layer_from_prototxt

DTYPES = [np.float32, np.float64]


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def f32(value: float) -> float:
    """A parameter as the layer sees it: caffe.proto stores them as float."""
    return float(np.float32(value))


# Independent references in float64: (prototxt, y(x), dy/dx(x)), written from the textbook formulas.
def elu(text_alpha):
    alpha = f32(text_alpha)
    return (f"type: 'ELU' elu_param {{ alpha: {text_alpha} }}",
            lambda x: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0))),
            lambda x: np.where(x > 0, 1.0, alpha * np.exp(np.minimum(x, 0))))


def exp(base, scale, shift):
    base, scale, shift = f32(base), f32(scale), f32(shift)
    ln_base = 1.0 if base == -1 else math.log(base)
    return (f"type: 'Exp' exp_param {{ base: {base} scale: {scale} shift: {shift} }}",
            lambda x: np.exp(ln_base * (shift + scale * x)),
            lambda x: ln_base * scale * np.exp(ln_base * (shift + scale * x)))


def log(base, scale, shift):
    base, scale, shift = f32(base), f32(scale), f32(shift)
    ln_base = 1.0 if base == -1 else math.log(base)
    return (f"type: 'Log' log_param {{ base: {base} scale: {scale} shift: {shift} }}",
            lambda x: np.log(shift + scale * x) / ln_base,
            lambda x: scale / (ln_base * (shift + scale * x)))


def swish(beta):
    beta = f32(beta)
    return (f"type: 'Swish' swish_param {{ beta: {beta} }}",
            lambda x: x * sigmoid(beta * x),
            lambda x: sigmoid(beta * x) + beta * x * sigmoid(beta * x) * (1 - sigmoid(beta * x)))


def clip(low, high):
    low, high = f32(low), f32(high)
    return (f"type: 'Clip' clip_param {{ min: {low} max: {high} }}",
            lambda x: np.minimum(np.maximum(x, low), high),
            lambda x: ((x >= low) & (x <= high)).astype(float))


BNLL = ("type: 'BNLL'", lambda x: np.logaddexp(0, x), sigmoid)
SMOOTH = {  # name: (layer, x scale); inputs away from the kinks and inside the domains
    "elu": (elu(1.0), 2), "elu_alpha_0.3": (elu(0.3), 2), "elu_alpha_0": (elu(0.0), 2),
    "elu_alpha_negative": (elu(-0.5), 2),
    "exp_e": (exp(-1, 1, 0), 1), "exp_base_2": (exp(2, 0.5, 1.5), 2),
    "exp_negative_scale": (exp(10, -0.3, -1), 2),
    "log_e": (log(-1, 1, 10), 1), "log_base_2": (log(2, 0.5, 4), 2),
    "log_negative_scale": (log(10, -2, 9), 1),
    "bnll": (BNLL, 3), "swish": (swish(1.0), 2), "swish_beta_2.5": (swish(2.5), 2),
    "swish_beta_negative": (swish(-0.7), 2),
    "clip": (clip(-0.5, 1.0), 2), "clip_point": (clip(0.25, 0.25), 1),
}


def inputs(scale, shape=(2, 3, 4, 5), seed=0):
    """Normal values, none within 1e-3 of the kinks of ELU (0) and Clip (-0.5, 0.25, 1)."""
    x = np.random.default_rng(seed).normal(scale=scale, size=shape)
    for kink in (0.0, -0.5, 0.25, 1.0):
        x = np.where(np.abs(x - kink) < 1e-3, kink + 0.01, x)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_forward_and_backward_match_the_reference(name, dtype):
    (text, forward, derivative), scale = SMOOTH[name]
    x = inputs(scale).astype(dtype)
    dy = np.random.default_rng(1).normal(size=x.shape).astype(dtype)
    layer, bottom, top = run_layer(text, x, dtype=dtype)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    x64 = x.astype(np.float64)
    tol = 3e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(top[0].data, forward(x64), rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, dy * derivative(x64), rtol=tol, atol=tol)
    assert top[0].data.dtype == dtype and dx.dtype == dtype


LN3 = math.log(3)
HAND = [  # prototxt, x, y, dy/dx worked out by hand
    ("type: 'ELU'", [-math.log(2), 0.0, 2.0], [-0.5, 0.0, 2.0], [0.5, 1.0, 1.0]),  # x = 0: alpha + y
    ("type: 'ELU' elu_param { alpha: 2 }", [-math.log(4), 0.0, 3.0], [-1.5, 0.0, 3.0], [0.5, 2.0, 1.0]),
    ("type: 'Exp'", [0.0, LN3], [1.0, 3.0], [1.0, 3.0]),
    ("type: 'Exp' exp_param { base: 2 shift: 1 }", [0.0, 1.0, 2.0, -3.0], [2.0, 4.0, 8.0, 0.25],
     [2 * math.log(2), 4 * math.log(2), 8 * math.log(2), 0.25 * math.log(2)]),
    ("type: 'Exp' exp_param { base: 10 scale: -1 }", [1.0, -2.0], [0.1, 100.0],
     [-0.1 * math.log(10), -100 * math.log(10)]),
    ("type: 'Log'", [1.0, math.e, 4.0], [0.0, 1.0, math.log(4)], [1.0, 1 / math.e, 0.25]),
    ("type: 'Log' log_param { base: 10 scale: 2 }", [5.0, 50.0, 0.05], [1.0, 2.0, -1.0],
     [1 / (5 * math.log(10)), 1 / (50 * math.log(10)), 1 / (0.05 * math.log(10))]),
    ("type: 'Log' log_param { base: 2 shift: 1 }", [0.0, 3.0, 7.0], [0.0, 2.0, 3.0],
     [1 / math.log(2), 1 / (4 * math.log(2)), 1 / (8 * math.log(2))]),
    # BNLL: softplus(ln 3) = ln 4, softplus(-ln 3) = ln(4 / 3); sigmoid(ln 3) = 3 / 4
    ("type: 'BNLL'", [0.0, LN3, -LN3], [math.log(2), math.log(4), math.log(4 / 3)], [0.5, 0.75, 0.25]),
    # Swish: sigmoid(ln 3) = 3/4, so y = 3/4 ln 3 and dy/dx = 3/4 + ln 3 * 3/4 * 1/4
    ("type: 'Swish'", [0.0, LN3, -LN3], [0.0, 0.75 * LN3, -0.25 * LN3],
     [0.5, 0.75 + LN3 * 3 / 16, 0.25 - LN3 * 3 / 16]),
    ("type: 'Swish' swish_param { beta: 2 }", [LN3 / 2], [0.375 * LN3], [0.75 + LN3 * 3 / 16]),
    # Clip: the gradient passes at the bounds themselves (Caffe: min <= x <= max)
    ("type: 'Clip' clip_param { min: -1 max: 2 }", [-3.0, -1.0, 0.5, 2.0, 7.0], [-1.0, -1.0, 0.5, 2.0, 2.0],
     [0.0, 1.0, 1.0, 1.0, 0.0]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", HAND, ids=[case[0] for case in HAND])
def test_hand_checked_values(case, dtype):
    text, x, y, derivative = case
    layer, bottom, top = run_layer(text, x, dtype=dtype)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(top[0].data, y, rtol=tol, atol=tol)
    (dx,) = backward_layer(layer, bottom, top, [np.full(len(x), 2.0)])
    np.testing.assert_allclose(dx, 2 * np.array(derivative), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_is_a_step_above_the_threshold(dtype):
    x = [-1.0, 0.0, 0.5, 0.50001, 3.0, np.nan, -np.inf, np.inf]
    _, _, top = run_layer("type: 'Threshold' threshold_param { threshold: 0.5 }", x, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [0, 0, 0, 1, 1, 0, 0, 1])
    _, _, top = run_layer("type: 'Threshold'", x, dtype=dtype)  # default threshold 0: x > 0
    np.testing.assert_array_equal(top[0].data, [0, 0, 1, 1, 1, 0, 0, 1])


def test_caffe_corner_values():
    """Large, infinite and nan inputs behave as Caffe's formulas do, without overflow."""
    big = [-1e4, -100.0, 100.0, 1e4]
    _, _, top = run_layer("type: 'ELU'", big)
    np.testing.assert_array_equal(top[0].data, [-1.0, -1.0, 100.0, 1e4])
    layer, bottom, top = run_layer("type: 'BNLL'", big + [-np.inf, np.inf], dtype=np.float32)
    np.testing.assert_array_equal(top[0].data, [0.0, np.float32(math.exp(-100)), 100.0, 1e4, 0.0, np.inf])
    (dx,) = backward_layer(layer, bottom, top, [np.ones(6)])
    np.testing.assert_array_equal(dx, [0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    # softplus of a very negative x is exp(x), not 0 (1 + exp(x) rounds to 1)
    _, _, top = run_layer("type: 'BNLL'", [-30.0, -50.0], dtype=np.float32)
    np.testing.assert_allclose(top[0].data, np.exp([-30.0, -50.0]), rtol=1e-6)
    _, _, top = run_layer("type: 'Swish'", big)
    np.testing.assert_allclose(top[0].data, [0.0, -100 * sigmoid(-100.0), 100 * sigmoid(100.0), 1e4],
                               rtol=1e-15, atol=1e-40)
    # Clip: nan gives min, as Caffe's max(min, min(x, max)); Log of x <= 0 is -inf / nan
    _, _, top = run_layer("type: 'Clip' clip_param { min: -1 max: 1 }", [np.nan, -np.inf, np.inf])
    np.testing.assert_array_equal(top[0].data, [-1.0, -1.0, 1.0])
    _, _, top = run_layer("type: 'Log'", [0.0, -1.0])
    np.testing.assert_array_equal(top[0].data, [-np.inf, np.nan])


TORCH = {  # prototxt: torch function of x
    "type: 'ELU' elu_param { alpha: 0.7 }": lambda torch, x: torch.nn.functional.elu(x, alpha=f32(0.7)),
    "type: 'BNLL'": lambda torch, x: torch.nn.functional.softplus(x),
    "type: 'Swish'": lambda torch, x: torch.nn.functional.silu(x),
    "type: 'Swish' swish_param { beta: 1.7 }": lambda torch, x: x * torch.sigmoid(f32(1.7) * x),
    "type: 'Clip' clip_param { min: -0.5 max: 1.5 }": lambda torch, x: torch.clamp(x, -0.5, 1.5),
    "type: 'Exp' exp_param { base: 3 scale: 0.5 shift: -1 }": lambda torch, x: 3 ** (0.5 * x - 1),
    "type: 'Log' log_param { base: 2 scale: 3 shift: 8 }": lambda torch, x: torch.log2(3 * x + 8),
    "type: 'Threshold' threshold_param { threshold: 0.3 }": lambda torch, x: (x > f32(0.3)).double(),
}


@pytest.mark.parametrize("text", sorted(TORCH))
def test_pytorch_agrees(text):
    torch = pytest.importorskip("torch")
    x = inputs(1, (3, 4, 5), seed=7)
    dy = np.random.default_rng(8).normal(size=x.shape)
    layer, bottom, top = run_layer(text, x)
    xt = torch.tensor(x, requires_grad=True)
    yt = TORCH[text](torch, xt)
    np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    if "Threshold" in text:
        return
    yt.backward(torch.tensor(dy))
    (dx,) = backward_layer(layer, bottom, top, [dy])
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-14)


# -- gradients --------------------------------------------------------------------------------------


READ_Y = [name for name in sorted(SMOOTH) if name.startswith(("elu", "exp"))]


@pytest.mark.parametrize("name, reads_top", [(name, False) for name in sorted(SMOOTH)]
                         + [(name, True) for name in READ_Y])
def test_gradient_check(name, reads_top):
    """fp64 gradient check; ELU and Exp also with y read back from the top (as in a Net where no later
    layer writes it)."""
    (text, _, _), scale = SMOOTH[name]
    layer = layer_from_prototxt(text)
    layer.top_data_survives = reads_top
    check_layer(layer, [inputs(scale, (2, 3, 2, 2), seed=3)], exhaustive=True, stepsize=1e-4,
                threshold=1e-6)


# -- in place -----------------------------------------------------------------------------------------


def hard_inputs(dtype, shape=(3, 4, 5, 13)) -> np.ndarray:
    """Normal values and the awkward ones: zeros of both signs, the clip bounds, tiny and huge values."""
    rng = np.random.default_rng(3)
    x = rng.normal(scale=2, size=shape).astype(dtype)
    info = np.finfo(dtype)
    special = np.array([0.0, -0.0, -0.5, 1.0, info.tiny, -info.tiny, info.smallest_subnormal, -1e-30, 1e-30,
                        -30.0, 30.0, -info.max / 4, info.max / 4], dtype)
    flat = x.reshape(-1)
    places = rng.choice(flat.size, flat.size // 3, replace=False)
    flat[places] = np.resize(special, places.size)
    return x


def run(text, x, dtype, in_place, survives, backward=True):
    """Forward then backward (NaN-filled bottom diff); returns (layer, y, dx, kept bytes after forward)."""
    layer = layer_from_prototxt(text, dtype=dtype)
    bottom = blobs_from_arrays(x, dtype=dtype)
    top = [bottom[0]] if in_place else [Blob((), dtype)]
    layer.setup(bottom, top)
    layer.top_data_survives = survives  # as a Net sets it
    with np.errstate(all="ignore"):
        planned = layer.planned_kept_bytes(bottom, top)
    layer.run_forward(bottom, top)
    y = np.array(top[0].data)
    kept = layer.kept_bytes()
    assert kept == planned, "planned_kept_bytes (minicaffe summary) differs from what forward kept"
    if not backward:
        return layer, y, None, kept
    dy = np.random.default_rng(5).normal(size=x.shape).astype(dtype)
    (dx,) = backward_layer(layer, bottom, top, [dy])
    return layer, y, dx, kept


IN_PLACE = {  # prototxt: what in place keeps for backward (when a later layer writes the top, when not)
    "type: 'ELU'": ("x", None),  # None: y is read back from the top
    "type: 'ELU' elu_param { alpha: 0.25 }": ("x", None),
    "type: 'ELU' elu_param { alpha: -0.5 }": ("x", "x"),  # y > 0 no longer tells x > 0
    "type: 'Exp' exp_param { base: 2 scale: 0.5 shift: 1 }": ("x", None),
    "type: 'Log' log_param { scale: 0.5 shift: 2 }": ("x", "x"),
    "type: 'BNLL'": ("x", "x"),
    "type: 'Swish' swish_param { beta: 1.5 }": ("x", "x"),
    "type: 'Clip' clip_param { min: -0.5 max: 1 }": ("mask", "mask"),  # a byte: min <= x <= max
    "type: 'Threshold' threshold_param { threshold: 0.5 }": (None, None),  # no backward
}


def assert_same_bits(got, want):
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


@pytest.mark.parametrize("survives", [False, True], ids=["top_overwritten_later", "top_survives"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("text", sorted(IN_PLACE))
def test_in_place_equals_not_in_place_bit_for_bit(text, dtype, survives):
    x = hard_inputs(dtype)
    if "Log" in text:
        x = np.abs(x)  # inside the domain (x = 0 and subnormals still give the infinities)
    backward = "Threshold" not in text  # no gradient (tested below)
    with np.errstate(all="ignore"):
        plain = run(text, x, dtype, False, survives, backward)
        lean = run(text, x, dtype, True, survives, backward)
    assert_same_bits(lean[1], plain[1])
    if backward:
        assert_same_bits(lean[2], plain[2])
    kept = IN_PLACE[text][survives]
    assert lean[3] == {"x": np.dtype(dtype).itemsize, "mask": 1, None: 0}[kept] * x.size
    assert plain[3] == 0  # not in place: x is in the bottom, or y in the top
    assert lean[0].kept_lean == (lean[0].keeps == "input" and kept != "x")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("text", ["type: 'ELU' elu_param { alpha: 0.25 }",
                                  "type: 'Exp' exp_param { scale: -2 }"])
def test_gradient_from_y_and_from_x_agree(text, dtype):
    """ELU and Exp read y back where their top survives, and recompute it from x elsewhere: the same
    gradient up to rounding."""
    x = hard_inputs(dtype, (4, 5, 7))
    x = np.clip(x, -50, 20)  # Exp: no overflow
    from_x = run(text, x, dtype, False, survives=False)
    from_y = run(text, x, dtype, False, survives=True)
    assert_same_bits(from_y[1], from_x[1])
    np.testing.assert_allclose(from_y[2], from_x[2], rtol=4 * np.finfo(dtype).eps, atol=0)


NET = """
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
layer { name: "t" type: "Input" top: "target" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
layer { name: "act" type: "%s" bottom: "x" top: "%s" }
%s
layer { name: "loss" type: "EuclideanLoss" bottom: "%s" bottom: "target" top: "loss" }
"""
LATER = 'layer { name: "flip" type: "Power" bottom: "%s" top: "%s" power_param { scale: -1 shift: 0.5 } }'


@pytest.mark.parametrize("later", [False, True], ids=["alone", "later_in_place_layer"])
@pytest.mark.parametrize("kind", ["ELU", "Exp", "Swish", "BNLL"])
def test_in_a_net_in_place_matches_a_separate_top(kind, later):
    """In a Net, the ELU or Exp output is read back from the top only when no later layer writes it (a
    later in-place Power does); the gradients are those of the net with separate tops."""
    x = np.random.default_rng(1).normal(size=(2, 3, 4))
    target = np.random.default_rng(2).normal(size=x.shape)
    results = []
    for act_top in ("y", "x"):
        flip = LATER % (act_top, act_top) if later else ""
        text = NET % (kind, act_top, flip, act_top)
        net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TRAIN, dtype=np.float64)
        net.forward(x=x, target=target)
        act = net.layers[net._layer_ids["act"]]
        assert act.top_data_survives == (not later)
        if kind in ("ELU", "Exp"):
            assert act.kept_bytes() == (0 if not later or act_top == "y" else x.size * 8)
        net.backward()
        results.append([np.array(net.blobs[act_top].data), np.array(net.blobs["x"].diff)])
    for got, want in zip(results[1], results[0]):
        np.testing.assert_array_equal(got, want)


# -- Threshold has no backward, as in Caffe ------------------------------------------------------------


def test_threshold_backward_is_refused_unless_propagate_down_is_false():
    layer, bottom, top = run_layer("name: 'step' type: 'Threshold'", [1.0, -1.0])
    top[0].diff[...] = 1.0
    with pytest.raises(LayerError, match=r"layer 'step' \(Threshold\): has no gradient.*propagate_down"):
        layer.run_backward(top, [True], bottom)
    bottom[0].diff[...] = 7.0
    layer.run_backward(top, [False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [7.0, 7.0])


THRESHOLD_NET = """
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "t" type: "Input" top: "target" input_param { shape { dim: 2 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "step" type: "Threshold" bottom: "%s" top: "s" %s }
layer { name: "ip2" type: "InnerProduct" bottom: "s" top: "out"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }
"""


def test_threshold_in_a_net_as_in_caffe():
    """On an input, or with propagate_down: false, Caffe never calls Threshold's backward and the net
    trains; below a learned layer the gradient through it is asked for, and refused with the layer's name."""
    x = np.random.default_rng(0).normal(size=(2, 3))
    for bottom, extra in [("x", ""), ("h", "propagate_down: false")]:
        net = Net(io.parse_text(THRESHOLD_NET % (bottom, extra), caffe_pb2.NetParameter()), minicaffe.TRAIN)
        net.forward(x=x, target=np.zeros((2, 2)))
        net.backward()
        assert np.abs(net.params["ip2"][0].diff).sum() > 0
    net = Net(io.parse_text(THRESHOLD_NET % ("h", ""), caffe_pb2.NetParameter()), minicaffe.TRAIN)
    net.forward(x=x, target=np.zeros((2, 2)))
    with pytest.raises(LayerError, match="'step' \\(Threshold\\): has no gradient"):
        net.backward()


# -- parameters -----------------------------------------------------------------------------------------


def test_defaults_are_caffes():
    x = np.array([-1.0, 0.5, 2.0])
    np.testing.assert_allclose(run_layer("type: 'ELU'", x)[2][0].data, [math.expm1(-1), 0.5, 2.0])  # alpha 1
    np.testing.assert_allclose(run_layer("type: 'Exp'", x)[2][0].data, np.exp(x))  # base e, scale 1, shift 0
    np.testing.assert_allclose(run_layer("type: 'Log'", x[1:])[2][0].data, np.log(x[1:]))
    np.testing.assert_allclose(run_layer("type: 'Swish'", x)[2][0].data, x * sigmoid(x))  # beta 1
    np.testing.assert_array_equal(run_layer("type: 'Threshold'", x)[2][0].data, [0, 1, 1])  # threshold 0


@pytest.mark.parametrize("text, message", [
    ("type: 'Exp' exp_param { base: 0 }", "base must be -1 \\(for e\\) or a finite number > 0, got 0"),
    ("type: 'Exp' exp_param { base: -2 }", "got -2"),
    ("type: 'Exp' exp_param { base: inf }", "got inf"),
    ("type: 'Exp' exp_param { base: 10 shift: 400 }", "base\\^shift = inf is not finite"),
    ("type: 'Exp' exp_param { scale: nan }", "ln\\(base\\) \\* scale = nan"),
    ("type: 'Log' log_param { base: -0.5 }", "base must be -1"),
    ("type: 'Log' log_param { base: 1 }", "base 1 has no logarithms"),
    ("type: 'Log' log_param { shift: inf }", "shift = inf is not finite"),
    ("type: 'ELU' elu_param { alpha: nan }", "alpha must be finite"),
    ("type: 'Swish' swish_param { beta: -inf }", "beta must be finite"),
    ("type: 'Clip'", "needs clip_param \\{ min: ... max: ... \\}"),
    ("type: 'Clip' clip_param { min: 1 }", "needs clip_param"),
    ("type: 'Clip' clip_param { min: 2 max: 1 }", "min 2.0 must be <= max 1.0"),
    ("type: 'Clip' clip_param { min: nan max: 1 }", "min nan must be <= max"),
    ("type: 'Threshold' threshold_param { threshold: nan }", "threshold is nan"),
])
def test_bad_parameters_are_refused_naming_the_layer(text, message):
    kind = text.split("'")[1]
    with pytest.raises(LayerError, match=f"layer 'act' \\({kind}\\): .*{message}"):
        run_layer(f"name: 'act' {text}", np.ones(3))


@pytest.mark.parametrize("kind", ["ELU", "Exp", "Log", "BNLL", "Threshold", "Clip", "Swish"])
def test_one_bottom_one_top_and_propagate_down_false(kind):
    text = f"type: '{kind}'" + (" clip_param { min: 0 max: 1 }" if kind == "Clip" else "")
    layer, bottom, top = run_layer(text, np.ones((2, 3)))
    assert top[0].shape == (2, 3)
    bottom[0].diff[...] = 7.0
    top[0].diff[...] = 1.0
    layer.run_backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7.0)
    with pytest.raises(LayerError, match="takes 1 bottom"):
        run_layer(text, np.ones(3), np.ones(3))
