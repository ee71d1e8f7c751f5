"""Looking inside nets: parameter statistics (``minicaffe params``) and slope traces during training.

Parameters come either from a built Net (prototxt + optional weights: the shapes the net uses) or
straight from a .caffemodel / snapshot (no prototxt needed: layer names, types and blobs as stored).
"""

from __future__ import annotations

import csv
import fnmatch
import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import io
from .blob import proto_shape, proto_values
from .proto import caffe_pb2

# (layer name, layer type, parameter arrays)
LayerParams = tuple[str, str, list[np.ndarray]]


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


def caffemodel_params(path: str | Path) -> list[LayerParams]:
    """Every layer with blobs in a binary .caffemodel (V2 ``layer`` or legacy V1 ``layers``)."""
    model = io.upgrade_net(io.read_binary(path, caffe_pb2.NetParameter()), str(path))
    out = []
    for layer in model.layer:
        if not layer.blobs:
            continue
        arrays = []
        for i, blob in enumerate(layer.blobs):
            shape = proto_shape(blob)
            array = proto_values(blob)
            if int(np.prod(shape, dtype=np.int64)) != array.size:
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
    """{layer: [{"type", "index", "shape", "count", "mean", "std", "min", "max"[, "values"]}, ...]}."""
    out: OrderedDict[str, list[dict]] = OrderedDict()
    for name, kind, arrays in params:
        entries = []
        for index, array in enumerate(arrays):
            entry = {"type": kind, "index": index, **blob_stats(array)}
            if values:
                # float() of a float32 is exact, so these equal the stored numbers.
                entry["values"] = [float(v) for v in np.asarray(array).ravel()]
            entries.append(entry)
        out[name] = entries
    return out


# -- formatting ------------------------------------------------------------------------------------

def _g(value: float) -> str:
    return f"{value:.6g}"


def format_json(stats: OrderedDict[str, list[dict]]) -> str:
    return json.dumps(stats, indent=2)


def format_csv(stats: OrderedDict[str, list[dict]]) -> str:
    import io as _io

    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    with_values = any("values" in e for entries in stats.values() for e in entries)
    header = ["layer", "type", "index", "shape", "count", "mean", "std", "min", "max"]
    writer.writerow(header + (["values"] if with_values else []))
    for name, entries in stats.items():
        for e in entries:
            row = [name, e["type"], e["index"], "x".join(map(str, e["shape"])), e["count"],
                   repr(e["mean"]), repr(e["std"]), repr(e["min"]), repr(e["max"])]
            if with_values:
                row.append(" ".join(repr(v) for v in e.get("values", [])))
            writer.writerow(row)
    return buffer.getvalue()


def format_table(stats: OrderedDict[str, list[dict]]) -> str:
    rows = [["layer", "type", "blob", "shape", "count", "mean", "std", "min", "max"]]
    value_lines: dict[int, str] = {}
    for name, entries in stats.items():
        for e in entries:
            rows.append([name, e["type"], str(e["index"]), "x".join(map(str, e["shape"])) or "scalar",
                         str(e["count"]), _g(e["mean"]), _g(e["std"]), _g(e["min"]), _g(e["max"])])
            if "values" in e:
                value_lines[len(rows) - 1] = "    values: " + " ".join(_g(v) for v in e["values"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for r, row in enumerate(rows):
        left = [cell.ljust(w) for cell, w in zip(row[:4], widths[:4])]
        right = [cell.rjust(w) for cell, w in zip(row[4:], widths[4:])]
        lines.append("  ".join(left + right).rstrip())
        if r == 0:
            lines.append("-" * len(lines[0]))
        if r in value_lines:
            lines.append(value_lines[r])
    return "\n".join(lines)


# -- slope traces during training -------------------------------------------------------------------

class ParamWatcher:
    """Prints and records the parameters of the layers matching `pattern` (a glob on layer name or
    type, any case: ``prelu*``, ``PReLU``) while a net trains.

    ``record(iteration)`` returns one log line, e.g.
    ``alpha values at iteration 100: prelu1 mean 0.25 [0.21 .. 0.3], prelu2 mean 0.24 [...]``,
    and appends one CSV row per parameter blob: iteration, layer, index, mean, min, max.
    """

    CSV_HEADER = ("iteration", "layer", "index", "mean", "min", "max")

    def __init__(self, net, pattern: str, csv_path: str | Path | None = None):
        self.net, self.pattern = net, pattern
        self.layers = [layer for layer in net.layers
                       if layer.blobs and matches(pattern, layer.name, layer.type)]
        if not self.layers:
            have = ", ".join(f"{layer.name} ({layer.type})" for layer in net.layers if layer.blobs) or "none"
            raise ValueError(f"--watch '{pattern}' matches no layer with parameters "
                             f"(layers with parameters: {have})")
        self.csv_path = Path(csv_path) if csv_path is not None else None
        # "alpha" is what PReLU users call the slopes (and what the seeds print).
        self.label = "alpha values" if all(layer.type == "PReLU" for layer in self.layers) else "parameters"

    def stats(self) -> list[tuple[str, int, float, float, float]]:
        out = []
        for layer in self.layers:
            for index, blob in enumerate(layer.blobs):
                v = np.asarray(blob.data, dtype=np.float64)
                out.append((layer.name, index, float(v.mean()), float(v.min()), float(v.max())))
        return out

    def record(self, iteration: int) -> str:
        rows = self.stats()
        if self.csv_path is not None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            with open(self.csv_path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(self.CSV_HEADER)
                for name, index, mean, low, high in rows:
                    writer.writerow([iteration, name, index, repr(mean), repr(low), repr(high)])
        several = {name for name, index, *_ in rows if index > 0}
        parts = []
        for name, index, mean, low, high in rows:
            label = f"{name}[{index}]" if name in several else name
            parts.append(f"{label} mean {mean:.4g} [{low:.4g} .. {high:.4g}]")
        return f"{self.label} at iteration {iteration}: " + ", ".join(parts)


def read_watch_csv(path: str | Path) -> list[dict]:
    """The rows a ParamWatcher wrote, numbers converted."""
    with open(path, newline="") as f:
        return [{"iteration": int(r["iteration"]), "layer": r["layer"], "index": int(r["index"]),
                 "mean": float(r["mean"]), "min": float(r["min"]), "max": float(r["max"])}
                for r in csv.DictReader(f)]


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
    from .blob import Blob
    from .layer import LayerError, create_layer

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
    from .net import filter_net

    param = io.read_net_param(model) if not isinstance(model, caffe_pb2.NetParameter) else model
    state = caffe_pb2.NetState()
    state.CopyFrom(param.state)
    state.phase = phase
    param = filter_net(param, state)
    if force_backward:
        param.force_backward = True
    for layer in param.layer:
        if layer.type not in SOURCE_PARAMS:
            continue
        source = getattr(layer, SOURCE_PARAMS[layer.type]).source
        if not dummy_data:
            if source and not Path(source).exists():
                raise ValueError(f"{model}: layer '{layer.name}' ({layer.type}) reads '{source}', which does "
                                 "not exist (relative paths are from the current directory); create it, "
                                 "or use --dummy-data to replace data layers by DummyData")
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
    from .net import Net

    param = prepare_net_param(model, phase, dummy_data, dummy_shape, force_backward)
    net = Net(param, phase, dtype=dtype)
    net.source = str(model)
    if weights:
        net.copy_from(weights)
    return net


def load_params(model: str | None, weights: str | None, phase: int | None = None) -> list[LayerParams]:
    """Parameters for `minicaffe params` / `plot-params`: from the built net (model [+ weights]) or,
    with weights alone, straight from the .caffemodel."""
    from .layer import TEST

    if model:
        try:
            net = build_net(model, TEST if phase is None else phase, weights)
        except ValueError as error:
            # A train/test net whose database is absent here: the file still has every parameter.
            if not weights or "does not exist" not in str(error):
                raise
            names = {layer.name for layer in io.read_net_param(model).layer}
            return [entry for entry in caffemodel_params(weights) if entry[0] in names]
        return net_params(net)
    if weights:
        return caffemodel_params(weights)
    raise ValueError("give --model (and usually --weights), or --weights alone to read a .caffemodel")


def watch_solver(solver, pattern: str, csv_path: str | Path | None = None) -> ParamWatcher:
    """Trace the parameters of `solver`'s train net matching `pattern` at every display step (and at
    every iteration when display is 0): a log line, and a CSV row per blob in `csv_path`, by default
    ``<snapshot_prefix>_watch.csv`` beside the snapshots. Uses the solver's pycaffe-style callback,
    after the gradients (and the display lines) and before the update of that iteration."""
    from . import log

    if csv_path is None:
        csv_path = f"{solver.param.snapshot_prefix or 'minicaffe'}_watch.csv"
    watcher = ParamWatcher(solver.net, pattern, csv_path)

    def on_gradients() -> None:
        display = solver.param.display
        if not display or solver.iter % display == 0:
            # glog's file:line form, so log parsers keep reading the line (placed after the display's).
            log.info(watcher.record(solver.iter), "solver.cpp:262")

    solver.add_callback(on_gradients=on_gradients)
    return watcher


__all__ = ["ParamWatcher", "blob_stats", "build_net", "caffemodel_params", "format_csv", "format_json",
           "format_table", "load_params", "matches", "net_params", "param_stats", "prepare_net_param",
           "read_watch_csv", "select", "watch_solver"]
