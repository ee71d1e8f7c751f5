"""Nets written in Caffe's older formats, upgraded to today's (as Caffe's upgrade_proto.cpp does).

The steps, in Caffe's order, each taken only when the net needs it (``net_upgrades`` names them):

- V0: ``layers { layer { name type: "conv" num_output kernelsize ... } bottom top }``. A V0 "padding"
  layer is folded into the convolution or pooling it feeds; each V0 field goes to the per-type message
  of the layer's type (num_output -> convolution_param or inner_product_param, ...), and the type string
  to the V1 enum. A field the layer's type has no place for is dropped with a warning, as Caffe does.
- data transformation: a V1 Data / ImageData / WindowData layer's scale, mean_file, crop_size and
  mirror move from its data parameters into transform_param.
- V1: ``layers { type: CONVOLUTION blobs_lr weight_decay param blob_share_mode }`` become ``layer``
  with a type string and ParamSpecs (lr_mult, decay_mult, name, share_mode).
- input fields: net-level ``input`` with ``input_shape`` or ``input_dim`` becomes an Input layer first in
  the net; ``input`` alone (old .caffemodel files carry it) is dropped.
- BatchNorm: old BatchNorm layers declare three param specs; their lr_mult and decay_mult become 0 (the
  statistics are not learned), names kept.

The blobs of a legacy .caffemodel keep their 4-d num/channels/height/width shapes; Blob.from_proto
matches those with the net's shapes as Caffe does. Solvers: minicaffe.solver.upgrade_solver.
"""

from __future__ import annotations

from collections.abc import Callable

from . import log
from .files import FormatError
from .proto import caffe_pb2

V0 = caffe_pb2.V0LayerParameter
V1 = caffe_pb2.V1LayerParameter

# -- which upgrades a net needs ---------------------------------------------------------------------

DATA_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
# V1 data layer types -> the per-type message that held the transformation fields before transform_param.
V1_DATA_PARAMS = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                  V1.WINDOW_DATA: "window_data_param"}


def needs_v0_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return any(connection.HasField("layer") for connection in net.layers)


def needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    for layer in net.layers:
        name = V1_DATA_PARAMS.get(layer.type)
        if name and any(getattr(layer, name).HasField(f) for f in DATA_TRANSFORM_FIELDS):
            return True
    return False


def needs_v1_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.layers) > 0


def needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.input) > 0


def _old_batch_norm(layer: caffe_pb2.LayerParameter) -> bool:
    """An old BatchNorm definition: three param specs, not all of them already lr_mult 0 and decay_mult 0
    (Caffe looks at the count only; setting what is already 0 changes nothing, so such a net is current)."""
    return layer.type == "BatchNorm" and len(layer.param) == 3 and any(
        spec.lr_mult != 0 or spec.decay_mult != 0 for spec in layer.param)


def needs_batch_norm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return any(_old_batch_norm(layer) for layer in net.layer)


# -- the steps ----------------------------------------------------------------------------------------

def upgrade_v0_net(net: caffe_pb2.NetParameter, source: str) -> None:
    """V0 layers (inside V1's `layers`) -> V1 layers. As Caffe, the net keeps only its name, inputs and
    force_backward: a V0 net had nothing else."""
    connections = _fold_padding_layers(net, source)
    kept = caffe_pb2.NetParameter()
    for field in ("name", "force_backward"):
        if net.HasField(field):
            setattr(kept, field, getattr(net, field))
    kept.input.extend(net.input)
    kept.input_dim.extend(net.input_dim)
    for index, connection in enumerate(connections):
        _upgrade_v0_layer(connection, kept.layers.add(), index, source)
    net.CopyFrom(kept)


def _layer_label(connection: caffe_pb2.V1LayerParameter, index: int) -> str:
    name = connection.layer.name if connection.HasField("layer") else connection.name
    return f"layer '{name}'" if name else f"layers entry {index}"


def _fold_padding_layers(net: caffe_pb2.NetParameter, source: str) -> list[caffe_pb2.V1LayerParameter]:
    """The net's V0 connections with each "padding" layer removed: its pad goes to the convolution or
    pooling it feeds, which then reads the padding layer's input (Caffe's UpgradeV0PaddingLayers)."""
    producer: dict[str, int] = {name: -1 for name in net.input}  # blob -> index of its last writer
    out: list[caffe_pb2.V1LayerParameter] = []
    for index, connection in enumerate(net.layers):
        if not connection.HasField("layer"):
            raise FormatError(f"{source}: {_layer_label(connection, index)} has no V0 'layer' in a V0 net "
                              "(V0 and V1 layers cannot be mixed)")
        kind = connection.layer.type
        upgraded = None
        if kind != "padding":
            upgraded = caffe_pb2.V1LayerParameter()
            upgraded.CopyFrom(connection)
            out.append(upgraded)
        for j, blob in enumerate(connection.bottom):
            if blob not in producer:
                raise FormatError(f"{source}: {_layer_label(connection, index)} reads blob '{blob}', "
                                  "which no earlier layer or input makes")
            writer = producer[blob]
            if writer < 0 or net.layers[writer].layer.type != "padding":
                continue
            padding = net.layers[writer]
            if kind not in ("conv", "pool"):
                raise FormatError(f"{source}: {_layer_label(connection, index)} of type '{kind}' reads the "
                                  "output of a padding layer; only conv and pool layers can")
            if len(connection.bottom) != 1 or len(padding.bottom) != 1 or len(padding.top) != 1:
                raise FormatError(f"{source}: {_layer_label(padding, writer)} and the layer it pads must "
                                  "each have one bottom (and the padding layer one top)")
            upgraded.layer.pad = padding.layer.pad
            upgraded.bottom[j] = padding.bottom[0]
        for blob in connection.top:
            producer[blob] = index
    return out


# V0 type strings -> V1 enum (Caffe's UpgradeV0LayerType).
V0_TYPES = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION, "data": V1.DATA,
    "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS, "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT, "im2col": V1.IM2COL, "images": V1.IMAGE_DATA,
    "infogain_loss": V1.INFOGAIN_LOSS, "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING, "relu": V1.RELU,
    "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX, "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT,
    "tanh": V1.TANH, "window_data": V1.WINDOW_DATA,
}

_DATA_SOURCES = {"data": "data_param", "hdf5_data": "hdf5_data_param", "images": "image_data_param",
                 "window_data": "window_data_param"}
_CONV_IP = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_CONV_POOL = {"conv": "convolution_param", "pool": "pooling_param"}

# V0 field -> {V0 type: "message.field" in the V1 layer}; the field keeps its V0 name unless renamed in
# the path. A V0 field set on a type not listed here has no place in the upgraded layer.
V0_FIELDS: dict[str, dict[str, str]] = {
    "num_output": {t: f"{m}.num_output" for t, m in _CONV_IP.items()},
    "biasterm": {t: f"{m}.bias_term" for t, m in _CONV_IP.items()},
    "weight_filler": {t: f"{m}.weight_filler" for t, m in _CONV_IP.items()},
    "bias_filler": {t: f"{m}.bias_filler" for t, m in _CONV_IP.items()},
    "pad": {t: f"{m}.pad" for t, m in _CONV_POOL.items()},
    "kernelsize": {t: f"{m}.kernel_size" for t, m in _CONV_POOL.items()},
    "stride": {t: f"{m}.stride" for t, m in _CONV_POOL.items()},
    "group": {"conv": "convolution_param.group"},
    "pool": {"pool": "pooling_param.pool"},
    "dropout_ratio": {"dropout": "dropout_param.dropout_ratio"},
    "local_size": {"lrn": "lrn_param.local_size"},
    "alpha": {"lrn": "lrn_param.alpha"},
    "beta": {"lrn": "lrn_param.beta"},
    "k": {"lrn": "lrn_param.k"},
    "source": {**{t: f"{m}.source" for t, m in _DATA_SOURCES.items()},
               "infogain_loss": "infogain_loss_param.source"},
    "batchsize": {t: f"{m}.batch_size" for t, m in _DATA_SOURCES.items()},
    "rand_skip": {"data": "data_param.rand_skip", "images": "image_data_param.rand_skip"},
    "shuffle_images": {"images": "image_data_param.shuffle"},
    "new_height": {"images": "image_data_param.new_height"},
    "new_width": {"images": "image_data_param.new_width"},
    "concat_dim": {"concat": "concat_param.concat_dim"},
    "det_fg_threshold": {"window_data": "window_data_param.fg_threshold"},
    "det_bg_threshold": {"window_data": "window_data_param.bg_threshold"},
    "det_fg_fraction": {"window_data": "window_data_param.fg_fraction"},
    "det_context_pad": {"window_data": "window_data_param.context_pad"},
    "det_crop_mode": {"window_data": "window_data_param.crop_mode"},
    "hdf5_output_param": {"hdf5_output": "hdf5_output_param"},
}
# V0 transformation fields, on any layer type -> transform_param.
V0_TRANSFORM_FIELDS = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size", "mirror": "mirror"}
# Values whose enum type changed: V0's PoolMethod -> PoolingParameter's (same names).
_V0_VALUE: dict[str, Callable] = {
    "pool": lambda v: caffe_pb2.PoolingParameter.PoolMethod.Value(V0.PoolMethod.Name(v)),
}


def _assign(message, path: str, value) -> None:
    """message.<path> = value, where path is "sub.field": append to a repeated field, copy a message."""
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    field = message.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        getattr(message, name).append(value)
    elif field.message_type is not None:
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)


def _upgrade_v0_layer(connection: caffe_pb2.V1LayerParameter, out: caffe_pb2.V1LayerParameter,
                      index: int, source: str) -> None:
    """One V0 connection -> a V1 layer (Caffe's UpgradeV0LayerParameter)."""
    old = connection.layer
    label = _layer_label(connection, index)
    out.bottom.extend(connection.bottom)
    out.top.extend(connection.top)
    if old.HasField("name"):
        out.name = old.name
    if old.type not in V0_TYPES:
        raise FormatError(f"{source}: {label} has V0 type '{old.type}', which is not a V0 layer type "
                          f"(known: {', '.join(sorted(V0_TYPES))})")
    out.type = V0_TYPES[old.type]
    out.blobs.extend(old.blobs)
    out.blobs_lr.extend(old.blobs_lr)
    out.weight_decay.extend(old.weight_decay)
    for field, value in old.ListFields():
        name = field.name
        if name in ("name", "type", "blobs", "blobs_lr", "weight_decay"):
            continue
        if name in V0_TRANSFORM_FIELDS:
            setattr(out.transform_param, V0_TRANSFORM_FIELDS[name], value)
        elif old.type in V0_FIELDS.get(name, {}):
            _assign(out, V0_FIELDS[name][old.type], _V0_VALUE.get(name, lambda v: v)(value))
        else:
            log.warning(f"{source}: {label}: V0 field '{name}' has no place in a '{old.type}' layer; "
                        "dropped (as Caffe does)", "upgrade_proto.cpp:0")


def upgrade_data_transformation(net: caffe_pb2.NetParameter) -> None:
    """Caffe's UpgradeNetDataTransformation: move a V1 data layer's transformation fields out of its
    data parameters into transform_param (which they overwrite there)."""
    for layer in net.layers:
        name = V1_DATA_PARAMS.get(layer.type)
        if not name:
            continue
        params = getattr(layer, name)
        for field in DATA_TRANSFORM_FIELDS:
            if params.HasField(field):
                setattr(layer.transform_param, field, getattr(params, field))
                params.ClearField(field)


def _v1_type_names() -> dict[int, str]:
    """V1LayerParameter.LayerType enum value -> V2 type string (CamelCase of the enum name)."""
    special = {"NONE": "", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
               "INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "MVN": "MVN", "ABSVAL": "AbsVal",
               "BNLL": "BNLL", "TANH": "TanH", "RELU": "ReLU", "SOFTMAX_LOSS": "SoftmaxWithLoss",
               "ARGMAX": "ArgMax", "IM2COL": "Im2col", "SPP": "SPP"}
    names = {}
    for value in V1.LayerType.DESCRIPTOR.values:
        names[value.number] = special.get(
            value.name, "".join(part.capitalize() for part in value.name.split("_")))
    return names


V1_TYPE_NAMES = _v1_type_names()


def upgrade_v1_net(net: caffe_pb2.NetParameter, source: str) -> None:
    """V1 `layers` -> `layer` (Caffe's UpgradeV1Net): the fields both messages have are copied, the type
    enum becomes its string, and blobs_lr / weight_decay / param / blob_share_mode become ParamSpecs."""
    if net.layer:
        raise FormatError(f"{source}: has both 'layer' and the deprecated V1 'layers' fields; write every "
                          "layer as layer { type: \"Type\" ... }")
    shared = {f.name for f in V1.DESCRIPTOR.fields} & set(caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name)
    for old in net.layers:
        new = net.layer.add()
        for field in shared - {"type", "param"}:
            descriptor = old.DESCRIPTOR.fields_by_name[field]
            if descriptor.is_repeated:
                getattr(new, field).extend(getattr(old, field))
            elif old.HasField(field):
                _assign(new, field, getattr(old, field))
        if old.HasField("type"):
            new.type = V1_TYPE_NAMES[old.type]
        count = max(len(old.param), len(old.blob_share_mode), len(old.blobs_lr), len(old.weight_decay))
        for i in range(count):
            spec = new.param.add()
            if i < len(old.param):
                spec.name = old.param[i]
            if i < len(old.blob_share_mode):
                spec.share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(
                    V1.DimCheckMode.Name(old.blob_share_mode[i]))
            if i < len(old.blobs_lr):
                spec.lr_mult = old.blobs_lr[i]
            if i < len(old.weight_decay):
                spec.decay_mult = old.weight_decay[i]
    net.ClearField("layers")


def upgrade_net_input(net: caffe_pb2.NetParameter, source: str) -> None:
    """Net-level inputs -> an Input layer first in the net (Caffe's UpgradeNetInput). Inputs without
    shapes are names an old .caffemodel carries: they are dropped."""
    names = list(net.input)
    if net.input_shape:
        if len(net.input_shape) != len(names):
            raise FormatError(f"{source}: {len(names)} inputs but {len(net.input_shape)} input_shape entries")
        shapes = [list(s.dim) for s in net.input_shape]
    elif net.input_dim:
        dims = list(net.input_dim)
        if len(dims) != 4 * len(names):
            raise FormatError(f"{source}: {len(names)} inputs need {4 * len(names)} input_dim values, "
                              f"got {len(dims)}")
        shapes = [dims[4 * i:4 * i + 4] for i in range(len(names))]
    else:
        shapes = []
    if shapes:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        layer.top.extend(names)
        for shape in shapes:
            layer.input_param.shape.add().dim.extend(shape)
        layers = [layer, *net.layer]
        net.ClearField("layer")  # the list's references keep the old layers' contents
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_dim")
    net.ClearField("input_shape")


def upgrade_batch_norm(net: caffe_pb2.NetParameter) -> None:
    """Caffe's UpgradeNetBatchNorm: an old BatchNorm layer's three param specs get lr_mult 0 and
    decay_mult 0 (its blobs are statistics, never learned); their names stay."""
    for layer in net.layer:
        if _old_batch_norm(layer):
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0


# (name, needs it?, upgrade) in the order Caffe's UpgradeNetAsNeeded applies them; the name completes
# "upgraded ... " in the log.
STEPS: list[tuple[str, Callable, Callable]] = [
    ("deprecated V0LayerParameter layers", needs_v0_upgrade, upgrade_v0_net),
    ("deprecated data transformation fields (to transform_param)", needs_data_upgrade,
     lambda net, source: upgrade_data_transformation(net)),
    ("deprecated V1LayerParameter layers", needs_v1_upgrade, upgrade_v1_net),
    ("deprecated net input fields (to an Input layer)", needs_input_upgrade, upgrade_net_input),
    ("BatchNorm layers with deprecated param specs (lr_mult and decay_mult 0)", needs_batch_norm_upgrade,
     lambda net, source: upgrade_batch_norm(net)),
]


def net_upgrades(net: caffe_pb2.NetParameter) -> list[str]:
    """What upgrade_net would do to `net` (the names of the steps it needs, each judged on `net` as it is
    now); empty when the net is in today's format."""
    return [name for name, needed, _ in STEPS if needed(net)]


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "<net>") -> caffe_pb2.NetParameter:
    """Upgrade `net` in place to today's format, as Caffe's UpgradeNetAsNeeded; each step taken is
    logged. Returns `net`. A net that cannot be upgraded is a FormatError naming `source`."""
    for name, needed, upgrade in STEPS:
        if needed(net):
            upgrade(net, source)
            log.info(f"{source}: upgraded {name}", "upgrade_proto.cpp:0")
    return net
