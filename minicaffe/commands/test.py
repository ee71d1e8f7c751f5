"""minicaffe test --model M --weights W [--iterations N] [--gpu N]: Caffe's `caffe test`.

Runs the TEST phase of the model for N batches (default 50, as Caffe) with the given weights, logs each
batch's outputs and then the mean of every output (e.g. accuracy), in Caffe's log format. The means are
the solver's test scores (minicaffe.solver.OutputMeans).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import log
from ..layer import TEST
from ..net import Net
from ..solver import OutputMeans
from .common import add_gpu_argument, add_state_arguments, stages, use_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="net prototxt to score (its TEST phase)")
    parser.add_argument("--weights", required=True, help="trained .caffemodel(s), comma-separated")
    parser.add_argument("--iterations", type=int, default=50, help="batches to run (default 50)")
    add_gpu_argument(parser)
    add_state_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    weights = [w for w in args.weights.split(",") if w]
    for path in [args.model, *weights]:
        if not Path(path).exists():  # anything else there (a folder, a FIFO) is refused when read
            raise FileNotFoundError(f"'{path}' not found")
    use_device(args.gpu)
    net = Net(args.model, phase=TEST, level=args.level, stages=stages(args))
    for path in weights:
        net.copy_from(path)
    log.info(f"Running for {args.iterations} iterations.", "caffe.cpp:308")
    outputs = OutputMeans(net)
    for i in range(args.iterations):
        net.forward_count = i
        values = outputs.add(net.forward_range(0, len(net.layers) - 1))
        for name, value in zip(net.outputs, values):
            for v in value:
                log.info(f"Batch {i}, {name} = {log.fmt(v)}", "caffe.cpp:321")
    log.info(f"Loss: {log.fmt(outputs.mean_loss())}", "caffe.cpp:326")
    for _, _, text in outputs.results():
        log.info(text, "caffe.cpp:338")
    return 0
