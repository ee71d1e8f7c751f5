"""Solvers: each update rule and learning-rate policy against hand-written fp64 formulas, on a tiny net.

The net is y = x W^T + b with a Euclidean loss, built from small test-only layers defined here (numpy
math), so the expected gradients have a closed form: r = x W^T + b - t, dW = r^T x / N, db = sum(r) / N.
The expected updates below are the textbook formulas of each rule, written out independently of
minicaffe/solver.py.
"""

from __future__ import annotations

import io as _io
import math
import re
from pathlib import Path

import numpy as np
import pytest

import minicaffe
from minicaffe import log
from minicaffe.filler import fill
from minicaffe.io import parse_text
from minicaffe.layer import Layer, register
from minicaffe.proto import caffe_pb2
from minicaffe.solver import (
    KERNELS,
    SOLVER_TYPES,
    AdaDeltaSolver,
    AdaGradSolver,
    AdamSolver,
    NesterovSolver,
    RMSPropSolver,
    SGDSolver,
    Solver,
    SolverError,
    get_solver,
    learning_rate,
    read_solver,
    register_solver,
)

# -- test-only layers -------------------------------------------------------------------------------

DATA: dict[str, np.ndarray] = {}


@register("SolverTestData")
class _DataLayer(Layer):
    """Tops x and t: batch (forward_index mod number of batches) of DATA['x'], DATA['t']."""

    exact_num_bottom = 0
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        self.batch = self.param.data_param.batch_size

    def reshape(self, bottom, top):
        top[0].reshape(self.batch, DATA["x"].shape[1])
        top[1].reshape(self.batch, DATA["t"].shape[1])

    def forward(self, bottom, top):
        batches = len(DATA["x"]) // self.batch
        k = self.forward_index % batches
        rows = slice(k * self.batch, (k + 1) * self.batch)
        top[0].data[...] = DATA["x"][rows]
        top[1].data[...] = DATA["t"][rows]


@register("SolverTestLinear")
class _LinearLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.param.inner_product_param
        if not self.check_param_blob(0, (p.num_output, bottom[0].shape[1])):
            fill(self.add_param_blob((p.num_output, bottom[0].shape[1])), p.weight_filler,
                 minicaffe.rng.stream("filler", self.name, 0))
        if not self.check_param_blob(1, (p.num_output,)):
            fill(self.add_param_blob((p.num_output,)), p.bias_filler,
                 minicaffe.rng.stream("filler", self.name, 1))

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape[0], self.blobs[0].shape[0])

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data @ self.blobs[0].data.T + self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff
        if self.param_propagate_down[0]:
            self.blobs[0].diff[...] += dy.T @ bottom[0].data
        if self.param_propagate_down[1]:
            self.blobs[1].diff[...] += dy.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = dy @ self.blobs[0].data


@register("SolverTestLoss")
class _LossLayer(Layer):
    """sum((a - b)^2) / (2 N), as Caffe's EuclideanLoss."""

    exact_num_bottom = 2
    exact_num_top = 1
    default_loss_weight = 1.0

    def reshape(self, bottom, top):
        top[0].reshape(())

    def forward(self, bottom, top):
        self.residual = bottom[0].data - bottom[1].data
        top[0].data[...] = (self.residual ** 2).sum() / (2 * bottom[0].shape[0])

    def backward(self, top, propagate_down, bottom):
        scale = top[0].diff.item() / bottom[0].shape[0]
        if propagate_down[0]:
            bottom[0].diff[...] = scale * self.residual


NET = """
name: "tiny"
layer {{ name: "data" type: "SolverTestData" top: "x" top: "t" data_param {{ batch_size: {batch} }} }}
layer {{ name: "ip" type: "SolverTestLinear" bottom: "x" top: "y"
  param {{ lr_mult: {w_lr} decay_mult: {w_decay} }} param {{ lr_mult: {b_lr} decay_mult: {b_decay} }}
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.7 }}
                        bias_filler {{ type: "gaussian" std: 0.7 }} }} }}
layer {{ name: "loss" type: "SolverTestLoss" bottom: "y" bottom: "t" top: "loss" }}
"""


@pytest.fixture(autouse=True)
def _data_and_quiet_log():
    rng = np.random.default_rng(3)
    DATA["x"] = rng.normal(size=(8, 4))
    DATA["t"] = rng.normal(size=(8, 3))
    stream = _io.StringIO()
    log.set_stream(stream)
    yield stream
    log.set_stream(None)


def f32(value: float) -> float:
    """A solver field as the proto stores it (float32)."""
    return float(np.float32(value))


def make_param(solver_text: str, batch: int = 8, w_lr=1.0, b_lr=2.0, w_decay=1.0, b_decay=0.0):
    param = parse_text(solver_text, caffe_pb2.SolverParameter())
    net = NET.format(batch=batch, w_lr=w_lr, b_lr=b_lr, w_decay=w_decay, b_decay=b_decay)
    param.net_param.CopyFrom(parse_text(net, caffe_pb2.NetParameter()))
    param.snapshot_after_train = False
    return param


def params_of(solver) -> tuple[np.ndarray, np.ndarray]:
    w, b = solver.net.params["ip"]
    return np.array(w.data), np.array(b.data)


def gradients(w, b, x, t):
    r = x @ w.T + b - t
    n = len(x)
    return r.T @ x / n, r.sum(axis=0) / n, float((r ** 2).sum() / (2 * n))


# -- reference update rules (fp64 textbook formulas) --------------------------------------------------

def reference_run(kind: str, p, steps: int, w, b, lr_mult=(1.0, 2.0), decay_mult=(1.0, 0.0), rates=None):
    """`steps` updates of [w, b] by rule `kind` with solver fields `p`; returns (w, b, losses)."""
    values = [w.copy(), b.copy()]
    state = [[np.zeros_like(v), np.zeros_like(v)] for v in values]
    losses = []
    for it in range(steps):
        rate = rates[it] if rates is not None else f32(p.base_lr)
        gw, gb, loss = gradients(values[0], values[1], DATA["x"], DATA["t"])
        losses.append(loss)
        grads = [gw, gb]
        if p.clip_gradients >= 0:
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
            if norm > p.clip_gradients:
                grads = [g * (p.clip_gradients / norm) for g in grads]
        for i in range(2):
            g = grads[i]
            decay = p.weight_decay * decay_mult[i]
            g = g + decay * (values[i] if p.regularization_type == "L2" else np.sign(values[i]))
            lr = rate * lr_mult[i]
            h, s = state[i]
            m = p.momentum
            if kind == "SGD":
                h[...] = m * h + lr * g
                step = h.copy()
            elif kind == "Nesterov":
                old = h.copy()
                h[...] = m * h + lr * g
                step = (1 + m) * h - m * old
            elif kind == "AdaGrad":
                h[...] = h + g * g
                step = lr * g / (np.sqrt(h) + p.delta)
            elif kind == "RMSProp":
                h[...] = p.rms_decay * h + (1 - p.rms_decay) * g * g
                step = lr * g / (np.sqrt(h) + p.delta)
            elif kind == "AdaDelta":
                h[...] = m * h + (1 - m) * g * g
                dx = g * np.sqrt((s + p.delta) / (h + p.delta))
                s[...] = m * s + (1 - m) * dx * dx
                step = lr * dx
            elif kind == "Adam":
                t = it + 1
                h[...] = m * h + (1 - m) * g
                s[...] = p.momentum2 * s + (1 - p.momentum2) * g * g
                step = lr * math.sqrt(1 - p.momentum2 ** t) / (1 - m ** t) * h / (np.sqrt(s) + p.delta)
            values[i] = values[i] - step
    return values[0], values[1], losses


SOLVERS = {
    "SGD": 'type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"',
    "Nesterov": 'type: "Nesterov" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"',
    "AdaGrad": 'type: "AdaGrad" base_lr: 0.1 weight_decay: 0.01 lr_policy: "fixed" delta: 1e-6',
    "RMSProp": 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.95 weight_decay: 0.01 lr_policy: "fixed"',
    "AdaDelta": 'type: "AdaDelta" base_lr: 1.0 momentum: 0.95 delta: 1e-6 weight_decay: 0.01 '
                'lr_policy: "fixed"',
    "Adam": 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 delta: 1e-8 weight_decay: 0.01 '
            'lr_policy: "fixed"',
}


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_each_rule_matches_hand_formulas(kind):
    param = make_param(SOLVERS[kind])
    solver = Solver(param, dtype=np.float64)
    assert solver.type == kind
    w0, b0 = params_of(solver)
    solver.step(4)
    assert solver.iter == 4
    w, b = params_of(solver)
    want_w, want_b, _ = reference_run(kind, solver.param, 4, w0, b0)
    np.testing.assert_allclose(w, want_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b, want_b, rtol=1e-12, atol=1e-14)
    assert not np.allclose(w, w0)  # the parameters did move


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_history_layout(kind):
    solver = Solver(make_param(SOLVERS[kind]), dtype=np.float64)
    solver.step(2)
    per_param = 2 if kind in ("AdaDelta", "Adam") else 1
    assert len(solver.history) == 2 * per_param
    # Caffe's layout: the first history set, then (AdaDelta, Adam) the second, each in parameter order.
    assert [h.shape for h in solver.history] == [(3, 4), (3,)] * per_param
    if kind == "Adam":
        assert np.all(solver.history[2].data >= 0) and np.any(solver.history[2].data > 0)  # v
        assert np.any(solver.history[0].data < 0)  # m follows the gradient's sign


def test_sgd_literal_values():
    # One weight, one input: w = 0.5, x = 1, t = 0 -> dw = w. SGD lr 0.1, momentum 0.9:
    # v1 = 0.05, w1 = 0.45; v2 = 0.9 * 0.05 + 0.1 * 0.45 = 0.09, w2 = 0.36.
    DATA["x"], DATA["t"] = np.ones((1, 1)), np.zeros((1, 1))
    net = NET.format(batch=1, w_lr=1, b_lr=0, w_decay=0, b_decay=0).replace("num_output: 3", "num_output: 1")
    net = net.replace('weight_filler { type: "gaussian" std: 0.7 }',
                      'weight_filler { type: "constant" value: 0.5 }')
    param = parse_text('base_lr: 0.1 momentum: 0.9 lr_policy: "fixed"', caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(parse_text(net, caffe_pb2.NetParameter()))
    param.snapshot_after_train = False
    solver = SGDSolver(param, dtype=np.float64)
    solver.net.params["ip"][1].data[...] = 0
    solver.step(1)
    assert solver.net.params["ip"][0].data[0, 0] == pytest.approx(0.45, abs=1e-8)
    solver.step(1)
    assert solver.net.params["ip"][0].data[0, 0] == pytest.approx(0.36, abs=1e-8)
    assert solver.net.params["ip"][1].data[0] == 0  # lr_mult 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fields", ['weight_decay: 0.1', 'weight_decay: 0.1 regularization_type: "L1"',
                                    'weight_decay: 0', 'weight_decay: 0.1 iter_size: 2'])
def test_sgd_update_in_one_pass_equals_caffes_steps_apart(fields, dtype):
    """SGD's fused step (kernels/solver.cu's sgd_update) against Caffe's steps one by one (the generic
    Solver.update_parameter: normalize, regularize, the SGD rule, data -= diff), on hand-picked values:
    a zero weight (L1's sign 0), a zero history, lr_mult 2 and 0."""
    param = make_param(f'type: "SGD" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" {fields}', w_lr=2.0,
                       b_lr=0.0)
    fused, apart = (SGDSolver(param, dtype=dtype) for _ in range(2))
    for solver in (fused, apart):
        for index, learnable in enumerate(solver.net.learnable_params):
            shape = learnable.blob.shape
            learnable.blob.data[...] = np.random.default_rng(index).normal(size=shape)
            learnable.blob.data.reshape(-1)[0] = 0
            learnable.blob.diff[...] = np.random.default_rng(10 + index).normal(size=shape)
            solver.histories(index)[0][...] = np.random.default_rng(20 + index).normal(size=shape)
            solver.histories(index)[0].reshape(-1)[-1] = 0
    for index in range(len(fused.net.learnable_params)):
        fused.update_parameter(index, 0.05)
        Solver.update_parameter(apart, index, 0.05)
    tolerance = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-14, atol=1e-15)
    for mine, theirs in zip(fused.net.learnable_params, apart.net.learnable_params):
        np.testing.assert_allclose(mine.blob.data, theirs.blob.data, **tolerance)
        np.testing.assert_allclose(mine.blob.diff, theirs.blob.diff, **tolerance)  # the step, as Caffe
    for mine, theirs in zip(fused.history, apart.history):
        np.testing.assert_allclose(mine.data, theirs.data, **tolerance)


def test_an_sgd_subclass_with_its_own_regularize_keeps_it():
    """The fused step is plain SGD's only: a subclass's own regularize (here: none) is honoured."""
    class NoDecay(SGDSolver):
        def regularize(self, index: int) -> None:
            pass

    text = 'type: "SGD" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" weight_decay: '
    no_decay = NoDecay(make_param(text + "10"), dtype=np.float64)
    zero_decay = SGDSolver(make_param(text + "0"), dtype=np.float64)
    for solver in (no_decay, zero_decay):
        solver.step(2)
    for mine, theirs in zip(params_of(no_decay), params_of(zero_decay)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-14)


def test_sgd_update_hand_checked():
    """w = 1, -2, 0; diff 0.5; history 0.1, 0, 0; L2 decay 0.1, momentum 0.9, rate 0.01:
    g = 0.6, 0.3, 0.5; h = 0.09 + 0.006, 0.003, 0.005; w - h. Without decay and without the data update:
    h = 0.09 + 0.005, 0.005."""
    data = np.array([1.0, -2.0, 0.0])
    diff, history = np.full(3, 0.5), np.array([0.1, 0.0, 0.0])
    KERNELS.sgd_update(3, data, diff, history, 1.0, 0.1, 0, 0.9, 0.01, 1, extents=3)
    np.testing.assert_allclose(history, [0.096, 0.003, 0.005], rtol=1e-14)
    np.testing.assert_allclose(diff, history, rtol=0)
    np.testing.assert_allclose(data, [1 - 0.096, -2.003, -0.005], rtol=1e-14)
    # the update value alone (SGDSolver.compute_update): data stays, diff and history take the step
    data, diff, history = np.array([1.0, -2.0]), np.full(2, 0.5), np.array([0.1, 0.0])
    KERNELS.sgd_update(2, data, diff, history, 1.0, 0.0, 0, 0.9, 0.01, 0, extents=2)
    np.testing.assert_allclose(history, [0.095, 0.005], rtol=1e-14)
    np.testing.assert_allclose(diff, history, rtol=0)
    np.testing.assert_array_equal(data, [1.0, -2.0])


POLICIES = {
    "fixed": ("", lambda it, p: f32(0.1)),
    "step": ("gamma: 0.5 stepsize: 2", lambda it, p: f32(0.1) * 0.5 ** (it // 2)),
    "exp": ("gamma: 0.9", lambda it, p: f32(0.1) * f32(0.9) ** it),
    "inv": ("gamma: 0.1 power: 0.75", lambda it, p: f32(0.1) * (1 + f32(0.1) * it) ** -0.75),
    "multistep": ("gamma: 0.5 stepvalue: 2 stepvalue: 3",
                  lambda it, p: f32(0.1) * 0.5 ** ((it >= 2) + (it >= 3))),
    "poly": ("power: 2 max_iter: 10", lambda it, p: f32(0.1) * (1 - it / 10) ** 2),
    "sigmoid": ("gamma: -0.5 stepsize: 2",
                lambda it, p: f32(0.1) / (1 + math.exp(0.5 * (it - 2)))),
}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_lr_policy_rates_and_updates(policy):
    fields, rate_of = POLICIES[policy]
    text = f'type: "SGD" base_lr: 0.1 momentum: 0.5 lr_policy: "{policy}" {fields}'
    param = make_param(text)
    # The schedule itself, at several iterations.
    step = 0
    for it in range(6):
        rate, step = learning_rate(param, it, step)
        assert rate == pytest.approx(rate_of(it, param), rel=1e-12), (policy, it)
    # And the solver uses it, iteration by iteration.
    solver = Solver(param, dtype=np.float64)
    w0, b0 = params_of(solver)
    solver.step(5)
    want_w, want_b, _ = reference_run("SGD", solver.param, 5, w0, b0,
                                      rates=[rate_of(it, param) for it in range(5)])
    np.testing.assert_allclose(params_of(solver)[0], want_w, rtol=1e-12)
    np.testing.assert_allclose(params_of(solver)[1], want_b, rtol=1e-12)


def test_multistep_advances_one_step_per_iteration_and_is_saved():
    param = make_param('base_lr: 1 lr_policy: "multistep" gamma: 0.1 stepvalue: 0 stepvalue: 0 stepvalue: 5')
    rates, step = [], 0
    for it in range(3):
        rate, step = learning_rate(param, it, step)
        rates.append(rate)
    # Caffe moves at most one step per iteration (an `if`, not a `while`).
    assert rates == pytest.approx([0.1, 0.01, 0.01])
    solver = Solver(param, dtype=np.float64)
    solver.step(3)
    assert solver.current_step == 2


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_lr_mult_zero_leaves_parameter_unchanged(kind):
    solver = Solver(make_param(SOLVERS[kind], w_lr=0, b_lr=1, b_decay=1), dtype=np.float64)
    w0, b0 = params_of(solver)
    solver.step(3)
    w, b = params_of(solver)
    assert np.array_equal(w, w0)
    assert not np.allclose(b, b0)


@pytest.mark.parametrize("reg", ["L2", "L1"])
def test_weight_decay_l1_l2_and_decay_mult_zero(reg):
    # Targets that the initial weights fit exactly: the gradient is zero, only weight decay moves w,
    # and the bias (decay_mult 0) stays.
    text = f'base_lr: 0.5 weight_decay: 0.1 regularization_type: "{reg}" lr_policy: "fixed"'
    solver = Solver(make_param(text, w_decay=1, b_decay=0), dtype=np.float64)
    w0, b0 = params_of(solver)
    DATA["t"] = DATA["x"] @ w0.T + b0
    solver.step(1)
    w, b = params_of(solver)
    lr, decay = 0.5, f32(0.1)
    want = w0 - lr * decay * (w0 if reg == "L2" else np.sign(w0))
    np.testing.assert_allclose(w, want, rtol=1e-12)
    assert np.array_equal(b, b0)


def test_l1_and_l2_differ():
    def run(reg):
        s = Solver(make_param(f'base_lr: 0.1 weight_decay: 0.5 regularization_type: "{reg}" '
                              'lr_policy: "fixed"'), dtype=np.float64)
        s.step(2)
        return params_of(s)[0]

    assert not np.allclose(run("L1"), run("L2"))


@pytest.mark.parametrize("reg", ["L2", "L1"])
@pytest.mark.parametrize("kind", list(SOLVERS))
def test_decay_mult_and_lr_mult_are_factors(kind, reg):
    # decay_mult 0.5 / 2 and lr_mult 0.5 / 3: Caffe multiplies weight_decay and the rate by them.
    text = SOLVERS[kind].replace("weight_decay: 0.01", "weight_decay: 0.2") + f' regularization_type: "{reg}"'
    solver = Solver(make_param(text, w_lr=0.5, b_lr=3, w_decay=0.5, b_decay=2), dtype=np.float64)
    w0, b0 = params_of(solver)
    solver.step(3)
    w, b = params_of(solver)
    want_w, want_b, _ = reference_run(kind, solver.param, 3, w0, b0, lr_mult=(0.5, 3.0),
                                      decay_mult=(0.5, 2.0))
    np.testing.assert_allclose(w, want_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(b, want_b, rtol=1e-12, atol=1e-14)
    # Read as on/off switches (a nonzero mult counting as 1), either mult gives clearly other values.
    for lr_mult, decay_mult in [((0.5, 3.0), (1.0, 1.0)), ((1.0, 1.0), (0.5, 2.0))]:
        switch_w, switch_b, _ = reference_run(kind, solver.param, 3, w0, b0, lr_mult=lr_mult,
                                              decay_mult=decay_mult)
        assert not np.allclose(w, switch_w, rtol=1e-6, atol=0), (lr_mult, decay_mult)
        assert not np.allclose(b, switch_b, rtol=1e-6, atol=0), (lr_mult, decay_mult)


def first_step(kind: str, p, g: np.ndarray, lr: float) -> np.ndarray:
    """Caffe's first update value of a parameter with diff `g` at local rate `lr` (all history zero)."""
    m, delta = p.momentum, p.delta
    if kind == "SGD":
        return lr * g
    if kind == "Nesterov":  # (1 + m) * h - m * 0, h = lr * g
        return (1 + m) * lr * g
    if kind == "AdaGrad":  # h = g^2
        return lr * g / (np.abs(g) + delta)
    if kind == "RMSProp":  # h = (1 - rms_decay) g^2
        return lr * g / (math.sqrt(1 - p.rms_decay) * np.abs(g) + delta)
    if kind == "AdaDelta":  # h = (1 - m) g^2, squared-update history 0
        return lr * g * np.sqrt(delta / ((1 - m) * g * g + delta))
    # Adam: m1 = (1 - b1) g, v1 = (1 - b2) g^2, correction sqrt(1 - b2) / (1 - b1)
    b2 = p.momentum2
    return lr * math.sqrt(1 - b2) * g / (math.sqrt(1 - b2) * np.abs(g) + delta)


@pytest.mark.parametrize("reg", ["L2", "L1"])
@pytest.mark.parametrize("kind", list(SOLVERS))
def test_weight_decay_alone_with_fractional_mults(kind, reg):
    # Targets the initial weights fit exactly: the diff is weight decay only, weight_decay * decay_mult
    # times w (L2) or sign(w) (L1), and one step of each rule has a closed form.
    text = SOLVERS[kind].replace("weight_decay: 0.01", "weight_decay: 0.2") + f' regularization_type: "{reg}"'
    solver = Solver(make_param(text, w_lr=0.5, b_lr=3, w_decay=0.5, b_decay=2), dtype=np.float64)
    w0, b0 = params_of(solver)
    DATA["t"] = DATA["x"] @ w0.T + b0
    solver.step(1)
    rate = solver.param.base_lr
    for got, start, lr_mult, decay_mult in zip(params_of(solver), (w0, b0), (0.5, 3.0), (0.5, 2.0)):
        g = solver.param.weight_decay * decay_mult * (start if reg == "L2" else np.sign(start))
        np.testing.assert_allclose(got, start - first_step(kind, solver.param, g, rate * lr_mult),
                                   rtol=1e-12, atol=1e-15)


def test_iter_size_2_equals_double_batch():
    text = 'base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"'
    half = make_param(text, batch=4)
    half.iter_size = 2
    full = make_param(text, batch=8)
    a, b = Solver(half, dtype=np.float64), Solver(full, dtype=np.float64)
    assert np.array_equal(params_of(a)[0], params_of(b)[0])
    a.step(3)
    b.step(3)
    for x, y in zip(params_of(a), params_of(b)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)
    assert not np.allclose(params_of(a)[0], params_of(Solver(full, dtype=np.float64))[0])


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_clip_gradients(clip, _data_and_quiet_log):
    text = f'base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed" clip_gradients: {clip}'
    solver = Solver(make_param(text), dtype=np.float64)
    w0, b0 = params_of(solver)
    solver.step(3)
    want_w, want_b, _ = reference_run("SGD", solver.param, 3, w0, b0)
    np.testing.assert_allclose(params_of(solver)[0], want_w, rtol=1e-12)
    np.testing.assert_allclose(params_of(solver)[1], want_b, rtol=1e-12)
    clipped = "Gradient clipping: scaling down gradients" in _data_and_quiet_log.getvalue()
    assert clipped == (clip < 1)


def test_clipping_changes_the_result():
    def run(extra):
        s = Solver(make_param('base_lr: 0.1 lr_policy: "fixed" ' + extra), dtype=np.float64)
        s.step(1)
        return params_of(s)[0]

    assert not np.allclose(run("clip_gradients: 0.01"), run(""))


def test_average_loss_smooths_over_the_last_iterations():
    text = 'base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" average_loss: 3'
    solver = Solver(make_param(text), dtype=np.float64)
    w0, b0 = params_of(solver)
    solver.step(5)
    _, _, losses = reference_run("SGD", solver.param, 5, w0, b0)
    assert solver.smoothed_loss == pytest.approx(np.mean(losses[2:5]), rel=1e-10)


def test_float32_solver_tracks_float64():
    text = SOLVERS["Adam"]
    s32, s64 = Solver(make_param(text)), Solver(make_param(text), dtype=np.float64)
    assert s32.net.params["ip"][0].dtype == np.float32
    s32.step(3)
    s64.step(3)
    np.testing.assert_allclose(params_of(s32)[0], params_of(s64)[0], rtol=1e-4, atol=1e-5)


# -- solver classes, types and set-up ---------------------------------------------------------------

def test_rule_classes_override_type_and_get_solver_uses_it():
    param = make_param(SOLVERS["SGD"])
    assert AdamSolver(param).type == "Adam"
    assert len(AdamSolver(param).history) == 4
    assert get_solver(param).type == "SGD"
    for name in ("SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
                 "AdamSolver", "get_solver"):
        assert hasattr(minicaffe, name)


RULE_CLASSES = {"SGD": SGDSolver, "Nesterov": NesterovSolver, "AdaGrad": AdaGradSolver,
                "RMSProp": RMSPropSolver, "AdaDelta": AdaDeltaSolver, "Adam": AdamSolver}


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_solver_and_get_solver_build_the_registered_class(kind):
    cls = RULE_CLASSES[kind]
    assert SOLVER_TYPES[kind] is cls and cls.type == kind
    param = make_param(SOLVERS[kind])
    # A rule class uses its own rule whatever the file's type (here the default, SGD), as pycaffe's.
    for solver in (Solver(param), get_solver(param), cls(make_param('base_lr: 0.1 lr_policy: "fixed"'))):
        assert type(solver) is cls and solver.type == kind
        assert len(solver.history) == 2 * cls.history_blobs
    assert cls.history_blobs == (2 if kind in ("AdaDelta", "Adam") else 1)
    # The legacy solver_type enum, upgraded as Caffe does, names the same class.
    legacy = make_param(f'base_lr: 0.1 lr_policy: "fixed" solver_type: {kind.upper()}')
    assert type(Solver(legacy)) is cls


def test_unknown_type_names_the_file_and_the_known_types(tmp_path):
    (tmp_path / "net.prototxt").write_text(NET.format(batch=8, w_lr=1, b_lr=1, w_decay=1, b_decay=1))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" type: "Momentum"')
    for build in (Solver, get_solver):
        with pytest.raises(SolverError) as error:
            build(str(solver_file))
        message = str(error.value)
        assert message.startswith(f"{solver_file}: unknown solver type 'Momentum'")
        assert all(kind in message for kind in SOLVERS)


def test_a_registered_rule_is_used_with_its_own_history_blobs():
    @register_solver("SolverTestSignSGD")
    class SignSolver(Solver):
        """step = local_rate * sign(diff); three history blobs marked with their number."""

        history_blobs = 3

        def compute_update(self, index, rate):
            for k, history in enumerate(self.histories(index)):
                history[...] = 10 * k + index
            diff = self.net.learnable_params[index].blob.mutable_diff()
            diff[...] = rate * self.net.learnable_params[index].lr_mult * np.sign(diff)

    try:
        solver = Solver(make_param('type: "SolverTestSignSGD" base_lr: 0.1 lr_policy: "fixed"'),
                        dtype=np.float64)
        assert type(solver) is SignSolver
        w0, b0 = params_of(solver)
        gw, gb, _ = gradients(w0, b0, DATA["x"], DATA["t"])
        solver.step(1)
        np.testing.assert_allclose(params_of(solver)[0], w0 - f32(0.1) * np.sign(gw), rtol=1e-12)
        np.testing.assert_allclose(params_of(solver)[1], b0 - f32(0.1) * 2 * np.sign(gb), rtol=1e-12)
        # Caffe's order: blob k of every parameter, then blob k + 1 of every parameter.
        assert [h.shape for h in solver.history] == [(3, 4), (3,)] * 3
        assert [float(h.data.flat[0]) for h in solver.history] == [0, 1, 10, 11, 20, 21]
    finally:
        del SOLVER_TYPES["SolverTestSignSGD"]


def test_legacy_solver_type_enum():
    param = make_param('base_lr: 0.1 lr_policy: "fixed" solver_type: NESTEROV')
    assert Solver(param).type == "Nesterov"
    both = make_param('base_lr: 0.1 lr_policy: "fixed" solver_type: ADAM type: "Adam"')
    with pytest.raises(SolverError, match="not both"):
        Solver(both)


@pytest.mark.parametrize("text, message", [
    ('base_lr: 0.1 lr_policy: "fixed" type: "Momentum"', "unknown solver type 'Momentum'"),
    ("base_lr: 0.1", "lr_policy is not set"),
    ('base_lr: 0.1 lr_policy: "cosine"', "lr_policy 'cosine'"),
    ('base_lr: 0.1 lr_policy: "step"', "needs stepsize > 0"),
    ('base_lr: 0.1 lr_policy: "fixed" type: "AdaGrad" momentum: 0.9', "momentum cannot be used with AdaGrad"),
    ('base_lr: 0.1 lr_policy: "fixed" type: "RMSProp" rms_decay: 1.5', "rms_decay must be in"),
    ('base_lr: 0.1 lr_policy: "fixed" regularization_type: "L3"', "regularization_type 'L3'"),
    ('base_lr: 0.1 lr_policy: "fixed" test_iter: 1', "test_interval"),
    ('base_lr: 0.1 lr_policy: "fixed" average_loss: 0', "average_loss"),
])
def test_bad_solver_fields(text, message):
    with pytest.raises(SolverError, match=re.escape(message)):
        Solver(make_param(text))


def test_train_net_is_required_and_unique():
    with pytest.raises(SolverError, match="no train net"):
        Solver(parse_text('base_lr: 0.1 lr_policy: "fixed"', caffe_pb2.SolverParameter()))
    param = make_param('base_lr: 0.1 lr_policy: "fixed"')
    param.train_net_param.CopyFrom(param.net_param)
    with pytest.raises(SolverError, match="only one train net"):
        Solver(param)
    with pytest.raises(TypeError):
        Solver(42)


STAGED_NET = NET.format(batch=8, w_lr=1, b_lr=1, w_decay=1, b_decay=1) + """
layer { name: "extra" type: "SolverTestLoss" bottom: "y" bottom: "t" top: "extra"
        include { phase: TEST stage: "val" } }
"""


def test_test_nets_states_and_precedence():
    param = parse_text('base_lr: 0.1 lr_policy: "fixed" test_iter: 2 test_iter: 1 test_interval: 5 '
                       'test_state { stage: "val" } test_state { }', caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(parse_text(STAGED_NET, caffe_pb2.NetParameter()))
    solver = Solver(param, dtype=np.float64)
    assert len(solver.test_nets) == 2
    assert solver.net.phase == minicaffe.TRAIN
    assert all(n.phase == minicaffe.TEST for n in solver.test_nets)
    assert "extra" in solver.test_nets[0].layer_dict and "extra" not in solver.test_nets[1].layer_dict
    # test_net_param come first, then the generic net for the remaining test_iter entries.
    param2 = parse_text('base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_iter: 1 test_interval: 5',
                        caffe_pb2.SolverParameter())
    param2.net_param.CopyFrom(parse_text(NET.format(batch=8, w_lr=1, b_lr=1, w_decay=1, b_decay=1),
                                         caffe_pb2.NetParameter()))
    param2.test_net_param.add().CopyFrom(parse_text(STAGED_NET, caffe_pb2.NetParameter()))
    param2.test_net_param[0].state.stage.append("val")
    solver2 = Solver(param2, dtype=np.float64)
    assert "extra" in solver2.test_nets[0].layer_dict and "extra" not in solver2.test_nets[1].layer_dict
    bad = parse_text('base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_interval: 5 '
                     'test_state { } test_state { }', caffe_pb2.SolverParameter())
    bad.net_param.CopyFrom(param2.net_param)
    with pytest.raises(SolverError, match="test_state must be unspecified or given once per test net"):
        Solver(bad)


def test_testing_schedule_scores_and_shared_weights(_data_and_quiet_log):
    param = make_param('base_lr: 0.1 lr_policy: "fixed" test_iter: 2 test_interval: 2 max_iter: 4 '
                       'display: 1 test_compute_loss: true')
    solver = Solver(param, dtype=np.float64)
    solver.solve()
    text = _data_and_quiet_log.getvalue()
    assert re.findall(r"Iteration (\d+), Testing net \(#0\)", text) == ["0", "2", "4"]
    # The test net uses the trained weights: its loss is the loss of the final parameters.
    w, b = params_of(solver)
    _, _, loss = gradients(w, b, DATA["x"], DATA["t"])
    assert solver.test_scores[0]["loss"] == pytest.approx(loss, rel=1e-12)
    assert solver.test_nets[0].params["ip"][0].data is not None
    assert np.array_equal(solver.test_nets[0].params["ip"][0].data, w)
    assert "Test loss: " in text

    solver = Solver(make_param('base_lr: 0.1 lr_policy: "fixed" test_iter: 1 test_interval: 2 max_iter: 3 '
                               'test_initialization: false'), dtype=np.float64)
    _data_and_quiet_log.truncate(0)
    solver.solve()
    assert re.findall(r"Iteration (\d+), Testing net", _data_and_quiet_log.getvalue()) == ["2"]


GLOG = r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [a-z_]+\.cpp:\d+\] "


def test_log_lines_have_caffe_format(_data_and_quiet_log):
    param = make_param('base_lr: 0.1 lr_policy: "fixed" display: 2 max_iter: 4 test_iter: 1 test_interval: 4')
    Solver(param, dtype=np.float64).solve()
    lines = _data_and_quiet_log.getvalue().splitlines()
    assert all(re.match(GLOG, line) for line in lines), lines
    text = "\n".join(lines)
    assert re.search(GLOG + r"Iteration 2 \([-\d.e+]+ iter/s, [\d.e+-]+s/2 iters\), loss = [\d.e+-]+$",
                     text, re.M)
    assert re.search(GLOG + r"    Train net output #0: loss = ([\d.e+-]+) \(\* 1 = \1 loss\)$", text, re.M)
    assert re.search(GLOG + r"Iteration 2, lr = 0\.1$", text, re.M)
    assert re.search(GLOG + r"    Test net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)$",
                     text, re.M)
    assert re.search(GLOG + r"Iteration 4, loss = [\d.e+-]+$", text, re.M)
    assert lines[-1].endswith("] Optimization Done.")
    # Caffe's tools/extra/parse_log.py regular expressions.
    assert re.search(r"Iteration (\d+)", text)
    assert re.search(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)", text)
    assert re.search(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)", text)
    assert re.search(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)", text)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("blob, value, shown", [("x", np.nan, "nan"), ("t", np.inf, "inf")])
def test_non_finite_loss_is_warned_once(blob, value, shown, _data_and_quiet_log):
    # Batch 0 (rows 0-3) is clean, batch 1 (rows 4-7) has a NaN input or an infinite target: iteration 1
    # has a non-finite loss, and the parameters stay non-finite from then on; one warning only.
    DATA[blob][5, 1] = value
    solver = Solver(make_param('base_lr: 0.1 lr_policy: "fixed" display: 1', batch=4), dtype=np.float64)
    solver.allow_nan = True  # Caffe's behaviour (without it training stops: tests/test_training_guards.py)
    solver.step(1)
    assert "W" not in [line[0] for line in _data_and_quiet_log.getvalue().splitlines()]
    solver.step(3)
    solver.step(2)
    assert not np.isfinite(solver.smoothed_loss)
    lines = _data_and_quiet_log.getvalue().splitlines()
    warnings = [line for line in lines if line.startswith("W")]
    assert len(warnings) == 1, warnings
    assert re.match("^W" + GLOG[2:] + rf"Iteration 1, loss = {shown} is not finite", warnings[0]), warnings


def test_progress_display_only_on_a_terminal():
    class Tty(_io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), _io.StringIO()
    for stream in (tty, pipe):
        progress = log.Progress(0, 10, stream=stream, interval=0)
        progress.update(5, 0.25)
        progress.close()
    assert "[ 5/10]" in tty.getvalue() and "ETA" in tty.getvalue()
    assert pipe.getvalue() == ""
    # On a terminal, a log line first clears the progress line, which is then drawn again below it.
    tty = Tty()
    log.set_stream(tty)
    progress = log.Progress(0, 10, interval=0)
    progress.update(3)
    log.info("hello")
    progress.close()
    text = tty.getvalue()
    status = text[text.index("[ 3/10]"):text.index("ETA")]
    assert re.search(r"\r\033\[K" + GLOG[1:] + r"hello\n" + re.escape(status), text)


def test_random_seed_sets_the_fillers():
    a = Solver(make_param('base_lr: 0.1 lr_policy: "fixed" random_seed: 7'))
    b = Solver(make_param('base_lr: 0.1 lr_policy: "fixed" random_seed: 7'))
    c = Solver(make_param('base_lr: 0.1 lr_policy: "fixed" random_seed: 8'))
    assert np.array_equal(params_of(a)[0], params_of(b)[0])
    assert not np.array_equal(params_of(a)[0], params_of(c)[0])


def test_read_solver_paths_and_prefix(tmp_path, monkeypatch):
    (tmp_path / "nets").mkdir()
    net = NET.format(batch=8, w_lr=1, b_lr=1, w_decay=1, b_decay=1)
    (tmp_path / "nets" / "tiny.prototxt").write_text(net)
    solver_file = tmp_path / "nets" / "my_solver.prototxt"
    solver_file.write_text('net: "tiny.prototxt" base_lr: 0.1 lr_policy: "fixed" solver_type: ADAM')
    monkeypatch.chdir(tmp_path)
    param = read_solver(solver_file)
    assert param.type == "Adam"
    assert param.snapshot_prefix == str(solver_file.with_suffix(""))
    # net path: not in the CWD, found beside the solver file.
    solver = Solver(str(solver_file))
    assert solver.net.name == "tiny"
    # snapshot_prefix naming a folder: folder / solver stem.
    (tmp_path / "snaps").mkdir()
    solver_file.write_text('net: "tiny.prototxt" base_lr: 0.1 lr_policy: "fixed" snapshot_prefix: "snaps"')
    assert read_solver(solver_file).snapshot_prefix == str(Path("snaps", "my_solver"))
    solver_file.write_text('net: "missing.prototxt" base_lr: 0.1 lr_policy: "fixed"')
    with pytest.raises(SolverError, match="net file 'missing.prototxt' not found"):
        Solver(str(solver_file))


def test_rule_classes_derive_from_sgd_solver_as_in_caffe():
    """Caffe's Nesterov/AdaGrad/RMSProp/AdaDelta/Adam solvers are SGDSolver subclasses (pycaffe code may
    test isinstance(solver, caffe.SGDSolver)); each still uses its own rule."""
    from minicaffe import solver as solver_module

    for name in ("Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"):
        cls = solver_module.SOLVER_TYPES[name]
        assert issubclass(cls, solver_module.SGDSolver) and cls.compute_update is not \
            solver_module.SGDSolver.compute_update
