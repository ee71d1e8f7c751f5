"""LSTMUnit, LSTM and RNN: forward against plain numpy (and hand-checked values; torch.nn.LSTM as an
optional oracle), fp64 gradient checks of every input and parameter, cont resetting the state, the
state carried between forwards, expose_hidden, Caffe's parameter names / shapes through .caffemodel,
and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.net import Net, NetError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import GradientChecker, blobs_from_arrays, layer_from_prototxt

FILL = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def recurrent_text(kind: str, hidden: int, expose_hidden: bool = False) -> str:
    expose = "expose_hidden: true" if expose_hidden else ""
    return f'type: "{kind}" recurrent_param {{ num_output: {hidden} {expose} {FILL} }}'


def setup_layer(text: str, *arrays, num_top: int = 1):
    layer = layer_from_prototxt(text)
    bottom = blobs_from_arrays(*arrays)
    top = [Blob((), np.float64) for _ in range(num_top)]
    layer.setup(bottom, top)
    return layer, bottom, top


# -- references (plain numpy, written from the equations, one step at a time) ----------------------

def lstm_step(x_gates, h, c, cont, w_hc):
    """One LSTM step; x_gates = W_xc x + b_c (+ W_xc_static x_static), gate order i, f, o, g."""
    hidden = h.shape[-1]
    gates = x_gates + (cont[:, None] * h) @ w_hc.T
    i = sigmoid(gates[:, :hidden])
    f = cont[:, None] * sigmoid(gates[:, hidden:2 * hidden])
    o = sigmoid(gates[:, 2 * hidden:3 * hidden])
    g = np.tanh(gates[:, 3 * hidden:])
    c = f * c + i * g
    return o * np.tanh(c), c


def lstm_reference(x, cont, params, x_static=None, h0=None, c0=None):
    """(outputs (T, N, H), h_T, c_T)."""
    if x_static is None:
        w_xc, b_c, w_hc = params
        static = 0.0
    else:
        w_xc, b_c, w_xc_static, w_hc = params
        static = x_static.reshape(len(x_static), -1) @ w_xc_static.T
    steps, streams = cont.shape
    hidden = w_hc.shape[1]
    h = np.zeros((streams, hidden)) if h0 is None else h0[0]
    c = np.zeros((streams, hidden)) if c0 is None else c0[0]
    out = []
    for t in range(steps):
        h, c = lstm_step(x[t].reshape(streams, -1) @ w_xc.T + b_c + static, h, c, cont[t], w_hc)
        out.append(h)
    return np.array(out), h, c


def rnn_reference(x, cont, params, x_static=None, h0=None):
    """(outputs o (T, N, H), h_T)."""
    if x_static is None:
        w_xh, b_h, w_hh, w_ho, b_o = params
        static = 0.0
    else:
        w_xh, b_h, w_xh_static, w_hh, w_ho, b_o = params
        static = x_static.reshape(len(x_static), -1) @ w_xh_static.T
    steps, streams = cont.shape
    h = np.zeros((streams, w_hh.shape[0])) if h0 is None else h0[0]
    out = []
    for t in range(steps):
        h = np.tanh(x[t].reshape(streams, -1) @ w_xh.T + b_h + static + (cont[t][:, None] * h) @ w_hh.T)
        out.append(np.tanh(h @ w_ho.T + b_o))
    return np.array(out), h


def params_of(layer):
    return [np.array(blob.data) for blob in layer.blobs]


# -- LSTMUnit --------------------------------------------------------------------------------------

def test_lstm_unit_hand_checked_values():
    # One unit, two streams; pre-activations i' = f' = o' = 0 (gates 0.5), g' = atanh(0.5) (g = 0.5),
    # c_prev = 2. Continuing: c = 0.5 * 2 + 0.5 * 0.5 = 1.25, h = 0.5 * tanh(1.25).
    # New sequence (cont 0): c = 0.5 * 0.5 = 0.25, h = 0.5 * tanh(0.25).
    g = np.arctanh(0.5)
    x = np.array([[[0, 0, 0, g], [0, 0, 0, g]]])
    c_prev = np.array([[[2.0], [2.0]]])
    cont = np.array([[1.0, 0.0]])
    layer, bottom, top = setup_layer('type: "LSTMUnit"', c_prev, x, cont, num_top=2)
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data.ravel(), [1.25, 0.25], rtol=1e-14)
    np.testing.assert_allclose(top[1].data.ravel(), [0.5 * 0.8482836399575129, 0.5 * 0.24491866240370910],
                               rtol=1e-14)


def test_lstm_unit_forward_matches_numpy():
    rng = np.random.default_rng(0)
    streams, hidden = 4, 5
    c_prev = rng.normal(size=(1, streams, hidden))
    x = rng.normal(size=(1, streams, 4 * hidden))
    cont = np.array([[1.0, 0.0, 1.0, 0.5]])
    layer, bottom, top = setup_layer('type: "LSTMUnit"', c_prev, x, cont, num_top=2)
    layer.run_forward(bottom, top)
    i, f = sigmoid(x[..., :hidden]), cont[..., None] * sigmoid(x[..., hidden:2 * hidden])
    o, g = sigmoid(x[..., 2 * hidden:3 * hidden]), np.tanh(x[..., 3 * hidden:])
    c = f * c_prev + i * g
    np.testing.assert_allclose(top[0].data, c, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(top[1].data, o * np.tanh(c), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cont", [[1.0, 0.0, 1.0], [0.3, 1.0, 0.0]], ids=["binary", "fractional"])
@pytest.mark.parametrize("checked", [0, 1], ids=["c_prev", "x"])
def test_lstm_unit_gradient(cont, checked):
    rng = np.random.default_rng(1)
    c_prev = rng.normal(size=(1, 3, 2))
    x = rng.normal(size=(1, 3, 8))
    layer = layer_from_prototxt('type: "LSTMUnit"')
    bottom = blobs_from_arrays(c_prev, x, np.array([cont]))
    top = [Blob((), np.float64), Blob((), np.float64)]
    GradientChecker(1e-4, 1e-6).check_gradient_exhaustive(layer, bottom, top, check_bottom=checked)


def test_lstm_unit_refuses_a_cont_gradient_and_bad_shapes():
    rng = np.random.default_rng(2)
    c_prev, x, cont = rng.normal(size=(1, 2, 3)), rng.normal(size=(1, 2, 12)), np.ones((1, 2))
    layer, bottom, top = setup_layer('type: "LSTMUnit"', c_prev, x, cont, num_top=2)
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="sequence continuation"):
        layer.run_backward(top, [True, True, True], bottom)
    assert not layer.allow_force_backward(2)
    for arrays, message in [((c_prev, rng.normal(size=(1, 2, 10)), cont), r"X \(bottom 1\)"),
                            ((c_prev, x, np.ones((1, 3))), r"cont \(bottom 2\)"),
                            ((c_prev[0], x, cont), r"C_prev \(bottom 0\)")]:
        with pytest.raises(LayerError, match=message):
            setup_layer('type: "LSTMUnit"', *arrays, num_top=2)
    layer = layer_from_prototxt('type: "LSTMUnit"')
    bottom = blobs_from_arrays(c_prev, x, cont)
    with pytest.raises(LayerError, match="in place"):
        layer.setup(bottom, [bottom[0], Blob((), np.float64)])


# -- LSTM and RNN forward ------------------------------------------------------------------------------

CONT = np.array([[0, 1], [1, 1], [1, 0.0]])  # stream 1 starts a new sequence at step 3


@pytest.mark.parametrize("static", [False, True], ids=["plain", "static_input"])
def test_lstm_forward_matches_numpy(static):
    rng = np.random.default_rng(3)
    x, x_static = rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(2, 3))  # x: 4-D, flattened from axis 2
    arrays = (x, CONT, x_static) if static else (x, CONT)
    layer, bottom, top = setup_layer(recurrent_text("LSTM", 4), *arrays)
    layer.run_forward(bottom, top)
    expected, _, _ = lstm_reference(x, CONT, params_of(layer), x_static if static else None)
    assert top[0].shape == (3, 2, 4)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("static", [False, True], ids=["plain", "static_input"])
def test_rnn_forward_matches_numpy(static):
    rng = np.random.default_rng(4)
    x, x_static = rng.normal(size=(3, 2, 3)), rng.normal(size=(2, 2))
    arrays = (x, CONT, x_static) if static else (x, CONT)
    layer, bottom, top = setup_layer(recurrent_text("RNN", 3), *arrays)
    layer.run_forward(bottom, top)
    expected, _ = rnn_reference(x, CONT, params_of(layer), x_static if static else None)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_a_single_time_step(kind):
    rng = np.random.default_rng(22)
    x, cont = rng.normal(size=(1, 3, 2)), np.array([[0.0, 1.0, 0.0]])
    layer, bottom, top = setup_layer(recurrent_text(kind, 2), x, cont)
    layer.run_forward(bottom, top)
    reference = lstm_reference if kind == "LSTM" else rnn_reference
    np.testing.assert_allclose(top[0].data, reference(x, cont, params_of(layer))[0], rtol=1e-12)


def test_rnn_hand_checked_values():
    # One step, one stream, one unit: h = tanh(2 * 0.5 + 0.25) = tanh(1.25), o = tanh(-1 * h + 0.5).
    layer, bottom, top = setup_layer('type: "RNN" recurrent_param { num_output: 1 }', [[[0.5]]], [[0.0]])
    for blob, value in zip(layer.blobs, [2.0, 0.25, 7.0, -1.0, 0.5]):  # W_xh, b_h, W_hh, W_ho, b_o
        blob.data[...] = value
    layer.run_forward(bottom, top)
    assert top[0].data.item() == pytest.approx(np.tanh(0.5 - 0.8482836399575129), rel=1e-14)


def test_lstm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    steps, streams, inputs, hidden = 4, 3, 2, 5
    x = rng.normal(size=(steps, streams, inputs))
    layer, bottom, top = setup_layer(recurrent_text("LSTM", hidden), x, np.ones((steps, streams)))
    layer.run_forward(bottom, top)
    w_xc, b_c, w_hc = params_of(layer)
    # torch's gate order is i, f, g, o; Caffe's i, f, o, g.
    order = np.concatenate([np.arange(k * hidden, (k + 1) * hidden) for k in (0, 1, 3, 2)])
    lstm = torch.nn.LSTM(inputs, hidden).double()
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(w_xc[order]))
        lstm.weight_hh_l0.copy_(torch.from_numpy(w_hc[order]))
        lstm.bias_ih_l0.copy_(torch.from_numpy(b_c[order]))
        lstm.bias_hh_l0.zero_()
        expected, _ = lstm(torch.from_numpy(x))
    np.testing.assert_allclose(top[0].data, expected.numpy(), rtol=1e-12, atol=1e-14)


def test_cont_zero_resets_the_state():
    """A stream whose cont is 0 at step t gives, from t on, what a fresh sequence starting there gives."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 2, 3))
    for kind in ("LSTM", "RNN"):
        cont = np.array([[0, 0], [1, 1], [0, 1], [1, 1.0]])
        layer, bottom, top = setup_layer(recurrent_text(kind, 3), x, cont)
        layer.run_forward(bottom, top)
        whole = np.array(top[0].data)
        fresh, fresh_bottom, fresh_top = setup_layer(recurrent_text(kind, 3), x[2:], cont[2:])
        for mine, theirs in zip(fresh.blobs, layer.blobs):
            mine.data[...] = theirs.data
        fresh.run_forward(fresh_bottom, fresh_top)
        np.testing.assert_allclose(whole[2:, 0], fresh_top[0].data[:, 0], rtol=1e-13)
        assert not np.allclose(whole[2:, 1], fresh_top[0].data[:, 1])  # stream 1 went on


def test_state_carries_over_between_forwards_as_in_caffe():
    rng = np.random.default_rng(7)
    x1, x2 = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2, 3))
    cont = np.array([[0, 0], [1, 1.0]])
    layer, bottom, top = setup_layer(recurrent_text("LSTM", 3), x1, cont)
    layer.run_forward(bottom, top)
    _, h, c = lstm_reference(x1, cont, params_of(layer))
    bottom[0].data[...] = x2
    bottom[1].data[...] = [[1, 0], [1, 1]]  # stream 0 continues, stream 1 starts over
    layer.run_forward(bottom, top)
    expected, _, _ = lstm_reference(x2, bottom[1].data, params_of(layer), h0=h[None], c0=c[None])
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_expose_hidden_takes_and_gives_the_states(kind):
    rng = np.random.default_rng(8)
    x, x_static = rng.normal(size=(3, 2, 3)), rng.normal(size=(2, 4))
    cont = rng.uniform(0.2, 1.0, (3, 2))
    states = [rng.normal(size=(1, 2, 5)) for _ in range(2 if kind == "LSTM" else 1)]
    layer, bottom, top = setup_layer(recurrent_text(kind, 5, expose_hidden=True), x, cont, x_static, *states,
                                     num_top=1 + len(states))
    layer.run_forward(bottom, top)
    layer.run_forward(bottom, top)  # exposed states: nothing carries over
    if kind == "LSTM":
        out, h, c = lstm_reference(x, cont, params_of(layer), x_static, *states)
        finals = [h, c]
    else:
        out, h = rnn_reference(x, cont, params_of(layer), x_static, *states)
        finals = [h]
    np.testing.assert_allclose(top[0].data, out, rtol=1e-12)
    for blob, final in zip(top[1:], finals):
        assert blob.shape == (1, 2, 5)
        np.testing.assert_allclose(blob.data[0], final, rtol=1e-12)


# -- gradients ------------------------------------------------------------------------------------------

def check(layer_text, arrays, checked, num_top=1):
    layer = layer_from_prototxt(layer_text)
    bottom = blobs_from_arrays(*arrays)
    top = [Blob((), np.float64) for _ in range(num_top)]
    checker = GradientChecker(1e-4, 1e-6)
    for index in checked:  # every parameter is checked with each
        checker.check_gradient(layer, bottom, top, check_bottom=index)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_gradient_x_and_params(kind):
    # cont = 0 at step 1: the state carried from the checker's previous forward does not count.
    rng = np.random.default_rng(9)
    check(recurrent_text(kind, 3), [rng.normal(size=(3, 2, 2)), [[0, 0], [1, 1], [1, 0]]], [0])


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_gradient_static_input(kind):
    rng = np.random.default_rng(10)
    check(recurrent_text(kind, 2), [rng.normal(size=(2, 2, 2)), [[0, 0], [1, 1]], rng.normal(size=(2, 3))],
          [0, 2])


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_gradient_exposed_hidden_states(kind):
    """The initial states get gradients, and the diffs of the final-state tops flow back (the objective
    covers every top)."""
    rng = np.random.default_rng(11)
    states = [rng.normal(size=(1, 2, 3)) for _ in range(2 if kind == "LSTM" else 1)]
    arrays = [rng.normal(size=(3, 2, 2)), rng.uniform(0.2, 1.0, (3, 2)), rng.normal(size=(2, 2)), *states]
    check(recurrent_text(kind, 3, expose_hidden=True), arrays, [0, 2, *range(3, 3 + len(states))],
          num_top=1 + len(states))


def test_gradient_exhaustive_small_lstm():
    rng = np.random.default_rng(12)
    layer = layer_from_prototxt(recurrent_text("LSTM", 2))
    bottom = blobs_from_arrays(rng.normal(size=(2, 1, 2)), [[0.0], [1.0]])
    top = [Blob((), np.float64)]
    GradientChecker(1e-4, 1e-6).check_gradient_exhaustive(layer, bottom, top, check_bottom=0)


def test_lr_mult_zero_parameter_gets_no_gradient():
    rng = np.random.default_rng(13)
    layer, bottom, top = setup_layer(recurrent_text("LSTM", 2), rng.normal(size=(2, 2, 2)), np.ones((2, 2)))
    layer.param_propagate_down = [True, False, True]
    layer.run_forward(bottom, top)
    top[0].diff[...] = 1
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.run_backward(top, [True, False], bottom)
    assert not layer.blobs[1].diff.any()
    assert layer.blobs[0].diff.any() and layer.blobs[2].diff.any()


def test_refuses_a_cont_gradient():
    rng = np.random.default_rng(14)
    layer, bottom, top = setup_layer(recurrent_text("RNN", 2), rng.normal(size=(2, 2, 2)), np.ones((2, 2)))
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="sequence continuation"):
        layer.run_backward(top, [True, True], bottom)
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)


# -- Caffe's parameters, nets, .caffemodel -----------------------------------------------------------------

def test_parameter_shapes_are_caffes():
    rng = np.random.default_rng(15)
    x, cont, x_static = rng.normal(size=(2, 3, 4, 2)), np.ones((2, 3)), rng.normal(size=(3, 5))
    lstm, _, _ = setup_layer(recurrent_text("LSTM", 6), x, cont, x_static)
    assert [b.shape for b in lstm.blobs] == [(24, 8), (24,), (24, 5), (24, 6)]  # W_xc b_c W_xc_static W_hc
    rnn, _, _ = setup_layer(recurrent_text("RNN", 6), x, cont)
    assert [b.shape for b in rnn.blobs] == [(6, 8), (6,), (6, 6), (6, 6), (6,)]  # W_xh b_h W_hh W_ho b_o


NET = """
name: "seq"
layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: 3 dim: 2 dim: 4 }} }} }}
layer {{ name: "cont" type: "Input" top: "cont" input_param {{ shape {{ dim: 3 dim: 2 }} }} }}
layer {{ name: "rec" type: "{kind}" bottom: "x" bottom: "cont" top: "out"
        recurrent_param {{ num_output: 3 {fill} }} }}
"""


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_weights_round_trip_through_caffemodel(kind, tmp_path):
    text = NET.format(kind=kind, fill=FILL)
    param = io.parse_text(text, caffe_pb2.NetParameter(), "<net>")
    rng = np.random.default_rng(16)
    inputs = {"x": rng.normal(size=(3, 2, 4)), "cont": np.array([[0, 0], [1, 1], [1, 1.0]])}
    net = Net(param, phase=caffe_pb2.TEST)
    expected = np.array(net.forward(**inputs)["out"])
    net.save(tmp_path / "w.caffemodel")
    saved = io.read_binary(tmp_path / "w.caffemodel", caffe_pb2.NetParameter())
    layer = next(layer for layer in saved.layer if layer.name == "rec")
    assert [list(b.shape.dim) for b in layer.blobs] == [list(b.shape) for b in net.params["rec"]]
    other = Net(io.parse_text(NET.format(kind=kind, fill=""), caffe_pb2.NetParameter(), "<net>"),
                phase=caffe_pb2.TEST)
    assert not np.allclose(other.forward(**inputs)["out"], expected)
    other.copy_from(tmp_path / "w.caffemodel")
    np.testing.assert_allclose(other.forward(**inputs)["out"], expected, rtol=1e-6)


def test_a_caffemodel_written_in_caffes_layout_loads():
    """Blobs as Caffe's LSTM stores them: W_xc (4H, D), b_c (4H), W_hc (4H, H), float data."""
    rng = np.random.default_rng(17)
    hidden, inputs = 3, 4
    values = [rng.normal(size=(4 * hidden, inputs)), rng.normal(size=4 * hidden),
              rng.normal(size=(4 * hidden, hidden))]
    trained = caffe_pb2.NetParameter(name="seq")
    layer = trained.layer.add(name="rec", type="LSTM")
    for array in values:
        blob = layer.blobs.add()
        blob.shape.dim.extend(array.shape)
        blob.data.extend(array.astype(np.float32).ravel())
    net = Net(io.parse_text(NET.format(kind="LSTM", fill=""), caffe_pb2.NetParameter(), "<net>"),
              phase=caffe_pb2.TEST, dtype=np.float64)
    net.copy_from_proto(trained)
    x, cont = rng.normal(size=(3, 2, 4)), np.array([[0, 0], [1, 1], [1, 1.0]])
    out = net.forward(x=x, cont=cont)["out"]
    expected, _, _ = lstm_reference(x, cont, [v.astype(np.float32).astype(np.float64) for v in values])
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_blobs_given_in_the_prototxt_are_used():
    rng = np.random.default_rng(18)
    values = [rng.normal(size=(2, 1)), rng.normal(size=2), rng.normal(size=(2, 2)), rng.normal(size=(2, 2)),
              rng.normal(size=2)]
    blobs = " ".join("blobs { shape { " + " ".join(f"dim: {d}" for d in v.shape) + " } "
                     + " ".join(f"double_data: {float(d)!r}" for d in v.ravel()) + " }" for v in values)
    x, cont = rng.normal(size=(2, 1, 1)), np.array([[0.0], [1.0]])
    layer, bottom, top = setup_layer(f'type: "RNN" recurrent_param {{ num_output: 2 }} {blobs}', x, cont)
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, rnn_reference(x, cont, values)[0], rtol=1e-12)


def test_two_layers_sharing_parameters_by_name_compute_alike():
    names = "".join(f' param {{ name: "{n}" }}' for n in ("W_xc", "b_c", "W_hc"))
    text = NET.format(kind="LSTM", fill=FILL).replace('top: "out"', f'top: "out"{names}') + (
        f'layer {{ name: "rec2" type: "LSTM" bottom: "x" bottom: "cont" top: "out2"{names}\n'
        f'        recurrent_param {{ num_output: 3 {FILL.replace("0.5", "0.1")} }} }}\n')
    net = Net(io.parse_text(text, caffe_pb2.NetParameter(), "<net>"), phase=caffe_pb2.TEST)
    rng = np.random.default_rng(19)
    out = net.forward(x=rng.normal(size=(3, 2, 4)), cont=np.array([[0, 0], [1, 1], [1, 1.0]]))
    np.testing.assert_array_equal(out["out"], out["out2"])


def test_trains_in_a_net(tmp_path):
    """An LSTM net with a Euclidean loss: backward runs through the Net, and SGD lowers the loss."""
    from minicaffe.solver import get_solver

    x_input = 'top: "x" input_param { shape { dim: 3 dim: 2 dim: 4 } }'
    with_target = ('top: "x" top: "target" input_param { shape { dim: 3 dim: 2 dim: 4 } '
                   'shape { dim: 3 dim: 2 dim: 3 } }')
    net_text = NET.format(kind="LSTM", fill=FILL).replace(x_input, with_target)
    net_text += 'layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }\n'
    (tmp_path / "net.prototxt").write_text(net_text)
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.5 '
                                              'lr_policy: "fixed" max_iter: 100 display: 0 '
                                              'snapshot_after_train: false solver_mode: CPU')
    solver = get_solver(tmp_path / "solver.prototxt", dtype=np.float64)
    net = solver.net
    rng = np.random.default_rng(20)
    net.blobs["x"].data[...] = rng.normal(size=(3, 2, 4))
    net.blobs["cont"].data[...] = [[0, 0], [1, 1], [1, 1]]
    net.blobs["target"].data[...] = rng.uniform(-0.5, 0.5, (3, 2, 3))
    first = net.forward()["loss"].item()
    solver.step(100)
    assert net.forward()["loss"].item() < 0.5 * first


# -- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arrays, message", [
    (((3, 2, 4), (2, 2)), r"cont \(bottom 1\) must have shape \(T, N\) = \[3, 2\]"),
    (((3, 2, 4), (3, 3)), r"cont \(bottom 1\) must have shape \(T, N\) = \[3, 2\]"),
    (((3, 2, 4), (3, 2, 1)), r"cont \(bottom 1\)"),
    (((3,), (3, 1)), r"x \(bottom 0\) must have at least 2 axes"),
    (((0, 2, 4), (0, 2)), r"x \(bottom 0\) must have at least one time step"),
    (((3, 2, 4), (3, 2), (3, 5)), r"x_static \(bottom 2\) must have shape \(N, ...\) with N = 2"),
])
def test_bad_shapes_are_clear_errors(arrays, message):
    with pytest.raises(LayerError, match=message):
        setup_layer(recurrent_text("LSTM", 3), *[np.zeros(shape) for shape in arrays])


def test_other_errors():
    with pytest.raises(LayerError, match="num_output must be given and positive"):
        setup_layer('type: "RNN"', np.zeros((2, 1, 1)), np.zeros((2, 1)))
    with pytest.raises(LayerError, match=r"takes at least 4 bottom"):
        setup_layer(recurrent_text("LSTM", 3, expose_hidden=True), np.zeros((2, 1, 1)), np.zeros((2, 1)),
                    np.zeros((1, 1, 3)), num_top=3)
    with pytest.raises(LayerError, match=r"hidden state c_0 \(bottom 3\) must have shape"):
        setup_layer(recurrent_text("LSTM", 3, expose_hidden=True), np.zeros((2, 1, 1)), np.zeros((2, 1)),
                    np.zeros((1, 1, 3)), np.zeros((1, 2, 3)), num_top=3)
    layer, bottom, top = setup_layer(recurrent_text("LSTM", 3), np.zeros((2, 2, 1)), np.zeros((2, 2)))
    bottom[0].reshape(3, 2, 1)
    bottom[1].reshape(3, 2)
    with pytest.raises(LayerError, match="number of time steps changed.*T = 2"):
        layer.run_forward(bottom, top)
    with pytest.raises(NetError, match="'rec'"):
        Net(io.parse_text(NET.format(kind="LSTM", fill="").replace("num_output: 3", "num_output: 0"),
                          caffe_pb2.NetParameter(), "<net>"), phase=caffe_pb2.TEST)


def test_a_new_batch_size_restarts_the_state():
    rng = np.random.default_rng(21)
    layer, bottom, top = setup_layer(recurrent_text("LSTM", 3), rng.normal(size=(2, 2, 2)), np.ones((2, 2)))
    layer.run_forward(bottom, top)
    x = rng.normal(size=(2, 3, 2))
    bottom[0].reshape(x.shape)
    bottom[0].data[...] = x
    bottom[1].reshape(2, 3)
    bottom[1].data[...] = 1
    layer.run_forward(bottom, top)
    expected = lstm_reference(x, np.ones((2, 3)), params_of(layer))[0]  # from a zero state
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)


def test_refuses_in_place():
    layer = layer_from_prototxt(recurrent_text("RNN", 3))
    bottom = blobs_from_arrays(np.zeros((2, 1, 3)), np.zeros((2, 1)))
    with pytest.raises(LayerError, match="cannot run in place"):
        layer.setup(bottom, [bottom[0]])
