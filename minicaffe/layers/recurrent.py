"""RNN and LSTM, after BVLC Caffe's RecurrentLayer: the recurrence unrolled over T time steps into an inner
Net built from ordinary layers (InnerProduct, Eltwise, TanH, Scale, Slice, Concat, Reshape, Split,
LSTMUnit), so forward and backward are that net's.

Bottoms: x (T, N, ...) -- T time steps of N independent streams --, cont (T, N) -- 0 where a stream
starts a new sequence, which resets its hidden state (the state is multiplied by cont) --, optionally
x_static (N, ...) -- an input seen at every step --, and with recurrent_param.expose_hidden the initial
hidden state(s) (1, N, num_output): h_0 (RNN), h_0 and c_0 (LSTM). Tops: the outputs (T, N, num_output)
and, with expose_hidden, the final hidden state(s) h_T (and c_T). Without expose_hidden the state is
carried from one forward to the next, as in Caffe (it starts at zero; cont = 0 drops it).

The parameters are those of the inner net, in its order, with Caffe's names and shapes, so .caffemodel
files interchange: LSTM W_xc (4H, D), b_c (4H), [W_xc_static (4H, S)], W_hc (4H, H); RNN W_xh (H, D),
b_h (H), [W_xh_static (H, S)], W_hh (H, H), W_ho (H, H), b_o (H), with D, S the sizes of one step of x
and of x_static. The outer layer's blobs are the inner net's own blob objects, so weights loaded into
the layer are what the inner net computes with.

Beyond Caffe, with expose_hidden the hidden-state bottoms get gradients and the diffs of the h_T / c_T
tops flow into the net (Caffe shares only their data, so both are silently dropped there).
recurrent_param.debug_info is accepted and has no effect (minicaffe's Net has no debug output).
"""

from __future__ import annotations

import numpy as np

from ..layer import TEST, Layer, LayerError, register
from ..net import Net, NetError
from ..proto import caffe_pb2


class RecurrentLayer(Layer):
    """The unrolling machinery; a subclass names its state blobs and adds its step layers."""

    # Names of the inner net's recurrent inputs (the state before step 1) and of the copies of the
    # state after step T; the exposed bottoms and tops follow these orders.
    state_inputs: tuple[str, ...] = ()
    state_outputs: tuple[str, ...] = ()
    output = ""  # the inner blob of the outputs of all steps, top 0

    def __init__(self, param, phase: int = TEST, dtype=np.float32):
        super().__init__(param, phase, dtype)
        self.expose_hidden = param.recurrent_param.expose_hidden
        exposed = len(self.state_inputs) if self.expose_hidden else 0
        # Blob counts depend on expose_hidden: x, cont, [x_static], [states]; outputs, [final states].
        self.min_num_bottom = 2 + exposed
        self.max_num_bottom = 3 + exposed
        self.exact_num_top = 1 + exposed

    def fill_unrolled_net(self, net: caffe_pb2.NetParameter, steps: int) -> None:
        """Add the state inputs and the layers of every step to `net`, whose Input layer gives x, cont
        (and x_static when self.static_input)."""
        raise NotImplementedError

    # -- building ------------------------------------------------------------------------------
    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1  # cont is a marker, not a value to differentiate

    def layer_setup(self, bottom, top):
        param = self.param.recurrent_param
        self.num_output = param.num_output
        if self.num_output <= 0:
            self.fail("recurrent_param.num_output must be given and positive")
        exposed = len(self.state_inputs) if self.expose_hidden else 0
        self.static_input = len(bottom) > 2 + exposed
        self._check_bottoms(bottom)
        self.steps = bottom[0].shape[0]
        self._streams = None  # the N of the last reshape (the inner net is built for this one)
        self.build_streams = bottom[0].shape[1]

        net_param = caffe_pb2.NetParameter(name=f"{self.name}_unrolled", force_backward=True)
        inputs = net_param.layer.add(name="input", type="Input")
        for name, blob in zip(("x", "cont", "x_static"), bottom[:3 if self.static_input else 2]):
            inputs.top.append(name)
            inputs.input_param.shape.add().dim.extend(blob.shape)
        self.fill_unrolled_net(net_param, self.steps)
        for layer in net_param.layer:  # inner names say whose they are (and key the fillers' streams)
            layer.name = f"{self.name}_{layer.name}"
        try:
            self.net = Net(net_param, phase=self.phase, dtype=self.dtype)
        except NetError as error:
            self.fail(f"cannot build the unrolled net: {error}")
        self._adopt_params()
        # Which inner (layer, bottom) pairs read each outer bottom, to pass propagate_down on.
        names = ["x", "cont"] + (["x_static"] if self.static_input else []) + list(self.state_inputs)
        self._inputs = [self.net.blobs[name] for name in names]
        self._readers = [[(i, j) for i, bottoms in enumerate(self.net.bottom_names)
                          for j, name in enumerate(bottoms) if name == wanted] for wanted in names]
        self._state_in = [self.net.blobs[name] for name in self.state_inputs]
        self._state_out = [self.net.blobs[name] for name in self.state_outputs]

    def _adopt_params(self) -> None:
        """Make the inner net's parameters (one blob per name, in net order) this layer's blobs; blobs the
        layer already has (from the prototxt or a .caffemodel) give their values."""
        owners = [learnable.blob for learnable in self.net.learnable_params]
        if self.blobs:
            if len(self.blobs) != len(owners):
                self.fail(f"has {len(self.blobs)} parameter blobs, expected {len(owners)}")
            for i, (given, owner) in enumerate(zip(self.blobs, owners)):
                if given.shape != owner.shape:
                    self.fail(f"parameter blob {i} has shape {list(given.shape)}, "
                              f"expected {list(owner.shape)}")
                owner.data[...] = given.data
        self.blobs = owners
        # Every use of a parameter in the inner net: (inner layer, its blob index, our blob index).
        self._param_uses = [(layer, j, next(k for k, owner in enumerate(owners) if owner is blob))
                            for layer in self.net.layers for j, blob in enumerate(layer.blobs)]

    def _check_bottoms(self, bottom) -> None:
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2:
            self.fail(f"x (bottom 0) must have at least 2 axes (T time steps, N streams, ...), "
                      f"got shape {list(x.shape)}")
        if x.shape[0] < 1:
            self.fail(f"x (bottom 0) must have at least one time step, got shape {list(x.shape)}")
        if cont.shape != x.shape[:2]:
            self.fail(f"cont (bottom 1) must have shape (T, N) = {list(x.shape[:2])} to match x "
                      f"{list(x.shape)}, got {list(cont.shape)}")
        if self.static_input and (bottom[2].num_axes < 1 or bottom[2].shape[0] != x.shape[1]):
            self.fail(f"x_static (bottom 2) must have shape (N, ...) with N = {x.shape[1]} as x "
                      f"{list(x.shape)}, got {list(bottom[2].shape)}")

    # -- running -------------------------------------------------------------------------------
    def reshape(self, bottom, top):
        self._check_bottoms(bottom)
        if bottom[0].shape[0] != self.steps:
            self.fail(f"the number of time steps changed: the net is unrolled for T = {self.steps}, "
                      f"x has shape {list(bottom[0].shape)}")
        if any(t is b for t in top for b in bottom):
            self.fail("cannot run in place")
        streams = bottom[0].shape[1]
        state_shape = (1, streams, self.num_output)
        if self.expose_hidden:
            first = len(bottom) - len(self._state_in)
            for k, blob in enumerate(bottom[first:]):
                if blob.shape != state_shape:
                    self.fail(f"hidden state {self.state_inputs[k]} (bottom {first + k}) must have shape "
                              f"(1, N, num_output) = {list(state_shape)}, got {list(blob.shape)}")
        given = list(zip(self._inputs, bottom))  # x, cont, [x_static], [exposed states]
        for inner, outer in given:
            inner.reshape_like(outer)
        for blob in self._state_in:
            blob.reshape(state_shape)
        try:
            self.net.reshape()
        except LayerError as error:
            self.fail(f"in the unrolled net: {error}")
        for inner, outer in given:
            inner.share_data(outer)
            if inner is not self._inputs[1]:  # cont's diff is never written
                inner.share_diff(outer)
        output = self.net.blobs[self.output]
        for outer, inner in zip(top, [output] + (self._state_out if self.expose_hidden else [])):
            outer.reshape_like(inner)
            outer.share_data(inner)
            outer.share_diff(inner)
        if streams != self._streams:
            # A new N: the carried state starts again from zero (Caffe's Reset).
            for blob in self._state_out:
                blob.mutable_data()[...] = 0
            self._streams = streams

    def _use_own_params(self) -> None:
        """Point the inner layers at this layer's blobs again: the outer Net may have replaced one by a
        blob shared with another layer (ParamSpec name) after setup."""
        for layer, j, k in self._param_uses:
            layer.blobs[j] = self.blobs[k]

    def forward(self, bottom, top):
        self._use_own_params()
        if not self.expose_hidden:  # the state goes on from where the last forward left it
            for state_in, state_out in zip(self._state_in, self._state_out):
                state_in.mutable_data()[...] = state_out.get_data()
        try:
            self.net.forward_range(0, len(self.net.layers) - 1)
        except NetError as error:
            self.fail(f"in the unrolled net: {error}")

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            self.fail("cannot backpropagate to the sequence continuation indicators (bottom 1, cont)")
        self._use_own_params()
        for layer, j, k in self._param_uses:
            layer.param_propagate_down[j] = self.param_propagate_down[k]
        down = list(propagate_down) + [False] * (len(self._readers) - len(propagate_down))
        for readers, wanted in zip(self._readers, down):
            for i, j in readers:
                self.net.bottom_need_backward[i][j] = wanted
        if not self.expose_hidden:  # nothing beyond this batch asks for the final state's gradient
            for blob in self._state_out:
                blob.mutable_diff()[...] = 0
        self.net.backward_range(len(self.net.layers) - 1, 0)


def _layer(net: caffe_pb2.NetParameter, name: str, kind: str, bottoms, tops, params=(),
           **fields) -> caffe_pb2.LayerParameter:
    """Append a layer to `net`: `params` are the names of its parameter blobs; `fields` set its
    *_param messages (copied) or propagate_down."""
    layer = net.layer.add(name=name, type=kind)
    layer.bottom.extend(bottoms)
    layer.top.extend(tops)
    for param_name in params:
        layer.param.add(name=param_name)
    for field, value in fields.items():
        if field == "propagate_down":
            layer.propagate_down.extend(value)
        else:
            getattr(layer, field).CopyFrom(value)
    return layer


class _UnrolledNetBuilder:
    """The layers that RNN and LSTM share: the per-step slices of cont and of the input transform, the
    gating of the state by cont, and the concatenation of the outputs."""

    def __init__(self, layer: RecurrentLayer, net: caffe_pb2.NetParameter, steps: int, step_inputs: int):
        """`step_inputs`: the width of what each step adds up (4H LSTM gate inputs, H for the RNN)."""
        self.layer, self.net, self.steps = layer, net, steps
        param = layer.param.recurrent_param
        self.weight_filler, self.bias_filler = param.weight_filler, param.bias_filler
        self.step_inputs = step_inputs

    def inner_product(self, num_output: int, axis: int, bias: bool) -> caffe_pb2.InnerProductParameter:
        param = caffe_pb2.InnerProductParameter(num_output=num_output, axis=axis, bias_term=bias,
                                                weight_filler=self.weight_filler)
        if bias:
            param.bias_filler.CopyFrom(self.bias_filler)
        return param

    def begin(self, weight: str, bias: str, static_weight: str) -> list[str]:
        """The state inputs (h_0, ...), cont sliced by step, and the input transform weight x + bias of all
        steps at once, sliced by step (plus the static input's transform, the same at every step).
        Returns the names of the blobs that step t adds up, with "{t}" for the step."""
        steps, net = self.steps, self.net
        state = net.layer.add(name="state_input", type="Input", top=self.layer.state_inputs)
        state.input_param.shape.add(dim=[1, self.layer.build_streams, self.layer.num_output])
        _layer(net, "cont_slice", "Slice", ["cont"], [f"cont_{t}" for t in range(1, steps + 1)],
               slice_param=caffe_pb2.SliceParameter(axis=0))
        _layer(net, "x_transform", "InnerProduct", ["x"], [f"{weight}_x"], [weight, bias],
               inner_product_param=self.inner_product(self.step_inputs, 2, True))
        added = [f"{weight}_x_{{t}}"]
        if self.layer.static_input:
            _layer(net, f"{weight}_x_static", "InnerProduct", ["x_static"], [f"{weight}_x_static_preshape"],
                   [static_weight], inner_product_param=self.inner_product(self.step_inputs, 1, False))
            shape = caffe_pb2.BlobShape(dim=[1, -1, self.step_inputs])  # one step of N streams
            _layer(net, f"{weight}_x_static_reshape", "Reshape", [f"{weight}_x_static_preshape"],
                   [f"{weight}_x_static"], reshape_param=caffe_pb2.ReshapeParameter(shape=shape))
            added.append(f"{weight}_x_static")
        _layer(net, f"{weight}_x_slice", "Slice", [f"{weight}_x"],
               [f"{weight}_x_{t}" for t in range(1, steps + 1)], slice_param=caffe_pb2.SliceParameter(axis=0))
        return added

    def conted_state(self, t: int) -> str:
        """h_{t-1} * cont_t: the state that step t sees (zero where a new sequence starts)."""
        _layer(self.net, f"h_conted_{t - 1}", "Scale", [f"h_{t - 1}", f"cont_{t}"], [f"h_conted_{t - 1}"],
               scale_param=caffe_pb2.ScaleParameter(axis=0), propagate_down=[True, False])
        return f"h_conted_{t - 1}"

    def finish(self, per_step_output: str, output: str) -> None:
        """The exposed copy of h_T, and the outputs of all steps concatenated along time."""
        _layer(self.net, "h_T_copy", "Split", [f"h_{self.steps}"], ["h_T"])
        _layer(self.net, f"{output}_concat", "Concat", [per_step_output.format(t=t) for t in
                                                        range(1, self.steps + 1)], [output],
               concat_param=caffe_pb2.ConcatParameter(axis=0))


@register("LSTM")
class LSTMLayer(RecurrentLayer):
    """Long short-term memory, Caffe's gate order i, f, o, g (see LSTMUnit)."""

    state_inputs = ("h_0", "c_0")
    state_outputs = ("h_T", "c_T")
    output = "h"

    def fill_unrolled_net(self, net, steps):
        hidden = self.num_output
        build = _UnrolledNetBuilder(self, net, steps, 4 * hidden)
        added = build.begin("W_xc", "b_c", "W_xc_static")
        for t in range(1, steps + 1):
            conted = build.conted_state(t)
            _layer(net, f"transform_{t}", "InnerProduct", [conted], [f"W_hc_h_{t - 1}"], ["W_hc"],
                   inner_product_param=build.inner_product(4 * hidden, 2, False))
            _layer(net, f"gate_input_{t}", "Eltwise", [f"W_hc_h_{t - 1}"] + [a.format(t=t) for a in added],
                   [f"gate_input_{t}"])  # Eltwise's default operation: SUM
            _layer(net, f"unit_{t}", "LSTMUnit", [f"c_{t - 1}", f"gate_input_{t}", f"cont_{t}"],
                   [f"c_{t}", f"h_{t}"], propagate_down=[True, True, False])
        _layer(net, "c_T_copy", "Split", [f"c_{steps}"], ["c_T"])
        build.finish("h_{t}", "h")


@register("RNN")
class RNNLayer(RecurrentLayer):
    """Elman network: h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h), o_t = tanh(W_ho h_t + b_o)."""

    state_inputs = ("h_0",)
    state_outputs = ("h_T",)
    output = "o"

    def fill_unrolled_net(self, net, steps):
        hidden = self.num_output
        build = _UnrolledNetBuilder(self, net, steps, hidden)
        added = build.begin("W_xh", "b_h", "W_xh_static")
        for t in range(1, steps + 1):
            conted = build.conted_state(t)
            _layer(net, f"W_hh_h_{t - 1}", "InnerProduct", [conted], [f"W_hh_h_{t - 1}"], ["W_hh"],
                   inner_product_param=build.inner_product(hidden, 2, False))
            _layer(net, f"h_input_sum_{t}", "Eltwise", [f"W_hh_h_{t - 1}"] + [a.format(t=t) for a in added],
                   [f"h_neuron_input_{t}"])
            _layer(net, f"h_neuron_{t}", "TanH", [f"h_neuron_input_{t}"], [f"h_{t}"])
            _layer(net, f"W_ho_h_{t}", "InnerProduct", [f"h_{t}"], [f"W_ho_h_{t}"], ["W_ho", "b_o"],
                   inner_product_param=build.inner_product(hidden, 2, True))
            _layer(net, f"o_neuron_{t}", "TanH", [f"W_ho_h_{t}"], [f"o_{t}"])
        build.finish("o_{t}", "o")
