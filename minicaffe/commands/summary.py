"""`minicaffe summary`: every layer with its type, top shapes, parameter count and memory (as Keras'
``model.summary()``).

Activation memory is the data of the blobs a layer creates (its tops; a top that shares its bottom's
memory, in place or as a Split's, Flatten's or Reshape's, adds nothing); training needs as much again for
the diffs. Parameter memory is the data of the parameter blobs, shared parameters counted once in the
totals. "Kept for backward" is what a layer's forward keeps for its backward beyond the blobs (a copy of
its input or output, or in place a byte mask: Layer.planned_kept_bytes). The Split layers the net
inserts where a blob feeds several layers (Caffe's InsertSplits) are listed too, marked "automatic".
"""

from __future__ import annotations

import argparse

import numpy as np

from .. import inspect
from ..kernel import data_address
from ..layer import TEST, TRAIN


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="net prototxt")
    parser.add_argument("--weights", help="optional .caffemodel (parameter shapes come from the net)")
    parser.add_argument("--phase", choices=("TRAIN", "TEST"), default="TEST", help="net phase (default TEST)")
    parser.add_argument("--dummy-data", nargs="?", const="", default=None, metavar="SHAPE",
                        help="replace data layers by DummyData of the same shape (no database needed); "
                             "SHAPE (one sample, e.g. 1,28,28) when the source cannot be read")
    parser.add_argument("--double", action="store_true", help="float64 blobs (default float32)")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def memory_address(blob) -> int:
    """Where a blob's data starts (numpy or CuPy): blobs sharing their data share it."""
    return data_address(blob.get_data())


def summarize(net) -> dict:
    """Per-layer rows and totals of a built Net."""
    rows = []
    seen_blobs: set[int] = set()
    seen_params: set[int] = set()
    totals = {"params": 0, "trainable": 0, "activation_bytes": 0, "param_bytes": 0, "kept_bytes": 0}
    learnable = {id(p.blob): p.lr_mult != 0 for p in net.learnable_params}
    user_layers = {layer.name for layer in net.param.layer}
    for i, layer in enumerate(net.layers):
        bottoms = net.bottom_vecs[i]
        tops = []
        activation = 0
        for name, blob in zip(net.top_names[i], net.top_vecs[i]):
            in_place = any(blob is b for b in bottoms)
            tops.append((name, blob.shape, in_place))
            # In-place tops, Split, Flatten and Reshape tops share memory that is already counted.
            memory = memory_address(blob)
            if memory not in seen_blobs:
                activation += blob.count * blob.dtype.itemsize
            if blob.count:  # an empty blob has no memory of its own to share
                seen_blobs.add(memory)
        count = sum(blob.count for blob in layer.blobs)
        param_bytes = sum(blob.count * blob.dtype.itemsize for blob in layer.blobs)
        for blob in layer.blobs:
            if id(blob) in seen_params:
                continue
            seen_params.add(id(blob))
            totals["params"] += blob.count
            totals["param_bytes"] += blob.count * blob.dtype.itemsize
            if learnable.get(id(blob), False):
                totals["trainable"] += blob.count
        totals["activation_bytes"] += activation
        kept = layer.planned_kept_bytes(bottoms, net.top_vecs[i])
        totals["kept_bytes"] += kept
        # Splits inserted by the net where a blob feeds several layers are not in the prototxt.
        automatic = layer.type == "Split" and layer.name not in user_layers
        rows.append({"name": net._layer_names[i], "type": layer.type, "automatic": automatic, "tops": tops,
                     "params": count, "activation_bytes": activation, "param_bytes": param_bytes,
                     "kept_bytes": kept})
    return {"rows": rows, **totals}


def format_summary(net, info: dict) -> str:
    def shape_text(shape) -> str:
        return "x".join(str(d) for d in shape) or "scalar"

    table = [["Layer (type)", "Top shapes", "Params", "Activation memory", "Param memory",
              "Kept for backward"]]
    for row in info["rows"]:
        tops = [f"{name} {shape_text(shape)}" + (" (in place)" if in_place else "")
                for name, shape, in_place in row["tops"]] or ["-"]
        kind = f"{row['type']}, automatic" if row["automatic"] else row["type"]
        first = [f"{row['name']} ({kind})", tops[0], f"{row['params']:,}",
                 human_bytes(row["activation_bytes"]), human_bytes(row["param_bytes"]),
                 human_bytes(row["kept_bytes"])]
        table.append(first)
        table.extend(["", top, "", "", "", ""] for top in tops[1:])
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    rule = "=" * (sum(widths) + 2 * (len(widths) - 1))
    automatic = sum(row["automatic"] for row in info["rows"])
    count = f"{len(info['rows'])} layers" + (f", {automatic} of them automatic Splits" if automatic else "")
    lines = [f"Net: {net.name or '(unnamed)'}  ({count}, {np.dtype(net.dtype).name})", rule]
    for k, r in enumerate(table):
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1])] +
                               [cell.rjust(w) for cell, w in zip(r[2:], widths[2:])]).rstrip())
        if k == 0:
            lines.append(rule)
    lines.append(rule)
    lines.append(f"Total params: {info['params']:,}")
    lines.append(f"Trainable params: {info['trainable']:,}")
    lines.append(f"Non-trainable params: {info['params'] - info['trainable']:,}")
    lines.append(f"Activation memory (data): {human_bytes(info['activation_bytes'])}"
                 f" (x2 with diffs when training)")
    lines.append(f"Parameter memory: {human_bytes(info['param_bytes'])}")
    lines.append(f"Kept for backward: {human_bytes(info['kept_bytes'])}")
    lines.append(f"Total: {human_bytes(info['activation_bytes'] + info['param_bytes'])}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    shape = inspect.parse_shape(args.dummy_data) if args.dummy_data else None
    net = inspect.build_net(args.model, TRAIN if args.phase == "TRAIN" else TEST, args.weights,
                            dummy_data=args.dummy_data is not None, dummy_shape=shape,
                            dtype=np.float64 if args.double else np.float32)
    print(format_summary(net, summarize(net)))
    return 0
