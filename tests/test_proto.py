"""Tests for the Caffe-compatible schema in protos/caffe.proto."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from google.protobuf import text_format
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import given, settings
from hypothesis import strategies as st

from minicaffe.proto import caffe_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# (a) generated module is in sync with protos/caffe.proto
# ---------------------------------------------------------------------------


def _load_gen_proto():
    spec = importlib.util.spec_from_file_location(
        "minicaffe_gen_proto", ROOT / "tools" / "gen_proto.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version_line(source: bytes) -> bytes:
    for line in source.splitlines():
        if line.startswith(b"# Protobuf Python Version:"):
            return line
    return b""


def test_generated_module_not_stale():
    gen = _load_gen_proto()
    committed = gen.GENERATED.read_bytes()
    fresh = gen.fresh_bytes()
    # The [test] extra pins grpcio-tools, so its protobuf version is the one the module was made with.
    assert _version_line(fresh) == _version_line(committed), (
        "installed grpcio-tools targets a different protobuf version "
        f"({_version_line(fresh)!r} vs committed {_version_line(committed)!r}): install the [test] extra")
    assert fresh == committed, "run python tools/gen_proto.py"


def test_gen_proto_check_exit_status(tmp_path, monkeypatch):
    gen = _load_gen_proto()
    fresh = gen.fresh_bytes()
    fake = tmp_path / "caffe_pb2.py"
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "GENERATED", fake)
    fake.write_bytes(fresh)
    assert gen.main(["--check"]) == 0
    fake.write_bytes(fresh + b"# tampered\n")
    assert gen.main(["--check"]) == 1


# ---------------------------------------------------------------------------
# (b) real Caffe files: MTCNN det1/det2/det3
# ---------------------------------------------------------------------------

def _read_prototxt(path: Path) -> pb.NetParameter:
    net = pb.NetParameter()
    text_format.Parse(path.read_text(), net)
    return net


def _read_caffemodel(path: Path) -> tuple[pb.NetParameter, bytes]:
    raw = path.read_bytes()
    net = pb.NetParameter()
    net.ParseFromString(raw)
    return net, raw


def _unknown_paths(msg, path="net"):
    """Paths of every sub-message carrying fields the schema does not know."""
    found = [(path, f.field_number) for f in UnknownFieldSet(msg)]
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        for i, item in enumerate(items):
            found += _unknown_paths(item, f"{path}.{field.name}[{i}]")
    return found


# (input spatial size, layer types in order, PReLU blob sizes in the caffemodel)
MTCNN_FACTS = {
    1: (
        12,
        [
            "Convolution",
            "PReLU",
            "Pooling",
            "Convolution",
            "PReLU",
            "Convolution",
            "PReLU",
            "Convolution",
            "Convolution",
            "Softmax",
        ],
        [10, 16, 32],
    ),
    2: (
        24,
        [
            "Convolution",
            "PReLU",
            "Pooling",
            "Convolution",
            "PReLU",
            "Pooling",
            "Convolution",
            "PReLU",
            "InnerProduct",
            "PReLU",
            "InnerProduct",
            "InnerProduct",
            "Softmax",
        ],
        [28, 48, 64, 128],
    ),
    3: (
        48,
        [
            "Convolution",
            "PReLU",
            "Pooling",
            "Convolution",
            "PReLU",
            "Pooling",
            "Convolution",
            "PReLU",
            "Pooling",
            "Convolution",
            "PReLU",
            "InnerProduct",
            "Dropout",
            "PReLU",
            "InnerProduct",
            "InnerProduct",
            "InnerProduct",
            "Softmax",
        ],
        [32, 64, 64, 128, 256],
    ),
}


@pytest.mark.parametrize("idx", [1, 2, 3])
def test_mtcnn_prototxt_parses(idx, mtcnn_dir):
    size, types, _ = MTCNN_FACTS[idx]
    net = _read_prototxt(mtcnn_dir / f"det{idx}.prototxt")
    assert list(net.input) == ["data"]
    assert list(net.input_dim) == [1, 3, size, size]
    assert [layer.type for layer in net.layer] == types
    assert len(net.layers) == 0  # no V1 layers in a modern prototxt

    conv1 = net.layer[0]
    assert conv1.name == "conv1"
    assert conv1.convolution_param.HasField("weight_filler")
    assert conv1.convolution_param.weight_filler.type == "xavier"
    assert conv1.convolution_param.bias_filler.type == "constant"
    assert list(conv1.convolution_param.kernel_size) == [3]
    assert len(conv1.param) == 2

    pools = [layer for layer in net.layer if layer.type == "Pooling"]
    assert all(p.pooling_param.pool == pb.PoolingParameter.MAX for p in pools)

    # Text round trip is lossless.
    again = pb.NetParameter()
    text_format.Parse(text_format.MessageToString(net), again)
    assert again == net


def test_det1_prototxt_details(mtcnn_dir):
    net = _read_prototxt(mtcnn_dir / "det1.prototxt")
    assert net.name == "PNet"
    prelus = [layer for layer in net.layer if layer.type == "PReLU"]
    assert [p.name for p in prelus] == ["PReLU1", "PReLU2", "PReLU3"]
    # In-place: bottom == top, and no prelu_param given (channel-wise default).
    assert all(list(p.bottom) == list(p.top) for p in prelus)
    assert not any(p.HasField("prelu_param") for p in prelus)
    assert prelus[0].prelu_param.channel_shared is False
    conv1 = net.layer[0]
    assert [(p.lr_mult, p.decay_mult) for p in conv1.param] == [(1.0, 1.0), (2.0, 0.0)]
    assert [
        layer.convolution_param.num_output
        for layer in net.layer
        if layer.type == "Convolution"
    ] == [10, 16, 32, 2, 4]


@pytest.mark.parametrize("idx", [1, 2, 3])
def test_mtcnn_caffemodel_parses(idx, mtcnn_dir):
    _, _, prelu_sizes = MTCNN_FACTS[idx]
    net, raw = _read_caffemodel(mtcnn_dir / f"det{idx}.caffemodel")
    types = {layer.type for layer in net.layer}
    expected = {
        "HDF5Data",
        "Slice",
        "Split",
        "SoftmaxWithLoss",
        "EuclideanLoss",
        "Accuracy",
    }
    assert expected <= types
    assert len(net.layers) == 0

    prelus = [layer for layer in net.layer if layer.type == "PReLU"]
    assert [len(p.blobs) for p in prelus] == [1] * len(prelus)
    assert [len(p.blobs[0].data) for p in prelus] == prelu_sizes
    assert [list(p.blobs[0].shape.dim) for p in prelus] == [[n] for n in prelu_sizes]
    assert any(v < 0 for p in prelus for v in p.blobs[0].data)

    data = next(layer for layer in net.layer if layer.type == "HDF5Data")
    assert data.hdf5_data_param.batch_size > 0
    assert data.hdf5_data_param.source.endswith(".txt")
    assert [rule.phase for rule in data.include] == [pb.TRAIN]

    slicer = next(layer for layer in net.layer if layer.type == "Slice")
    assert list(slicer.slice_param.slice_point) == [1, 5]
    assert slicer.slice_param.axis == 1

    loss = next(layer for layer in net.layer if layer.type == "SoftmaxWithLoss")
    assert loss.loss_param.ignore_label == 2

    # Weight blobs use the N-d `shape` field, not the legacy 4-d fields.
    for layer in net.layer:
        for blob in layer.blobs:
            assert blob.HasField("shape")
            assert not blob.HasField("num")
            count = math.prod(blob.shape.dim)
            assert len(blob.data) == count
            assert len(blob.diff) == 0

    # Everything outside the loss layers is covered by the schema; the only
    # unknown fields are the MTCNN authors' own Caffe-fork extensions.
    for path, _number in _unknown_paths(net):
        assert path.endswith(("].loss_param[0]", "].softmax_param[0]")), path

    # Re-serialising reproduces the file byte for byte.
    assert net.SerializeToString() == raw


def test_det1_caffemodel_details(mtcnn_dir):
    net, _ = _read_caffemodel(mtcnn_dir / "det1.caffemodel")
    by_name = {layer.name: layer for layer in net.layer}
    conv1 = by_name["conv1"]
    assert [list(b.shape.dim) for b in conv1.blobs] == [[10, 3, 3, 3], [10]]
    assert "Silence" in {layer.type for layer in net.layer}
    assert by_name["pool1"].pooling_param.kernel_size == 2
    assert by_name["pool1"].pooling_param.stride == 2


# ---------------------------------------------------------------------------
# (c) defaults and field numbers match BVLC Caffe
# ---------------------------------------------------------------------------


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


def test_layer_defaults():
    conv = pb.ConvolutionParameter()
    assert conv.bias_term is True
    assert conv.group == 1
    assert conv.axis == 1
    assert conv.engine == pb.ConvolutionParameter.DEFAULT
    assert len(conv.pad) == 0 and len(conv.stride) == 0

    pool = pb.PoolingParameter()
    assert pool.pool == pb.PoolingParameter.MAX
    assert pool.stride == 1
    assert pool.pad == 0
    assert pool.round_mode == pb.PoolingParameter.CEIL
    assert pool.global_pooling is False

    assert pb.PReLUParameter().channel_shared is False

    lrn = pb.LRNParameter()
    assert lrn.local_size == 5
    assert _close(lrn.alpha, 1.0)
    assert _close(lrn.beta, 0.75)
    assert _close(lrn.k, 1.0)
    assert lrn.norm_region == pb.LRNParameter.ACROSS_CHANNELS

    bn = pb.BatchNormParameter()
    assert _close(bn.moving_average_fraction, 0.999)
    assert _close(bn.eps, 1e-5)
    assert not bn.HasField("use_global_stats")

    assert _close(pb.DropoutParameter().dropout_ratio, 0.5)

    elt = pb.EltwiseParameter()
    assert elt.stable_prod_grad is True
    assert elt.operation == pb.EltwiseParameter.SUM

    filler = pb.FillerParameter()
    assert filler.type == "constant"
    assert filler.value == 0.0
    assert filler.std == 1.0
    assert filler.max == 1.0
    assert filler.min == 0.0
    assert filler.sparse == -1
    assert filler.variance_norm == pb.FillerParameter.FAN_IN

    loss = pb.LossParameter()
    assert loss.normalization == pb.LossParameter.VALID
    assert not loss.HasField("ignore_label")

    assert pb.Datum().encoded is False
    assert pb.InnerProductParameter().bias_term is True
    assert pb.InnerProductParameter().transpose is False
    assert pb.SoftmaxParameter().axis == 1
    assert pb.ConcatParameter().axis == 1
    assert pb.SliceParameter().axis == 1
    assert pb.FlattenParameter().end_axis == -1
    assert pb.ReshapeParameter().num_axes == -1
    assert pb.CropParameter().axis == 2
    assert pb.ScaleParameter().bias_term is False
    assert pb.ExpParameter().base == -1.0
    assert pb.PowerParameter().power == 1.0
    assert _close(pb.MVNParameter().eps, 1e-9)
    assert pb.DataParameter().backend == pb.DataParameter.LEVELDB
    assert pb.DataParameter().prefetch == 4
    assert pb.ImageDataParameter().batch_size == 1
    assert pb.ImageDataParameter().is_color is True
    assert pb.TransformationParameter().scale == 1.0
    assert pb.ParamSpec().lr_mult == 1.0
    assert pb.ParamSpec().decay_mult == 1.0
    assert pb.NetState().phase == pb.TEST
    assert pb.SwishParameter().beta == 1.0
    assert pb.InfogainLossParameter().axis == 1
    assert pb.V0LayerParameter().biasterm is True
    assert pb.BlobProto().num == 0


def test_solver_defaults():
    s = pb.SolverParameter()
    assert not s.HasField("base_lr")
    assert s.base_lr == 0.0
    assert s.momentum == 0.0
    assert not s.HasField("lr_policy")
    assert s.lr_policy == ""
    assert _close(s.delta, 1e-8)
    assert _close(s.momentum2, 0.999)
    assert _close(s.rms_decay, 0.99)
    assert s.solver_mode == pb.SolverParameter.GPU
    assert s.snapshot_format == pb.SolverParameter.BINARYPROTO
    assert s.test_initialization is True
    assert s.average_loss == 1
    assert s.iter_size == 1
    assert s.regularization_type == "L2"
    assert s.type == "SGD"
    assert s.solver_type == pb.SolverParameter.SGD
    assert s.clip_gradients == -1.0
    assert s.random_seed == -1
    assert s.snapshot_after_train is True
    assert s.layer_wise_reduce is True
    assert s.test_interval == 0
    assert len(s.weights) == 0
    assert pb.SolverState().current_step == 0


FIELD_NUMBERS = [
    (pb.LayerParameter, "prelu_param", 131),
    (pb.LayerParameter, "param", 6),
    (pb.LayerParameter, "blobs", 7),
    (pb.LayerParameter, "transform_param", 100),
    (pb.LayerParameter, "loss_param", 101),
    (pb.LayerParameter, "convolution_param", 106),
    (pb.LayerParameter, "pooling_param", 121),
    (pb.LayerParameter, "inner_product_param", 117),
    (pb.LayerParameter, "batch_norm_param", 139),
    (pb.LayerParameter, "input_param", 143),
    (pb.LayerParameter, "swish_param", 147),
    (pb.LayerParameter, "clip_param", 148),
    (pb.NetParameter, "layer", 100),
    (pb.NetParameter, "layers", 2),
    (pb.NetParameter, "input_dim", 4),
    (pb.NetParameter, "input_shape", 8),
    (pb.BlobProto, "shape", 7),
    (pb.BlobProto, "double_data", 8),
    (pb.SolverParameter, "type", 40),
    (pb.SolverParameter, "weights", 42),
    (pb.V1LayerParameter, "layer", 1),
    (pb.V1LayerParameter, "param", 1001),
    (pb.V0LayerParameter, "hdf5_output_param", 1001),
]


@pytest.mark.parametrize(("message", "field", "number"), FIELD_NUMBERS)
def test_field_numbers(message, field, number):
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_layer_parameter_has_every_param_field():
    names = [
        "accuracy",
        "argmax",
        "batch_norm",
        "bias",
        "clip",
        "concat",
        "contrastive_loss",
        "convolution",
        "crop",
        "data",
        "dropout",
        "dummy_data",
        "eltwise",
        "elu",
        "embed",
        "exp",
        "flatten",
        "hdf5_data",
        "hdf5_output",
        "hinge_loss",
        "image_data",
        "infogain_loss",
        "inner_product",
        "input",
        "log",
        "lrn",
        "memory_data",
        "mvn",
        "parameter",
        "pooling",
        "power",
        "prelu",
        "python",
        "recurrent",
        "reduction",
        "relu",
        "reshape",
        "scale",
        "sigmoid",
        "softmax",
        "spp",
        "slice",
        "swish",
        "tanh",
        "threshold",
        "tile",
        "window_data",
        "transform",
        "loss",
    ]
    fields = pb.LayerParameter.DESCRIPTOR.fields_by_name
    for name in names:
        assert f"{name}_param" in fields, name
    numbers = [f.number for f in pb.LayerParameter.DESCRIPTOR.fields]
    assert len(numbers) == len(set(numbers))


def test_blob_packed_encoding():
    # Caffe writes repeated floats packed: tag 0x2a (field 5, length-delimited).
    blob = pb.BlobProto(data=[1.0, 2.0])
    assert blob.SerializeToString()[:2] == b"\x2a\x08"
    shape = pb.BlobShape(dim=[2, 3])
    assert shape.SerializeToString() == b"\x0a\x02\x02\x03"


def test_solver_prototxt_parses():
    text = """
        net: "train_val.prototxt"
        test_iter: 100
        test_interval: 500
        base_lr: 0.01
        momentum: 0.9
        momentum2: 0.995
        weight_decay: 0.0005
        lr_policy: "multistep"
        gamma: 0.1
        stepvalue: 1000
        stepvalue: 2000
        display: 20
        max_iter: 3000
        iter_size: 2
        clip_gradients: 10
        snapshot: 1000
        snapshot_prefix: "snap/net"
        solver_mode: CPU
        type: "Adam"
        weights: "a.caffemodel"
        weights: "b.caffemodel"
        train_state { phase: TRAIN stage: "s1" }
    """
    s = text_format.Parse(text, pb.SolverParameter())
    assert s.net == "train_val.prototxt"
    assert list(s.test_iter) == [100]
    assert list(s.stepvalue) == [1000, 2000]
    assert s.solver_mode == pb.SolverParameter.CPU
    assert s.type == "Adam"
    assert list(s.weights) == ["a.caffemodel", "b.caffemodel"]
    assert s.train_state.phase == pb.TRAIN
    assert _close(s.momentum2, 0.995)


def test_legacy_v1_and_v0_layers_parse():
    text = """
        name: "old"
        input: "data"
        input_dim: 1 input_dim: 1 input_dim: 28 input_dim: 28
        layers {
          name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
          blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
          convolution_param { num_output: 20 kernel_size: 5 }
          include { phase: TRAIN }
        }
        layers {
          layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 }
          bottom: "conv1" top: "pool1"
        }
    """
    net = text_format.Parse(text, pb.NetParameter())
    assert len(net.layers) == 2 and len(net.layer) == 0
    v1 = net.layers[0]
    assert v1.type == pb.V1LayerParameter.CONVOLUTION
    assert list(v1.blobs_lr) == [1.0, 2.0]
    assert v1.convolution_param.num_output == 20
    v0 = net.layers[1].layer
    assert v0.pool == pb.V0LayerParameter.AVE
    assert v0.kernelsize == 2
    assert v0.biasterm is True
    again = pb.NetParameter.FromString(net.SerializeToString())
    assert again == net


def test_datum_round_trip():
    datum = pb.Datum(channels=3, height=2, width=2, data=bytes(range(12)), label=7)
    again = pb.Datum.FromString(datum.SerializeToString())
    assert again == datum
    assert again.data == bytes(range(12))
    assert not again.encoded


def test_clip_requires_min_and_max():
    layer = text_format.Parse(
        'name: "c" type: "Clip" clip_param { min: -1 max: 6 }', pb.LayerParameter()
    )
    assert layer.clip_param.min == -1.0 and layer.clip_param.max == 6.0
    assert not pb.ClipParameter(min=0.0).IsInitialized()


# ---------------------------------------------------------------------------
# property test: BlobProto round trips
# ---------------------------------------------------------------------------

floats32 = st.floats(allow_nan=False, width=32)


@st.composite
def blob_protos(draw):
    dims = draw(st.lists(st.integers(min_value=0, max_value=6), max_size=4))
    count = math.prod(dims)
    data = draw(st.lists(floats32, min_size=count, max_size=count))
    blob = pb.BlobProto()
    blob.shape.dim.extend(dims)
    blob.data.extend(data)
    if draw(st.booleans()):
        blob.diff.extend(draw(st.lists(floats32, min_size=count, max_size=count)))
    return blob


@settings(deadline=None, max_examples=200)
@given(blob_protos())
def test_blob_proto_round_trip(blob):
    binary = pb.BlobProto()
    binary.ParseFromString(blob.SerializeToString())
    assert binary == blob
    assert list(binary.shape.dim) == list(blob.shape.dim)

    text = pb.BlobProto()
    text_format.Parse(text_format.MessageToString(blob), text)
    assert text == blob
    assert [math.copysign(1.0, v) for v in text.data] == [
        math.copysign(1.0, v) for v in blob.data
    ]
