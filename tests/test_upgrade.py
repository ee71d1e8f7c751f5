"""Legacy nets (V0, V1, input fields, old data and BatchNorm params) upgraded as Caffe's upgrade_proto,
legacy .caffemodel weights, and `minicaffe upgrade-net` / `upgrade-solver`."""

from __future__ import annotations

import io as python_io
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error
from hypothesis import given, settings
from hypothesis import strategies as st

import minicaffe
from minicaffe import io, log
from minicaffe.cli import main
from minicaffe.inspect import caffemodel_params
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.upgrade import V1_TYPE_NAMES, net_upgrades, upgrade_net

REPO = Path(__file__).resolve().parents[1]
LENET = REPO / "models" / "lenet" / "lenet_train_test.prototxt"

# Caffe's LeNet as its examples/mnist/lenet_train_test.prototxt was written in the V1 format: enum types,
# blobs_lr, `include: { phase }`, and the scale still in data_param.
LENET_V1 = """
name: "LeNet"
layers {
  name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "examples/mnist/mnist_train_lmdb" backend: LMDB batch_size: 64 scale: 0.00390625 }
  include: { phase: TRAIN }
}
layers {
  name: "mnist" type: DATA top: "data" top: "label"
  data_param { source: "examples/mnist/mnist_test_lmdb" backend: LMDB batch_size: 100 scale: 0.00390625 }
  include: { phase: TEST }
}
layers {
  name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
                      weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layers {
  name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layers {
  name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2"
  blobs_lr: 1 blobs_lr: 2
  convolution_param { num_output: 50 kernel_size: 5 stride: 1
                      weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layers {
  name: "pool2" type: POOLING bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layers {
  name: "ip1" type: INNER_PRODUCT bottom: "pool2" top: "ip1"
  blobs_lr: 1 blobs_lr: 2
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers {
  name: "ip2" type: INNER_PRODUCT bottom: "ip1" top: "ip2"
  blobs_lr: 1 blobs_lr: 2
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layers {
  name: "accuracy" type: ACCURACY bottom: "ip2" bottom: "label" top: "accuracy"
  include: { phase: TEST }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip2" bottom: "label" top: "loss" }
"""

# The same LeNet as the V0 format had it (Caffe's first lenet_train.prototxt: one phase, type strings,
# every parameter on the V0 layer itself).
LENET_V0 = """
name: "LeNet"
layers {
  layer { name: "mnist" type: "data" source: "examples/mnist/mnist_train_lmdb" batchsize: 64
          scale: 0.00390625 }
  top: "data" top: "label"
}
layers {
  layer { name: "conv1" type: "conv" num_output: 20 kernelsize: 5 stride: 1
          weight_filler { type: "xavier" } bias_filler { type: "constant" } blobs_lr: 1. blobs_lr: 2. }
  bottom: "data" top: "conv1"
}
layers { layer { name: "pool1" type: "pool" kernelsize: 2 stride: 2 pool: MAX } bottom: "conv1" top: "pool1" }
layers {
  layer { name: "conv2" type: "conv" num_output: 50 kernelsize: 5 stride: 1
          weight_filler { type: "xavier" } bias_filler { type: "constant" } blobs_lr: 1. blobs_lr: 2. }
  bottom: "pool1" top: "conv2"
}
layers { layer { name: "pool2" type: "pool" kernelsize: 2 stride: 2 pool: MAX } bottom: "conv2" top: "pool2" }
layers {
  layer { name: "ip1" type: "innerproduct" num_output: 500
          weight_filler { type: "xavier" } bias_filler { type: "constant" } blobs_lr: 1. blobs_lr: 2. }
  bottom: "pool2" top: "ip1"
}
layers { layer { name: "relu1" type: "relu" } bottom: "ip1" top: "ip1" }
layers {
  layer { name: "ip2" type: "innerproduct" num_output: 10
          weight_filler { type: "xavier" } bias_filler { type: "constant" } blobs_lr: 1. blobs_lr: 2. }
  bottom: "ip1" top: "ip2"
}
layers { layer { name: "loss" type: "softmax_loss" } bottom: "ip2" bottom: "label" top: "loss" }
"""

# Deploy LeNet (one 28x28 image) in the three formats.
LENET_DEPLOY = """
name: "LeNet"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 50 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""
LENET_DEPLOY_V1 = """
name: "LeNet"
input: "data" input_dim: 1 input_dim: 1 input_dim: 28 input_dim: 28
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
         convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1"
         pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "conv2" type: CONVOLUTION bottom: "pool1" top: "conv2"
         convolution_param { num_output: 50 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layers { name: "pool2" type: POOLING bottom: "conv2" top: "pool2"
         pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "ip1" type: INNER_PRODUCT bottom: "pool2" top: "ip1"
         inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" }
layers { name: "ip2" type: INNER_PRODUCT bottom: "ip1" top: "ip2"
         inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layers { name: "prob" type: SOFTMAX bottom: "ip2" top: "prob" }
"""
LENET_DEPLOY_V0 = """
name: "LeNet"
input: "data" input_dim: 1 input_dim: 1 input_dim: 28 input_dim: 28
layers { layer { name: "conv1" type: "conv" num_output: 20 kernelsize: 5 stride: 1
                 weight_filler { type: "xavier" } } bottom: "data" top: "conv1" }
layers { layer { name: "pool1" type: "pool" kernelsize: 2 stride: 2 pool: MAX } bottom: "conv1" top: "pool1" }
layers { layer { name: "conv2" type: "conv" num_output: 50 kernelsize: 5 stride: 1
                 weight_filler { type: "xavier" } } bottom: "pool1" top: "conv2" }
layers { layer { name: "pool2" type: "pool" kernelsize: 2 stride: 2 pool: MAX } bottom: "conv2" top: "pool2" }
layers { layer { name: "ip1" type: "innerproduct" num_output: 500 weight_filler { type: "xavier" } }
         bottom: "pool2" top: "ip1" }
layers { layer { name: "relu1" type: "relu" } bottom: "ip1" top: "ip1" }
layers { layer { name: "ip2" type: "innerproduct" num_output: 10 weight_filler { type: "xavier" } }
         bottom: "ip1" top: "ip2" }
layers { layer { name: "prob" type: "softmax" } bottom: "ip2" top: "prob" }
"""


def net_param(text: str) -> caffe_pb2.NetParameter:
    return io.parse_text(text, caffe_pb2.NetParameter())


def upgraded(text: str) -> caffe_pb2.NetParameter:
    return upgrade_net(net_param(text), "test.prototxt")


def layer_param(text: str) -> caffe_pb2.LayerParameter:
    return io.parse_text(text, caffe_pb2.LayerParameter())


@pytest.fixture
def log_lines():
    """The log lines written while the test runs."""
    stream = python_io.StringIO()
    log.set_stream(stream)
    yield stream
    log.set_stream(None)


# -- whole nets ---------------------------------------------------------------------------------------

def test_v1_lenet_upgrades_to_todays_lenet(log_lines):
    assert net_upgrades(net_param(LENET_V1)) == ["deprecated data transformation fields (to transform_param)",
                                                 "deprecated V1LayerParameter layers"]
    assert upgraded(LENET_V1) == io.read_net_param(LENET)
    assert "test.prototxt: upgraded deprecated V1LayerParameter layers" in log_lines.getvalue()


def test_v0_lenet_upgrades_to_todays_lenet_train_phase():
    # V0 had no phases and no backend: today's LeNet without its TEST layers, include rules and backend.
    expected = io.read_net_param(LENET)
    layers = [layer for layer in expected.layer if not any(r.phase == caffe_pb2.TEST for r in layer.include)]
    del expected.layer[:]
    for layer in layers:
        layer.ClearField("include")
        if layer.type == "Data":
            layer.data_param.ClearField("backend")
        expected.layer.add().CopyFrom(layer)
    assert upgraded(LENET_V0) == expected
    assert net_upgrades(upgraded(LENET_V0)) == []


@pytest.mark.parametrize("legacy", [LENET_DEPLOY_V1, LENET_DEPLOY_V0], ids=["V1", "V0"])
def test_legacy_deploy_nets_build_the_same_net(legacy):
    assert upgraded(legacy) == net_param(LENET_DEPLOY)
    old, new = Net(net_param(legacy), minicaffe.TEST), Net(net_param(LENET_DEPLOY), minicaffe.TEST)
    assert {k: b.shape for k, b in old.blobs.items()} == {k: b.shape for k, b in new.blobs.items()}
    assert old.blobs["pool2"].shape == (1, 50, 4, 4) and old.blobs["prob"].shape == (1, 10)
    assert {k: [b.shape for b in v] for k, v in old.params.items()} == \
        {k: [b.shape for b in v] for k, v in new.params.items()}
    assert [layer.type for layer in old.layers] == [layer.type for layer in new.layers]


def test_read_net_param_and_net_upgrade_legacy_files(tmp_path):
    path = tmp_path / "old.prototxt"
    path.write_text(LENET_DEPLOY_V0)
    assert io.read_net_param(path) == net_param(LENET_DEPLOY)
    assert Net(str(path), minicaffe.TEST).blobs["ip1"].shape == (1, 500)


# -- V0 ----------------------------------------------------------------------------------------------

def test_v0_padding_layers_fold_into_the_conv_and_pool_they_feed():
    net = upgraded("""
        input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
        layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
        layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 5 }
                 bottom: "pad1" top: "conv1" }
        layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
        layers { layer { name: "pool1" type: "pool" kernelsize: 3 stride: 1 } bottom: "pad2" top: "pool1" }
    """)
    assert [layer.name for layer in net.layer] == ["input", "conv1", "pool1"]
    assert net.layer[1] == layer_param("""name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
                                          convolution_param { num_output: 4 kernel_size: 5 pad: 2 }""")
    assert net.layer[2] == layer_param("""name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
                                          pooling_param { kernel_size: 3 stride: 1 pad: 1 }""")
    built = Net(net, minicaffe.TEST)
    assert built.blobs["conv1"].shape == (1, 4, 8, 8) and built.blobs["pool1"].shape == (1, 4, 8, 8)


# One V0 layer -> the V2 layer Caffe's upgrade makes of it (each V0 field in its per-type message).
V0_LAYERS = {
    "conv": ("""name: "c" type: "conv" num_output: 8 biasterm: false pad: 1 kernelsize: 3 group: 2 stride: 2
                weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 1 }
                blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0""",
             """name: "c" type: "Convolution"
                param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
                convolution_param { num_output: 8 bias_term: false pad: 1 kernel_size: 3 group: 2 stride: 2
                  weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 1 } }"""),
    "innerproduct": ("""name: "ip" type: "innerproduct" num_output: 3 biasterm: false
                        weight_filler { type: "xavier" } bias_filler { type: "constant" }""",
                     """name: "ip" type: "InnerProduct" inner_product_param { num_output: 3 bias_term: false
                        weight_filler { type: "xavier" } bias_filler { type: "constant" } }"""),
    "pool": ("""name: "p" type: "pool" pool: AVE kernelsize: 3 stride: 2 pad: 1""",
             """name: "p" type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"""),
    "pool stochastic": ("""name: "p" type: "pool" pool: STOCHASTIC""",
                        """name: "p" type: "Pooling" pooling_param { pool: STOCHASTIC }"""),
    "lrn": ("""name: "n" type: "lrn" local_size: 3 alpha: 0.5 beta: 0.25 k: 2""",
            """name: "n" type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.25 k: 2 }"""),
    "dropout": ("""name: "d" type: "dropout" dropout_ratio: 0.25""",
                """name: "d" type: "Dropout" dropout_param { dropout_ratio: 0.25 }"""),
    "concat": ("""name: "cat" type: "concat" concat_dim: 0""",
               """name: "cat" type: "Concat" concat_param { concat_dim: 0 }"""),
    "data": ("""name: "d" type: "data" source: "db" batchsize: 4 rand_skip: 7 meanfile: "m.binaryproto"
                cropsize: 5 mirror: true scale: 0.5""",
             """name: "d" type: "Data" data_param { source: "db" batch_size: 4 rand_skip: 7 }
                transform_param { mean_file: "m.binaryproto" crop_size: 5 mirror: true scale: 0.5 }"""),
    "images": ("""name: "i" type: "images" source: "list.txt" batchsize: 2 rand_skip: 1 shuffle_images: true
                  new_height: 6 new_width: 7""",
               """name: "i" type: "ImageData" image_data_param { source: "list.txt" batch_size: 2 rand_skip: 1
                  shuffle: true new_height: 6 new_width: 7 }"""),
    "hdf5_data": ("""name: "h" type: "hdf5_data" source: "files.txt" batchsize: 3""",
                  """name: "h" type: "HDF5Data" hdf5_data_param { source: "files.txt" batch_size: 3 }"""),
    "window_data": ("""name: "w" type: "window_data" source: "windows.txt" batchsize: 8 det_fg_threshold: 0.6
                       det_bg_threshold: 0.4 det_fg_fraction: 0.5 det_context_pad: 16
                       det_crop_mode: "square" """,
                    """name: "w" type: "WindowData" window_data_param { source: "windows.txt" batch_size: 8
                       fg_threshold: 0.6 bg_threshold: 0.4 fg_fraction: 0.5 context_pad: 16
                       crop_mode: "square" }"""),
    "infogain_loss": ("""name: "l" type: "infogain_loss" source: "H.binaryproto" """,
                      """name: "l" type: "InfogainLoss" infogain_loss_param { source: "H.binaryproto" }"""),
    "hdf5_output": ("""name: "o" type: "hdf5_output" hdf5_output_param { file_name: "out.h5" }""",
                    """name: "o" type: "HDF5Output" hdf5_output_param { file_name: "out.h5" }"""),
}
# The types whose V0 layers carry no fields of their own.
V0_PLAIN_TYPES = {"accuracy": "Accuracy", "bnll": "BNLL", "euclidean_loss": "EuclideanLoss",
                  "flatten": "Flatten", "im2col": "Im2col",
                  "multinomial_logistic_loss": "MultinomialLogisticLoss", "relu": "ReLU",
                  "sigmoid": "Sigmoid", "softmax": "Softmax", "softmax_loss": "SoftmaxWithLoss",
                  "split": "Split", "tanh": "TanH"}


def v0_net(layer: str, bottom: str = 'bottom: "x"') -> str:
    return f'input: "x" layers {{ layer {{ {layer} }} {bottom} top: "y" }}'


@pytest.mark.parametrize("case", V0_LAYERS)
def test_v0_fields_go_to_their_per_type_params(case):
    old, new = V0_LAYERS[case]
    expected = layer_param(new)
    expected.bottom.append("x")
    expected.top.append("y")
    # `input` without dims names an input an old caffemodel recorded: dropped, it makes no layer.
    assert list(upgraded(v0_net(old)).layer) == [expected]


@pytest.mark.parametrize("v0_type", V0_PLAIN_TYPES)
def test_v0_type_strings(v0_type):
    (layer,) = upgraded(v0_net(f'name: "l" type: "{v0_type}"')).layer
    assert layer.type == V0_PLAIN_TYPES[v0_type]


def test_v0_field_of_another_type_is_dropped_with_a_warning(log_lines):
    (layer,) = upgraded(v0_net('name: "r" type: "relu" num_output: 3 kernelsize: 2')).layer
    assert layer == layer_param('name: "r" type: "ReLU" bottom: "x" top: "y"')
    text = log_lines.getvalue()
    assert "layer 'r': V0 field 'num_output' has no place in a 'relu' layer" in text
    assert "V0 field 'kernelsize'" in text


@pytest.mark.parametrize("text, message", [
    (v0_net('name: "q" type: "quux"'), r"layer 'q' has V0 type 'quux', which is not a V0 layer type"),
    (v0_net('name: "q"'), r"layer 'q' has V0 type '', which is not"),
    (v0_net('name: "c" type: "conv"', 'bottom: "nowhere"'),
     r"layer 'c' reads blob 'nowhere', which no earlier"),
    ('input: "x" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }'
     'layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }',
     r"layer 'r' of type 'relu' reads the output of a padding layer"),
    ('input: "x" input: "z" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "x" top: "p" }'
     'layers { layer { name: "c" type: "conv" } bottom: "p" bottom: "z" top: "c" }',
     r"layer 'p' and the layer it pads must each have one bottom"),
    ('input: "x" layers { layer { name: "r" type: "relu" } bottom: "x" top: "y" }'
     'layers { name: "v1" type: RELU bottom: "y" top: "z" }', r"layer 'v1' has no V0 'layer' in a V0 net"),
    ('layers { name: "a" type: RELU } layer { name: "b" type: "ReLU" }',
     r"has both 'layer' and .* V1 'layers'"),
    ('input: "x" input: "y" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1',
     r"2 inputs need 8 input_dim values, got 4"),
    ('input: "x" input: "y" input_shape { dim: 1 }', r"2 inputs but 1 input_shape entries"),
])
def test_nets_that_cannot_be_upgraded_are_errors_naming_the_file(text, message):
    with pytest.raises(io.FormatError, match=r"^test.prototxt: " + message):
        upgraded(text)


# -- V1 ----------------------------------------------------------------------------------------------

# Caffe's UpgradeV1LayerType, written out.
V1_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss", "MVN": "MVN",
    "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}


def test_v1_type_enum_names():
    names = {caffe_pb2.V1LayerParameter.LayerType.Name(v): s for v, s in V1_TYPE_NAMES.items()}
    assert names == V1_TYPES


def test_v1_param_fields_become_param_specs():
    net = upgraded("""
        layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" blobs_lr: 1 blobs_lr: 2 weight_decay: 1
                 weight_decay: 0 param: "w" param: "b" blob_share_mode: PERMISSIVE loss_weight: 0.5
                 include { phase: TRAIN } exclude { stage: "deploy" } inner_product_param { num_output: 2 } }
        layers { name: "ip2" type: INNER_PRODUCT bottom: "y" top: "z" param: "w" }
    """)
    assert net.layer[0] == layer_param("""
        name: "ip" type: "InnerProduct" bottom: "x" top: "y" loss_weight: 0.5
        param { name: "w" share_mode: PERMISSIVE lr_mult: 1 decay_mult: 1 }
        param { name: "b" lr_mult: 2 decay_mult: 0 }
        include { phase: TRAIN } exclude { stage: "deploy" } inner_product_param { num_output: 2 }""")
    assert net.layer[1] == layer_param('name: "ip2" type: "InnerProduct" bottom: "y" top: "z" '
                                       'param { name: "w" }')


@pytest.mark.parametrize("v1_type, params", [("DATA", "data_param"), ("IMAGE_DATA", "image_data_param"),
                                             ("WINDOW_DATA", "window_data_param")])
def test_v1_data_transformation_fields_move_to_transform_param(v1_type, params):
    (layer,) = upgraded(f"""
        layers {{ name: "d" type: {v1_type} top: "x" transform_param {{ scale: 3 mean_value: 4 }}
                  {params} {{ source: "s" scale: 0.5 mean_file: "m" crop_size: 2 mirror: true }} }}
    """).layer
    expected = 'scale: 0.5 mean_value: 4 mean_file: "m" crop_size: 2 mirror: true'
    assert layer.transform_param == io.parse_text(expected, caffe_pb2.TransformationParameter())
    assert str(getattr(layer, params)).strip() == 'source: "s"'


def test_input_fields():
    net = upgraded('input: "a" input: "b" input_shape { dim: 2 dim: 3 } input_shape { dim: 4 } '
                   'layer { name: "r" type: "ReLU" bottom: "a" top: "c" }')
    assert net == net_param('layer { name: "input" type: "Input" top: "a" top: "b" '
                            'input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } } } '
                            'layer { name: "r" type: "ReLU" bottom: "a" top: "c" }')
    # An old .caffemodel names its inputs without shapes: the names are dropped.
    relu = 'layer { name: "r" type: "ReLU" }'
    assert upgraded('input: "data" ' + relu) == net_param(relu)


def test_old_batch_norm_param_specs_get_lr_and_decay_0():
    old = """input: "x" input_shape { dim: 2 dim: 3 }
             layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y"
                     param { name: "mean" lr_mult: 1 } param { lr_mult: 0 } param { decay_mult: 2 } }"""
    net = upgraded(old)
    specs = [(s.name, s.lr_mult, s.decay_mult) for s in net.layer[1].param]
    assert specs == [("mean", 0, 0), ("", 0, 0), ("", 0, 0)]
    assert net_upgrades(net) == []
    Net(net, minicaffe.TEST).forward(x=np.ones((2, 3)))


# -- legacy .caffemodel weights -------------------------------------------------------------------------

def legacy_blob(values: np.ndarray, dims4: tuple[int, int, int, int]) -> caffe_pb2.BlobProto:
    """A BlobProto as V0/V1 Caffe wrote it: num, channels, height, width, no `shape`."""
    num, channels, height, width = dims4
    return caffe_pb2.BlobProto(num=num, channels=channels, height=height, width=width,
                               data=values.ravel().tolist())


def lenet_weights(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    shapes = {"conv1": [(20, 1, 5, 5), (20,)], "conv2": [(50, 20, 5, 5), (50,)],
              "ip1": [(500, 800), (500,)], "ip2": [(10, 500), (10,)]}
    return {name: [rng.standard_normal(s).astype(np.float32) for s in pair] for name, pair in shapes.items()}


def legacy_4d(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Caffe's legacy dims of a blob: its shape padded on the left with 1s to 4 axes."""
    return (1,) * (4 - len(shape)) + tuple(shape)


def v1_caffemodel(weights) -> caffe_pb2.NetParameter:
    """LeNet deploy as a V1 .caffemodel: `layers` with enum types, blobs_lr / weight_decay, legacy dims."""
    model = net_param(LENET_DEPLOY_V1)
    model.ClearField("input_dim")  # Caffe's old ToProto wrote the input names only
    for layer in model.layers:
        if layer.name in weights:
            layer.blobs_lr.extend([1, 2])
            layer.weight_decay.extend([1, 0])
            layer.blobs.extend(legacy_blob(w, legacy_4d(w.shape)) for w in weights[layer.name])
    return model


def v0_caffemodel(weights) -> caffe_pb2.NetParameter:
    model = net_param(LENET_DEPLOY_V0)
    for connection in model.layers:
        blobs = weights.get(connection.layer.name, [])
        connection.layer.blobs.extend(legacy_blob(w, legacy_4d(w.shape)) for w in blobs)
    return model


def assert_weights(net: Net, weights) -> None:
    assert set(net.params) == set(weights)
    for name, arrays in weights.items():
        for blob, array in zip(net.params[name], arrays):
            assert blob.shape == array.shape
            np.testing.assert_array_equal(blob.data, array)


@pytest.mark.parametrize("make", [v1_caffemodel, v0_caffemodel], ids=["V1", "V0"])
def test_legacy_caffemodel_loads_weights(tmp_path, make):
    weights = lenet_weights()
    path = tmp_path / "lenet.caffemodel"
    io.write_binary(path, make(weights))
    assert "shape" not in str(io.read_binary(path, caffe_pb2.NetParameter()))  # legacy dims only
    net = Net(net_param(LENET_DEPLOY), str(path), minicaffe.TEST)
    assert_weights(net, weights)
    net.forward(data=np.zeros((1, 1, 28, 28), np.float32))
    # Also a legacy NetParameter given directly, and inspect's reading of the file.
    fresh = Net(net_param(LENET_DEPLOY), minicaffe.TEST)
    fresh.copy_from_proto(make(weights), "proto")
    assert_weights(fresh, weights)
    kinds = {name: kind for name, kind, _ in caffemodel_params(path)}
    assert kinds == {"conv1": "Convolution", "conv2": "Convolution",
                     "ip1": "InnerProduct", "ip2": "InnerProduct"}


# -- minicaffe upgrade-net / upgrade-solver --------------------------------------------------------------

def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_upgrade_net_text_round_trip(tmp_path, capsys):
    old, new, again = tmp_path / "old.prototxt", tmp_path / "new.prototxt", tmp_path / "again.prototxt"
    old.write_text(LENET_V0)
    code, _, err = cli(capsys, "upgrade-net", old, new)
    assert code == 0, err
    assert "old.prototxt: upgraded deprecated V0LayerParameter layers" in err
    assert "upgraded deprecated V1LayerParameter layers" in err
    assert "Wrote upgraded NetParameter text proto to" in err
    assert io.read_text(new, caffe_pb2.NetParameter()) == upgraded(LENET_V0)
    code, _, err = cli(capsys, "upgrade-net", new, again)
    assert code == 0 and "already in today's format" in err
    assert again.read_bytes() == new.read_bytes()


def test_upgrade_net_binary_round_trip(tmp_path, capsys):
    weights = lenet_weights(1)
    old, new = tmp_path / "old.caffemodel", tmp_path / "new.weights"  # the format is read from the bytes
    io.write_binary(old, v1_caffemodel(weights))
    code, _, err = cli(capsys, "upgrade-net", old, new)
    assert code == 0, err
    assert "Wrote upgraded NetParameter binary proto to" in err
    model = io.read_binary(new, caffe_pb2.NetParameter())
    assert not model.layers and not model.input
    assert [layer.name for layer in model.layer][:2] == ["conv1", "pool1"]
    assert list(model.layer[0].param) == [caffe_pb2.ParamSpec(lr_mult=1, decay_mult=1),
                                          caffe_pb2.ParamSpec(lr_mult=2, decay_mult=0)]
    net = Net(net_param(LENET_DEPLOY), minicaffe.TEST)
    net.copy_from(new)
    assert_weights(net, weights)
    # Forced formats.
    text = tmp_path / "text"
    code, _, err = cli(capsys, "upgrade-net", "--text", tmp_path / "missing", text)
    assert one_line_error(code, err) and "missing" in err
    code, _, err = cli(capsys, "upgrade-net", "--binary", old, tmp_path / "forced")
    assert code == 0 and io.read_binary(tmp_path / "forced", caffe_pb2.NetParameter()) == model


def test_upgrade_net_decides_text_or_binary_by_the_bytes_not_the_name(tmp_path, capsys):
    text_in, binary_in = tmp_path / "text.caffemodel", tmp_path / "binary.prototxt"
    text_in.write_text(LENET_DEPLOY_V1)
    io.write_binary(binary_in, net_param(LENET_DEPLOY_V0))
    assert cli(capsys, "upgrade-net", text_in, tmp_path / "a")[0] == 0
    assert cli(capsys, "upgrade-net", binary_in, tmp_path / "b")[0] == 0
    assert io.read_text(tmp_path / "a", caffe_pb2.NetParameter()) == net_param(LENET_DEPLOY)
    assert io.read_binary(tmp_path / "b", caffe_pb2.NetParameter()) == net_param(LENET_DEPLOY)


def test_upgrade_net_bad_input_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    binary = tmp_path / "model.caffemodel"
    io.write_binary(binary, v1_caffemodel(lenet_weights()))
    text = tmp_path / "net.prototxt"
    text.write_text(LENET_V1)
    bad_type = tmp_path / "bad_type.prototxt"
    bad_type.write_text(v0_net('name: "q" type: "quux"'))
    typo = tmp_path / "typo.prototxt"
    typo.write_text('name: "x"\nlayers { nme: "a" }\n')
    cases = [
        (["--text", binary], "model.caffemodel: not a text prototxt"),
        (["--binary", text], "net.prototxt: not a binary NetParameter"),
        ([bad_type], "bad_type.prototxt: layer 'q' has V0 type 'quux'"),
        ([typo], "typo.prototxt:2:"),
        ([tmp_path / "absent.prototxt"], "absent.prototxt"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, "upgrade-net", *args, out)
        assert one_line_error(code, err, log_lines=True), err
        assert err.strip().splitlines()[-1].startswith("minicaffe upgrade-net: error: ")
        assert message in err
        assert not out.exists()


def test_upgrade_solver(tmp_path, capsys):
    old, new = tmp_path / "solver.prototxt", tmp_path / "new.prototxt"
    old.write_text(f'base_lr: 0.01 solver_type: NESTEROV net_param {{ {LENET_DEPLOY_V1} }}')
    code, _, err = cli(capsys, "upgrade-solver", old, new)
    assert code == 0, err
    assert "upgraded the deprecated 'solver_type' enum to type 'Nesterov'" in err
    solver = io.read_solver_param(new)
    assert solver.type == "Nesterov" and not solver.HasField("solver_type")
    assert solver.net_param == net_param(LENET_DEPLOY)
    old.write_text('type: "Adam" solver_type: ADAM')
    code, _, err = cli(capsys, "upgrade-solver", old, new)
    assert one_line_error(code, err) and "solver.prototxt: give the solver 'type'" in err


# -- properties ---------------------------------------------------------------------------------------

_names = st.text("abcxyz_", min_size=1, max_size=4)
_param_spec = st.builds(caffe_pb2.ParamSpec, name=st.one_of(st.just(""), _names),
                        lr_mult=st.sampled_from([0.0, 1.0, 2.0]), decay_mult=st.sampled_from([0.0, 1.0]))


@st.composite
def current_layers(draw) -> caffe_pb2.LayerParameter:
    kind = draw(st.sampled_from(["Convolution", "InnerProduct", "ReLU", "Data", "BatchNorm", "Input"]))
    layer = caffe_pb2.LayerParameter(name=draw(_names), type=kind, bottom=draw(st.lists(_names, max_size=2)),
                                     top=draw(st.lists(_names, max_size=2)))
    if kind == "BatchNorm" and draw(st.booleans()):  # today's BatchNorm with three specs: all zero
        layer.param.extend(caffe_pb2.ParamSpec(name=draw(_names), lr_mult=0, decay_mult=0) for _ in range(3))
    else:
        layer.param.extend(draw(st.lists(_param_spec, max_size=2)))
    if kind == "Data":
        layer.data_param.source = draw(_names)
        layer.transform_param.scale = draw(st.floats(0.125, 2, width=32))
    if kind == "Convolution":
        layer.convolution_param.kernel_size.extend(draw(st.lists(st.integers(1, 5), max_size=2)))
    if draw(st.booleans()):
        layer.include.add(phase=draw(st.sampled_from([caffe_pb2.TRAIN, caffe_pb2.TEST])))
    return layer


@settings(max_examples=60, deadline=None)
@given(name=_names, layers=st.lists(current_layers(), max_size=5), force_backward=st.booleans())
def test_upgrading_a_current_net_is_the_identity(name, layers, force_backward):
    net = caffe_pb2.NetParameter(name=name, layer=layers, force_backward=force_backward)
    before = net.SerializeToString()
    assert net_upgrades(net) == []
    assert upgrade_net(net).SerializeToString() == before


_v1_types = st.sampled_from(["CONVOLUTION", "INNER_PRODUCT", "RELU", "DATA", "POOLING", "SOFTMAX_LOSS"])


@settings(max_examples=40, deadline=None)
@given(types=st.lists(_v1_types, min_size=1, max_size=4), lrs=st.lists(st.floats(0, 4, width=32), max_size=2),
       scale=st.one_of(st.none(), st.floats(0.125, 2, width=32)), inputs=st.booleans())
def test_upgrade_is_idempotent_on_v1_nets(types, lrs, scale, inputs):
    net = caffe_pb2.NetParameter()
    if inputs:
        net.input.append("x")
        net.input_dim.extend([1, 2, 3, 4])
    for i, kind in enumerate(types):
        layer = net.layers.add(name=f"l{i}", type=caffe_pb2.V1LayerParameter.LayerType.Value(kind))
        layer.blobs_lr.extend(lrs)
        if kind == "DATA" and scale is not None:
            layer.data_param.scale = scale
    once = upgrade_net(net)
    assert not once.layers and not once.input and net_upgrades(once) == []
    assert len(once.layer) == len(types) + inputs
    assert upgrade_net(caffe_pb2.NetParameter.FromString(once.SerializeToString())) == once
