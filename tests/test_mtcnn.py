"""Real Caffe models: the MTCNN cascade (det1-3) loads with its weights and runs.

The reference forward here is an independent numpy interpreter of the same NetParameter (plain
numpy convolution, pooling with Caffe's ceil rounding, PReLU, ...), fed the weights read straight from
the .caffemodel with protobuf; our Net must agree with it. Skipped without the shared data
($MINICAFFE_SHARED/models/mtcnn, see conftest.shared_data).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import minicaffe
from minicaffe import io
from minicaffe.proto import caffe_pb2


def stored_blobs(caffemodel) -> dict[str, list[np.ndarray]]:
    """Layer name -> its blobs, read with protobuf alone."""
    net = caffe_pb2.NetParameter.FromString(caffemodel.read_bytes())
    return {layer.name: [np.asarray(b.data, np.float64).reshape(tuple(b.shape.dim)) for b in layer.blobs]
            for layer in net.layer if layer.blobs}


# -- an independent reference interpreter (numpy only) ---------------------------------------------

def ref_conv(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    k = w.shape[2]
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, w.shape[0], oh, ow))
    for i in range(k):
        for j in range(k):
            patch = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + b.reshape(1, -1, 1, 1)


def ref_max_pool(x, k, stride):
    n, c, h, w = x.shape
    oh = math.ceil((h - k) / stride) + 1
    ow = math.ceil((w - k) / stride) + 1
    out = np.full((n, c, oh, ow), -np.inf)
    for i in range(oh):
        for j in range(ow):
            window = x[:, :, i * stride:min(i * stride + k, h), j * stride:min(j * stride + k, w)]
            out[:, :, i, j] = window.max(axis=(2, 3))
    return out


def ref_prelu(x, slopes):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return np.where(x > 0, x, x * slopes.reshape(shape))


def ref_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference_forward(net_param, weights, data) -> dict[str, np.ndarray]:
    blobs = {"data": data}
    for layer in net_param.layer:
        if layer.type == "Input":
            continue
        x = blobs[layer.bottom[0]]
        params = weights.get(layer.name, [])
        if layer.type == "Convolution":
            p = layer.convolution_param
            y = ref_conv(x, params[0], params[1], p.stride[0] if p.stride else 1, p.pad[0] if p.pad else 0)
        elif layer.type == "PReLU":
            y = ref_prelu(x, params[0])
        elif layer.type == "Pooling":
            p = layer.pooling_param
            assert p.pool == caffe_pb2.PoolingParameter.MAX and not p.pad
            y = ref_max_pool(x, p.kernel_size, p.stride)
        elif layer.type == "InnerProduct":
            y = x.reshape(x.shape[0], -1) @ params[0].T + params[1]
        elif layer.type == "Dropout":
            y = x  # TEST phase
        elif layer.type == "Softmax":
            y = ref_softmax(x, layer.softmax_param.axis)
        else:
            raise AssertionError(f"reference has no {layer.type}")
        blobs[layer.top[0]] = y
    return blobs


# -- tests -----------------------------------------------------------------------------------------

NETS = {"det1": (1, 3, 12, 12), "det2": (1, 3, 24, 24), "det3": (1, 3, 48, 48)}


def normalised_input(shape, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape)
    return (pixels - 127.5) * 0.0078125


@pytest.mark.parametrize("name", sorted(NETS))
def test_mtcnn_loads_and_matches_reference(mtcnn_dir, name):
    net = minicaffe.Net(str(mtcnn_dir / f"{name}.prototxt"), str(mtcnn_dir / f"{name}.caffemodel"),
                        minicaffe.TEST)
    assert net.blobs["data"].shape == NETS[name]
    data = normalised_input((2,) + NETS[name][1:])
    out = net.forward(data=data)
    weights = stored_blobs(mtcnn_dir / f"{name}.caffemodel")
    expected = reference_forward(io.read_net_param(mtcnn_dir / f"{name}.prototxt"), weights, data)
    assert set(out) == set(net.outputs) and "prob1" in out
    for top in out:
        np.testing.assert_allclose(out[top], expected[top].reshape(out[top].shape), rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(out["prob1"].sum(axis=1), 1.0, rtol=1e-5)


def test_det1_is_fully_convolutional_with_ceil_pooling(mtcnn_dir):
    net = minicaffe.Net(str(mtcnn_dir / "det1.prototxt"), str(mtcnn_dir / "det1.caffemodel"),
                        minicaffe.TEST)
    data = normalised_input((1, 3, 47, 61), seed=1)
    out = net.forward(data=data)
    # conv1 3x3 -> 45x59; pool 2x2/2 with ceil -> 23x30 (floor would give 22x29); conv2, conv3 -> 19x26.
    assert net.blobs["pool1"].shape == (1, 10, 23, 30)
    assert out["prob1"].shape == (1, 2, 19, 26) and out["conv4-2"].shape == (1, 4, 19, 26)
    expected = reference_forward(io.read_net_param(mtcnn_dir / "det1.prototxt"),
                                 stored_blobs(mtcnn_dir / "det1.caffemodel"), data)
    np.testing.assert_allclose(out["prob1"], expected["prob1"], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name, counts", [("det1", [10, 16, 32]), ("det2", [28, 48, 64, 128]),
                                          ("det3", [32, 64, 64, 128, 256])])
def test_prelu_slopes_read_through_params_equal_file(mtcnn_dir, name, counts):
    net = minicaffe.Net(str(mtcnn_dir / f"{name}.prototxt"), str(mtcnn_dir / f"{name}.caffemodel"),
                        minicaffe.TEST)
    stored = stored_blobs(mtcnn_dir / f"{name}.caffemodel")
    prelus = [n for n, layer in zip(net._layer_names, net.layers) if layer.type == "PReLU"]
    assert [net.params[n][0].count for n in prelus] == counts
    for layer_name in prelus:
        stored_slopes = stored[layer_name][0].astype(np.float32)
        np.testing.assert_array_equal(net.params[layer_name][0].data, stored_slopes)
    assert any((net.params[n][0].data < 0).any() for n in prelus)  # learned slopes can be negative


def test_caffemodel_extra_training_layers_are_skipped(mtcnn_dir):
    trained = caffe_pb2.NetParameter.FromString((mtcnn_dir / "det1.caffemodel").read_bytes())
    file_types = {layer.type for layer in trained.layer}
    assert {"HDF5Data", "Slice", "SoftmaxWithLoss"} <= file_types
    net = minicaffe.Net(str(mtcnn_dir / "det1.prototxt"), str(mtcnn_dir / "det1.caffemodel"),
                        minicaffe.TEST)
    assert not {"HDF5Data", "Slice", "SoftmaxWithLoss"} & {layer.type for layer in net.layers}


def test_save_and_reload_round_trip(mtcnn_dir, tmp_path):
    net = minicaffe.Net(str(mtcnn_dir / "det2.prototxt"), str(mtcnn_dir / "det2.caffemodel"),
                        minicaffe.TEST)
    net.save(str(tmp_path / "det2_copy.caffemodel"))
    again = minicaffe.Net(str(mtcnn_dir / "det2.prototxt"), str(tmp_path / "det2_copy.caffemodel"),
                          minicaffe.TEST)
    for name, blobs in net.params.items():
        for a, b in zip(blobs, again.params[name]):
            np.testing.assert_array_equal(a.data, b.data)


def test_det1_on_the_real_test_image(mtcnn_dir):
    from PIL import Image as image  # Pillow: matplotlib's dependency, so in the [test] extra
    pixels = np.asarray(image.open(mtcnn_dir / "test1.jpg").convert("RGB"), np.float64)
    patch = pixels[:120, :160]
    # MTCNN's MATLAB code fed images transposed (W and H swapped) and as BGR? It used RGB -> keep RGB.
    data = ((patch - 127.5) * 0.0078125).transpose(2, 1, 0)[None]
    net = minicaffe.Net(str(mtcnn_dir / "det1.prototxt"), str(mtcnn_dir / "det1.caffemodel"),
                        minicaffe.TEST)
    out = net.forward(data=data)
    expected = reference_forward(io.read_net_param(mtcnn_dir / "det1.prototxt"),
                                 stored_blobs(mtcnn_dir / "det1.caffemodel"), data)
    np.testing.assert_allclose(out["prob1"], expected["prob1"], rtol=2e-4, atol=2e-5)
    assert out["prob1"].shape[2:] == expected["prob1"].shape[2:]
