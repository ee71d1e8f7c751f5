"""minicaffe test --model M --weights W [--iterations N] [--gpu N]: Caffe's `caffe test`.

Runs the TEST phase of the model for N batches (default 50, as Caffe) with the given weights, logs each
batch's outputs and then the mean of every output (e.g. accuracy), in Caffe's log format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .. import backend, log
from ..layer import TEST
from ..net import Net
from .train import add_device_arguments, stages, use_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="net prototxt to score (its TEST phase)")
    parser.add_argument("--weights", required=True, help="trained .caffemodel(s), comma-separated")
    parser.add_argument("--iterations", type=int, default=50, help="batches to run (default 50)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    for path in [args.model, *[w for w in args.weights.split(",") if w]]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"'{path}' not found")
    use_device(args.gpu)
    net = Net(args.model, phase=TEST, level=args.level, stages=stages(args))
    for weights in [w for w in args.weights.split(",") if w]:
        net.copy_from(weights)
    log.info(f"Running for {args.iterations} iterations.", "caffe.cpp:308")
    weights = {}
    for layer, names in zip(net.layers, net.top_names):
        for name, weight in zip(names, layer.loss_weights):
            weights[name] = float(weight)
    totals: list[np.ndarray] = []
    loss = 0.0
    for i in range(args.iterations):
        net.forward_count = i
        loss += net.forward_range(0, len(net.layers) - 1)
        values = [backend.to_host(net.blobs[name].get_data()).astype(np.float64).ravel()
                  for name in net.outputs]
        for name, value in zip(net.outputs, values):
            for v in value:
                log.info(f"Batch {i}, {name} = {log.fmt(v)}", "caffe.cpp:321")
        totals = values if i == 0 else [t + v for t, v in zip(totals, values)]
    log.info(f"Loss: {log.fmt(loss / args.iterations)}", "caffe.cpp:326")
    for name, total in zip(net.outputs, totals):
        weight = weights.get(name, 0.0)
        for value in total:
            mean = float(value) / args.iterations
            tail = f" (* {log.fmt(weight)} = {log.fmt(weight * mean)} loss)" if weight else ""
            log.info(f"{name} = {log.fmt(mean)}{tail}", "caffe.cpp:338")
    return 0
