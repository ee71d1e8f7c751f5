"""Looking inside nets: parameter statistics (``minicaffe params``, ``plot-params``) and the nets the
inspection commands build (``time``, ``summary``: data layers optionally replaced by DummyData).

Parameters come either from a built Net (prototxt + optional weights: the shapes the net uses) or
straight from a .caffemodel, or the .caffemodel a .solverstate snapshot names (no prototxt needed:
layer names, types and blobs as stored). Printing them: minicaffe.param_format; tracing them while a
net trains: minicaffe.watch.
"""

from __future__ import annotations

import fnmatch
import math
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import hdf5, io
from .blob import Blob, proto_shape, proto_values
from .layer import TEST, LayerError, create_layer
from .net import Net, NetError, filter_net
from .proto import caffe_pb2
from .solver import learned_net_path, read_solver_state

# (layer name, layer type, parameter arrays)
LayerParams = tuple[str, str, list[np.ndarray]]


class MissingSourceError(ValueError):
    """A data layer's source (database, list file) does not exist."""


def matches(pattern: str | None, *names: str) -> bool:
    """Shell-style glob (``prelu*``), case-insensitive, against any of `names` (layer name or type)."""
    if not pattern:
        return True
    pattern = pattern.lower()
    return any(fnmatch.fnmatchcase(name.lower(), pattern) for name in names)


def net_params(net) -> list[LayerParams]:
    """The parameter arrays of every layer of a built Net that has parameters (host copies)."""
    return [(layer.name, layer.type, [np.array(blob.data) for blob in layer.blobs])
            for layer in net.layers if layer.blobs]


def weights_file(path: str | Path) -> Path:
    """The .caffemodel holding the weights: `path` itself, or for a .solverstate (or .solverstate.h5)
    the model it names."""
    path = Path(path)
    if path.suffix != ".solverstate" and not path.name.endswith(".solverstate.h5"):
        return path
    state = read_solver_state(path)
    if not state.learned_net:
        raise io.FormatError(f"{path}: this solver state names no learned_net; give the .caffemodel "
                             "snapshot written with it")
    model = learned_net_path(path, state.learned_net)
    if not model.exists():
        raise io.FormatError(f"{path}: its weights are in '{state.learned_net}', which is not there "
                             f"(nor beside the .solverstate); give that .caffemodel")
    return model


def caffemodel_params(path: str | Path) -> list[LayerParams]:
    """Every layer with blobs in a binary .caffemodel (V2 ``layer`` or legacy V1 ``layers``), or in the
    .caffemodel a .solverstate names."""
    path = weights_file(path)
    if hdf5.is_hdf5(path):
        return hdf5_params(path)
    model = io.upgrade_net(io.read_binary(path, caffe_pb2.NetParameter()), str(path))
    out = []
    for layer in model.layer:
        if not layer.blobs:
            continue
        arrays = []
        for i, blob in enumerate(layer.blobs):
            shape = proto_shape(blob)
            array = proto_values(blob)
            if min(shape, default=0) < 0 or math.prod(shape) != array.size:  # Python ints: no wrap
                raise io.FormatError(f"{path}: layer '{layer.name}' blob {i} has {array.size} values "
                                     f"for shape {list(shape)}")
            arrays.append(array.reshape(shape))
        out.append((layer.name, layer.type, arrays))
    return out


def select(params: Iterable[LayerParams], layer: str | None = None,
           layer_type: str | None = None) -> list[LayerParams]:
    """Keep layers whose name matches the glob `layer` and whose type equals `layer_type` (any case)."""
    return [(name, kind, arrays) for name, kind, arrays in params
            if matches(layer, name) and (not layer_type or kind.lower() == layer_type.lower())]


def blob_stats(array: np.ndarray) -> dict:
    values = np.asarray(array, dtype=np.float64)
    empty = values.size == 0
    return {
        "shape": [int(d) for d in array.shape],
        "count": int(values.size),
        "mean": float(values.mean()) if not empty else float("nan"),
        "std": float(values.std()) if not empty else float("nan"),
        "min": float(values.min()) if not empty else float("nan"),
        "max": float(values.max()) if not empty else float("nan"),
    }


def param_stats(params: Iterable[LayerParams], values: bool = False) -> OrderedDict[str, list[dict]]:
    """{layer: [{"type", "blob", "shape", "count", "mean", "std", "min", "max"[, "values"]}, ...]}, where
    "blob" is the parameter blob's position in the layer (0: weights, 1: bias, ...)."""
    out: OrderedDict[str, list[dict]] = OrderedDict()
    for name, kind, arrays in params:
        entries = []
        for index, array in enumerate(arrays):
            entry = {"type": kind, "blob": index, **blob_stats(array)}
            if values:
                # float() of a float32 is exact, so these equal the stored numbers.
                entry["values"] = [float(v) for v in np.asarray(array).ravel()]
            entries.append(entry)
        out[name] = entries
    return out


# -- building nets for the inspection commands ------------------------------------------------------

# Layer types that read a data source, and the field holding it (and their batch_size).
SOURCE_PARAMS = {"Data": "data_param", "ImageData": "image_data_param", "HDF5Data": "hdf5_data_param",
                 "WindowData": "window_data_param"}


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,28,28' or '1x28x28' -> (1, 28, 28)."""
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise ValueError(f"bad shape '{text}': give integers such as 1,28,28") from None
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"bad shape '{text}': give positive integers such as 1,28,28")
    return shape


def _data_top_shapes(layer: caffe_pb2.LayerParameter, phase: int, shape: tuple[int, ...] | None):
    """Top shapes of a data layer: from `shape` (per sample, or with the batch) when given, else by
    setting the real layer up (which reads its source)."""
    batch = getattr(layer, SOURCE_PARAMS[layer.type]).batch_size or 1
    if shape is not None:
        data = shape if len(shape) == 4 else (batch, *shape)
        return [data] + [(data[0],)] * (len(layer.top) - 1)
    real = create_layer(layer, phase)
    tops = [Blob(()) for _ in layer.top]
    try:
        real.setup([], tops)
    except (LayerError, OSError, ValueError) as error:
        raise ValueError(f"--dummy-data: cannot tell the shape of layer '{layer.name}' ({layer.type}) "
                         f"from its source ({error}); give the sample shape, e.g. --dummy-data 1,28,28") \
            from None
    return [blob.shape for blob in tops]


def prepare_net_param(model, phase: int, dummy_data: bool = False,
                      dummy_shape: tuple[int, ...] | None = None,
                      force_backward: bool = False) -> caffe_pb2.NetParameter:
    """The NetParameter of `model` filtered for `phase`; with dummy_data, layers reading a data source
    become DummyData of the same top shapes (gaussian data, labels 0), so a net can be timed or
    summarised without its database. Without it, a missing source is a one-line error naming it."""
    param = io.read_net_param(model) if not isinstance(model, caffe_pb2.NetParameter) else model
    state = caffe_pb2.NetState()
    state.CopyFrom(param.state)
    state.phase = phase
    defined = len(param.layer)
    param = filter_net(param, state)
    if not param.layer:
        raise NetError(f"{model}: the net has no layers" if not defined else
                       f"{model}: none of the net's {defined} layers is included in phase "
                       f"{caffe_pb2.Phase.Name(phase)}")
    if force_backward:
        param.force_backward = True
    for layer in param.layer:
        if layer.type not in SOURCE_PARAMS:
            continue
        source = getattr(layer, SOURCE_PARAMS[layer.type]).source
        if not dummy_data:
            if source and not Path(source).exists():
                raise MissingSourceError(
                    f"{model}: layer '{layer.name}' ({layer.type}) reads '{source}', which does not exist "
                    "(relative paths are from the current directory); create it, or use --dummy-data to "
                    "replace data layers by DummyData")
            continue
        shapes = _data_top_shapes(layer, phase, dummy_shape)
        dummy = caffe_pb2.LayerParameter(name=layer.name, type="DummyData")
        dummy.top.extend(layer.top)
        dummy.include.extend(layer.include)
        for i, shape in enumerate(shapes):
            dummy.dummy_data_param.shape.add().dim.extend(shape)
            filler = dummy.dummy_data_param.data_filler.add()
            if i == 0:
                filler.type, filler.std = "gaussian", 1.0
            else:
                filler.type, filler.value = "constant", 0.0
        layer.CopyFrom(dummy)
    return param


def build_net(model, phase: int, weights: str | None = None, dummy_data: bool = False,
              dummy_shape: tuple[int, ...] | None = None, force_backward: bool = False,
              dtype=np.float32):
    """A Net for the inspection commands (see prepare_net_param), with weights loaded."""
    param = prepare_net_param(model, phase, dummy_data, dummy_shape, force_backward)
    net = Net(param, phase, dtype=dtype)
    net.source = str(model)
    if weights:
        net.copy_from(weights_file(weights))
    return net


def hdf5_params(path: Path) -> list[LayerParams]:
    """Every layer with blobs in Caffe's HDF5 weights (/data/<layer>/<j>); the file has no layer types."""
    out = []
    with hdf5.open_read(path, "reading HDF5 weights") as handle:
        data = handle.get("data")
        if data is None or not hasattr(data, "keys"):
            raise io.FormatError(f"{path}: has no 'data' group: not Caffe HDF5 weights")
        for name, group in data.items():
            arrays = [hdf5.dataset(group, str(j), f"{path}: layer '{name}'") for j in range(len(group))]
            if arrays:
                out.append((name, "", arrays))
    return out


def load_params(model: str | None, weights: str | None, phase: int | None = None) -> list[LayerParams]:
    """Parameters for `minicaffe params` / `plot-params`: from the built net (model [+ weights]) or,
    with weights alone, straight from the .caffemodel."""
    if model:
        try:
            net = build_net(model, TEST if phase is None else phase, weights)
        except MissingSourceError:
            # A train/test net whose database is absent here: the file still has every parameter.
            if not weights:
                raise
            names = {layer.name for layer in io.read_net_param(model).layer}
            return [entry for entry in caffemodel_params(weights) if entry[0] in names]
        return net_params(net)
    if weights:
        return caffemodel_params(weights)
    raise ValueError("give --model (and usually --weights), or --weights alone to read a .caffemodel")


__all__ = ["LayerParams", "MissingSourceError", "blob_stats", "build_net", "caffemodel_params", "load_params",
           "matches", "net_params", "param_stats", "parse_shape", "prepare_net_param", "select",
           "weights_file"]
