"""`minicaffe export --onnx`: a deploy net and its weights to an ONNX model (minicaffe/onnx_export.py),
optionally checked in onnxruntime against minicaffe's own forward (--check)."""

from __future__ import annotations

import argparse

from .. import onnx_export
from ..layer import TEST
from ..net import Net
from .common import add_state_arguments, stages


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", action="store_true", help="ONNX format (the default, and the only one)")
    parser.add_argument("--model", required=True, help="deploy net prototxt (Input layers as its inputs)")
    parser.add_argument("--weights", help=".caffemodel (or .h5) with the trained weights (default: the "
                                          "net's fillers)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=onnx_export.DEFAULT_OPSET,
                        help=f"ONNX opset version (default {onnx_export.DEFAULT_OPSET}; "
                             f"{onnx_export.MIN_OPSET} or newer)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="axis 0 of the inputs and outputs is a free 'batch' dimension")
    parser.add_argument("--check", action="store_true",
                        help="run the model in onnxruntime on a seeded input and compare every output "
                             f"with minicaffe's (max abs error within {onnx_export.TOLERANCE:g} of its max)")
    add_state_arguments(parser)


def run(args: argparse.Namespace) -> int:
    net = Net(args.model, TEST, weights=args.weights, level=args.level, stages=stages(args))
    onnx_export.export_onnx(net, args.output, opset=args.opset, dynamic_batch=args.dynamic_batch)
    print(f"wrote {args.output} (opset {args.opset}{', dynamic batch' if args.dynamic_batch else ''})")
    if args.check:
        for name, (error, largest) in onnx_export.check_onnx(net, args.output).items():
            print(f"check {name}: max abs error {error:.3g} (max abs value {largest:.3g}): ok")
    return 0
