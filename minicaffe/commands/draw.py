"""`minicaffe draw --model M -o net.svg|png|pdf|dot [--rankdir LR] [--phase TRAIN|TEST|ALL]`: the net
graph, as Caffe's draw_net.py: layers as boxes, blobs as octagons, edges bottom -> layer -> top.

The DOT text is written by this module; images are made by Graphviz's `dot` program when installed
(`-o net.dot` writes the text and needs no Graphviz). In-place layers get a new node for the blob they
rewrite, so the drawing stays acyclic.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from .. import io
from ..net import filter_net
from ..proto import caffe_pb2

COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
          "InnerProduct": "#CC33FF", "PReLU": "#7FD17F", "ReLU": "#9ACD32"}
DEFAULT_COLOR = "#6495ED"
BLOB_COLOR = "#E0E0E0"
FORMATS = ("svg", "png", "pdf", "dot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="net prototxt")
    parser.add_argument("-o", "--output", required=True, help="image to write: .svg, .png, .pdf or .dot")
    parser.add_argument("--rankdir", choices=("LR", "TB", "BT", "RL"), default="LR",
                        help="direction of the graph (default LR, as Caffe's draw_net)")
    parser.add_argument("--phase", choices=("TRAIN", "TEST", "ALL"), default="ALL",
                        help="draw the layers of one phase only (default ALL)")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def layer_label(layer: caffe_pb2.LayerParameter) -> str:
    """Name, type and the few parameters that explain the shapes (kernel, stride, pad, outputs)."""
    lines = [layer.name, f"({layer.type})"]
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        kernel = list(p.kernel_size) or [p.kernel_h, p.kernel_w]
        detail = f"{p.num_output} out, kernel {'x'.join(map(str, kernel))}"
        if p.stride and any(s != 1 for s in p.stride):
            detail += f", stride {'x'.join(map(str, p.stride))}"
        if p.pad and any(p.pad):
            detail += f", pad {'x'.join(map(str, p.pad))}"
        lines.append(detail)
    elif layer.type == "Pooling":
        p = layer.pooling_param
        method = caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)
        if p.global_pooling:
            lines.append(f"{method} global")
        else:
            kernel = p.kernel_size or f"{p.kernel_h}x{p.kernel_w}"
            lines.append(f"{method} kernel {kernel}, stride {p.stride or f'{p.stride_h}x{p.stride_w}'}")
    elif layer.type == "InnerProduct":
        lines.append(f"{layer.inner_product_param.num_output} out")
    return "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)


def net_to_dot(net: caffe_pb2.NetParameter, rankdir: str = "LR") -> str:
    """Graphviz DOT text of a NetParameter."""
    out = [f"digraph {_quote(net.name or 'net')} {{", f"  rankdir={rankdir};",
           '  node [fontname="Helvetica", fontsize=10];']
    current: dict[str, str] = {}  # blob name -> id of its newest node
    versions: dict[str, int] = {}

    def blob_node(name: str, new: bool) -> str:
        if new or name not in current:
            versions[name] = versions.get(name, -1) + 1
            node = f"blob:{name}:{versions[name]}"
            out.append(f"  {_quote(node)} [label={_quote(name)}, shape=octagon, style=filled, "
                       f'fillcolor="{BLOB_COLOR}"];')
            current[name] = node
        return current[name]

    for index, layer in enumerate(net.layer):
        layer_id = f"layer:{index}:{layer.name}"
        color = COLORS.get(layer.type, DEFAULT_COLOR)
        out.append(f'  {_quote(layer_id)} [label="{layer_label(layer)}", shape=box, style="filled,rounded", '
                   f'fillcolor="{color}"];')
        for bottom in layer.bottom:
            out.append(f"  {_quote(blob_node(bottom, False))} -> {_quote(layer_id)};")
        for top in layer.top:
            # An in-place top is a new version of the blob; a top produced by layers of different
            # phases (TRAIN and TEST data layers) stays one node.
            out.append(f"  {_quote(layer_id)} -> {_quote(blob_node(top, top in layer.bottom))};")
    out.append("}")
    return "\n".join(out) + "\n"


def render(dot_text: str, output: Path) -> None:
    fmt = output.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"{output}: unknown image type '.{fmt}' (use one of: "
                         f"{', '.join('.' + f for f in FORMATS)})")
    output.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dot":
        output.write_text(dot_text)
        return
    dot = shutil.which("dot")
    if dot is None:
        raise ValueError("drawing needs Graphviz's 'dot' program, which is not installed "
                         "(e.g. apt-get install graphviz); -o NAME.dot writes the graph text without it")
    result = subprocess.run([dot, f"-T{fmt}", "-o", str(output)], input=dot_text, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise ValueError(f"dot failed: {result.stderr.strip()}")


def run(args: argparse.Namespace) -> int:
    net = io.read_net_param(args.model)
    if args.phase != "ALL":
        net = filter_net(net, caffe_pb2.NetState(phase=caffe_pb2.Phase.Value(args.phase)))
    output = Path(args.output)
    render(net_to_dot(net, args.rankdir), output)
    print(f"wrote {output} ({len(net.layer)} layers)")
    return 0
