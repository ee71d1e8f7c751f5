"""pycaffe scripts run on minicaffe with only the import line changed.

The test bodies are written as a pycaffe user writes them; the numbers are checked against numpy
references written here."""

from __future__ import annotations

import numpy as np
import pytest

import minicaffe as caffe  # the only line a pycaffe script changes

DEPLOY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 2 kernel_size: 3
                            weight_filler { type: "gaussian" std: 0.5 }
                            bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }
"""

TRAIN_NET = """
name: "tiny_train"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prelu1" type: "PReLU" bottom: "ip1" top: "ip1" }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "target" top: "loss" }
"""


def reference_forward(x, w1, b1, slopes, w2, b2):
    """The DEPLOY net in numpy: valid 3x3 convolution, per-channel PReLU, inner product, softmax."""
    n, _, h, w = x.shape
    conv = np.zeros((n, w1.shape[0], h - 2, w - 2))
    for i in range(h - 2):
        for j in range(w - 2):
            patch = x[:, :, i:i + 3, j:j + 3]
            conv[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w1) + b1
    act = np.where(conv > 0, conv, slopes[None, :, None, None] * conv)
    logits = act.reshape(n, -1) @ w2.T + b2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return conv, act, e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def model(tmp_path):
    """A prototxt and a .caffemodel, as a pycaffe user has them."""
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    caffe.set_random_seed(3)
    net = caffe.Net(str(deploy), caffe.TEST)
    net.params["prelu1"][0].data[...] = [0.1, -0.3]
    weights = tmp_path / "tiny.caffemodel"
    net.save(str(weights))
    return str(deploy), str(weights)


def test_pycaffe_inference_script(model):
    model_def, model_weights = model
    caffe.set_mode_cpu()
    net = caffe.Net(model_def, model_weights, caffe.TEST)

    # Inspect the net as pycaffe users do.
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert list(net._layer_names) == ["data", "conv1", "prelu1", "ip1", "prob"]
    types = [layer.type for layer in net.layers]
    assert types == ["Input", "Convolution", "PReLU", "InnerProduct", "Softmax"]
    assert [(k, v.data.shape) for k, v in net.blobs.items()] == [
        ("data", (2, 3, 4, 4)), ("conv1", (2, 2, 2, 2)), ("ip1", (2, 3)), ("prob", (2, 3))]
    assert [(k, [p.data.shape for p in v]) for k, v in net.params.items()] == [
        ("conv1", [(2, 3, 3, 3), (2,)]), ("prelu1", [(2,)]), ("ip1", [(3, 8), (3,)])]
    alphas = net.params["prelu1"][0].data
    np.testing.assert_allclose(alphas, [0.1, -0.3], rtol=1e-6)
    assert net.layer_dict["prelu1"].type == "PReLU"
    assert len(net.layer_dict["ip1"].blobs) == 2
    assert net.top_names["conv1"] == ["conv1"] and net.bottom_names["ip1"] == ["conv1"]
    blob = net.blobs["data"]
    assert (blob.num, blob.channels, blob.height, blob.width, blob.count) == (2, 3, 4, 4, 96)

    # Set the data, run forward, read the output.
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    net.blobs["data"].data[...] = x
    output = net.forward()
    w1, b1 = net.params["conv1"][0].data, net.params["conv1"][1].data
    w2, b2 = net.params["ip1"][0].data, net.params["ip1"][1].data
    conv, act, prob = reference_forward(x.astype(np.float64), w1, b1, alphas, w2, b2)
    np.testing.assert_allclose(output["prob"], prob, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(net.blobs["conv1"].data, act, rtol=1e-4, atol=1e-5)
    assert output["prob"].argmax(axis=1).tolist() == prob.argmax(axis=1).tolist()

    # Writable parameters: new slopes change the output.
    net.params["prelu1"][0].data[...] = 1.0
    linear = net.forward(data=x)["prob"]
    _, _, prob_linear = reference_forward(x.astype(np.float64), w1, b1, np.ones(2), w2, b2)
    np.testing.assert_allclose(linear, prob_linear, rtol=1e-4, atol=1e-6)

    # Partial forward: start/end by layer name, extra blobs.
    net.blobs["data"].data[...] = x
    partial = net.forward(end="conv1")
    assert list(partial) == ["conv1"]
    np.testing.assert_allclose(partial["conv1"], conv, rtol=1e-4, atol=1e-5)
    rest = net.forward(start="prelu1", blobs=["ip1"])
    assert set(rest) == {"prob", "ip1"}

    # Reshape the input to a new batch size.
    net.blobs["data"].reshape(5, 3, 4, 4)
    net.reshape()
    assert net.blobs["prob"].data.shape == (5, 3)


def test_pycaffe_backward_script(model, tmp_path):
    model_def, model_weights = model
    # A deploy net has no loss: as in pycaffe, gradients need force_backward (e.g. for saliency maps).
    with_backward = tmp_path / "deploy_fb.prototxt"
    with_backward.write_text("force_backward: true\n" + open(model_def).read())
    net = caffe.Net(str(with_backward), caffe.TEST, weights=model_weights)
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4))
    net.forward(data=x.astype(np.float32))
    g = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    for blobs in net.params.values():
        for b in blobs:
            b.diff[...] = 0
    diffs = net.backward(prob=g)

    w1, b1 = net.params["conv1"][0].data, net.params["conv1"][1].data
    slopes = net.params["prelu1"][0].data
    w2 = net.params["ip1"][0].data.astype(np.float64)
    conv, act, prob = reference_forward(x, w1, b1, slopes, w2, net.params["ip1"][1].data)
    dlogits = prob * (g - (g * prob).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(net.params["ip1"][0].diff, dlogits.T @ act.reshape(2, -1), rtol=1e-3,
                               atol=1e-6)
    np.testing.assert_allclose(net.params["ip1"][1].diff, dlogits.sum(axis=0), rtol=1e-3, atol=1e-6)
    dact = (dlogits @ w2).reshape(act.shape)
    dconv = np.where(conv > 0, dact, slopes[None, :, None, None] * dact)
    np.testing.assert_allclose(net.params["prelu1"][0].diff,
                               (np.where(conv > 0, 0, conv) * dact).sum(axis=(0, 2, 3)), rtol=1e-3, atol=1e-6)
    dx = np.zeros_like(x)
    for i in range(2):
        for j in range(2):
            dx[:, :, i:i + 3, j:j + 3] += np.einsum("no,ochw->nchw", dconv[:, :, i, j], w1)
    assert list(diffs) == ["data"]
    np.testing.assert_allclose(diffs["data"], dx, rtol=1e-3, atol=1e-6)


def test_forward_all_batches_and_pads(model):
    model_def, model_weights = model
    net = caffe.Net(model_def, model_weights, caffe.TEST)
    x = np.random.default_rng(2).standard_normal((5, 3, 4, 4)).astype(np.float32)
    everything = net.forward_all(data=x)["prob"]
    assert everything.shape == (5, 3)
    one_by_one = [net.forward(data=x[i:i + 2])["prob"].copy() for i in range(0, 4, 2)]
    np.testing.assert_allclose(everything[:4], np.concatenate(one_by_one), rtol=1e-5)
    net.blobs["data"].reshape(2, 3, 4, 4)
    last = net.forward(data=np.concatenate([x[4:], np.zeros_like(x[:1])]))["prob"][0]
    np.testing.assert_allclose(everything[4], last, rtol=1e-5)


def test_save_and_copy_from(model, tmp_path):
    model_def, model_weights = model
    caffe.set_random_seed(99)  # other fillers than the saved model's
    net = caffe.Net(model_def, caffe.TEST)
    fresh = net.params["conv1"][0].data.copy()
    net.copy_from(model_weights)
    trained = caffe.Net(model_def, model_weights, caffe.TEST)
    np.testing.assert_array_equal(net.params["conv1"][0].data, trained.params["conv1"][0].data)
    assert not np.array_equal(fresh, net.params["conv1"][0].data)
    net.params["ip1"][1].data[...] = 7
    path = str(tmp_path / "changed.caffemodel")
    net.save(path)
    again = caffe.Net(model_def, path, caffe.TEST)
    np.testing.assert_array_equal(again.params["ip1"][1].data, 7)


@pytest.fixture
def solver_file(tmp_path):
    (tmp_path / "train.prototxt").write_text(TRAIN_NET)
    (tmp_path / "solver.prototxt").write_text(f"""
        net: "{tmp_path / 'train.prototxt'}"
        base_lr: 0.1 lr_policy: "fixed" momentum: 0 weight_decay: 0
        max_iter: 20 display: 0 snapshot_prefix: "{tmp_path / 'snap'}"
        solver_mode: CPU random_seed: 5
    """)
    return str(tmp_path / "solver.prototxt")


def test_pycaffe_solver_script(solver_file, tmp_path):
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver(solver_file)
    x = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    t = np.random.default_rng(5).standard_normal((4, 2)).astype(np.float32)
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["target"].data[...] = t

    # Gradients by hand from one forward/backward, then one SGD step: w <- w - lr * dw.
    solver.net.forward()
    for blobs in solver.net.params.values():
        for b in blobs:
            b.diff[...] = 0
    solver.net.backward()
    before = {k: [b.data.copy() for b in v] for k, v in solver.net.params.items()}
    grads = {k: [b.diff.copy() for b in v] for k, v in solver.net.params.items()}
    solver.step(1)
    assert solver.iter == 1
    for name in before:
        for old, grad, blob in zip(before[name], grads[name], solver.net.params[name]):
            np.testing.assert_allclose(blob.data, old - 0.1 * grad, rtol=1e-5, atol=1e-7)

    # Independent check of the first gradient: EuclideanLoss of PReLU(x W^T + b).
    w, b = before["ip1"]
    y = x @ w.T + b
    a = before["prelu1"][0]
    out = np.where(y > 0, y, a * y)
    dout = (out - t) / x.shape[0]
    dy = np.where(y > 0, dout, a * dout)
    np.testing.assert_allclose(grads["ip1"][0], dy.T @ x, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["prelu1"][0], (np.where(y > 0, 0, y) * dout).sum(axis=0),
                               rtol=1e-4, atol=1e-6)

    losses = []
    for _ in range(10):
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    assert losses[-1] < losses[0]
    model_file, state_file = solver.snapshot()
    assert solver.test_nets == []

    # Resume in a new solver from the snapshot.
    again = caffe.get_solver(solver_file)
    again.restore(state_file)
    assert again.iter == 11
    np.testing.assert_array_equal(again.net.params["prelu1"][0].data, solver.net.params["prelu1"][0].data)
    trained = caffe.Net(str(tmp_path / "train.prototxt"), model_file, caffe.TEST)
    np.testing.assert_array_equal(trained.params["ip1"][0].data, solver.net.params["ip1"][0].data)


def test_solver_callbacks_as_pycaffe(solver_file):
    solver = caffe.get_solver(solver_file)
    seen = []
    solver.add_callback(lambda: seen.append(("start", solver.iter)),
                        lambda: seen.append(("gradients", solver.iter)))
    solver.step(2)
    assert seen == [("start", 0), ("gradients", 0), ("start", 1), ("gradients", 1)]


def test_netspec_layers_and_params_are_exposed():
    from minicaffe import layers as L
    from minicaffe import params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    n.pool = L.Pooling(n.data, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    net = caffe.Net(n.to_proto(), caffe.TEST)
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(net.forward(data=x)["pool"], [[[[5, 7], [13, 15]]]])
    caffe.set_random_seed(12)
    assert callable(caffe.set_mode_gpu) and callable(caffe.set_device)


# -- caffe.io ---------------------------------------------------------------------------------------

def test_classification_script_with_transformer(model, tmp_path):
    from PIL import Image as pil  # Pillow: matplotlib's dependency, so in the [test] extra
    rgb = (np.arange(4 * 4 * 3).reshape(4, 4, 3) * 5).astype(np.uint8)
    pil.fromarray(rgb).save(tmp_path / "cat.png")

    model_def, model_weights = model
    net = caffe.Net(model_def, model_weights, caffe.TEST)
    mu = np.array([104.0, 117.0, 123.0])
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", mu)
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    image = caffe.io.load_image(str(tmp_path / "cat.png"))
    assert image.shape == (4, 4, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image, rgb / 255.0, rtol=1e-6)
    transformed = transformer.preprocess("data", image)
    expected = rgb.astype(np.float64).transpose(2, 0, 1)[::-1] - mu[:, None, None]  # BGR, mean removed
    np.testing.assert_allclose(transformed, expected, rtol=1e-5, atol=1e-4)
    net.blobs["data"].data[...] = transformed
    output = net.forward()
    assert output["prob"].shape == (2, 3)
    np.testing.assert_allclose(output["prob"].sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(transformer.deprocess("data", transformed), image, atol=1e-5)
    gray = caffe.io.load_image(str(tmp_path / "cat.png"), color=False)
    assert gray.shape == (4, 4, 1)
    with pytest.raises(ValueError, match="not one of the net inputs"):
        transformer.preprocess("image", image)
    with pytest.raises(ValueError, match="Mean channels"):
        transformer.set_mean("data", np.zeros(4))


def test_io_resize_oversample_and_blobs():
    im = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    # Halving with pixel-centre alignment averages each 2x2 block.
    np.testing.assert_allclose(caffe.io.resize_image(im, (2, 2))[:, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    np.testing.assert_array_equal(caffe.io.resize_image(im, (2, 2), interp_order=0)[:, :, 0],
                                  [[5, 7], [13, 15]])
    doubled = caffe.io.resize_image(im, (8, 8))
    assert doubled.shape == (8, 8, 1) and doubled[0, 0, 0] == 0 and doubled[-1, -1, 0] == 15

    crops = caffe.io.oversample([im], (2, 2))
    assert crops.shape == (10, 2, 2, 1)
    np.testing.assert_array_equal(crops[0, :, :, 0], [[0, 1], [4, 5]])        # top left
    np.testing.assert_array_equal(crops[3, :, :, 0], [[10, 11], [14, 15]])    # bottom right
    np.testing.assert_array_equal(crops[4, :, :, 0], [[5, 6], [9, 10]])       # centre
    np.testing.assert_array_equal(crops[5, :, :, 0], [[1, 0], [5, 4]])        # mirrored top left

    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    blob = caffe.io.array_to_blobproto(a, diff=-a)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob), a)
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(blob, return_diff=True), -a)
    arrays = caffe.io.blobprotovector_str_to_arraylist(caffe.io.arraylist_to_blobprotovector_str([a, a[0]]))
    assert [x.shape for x in arrays] == [(2, 3, 4), (3, 4)]
    from minicaffe.proto import caffe_pb2

    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=range(6))
    assert caffe.io.blobproto_to_array(legacy).shape == (1, 2, 1, 3)
    datum = caffe.io.array_to_datum(np.ones((1, 2, 2), np.uint8), 7)
    assert datum.label == 7 and caffe.io.datum_to_array(datum).shape == (1, 2, 2)


PYCAFFE_IO_NAMES = {"Transformer", "load_image", "resize_image", "oversample", "blobproto_to_array",
                    "array_to_blobproto", "arraylist_to_blobprotovector_str",
                    "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array"}


def test_io_lists_pycaffe_names():
    # dir() (and so tab completion) shows them, and `from caffe.io import *` brings them in.
    assert PYCAFFE_IO_NAMES <= set(dir(caffe.io))
    assert PYCAFFE_IO_NAMES <= set(caffe.io.__all__)
    assert set(caffe.io.__all__) <= set(dir(caffe.io))
    namespace: dict = {}
    exec("from minicaffe.io import *", namespace)
    assert PYCAFFE_IO_NAMES <= set(namespace)
    from minicaffe import caffe_io

    assert set(caffe_io.__all__) == PYCAFFE_IO_NAMES and "io" in dir(caffe)
