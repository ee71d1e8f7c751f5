"""The Layer machinery a layer writer uses: register, buffer, keeps / kept_input / kept_output, inner
layers run through run_forward / run_backward; and KernelFile's one object per file, Blob.to_proto and
Blob.set_data on the (fake) GPU."""

from __future__ import annotations

import numpy as np
import pytest
from test_gpu_paths import fake_cupy, on_device  # noqa: F401  (fake_cupy: the fixture)

import minicaffe
from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.kernel import KernelFile
from minicaffe.layer import LAYERS, Layer, LayerError, register
from minicaffe.layers.activation import SigmoidLayer
from minicaffe.layers.relu import ReLULayer
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.testing import blobs_from_arrays, layer_from_prototxt

# -- register ---------------------------------------------------------------------------------------

def test_register_refuses_a_duplicate_type():
    with pytest.raises(LayerError, match="'ReLU' is already registered by minicaffe.layers.relu.ReLULayer"):
        @register("ReLU")
        class MyReLU(Layer):
            pass
    assert LAYERS["ReLU"] is ReLULayer
    register("ReLU")(ReLULayer)  # the same class again is no duplicate


def test_register_override_replaces_a_type():
    try:
        @register("ReLU", override=True)
        class MyReLU(ReLULayer):
            pass

        assert LAYERS["ReLU"] is MyReLU and MyReLU.type == "ReLU"
        assert type(layer_from_prototxt('type: "ReLU"')) is MyReLU
    finally:
        LAYERS["ReLU"] = ReLULayer
    assert type(layer_from_prototxt('type: "ReLU"')) is ReLULayer


# -- buffer -----------------------------------------------------------------------------------------

def test_buffer_is_reused_by_name_shape_and_dtype():
    layer = layer_from_prototxt('type: "ReLU"')
    a = layer.buffer("a", (2, 3))
    assert a.dtype == np.float64 and a.shape == (2, 3)  # the layer's dtype by default
    assert layer.buffer("a", (2, 3)) is a and layer.buffers["a"] is a
    assert layer.buffer("b", (2, 3)) is not a
    assert layer.buffer("a", (2, 3), np.int32).dtype == np.int32
    assert layer.buffer("a", (3, 3)).shape == (3, 3)


# -- keeps ------------------------------------------------------------------------------------------

def test_keeps_input_copies_x_before_forward_only_in_place():
    x = np.array([[-1.0, 2.0, -3.0]])
    # Power 2 keeps a full copy (ReLU, AbsVal and PReLU may keep less: tests/test_lean_in_place.py).
    layer = layer_from_prototxt('type: "Power" power_param { power: 2 }')
    bottom = blobs_from_arrays(x)
    layer.setup(bottom, bottom)
    layer.run_forward(bottom, bottom)
    np.testing.assert_array_equal(bottom[0].data, [[1, 4, 9]])
    np.testing.assert_array_equal(layer.kept_input(bottom), x)  # x, though the blob now holds y
    assert layer.kept_input(bottom) is layer.buffers["kept"]
    top = [Blob((), np.float64)]
    bottom[0].data[...] = x
    layer.run_forward(bottom, top)
    assert layer.kept_input(bottom) is not layer.buffers["kept"]  # not in place: read from the blob
    np.testing.assert_array_equal(layer.kept_input(bottom), x)


def test_keeps_output_survives_a_later_in_place_layer_also_when_not_in_place():
    """Sigmoid (separate top) followed by a sign-flipping Power in place on that top."""
    def gradient(in_place_after: bool):
        out = "a" if in_place_after else "b"
        net = Net(io.parse_text(
            'force_backward: true\n'
            'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
            'layer { name: "sig" type: "Sigmoid" bottom: "x" top: "a" }\n'
            f'layer {{ name: "flip" type: "Power" bottom: "a" top: "{out}" power_param {{ scale: -2 }} }}\n',
            caffe_pb2.NetParameter()), minicaffe.TRAIN, dtype=np.float64)
        net.forward(x=np.random.default_rng(0).normal(size=(2, 3)))
        return np.array(net.backward(**{out: np.ones((2, 3))})["x"])

    np.testing.assert_allclose(gradient(True), gradient(False), rtol=1e-12)
    assert SigmoidLayer.keeps == "output"


def test_kept_accessors_check_the_declaration():
    layer = layer_from_prototxt('type: "ReLU"')
    with pytest.raises(AssertionError, match="keeps = 'output'"):
        layer.kept_output([Blob()])


# -- inner layers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, inner, bottoms", [
    ('type: "SoftmaxWithLoss"', "softmax", [np.ones((2, 3)), np.zeros(2)]),
    ('type: "Scale" scale_param { bias_term: true }', "bias_layer", [np.ones((2, 3))]),
])
def test_composite_layers_run_their_inner_layer_through_run_forward(monkeypatch, text, inner, bottoms):
    layer = layer_from_prototxt(text)
    bottom, top = blobs_from_arrays(*bottoms), [Blob((), np.float64)]
    layer.setup(bottom, top)
    calls = []

    def recorded(method):
        original = getattr(getattr(layer, inner), method)

        def run(*args):
            calls.append(method)
            return original(*args)
        return run

    for method in ("run_forward", "run_backward", "forward", "backward", "reshape"):
        monkeypatch.setattr(getattr(layer, inner), method, recorded(method))
    layer.run_forward(bottom, top)
    layer.run_backward(top, [True] + [False] * (len(bottom) - 1), bottom)
    # The outer reshape reshapes the inner layer too (as in Caffe), then the outer forward runs it.
    # Softmax's gradient is folded into the loss kernel, so SoftmaxWithLoss runs no inner backward.
    forward = ["reshape", "run_forward", "reshape", "forward"]
    assert calls == forward if inner == "softmax" else forward + ["run_backward", "backward"]


# -- kernels and blobs -------------------------------------------------------------------------------

def test_kernel_file_is_one_object_per_file():
    from minicaffe.layers import absval, activation, euclidean_loss, softmax_loss

    assert KernelFile("activation.cu") is KernelFile("activation.cu") is activation.KERNELS is absval.KERNELS
    assert euclidean_loss.KERNELS is softmax_loss.KERNELS
    assert KernelFile("relu.cu") is not KernelFile("activation.cu")


def test_to_proto_leaves_the_device_copy_newest(fake_cupy):  # noqa: F811
    minicaffe.set_mode_gpu()
    blob = Blob((2, 3), np.float32)
    blob.mutable_data()[...] = 2.0  # written on the device
    blob.mutable_diff()[...] = 3.0
    proto = blob.to_proto(write_diff=True)
    assert list(proto.data) == [2.0] * 6 and list(proto.diff) == [3.0] * 6
    # Both copies are valid now; `blob.data` would have marked the host copy newest ("host"), and the
    # next device read would upload it again.
    assert blob._data._head == blob._diff._head == "synced"
    blob.get_data(), blob.get_diff()
    assert blob._data._head == blob._diff._head == "synced"


def test_set_data_writes_the_current_mode(fake_cupy):  # noqa: F811
    blob = Blob((2, 2), np.float32)
    blob.set_data(np.arange(4.0).reshape(2, 2))  # CPU mode: a host write
    assert blob._data._head == "host"
    minicaffe.set_mode_gpu()
    blob.mutable_data()[...] = 0  # the device copy is now the newest
    blob.set_data(np.ones((2, 2)))
    assert blob._data._head == "device" and on_device(blob.get_data())
    np.testing.assert_array_equal(blob.data, 1.0)
