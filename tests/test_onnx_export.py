"""ONNX export (minicaffe/onnx_export.py, `minicaffe export`): every exported net runs in onnxruntime and
agrees with minicaffe's forward (check_onnx: max abs error within 1e-5 of each output's max), names
survive, and layers without an exact ONNX form are refused by name."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, one_line_error, shared_data
from google.protobuf import text_format

import minicaffe
from minicaffe import TEST
from minicaffe.cli import main
from minicaffe.io import read_net_param
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from minicaffe.onnx_export import OnnxExportError, check_onnx, export_graph  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import nets as bench  # noqa: E402  (benchmarks/nets.py: seeded weights for deploy nets, the LeNet solver)


def initializers(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def exported_and_checked(net: Net, tmp_path: Path, inputs=None, **options) -> tuple:
    """Export `net` to a file, read it back, check it in onnxruntime; (model, check report)."""
    path = tmp_path / "net.onnx"
    minicaffe.export_onnx(net, path, **options)
    model = onnx.load(str(path))
    report = check_onnx(net, path, inputs=inputs)
    assert set(report) == set(net.outputs)
    return model, report


def seeded_net(text: str, seed: int = 0) -> Net:
    """A TEST net from prototxt text with every parameter blob set from a seeded generator (BatchNorm:
    positive variances and a moving-average factor of 2, so that the export must divide by it)."""
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), TEST)
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            mean, variance, factor = (blob.data for blob in layer.blobs)
            mean[...] = rng.normal(0, 1, mean.shape) * 2
            variance[...] = rng.uniform(0.5, 2, variance.shape) * 2
            factor[...] = 2
            continue
        for blob in layer.blobs:
            blob.data[...] = rng.normal(0, 0.5, blob.shape)
    return net


def input_layer(shape, top: str = "data") -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return f'layer {{ name: "{top}" type: "Input" top: "{top}" input_param {{ shape {{ {dims} }} }} }}\n'


def one_layer(type_and_params: str, shape=(2, 3, 7, 7), bottoms=("data",)) -> str:
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms)
    return input_layer(shape) + f'layer {{ name: "l" {type_and_params} {bottom} top: "y" }}'


# -- real nets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["det1", "det2", "det3"])
def test_mtcnn(name, mtcnn_dir, tmp_path):
    net = Net(str(mtcnn_dir / f"{name}.prototxt"), str(mtcnn_dir / f"{name}.caffemodel"), TEST)
    model, report = exported_and_checked(net, tmp_path)
    assert [i.name for i in model.graph.input] == net.inputs
    assert [o.name for o in model.graph.output] == net.outputs
    # The learned PReLU slopes travel under their layers' names.
    stored = initializers(model)
    prelus = [(layer_name, layer) for layer_name, layer in net.layer_dict.items() if layer.type == "PReLU"]
    assert prelus
    for layer_name, layer in prelus:
        np.testing.assert_array_equal(stored[f"{layer_name}_slope"].reshape(-1), layer.blobs[0].data)


def test_mtcnn_det1_dynamic_batch(mtcnn_dir, tmp_path):
    net = Net(str(mtcnn_dir / "det1.prototxt"), str(mtcnn_dir / "det1.caffemodel"), TEST)
    path = tmp_path / "det1.onnx"
    model = minicaffe.export_onnx(net, path, dynamic_batch=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    check_onnx(net, path, batch=3)  # the net reshaped to batch 3, onnxruntime fed batch 3
    assert net.blobs["data"].shape[0] == 3


def test_lenet_prelu_after_training(tmp_path):
    """The PReLU LeNet after a few SGD steps on synthetic digits: its deploy net (Input instead of the data
    layers, no loss) exports with the trained weights, and the trained slopes read back by name."""
    solver = bench.lenet_solver()
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 10, solver.net.blobs["label"].shape[0])
    images = rng.uniform(0, 0.2, solver.net.blobs["data"].shape).astype(np.float32)
    for digit in range(10):  # a bright bar whose row is the label: learnable in a few steps
        images[labels == digit, 0, 2 + 2 * digit: 4 + 2 * digit, 4:24] = 1
    solver.net.blobs["data"].data[...] = images
    solver.net.blobs["label"].data[...] = labels
    solver.step(5)
    trained = solver.net.params["prelu1"][0].data
    assert not np.allclose(trained, 0.25)  # the slopes have moved from their filler value

    param = bench.lenet_train_param()
    deploy = caffe_pb2.NetParameter(name=param.name)
    for layer in param.layer:
        if layer.type == "Input":
            layer = deploy.layer.add(name="data", type="Input", top=["data"])
            layer.input_param.shape.add().dim.extend([4, 1, 28, 28])
        elif layer.type not in ("SoftmaxWithLoss", "Accuracy"):
            deploy.layer.add().CopyFrom(layer)
    deploy.layer.add(name="prob", type="Softmax", bottom=["ip2"], top=["prob"])
    net = Net(deploy, TEST)
    net.copy_from_proto(solver.net.to_proto())
    model, _ = exported_and_checked(net, tmp_path)
    stored = initializers(model)
    np.testing.assert_array_equal(stored["prelu1_slope"].reshape(-1), net.params["prelu1"][0].data)
    np.testing.assert_array_equal(stored["prelu1_slope"].reshape(-1), trained)
    np.testing.assert_array_equal(stored["conv1_weight"], net.params["conv1"][0].data)
    np.testing.assert_array_equal(stored["ip2_bias"], net.params["ip2"][1].data)


ZOO = ["AlexNet", "MobileNet-v1", "ResNet-50", "SphereFace-20", "SqueezeNet-v1.1"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_net(name, tmp_path):
    """Every zoo net at batch 1 with seeded weights; compared before the final Softmax (its logits), which
    would flatten differences into near-uniform probabilities."""
    folder = shared_data("models/zoo", f"{name}-deploy.prototxt")
    param = read_net_param(folder / f"{name}-deploy.prototxt")
    if param.layer[-1].type == "Softmax":
        del param.layer[-1]
    path = tmp_path / "deploy.prototxt"
    path.write_text(text_format.MessageToString(param))
    net = bench.zoo_net(path, batch=1)
    model, report = exported_and_checked(net, tmp_path)
    assert all(largest > 0 for _, largest in report.values())
    assert [o.name for o in model.graph.output] == net.outputs


# -- every mapped layer, with its edge cases ------------------------------------------------------------

POOL = 'type: "Pooling" pooling_param {{ {} }}'
LAYER_NETS = {
    # Pooling: ceil rounding with padding (the last window clipped to the image + padding), AVE's divisor
    # with padding, windows dropped for starting in the padding, FLOOR rounding leaving rows unread,
    # rectangular geometry, global pooling.
    "max_ceil_pad": one_layer(POOL.format("pool: MAX kernel_size: 3 stride: 2 pad: 1"), (2, 3, 6, 6)),
    "ave_ceil_pad": one_layer(POOL.format("pool: AVE kernel_size: 3 stride: 2 pad: 1"), (2, 3, 6, 6)),
    "ave_pad_7": one_layer(POOL.format("pool: AVE kernel_size: 3 stride: 2 pad: 1")),
    "ave_ceil_no_pad": one_layer(POOL.format("pool: AVE kernel_size: 3 stride: 2"), (2, 3, 6, 6)),
    "ave_last_window_dropped": one_layer(POOL.format("pool: AVE kernel_size: 2 stride: 2 pad: 1"),
                                         (1, 2, 5, 5)),
    "max_last_window_dropped": one_layer(POOL.format("pool: MAX kernel_size: 2 stride: 2 pad: 1"),
                                         (1, 2, 5, 5)),
    "ave_floor": one_layer(POOL.format("pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR"), (1, 2, 8, 8)),
    "max_floor_pad": one_layer(POOL.format("pool: MAX kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR"),
                               (1, 2, 8, 8)),
    "ave_rectangular": one_layer(POOL.format("pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 "
                                             "pad_h: 1 pad_w: 1"), (2, 2, 8, 8)),
    "ave_global": one_layer(POOL.format("pool: AVE global_pooling: true")),
    "max_global": one_layer(POOL.format("pool: MAX global_pooling: true")),
    # PReLU: per channel and channel_shared, on 2-d, 3-d and 4-d blobs.
    "prelu_4d": one_layer('type: "PReLU"'),
    "prelu_4d_shared": one_layer('type: "PReLU" prelu_param { channel_shared: true }'),
    "prelu_2d": one_layer('type: "PReLU"', (4, 5)),
    "prelu_2d_shared": one_layer('type: "PReLU" prelu_param { channel_shared: true }', (4, 5)),
    "prelu_3d": one_layer('type: "PReLU"', (2, 3, 5)),
    "relu_slope": one_layer('type: "ReLU" relu_param { negative_slope: 0.1 }'),
    "relu": one_layer('type: "ReLU"'),
    "eltwise_sum_coeff": input_layer((2, 3, 4, 4)) + input_layer((2, 3, 4, 4), "b")
    + input_layer((2, 3, 4, 4), "c")
    + 'layer { name: "l" type: "Eltwise" bottom: "data" bottom: "b" bottom: "c" top: "y" '
      "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 } }",
    "eltwise_prod_max": input_layer((2, 3, 4, 4)) + input_layer((2, 3, 4, 4), "b")
    + 'layer { name: "p" type: "Eltwise" bottom: "data" bottom: "b" top: "p" '
      "eltwise_param { operation: PROD } }"
    + 'layer { name: "m" type: "Eltwise" bottom: "data" bottom: "b" top: "m" '
      "eltwise_param { operation: MAX } }",
    "lrn_across": one_layer('type: "LRN" lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }',
                            (2, 7, 4, 4)),
    "lrn_within": one_layer('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 '
                            "norm_region: WITHIN_CHANNEL }"),
    "ip_axis1": one_layer('type: "InnerProduct" inner_product_param { num_output: 4 }'),
    "ip_axis1_transpose_no_bias": one_layer('type: "InnerProduct" inner_product_param { num_output: 4 '
                                            "transpose: true bias_term: false }"),
    "ip_axis2": one_layer('type: "InnerProduct" inner_product_param { num_output: 4 axis: 2 }', (2, 3, 4, 5)),
    "ip_axis2_transpose": one_layer('type: "InnerProduct" inner_product_param { num_output: 4 axis: -2 '
                                    "transpose: true }", (2, 3, 4, 5)),
    "conv_group_dilation": one_layer('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 '
                                     "group: 2 dilation: 2 pad: 1 stride: 2 }", (2, 4, 9, 9)),
    "conv_rect_no_bias": one_layer('type: "Convolution" convolution_param { num_output: 3 kernel_h: 3 '
                                   "kernel_w: 1 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2 "
                                   "bias_term: false }"),
    "deconv_groups": one_layer('type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 4 '
                               "group: 2 stride: 2 pad: 1 }", (2, 4, 5, 5)),
    "deconv_dilation": one_layer('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 3 '
                                 "dilation: 2 stride: 3 }"),
    "batch_norm_scale": one_layer('type: "BatchNorm"')
    + 'layer { name: "s" type: "Scale" bottom: "y" top: "y" scale_param { bias_term: true } }',
    "batch_norm_2d": one_layer('type: "BatchNorm"', (4, 5)),
    "scale_axes": one_layer('type: "Scale" scale_param { axis: 1 num_axes: 2 }', (2, 3, 4, 5)),
    "scale_bottom_bias": input_layer((2, 3, 4, 5)) + input_layer((3, 4), "s")
    + 'layer { name: "l" type: "Scale" bottom: "data" bottom: "s" top: "y" scale_param { bias_term: true } }',
    "bias": one_layer('type: "Bias" bias_param { axis: 2 num_axes: 1 }', (2, 3, 4, 5)),
    "softmax_axis": one_layer('type: "Softmax" softmax_param { axis: 2 }', (2, 3, 4, 5)),
    "mvn": one_layer('type: "MVN"'),
    "mvn_across_mean_only": one_layer('type: "MVN" mvn_param { across_channels: true '
                                      "normalize_variance: false }"),
    "mvn_across": one_layer('type: "MVN" mvn_param { across_channels: true eps: 0.01 }'),
    "power_affine_square": one_layer('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }'),
    "power_constant": one_layer('type: "Power" power_param { power: 3 scale: 0 shift: 1.5 }'),
    "power_zero": one_layer('type: "Power" power_param { power: 0 scale: 2 }'),
    "power_identity": one_layer('type: "Power"'),
    "power_linear": one_layer('type: "Power" power_param { scale: -3 shift: 0.25 }'),
    "power_root": one_layer('type: "AbsVal"')
    + 'layer { name: "p" type: "Power" bottom: "y" top: "z" power_param { power: 0.5 scale: 2 shift: 0.1 } }',
    "exp_base_scale_shift": one_layer('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 0.3 }'),
    "exp": one_layer('type: "Exp"'),
    "log_base_scale_shift": one_layer('type: "AbsVal"')
    + 'layer { name: "g" type: "Log" bottom: "y" top: "z" log_param { base: 10 scale: 3 shift: 0.5 } }',
    "elu": one_layer('type: "ELU" elu_param { alpha: 0.7 }'),
    "bnll": one_layer('type: "BNLL"'),
    "clip": one_layer('type: "Clip" clip_param { min: -0.5 max: 0.7 }'),
    "swish": one_layer('type: "Swish" swish_param { beta: 1.5 }'),
    "tanh_sigmoid_absval": one_layer('type: "TanH"')
    + 'layer { name: "s" type: "Sigmoid" bottom: "data" top: "s" }'
    + 'layer { name: "a" type: "AbsVal" bottom: "data" top: "a" }',
    "threshold": one_layer('type: "Threshold" threshold_param { threshold: 0.2 }'),
    "argmax_axis": one_layer('type: "ArgMax" argmax_param { axis: 1 }'),
    "argmax_axis_max_val": one_layer('type: "ArgMax" argmax_param { axis: 2 out_max_val: true }'),
    "argmax_items": one_layer('type: "ArgMax"'),
    "argmax_items_max_val": one_layer('type: "ArgMax" argmax_param { out_max_val: true }', (3, 10)),
    "reduction_sum_coeff": one_layer('type: "Reduction" reduction_param { operation: SUM axis: 1 '
                                     "coeff: -2 }"),
    "reduction_asum": one_layer('type: "Reduction" reduction_param { operation: ASUM axis: 2 }'),
    "reduction_sumsq": one_layer('type: "Reduction" reduction_param { operation: SUMSQ axis: -1 }'),
    "reduction_mean": one_layer('type: "Reduction" reduction_param { operation: MEAN axis: 0 coeff: 0.5 }'),
    "tile": one_layer('type: "Tile" tile_param { axis: 2 tiles: 3 }'),
    "crop": input_layer((2, 3, 9, 8)) + input_layer((2, 3, 5, 4), "ref")
    + 'layer { name: "l" type: "Crop" bottom: "data" bottom: "ref" top: "y" crop_param { axis: 2 offset: 3 '
      "offset: 1 } }",
    "concat_slice": input_layer((2, 3, 4, 4)) + input_layer((2, 2, 4, 4), "b")
    + 'layer { name: "c" type: "Concat" bottom: "data" bottom: "b" top: "c" }'
    + 'layer { name: "s" type: "Slice" bottom: "c" top: "s1" top: "s2" top: "s3" slice_param { axis: 3 '
      "slice_point: 1 slice_point: 3 } }"
    + 'layer { name: "h" type: "Concat" bottom: "s1" bottom: "s3" top: "h" concat_param { axis: 3 } }',
    "flatten_reshape": one_layer('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', (2, 3, 4, 5))
    + 'layer { name: "r" type: "Reshape" bottom: "y" top: "r" '
      "reshape_param { shape { dim: 0 dim: -1 dim: 2 } } }",
    "spp_max": one_layer('type: "SPP" spp_param { pyramid_height: 3 pool: MAX }', (2, 3, 7, 9)),
    "spp_ave": one_layer('type: "SPP" spp_param { pyramid_height: 3 pool: AVE }', (2, 3, 7, 9)),
    "spp_one_level": one_layer('type: "SPP" spp_param { pyramid_height: 1 pool: AVE }', (2, 3, 5, 5)),
    "embed": one_layer('type: "Embed" embed_param { num_output: 4 input_dim: 6 }', (2, 3)),
    "batch_reindex": input_layer((3, 2, 4)) + input_layer((5,), "index")
    + 'layer { name: "l" type: "BatchReindex" bottom: "data" bottom: "index" top: "y" }',
    "parameter": input_layer((2, 3))
    + 'layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } } }'
    + 'layer { name: "e" type: "Eltwise" bottom: "data" bottom: "p" top: "y" }',
    "dropout_split_in_place": one_layer('type: "ReLU"')
    + 'layer { name: "d" type: "Dropout" bottom: "y" top: "y" dropout_param { dropout_ratio: 0.5 } }'
    + 'layer { name: "sp" type: "Split" bottom: "y" top: "a" top: "b" }'
    + 'layer { name: "e" type: "Eltwise" bottom: "a" bottom: "b" top: "y2" }',
}


# Inputs that must be indices rather than the seeded normal values check_onnx feeds by default.
INDEX_INPUTS = {"embed": {"data": np.array([[0, 5, 2], [2, 1, 3]])},
                "batch_reindex": {"index": [2, 0, 2, 1, 0]}}


@pytest.mark.parametrize("name", list(LAYER_NETS))
def test_layer(name, tmp_path):
    net = seeded_net(LAYER_NETS[name])
    inputs = {blob: np.asarray(value) for blob, value in INDEX_INPUTS.get(name, {}).items()}
    model, report = exported_and_checked(net, tmp_path, inputs)
    assert [o.name for o in model.graph.output] == net.outputs
    assert all(largest > 0 for _, largest in report.values())


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("name", ["ave_ceil_pad", "mvn_across", "reduction_asum", "argmax_items_max_val",
                                  "concat_slice", "clip", "lrn_within"])
def test_other_opsets(name, opset, tmp_path):
    net = seeded_net(LAYER_NETS[name])
    model, _ = exported_and_checked(net, tmp_path, opset=opset)
    assert model.opset_import[0].version == opset


def test_ave_pooling_divisor_is_caffes_not_onnxs():
    """6x6, kernel 3, stride 2, pad 1: Caffe's ceil rounding gives 4 windows per axis, the last one over
    image row 5 and padding row 6 -- one of the two padding rows a ceil_mode AveragePool adds -- so Caffe
    divides it by 2 (rows) x 3 (or 2): the window clipped to the image plus its padding. The export's
    divisor correction says so, without relying on how a runtime clips ceil_mode windows; an AveragePool
    without the padding in the count (count_include_pad 0) gives other values."""
    import onnxruntime

    net = seeded_net(LAYER_NETS["ave_ceil_pad"])
    model = export_graph(net)
    assert [node.op_type for node in model.graph.node] == ["Pad", "AveragePool", "Mul"]
    correction = initializers(model)["l_divisor_correction"][0, 0]
    expected = np.ones((4, 4))
    expected[3, :] *= 3 / 2
    expected[:, 3] *= 3 / 2
    np.testing.assert_allclose(correction, expected)

    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    caffe = np.array(net.forward(data=x)["y"])
    helper = onnx.helper
    node = helper.make_node("AveragePool", ["data"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                            pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=0)
    graph = helper.make_graph([node], "naive", [helper.make_tensor_value_info("data", 1, x.shape)],
                              [helper.make_tensor_value_info("y", 1, None)])
    naive = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    got = onnxruntime.InferenceSession(naive.SerializeToString(),
                                       providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    assert got.shape == caffe.shape
    np.testing.assert_allclose(got[..., 1:3, 1:3], caffe[..., 1:3, 1:3], rtol=1e-5, atol=1e-6)
    assert np.abs(got[..., 0, :] - caffe[..., 0, :]).min() > 0  # the padded rows count in Caffe
    assert np.abs(got[..., 3, :] - caffe[..., 3, :]).min() > 0


def test_clip_gives_min_for_nan_as_caffe(tmp_path):
    net = seeded_net(LAYER_NETS["clip"])
    x = np.random.default_rng(1).standard_normal(net.blobs["data"].shape)
    x[0, 0, 0, :3] = np.nan
    check_onnx(net, export_graph(net), inputs={"data": x})
    assert (net.blobs["y"].data[0, 0, 0, :3] == -0.5).all()


def test_in_place_blobs_get_unique_names_and_outputs_keep_theirs(tmp_path):
    text = (input_layer((2, 3, 5, 5))
            + 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
              "convolution_param { num_output: 4 kernel_size: 3 } }"
            + 'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }'
            + 'layer { name: "prelu1" type: "PReLU" bottom: "conv1" top: "conv1" }'
            + 'layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" }')
    net = seeded_net(text)
    model, _ = exported_and_checked(net, tmp_path)
    outputs = [out for node in model.graph.node for out in node.output]
    assert len(outputs) == len(set(outputs))
    assert [o.name for o in model.graph.output] == ["conv1"]
    assert outputs[-1] == "conv1" and "conv1" not in outputs[:-1]
    names = set(initializers(model))
    assert {"conv1_weight", "conv1_bias", "prelu1_slope", "scale1_scale"} <= names


# -- what is refused --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    (input_layer((2, 3, 4, 4)) + 'layer { name: "l" type: "Im2col" bottom: "data" top: "y" '
     "convolution_param { kernel_size: 3 } }", "layer 'l' (Im2col) has no exact ONNX form"),
    (input_layer((2, 3)) + input_layer((2,), "keep")
     + 'layer { name: "f" type: "Filter" bottom: "data" bottom: "keep" top: "y" }',
     "layer 'f' (Filter) has no exact ONNX form"),
    (one_layer('type: "ArgMax" argmax_param { top_k: 2 axis: 1 }'), "layer 'l' (ArgMax): top_k 2"),
    (input_layer((2, 3, 4, 4)) + 'layer { name: "pool" type: "Pooling" bottom: "data" top: "y" top: "mask" '
     "pooling_param { pool: MAX kernel_size: 2 } }", "layer 'pool' (Pooling): the argmax mask"),
    ('layer { name: "d" type: "DummyData" top: "data" dummy_data_param { shape { dim: 2 dim: 3 } } }'
     'layer { name: "r" type: "ReLU" bottom: "data" top: "y" }', "layer 'd' (DummyData) is a data layer"),
    (input_layer((2, 3)) + input_layer((2,), "label")
     + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss" }',
     "layer 'loss' (SoftmaxWithLoss) is a training/scoring layer"),
])
def test_unsupported_layers_are_named(text, message):
    net = seeded_net(text)
    with pytest.raises(OnnxExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_graph(net)


@pytest.mark.parametrize("name", ["flatten_reshape", "ip_axis2_transpose", "argmax_items_max_val", "crop",
                                  "max_ceil_pad", "ave_ceil_pad", "spp_ave", "batch_norm_scale",
                                  "mvn_across"])
def test_dynamic_batch(name, tmp_path):
    """Exported with a free batch axis, run at another batch size than the prototxt's."""
    net = seeded_net(LAYER_NETS[name])
    path = tmp_path / "net.onnx"
    minicaffe.export_onnx(net, path, dynamic_batch=True)
    check_onnx(net, path, batch=5)
    assert all(net.blobs[name].shape[0] == 5 for name in net.inputs)


def test_dynamic_batch_refuses_what_fixes_the_batch():
    net = seeded_net(LAYER_NETS["reduction_mean"])
    with pytest.raises(OnnxExportError, match="batch axis"):
        export_graph(net, dynamic_batch=True)


def test_train_phase_net_is_refused():
    net = Net(text_format.Parse(LAYER_NETS["relu"], caffe_pb2.NetParameter()), minicaffe.TRAIN)
    with pytest.raises(OnnxExportError, match="TRAIN phase: export a TEST-phase"):
        export_graph(net)


def test_bad_opset():
    with pytest.raises(OnnxExportError, match="opset 9 is not supported"):
        export_graph(seeded_net(LAYER_NETS["relu"]), opset=9)


# -- the command ------------------------------------------------------------------------------------------

def test_cli_export_with_check(mtcnn_dir, tmp_path, capsys):
    out_path = tmp_path / "det2.onnx"
    code = main(["export", "--onnx", "--model", str(mtcnn_dir / "det2.prototxt"),
                 "--weights", str(mtcnn_dir / "det2.caffemodel"), "-o", str(out_path), "--check",
                 "--opset", "13"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"wrote {out_path} (opset 13)" in out
    assert "check prob1: max abs error" in out and "check conv5-2: max abs error" in out
    model = onnx.load(str(out_path))
    assert model.opset_import[0].version == 13
    assert "prelu1_slope" in initializers(model)


def test_cli_dynamic_batch(mtcnn_dir, tmp_path, capsys):
    out_path = tmp_path / "det1.onnx"
    code = main(["export", "--model", str(mtcnn_dir / "det1.prototxt"), "--weights",
                 str(mtcnn_dir / "det1.caffemodel"), "-o", str(out_path), "--dynamic-batch"])
    assert code == 0 and "dynamic batch" in capsys.readouterr().out
    model = onnx.load(str(out_path))
    assert all(v.type.tensor_type.shape.dim[0].dim_param == "batch"
               for v in [*model.graph.input, *model.graph.output])


def test_cli_unsupported_layer_is_one_line(tmp_path, capsys):
    model = tmp_path / "im2col.prototxt"
    model.write_text(input_layer((2, 3, 4, 4)) + 'layer { name: "l" type: "Im2col" bottom: "data" '
                     'top: "y" convolution_param { kernel_size: 3 } }')
    code = main(["export", "--model", str(model), "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert one_line_error(code, err, log_lines=True)
    assert "layer 'l' (Im2col) has no exact ONNX form" in err
    assert not (tmp_path / "x.onnx").exists()


def test_readme_table_lists_every_layer_type_as_exported():
    """README's table: every registered layer type once, "exact" exactly for the types with an exporter."""
    from minicaffe.onnx_export import EXPORTERS

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Export to ONNX"):]
    section = section[:section.index("\n## ")]
    verdicts = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not line.startswith("| ") or cells[0] == "Layer type":
            continue
        for type_name in cells[0].split(", "):
            assert type_name not in verdicts, type_name
            verdicts[type_name] = cells[2]
    # The built-in types (other tests register layers of their own, which stay registered).
    built_in = {name for name, cls in minicaffe.LAYERS.items() if cls.__module__.startswith("minicaffe.")}
    assert set(verdicts) == built_in
    exported = set(EXPORTERS) | {"Input", "Silence"}
    assert {t for t, verdict in verdicts.items() if verdict.startswith("exact")} == exported
    assert {t for t, verdict in verdicts.items() if verdict == "error"} == built_in - exported
