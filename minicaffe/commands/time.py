"""`minicaffe time`: per-layer forward and backward timings, as Caffe's `caffe time`.

Like Caffe, backward runs on every layer (the net is built with force_backward), after one untimed
forward-backward pass that also builds the kernels. In addition to Caffe's report, for element-wise
layers it prints the bytes each pass moves (forward: bottoms + tops + parameters; backward: 2x forward;
see minicaffe.timing) and the resulting bandwidth (bytes / average time, 1 GB = 1e9 bytes), next to the
machine's measured copy bandwidth (read + write of a large array copy).
"""

from __future__ import annotations

import argparse

import numpy as np

from .. import inspect
from ..layer import TEST, TRAIN
from ..timing import COPY_BYTES, copy_bandwidth, forward_bytes, time_net
from .common import add_gpu_argument, use_device

ELEMENTWISE = {"ReLU", "PReLU", "Power", "Eltwise", "Sigmoid", "TanH", "AbsVal", "Dropout", "BatchNorm",
               "Scale", "Bias"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="net prototxt")
    parser.add_argument("--weights", help="optional .caffemodel (timings rarely depend on it)")
    parser.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50, as Caffe)")
    add_gpu_argument(parser)
    parser.add_argument("--phase", choices=("TRAIN", "TEST"), default="TRAIN",
                        help="net phase (default TRAIN, as Caffe)")
    parser.add_argument("--dummy-data", nargs="?", const="", default=None, metavar="SHAPE",
                        help="replace data layers (Data, ImageData, HDF5Data) by DummyData of the same "
                             "shape, so no database is needed; SHAPE (e.g. 1,28,28: one sample) when "
                             "the source cannot be read to find it")
    parser.add_argument("--double", action="store_true", help="float64 blobs (default float32)")


def run(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {args.iterations}")
    gpu = use_device(args.gpu, quiet=True)  # quiet: the report below names the device
    phase = TRAIN if args.phase == "TRAIN" else TEST
    shape = inspect.parse_shape(args.dummy_data) if args.dummy_data else None
    net = inspect.build_net(args.model, phase, args.weights, dummy_data=args.dummy_data is not None,
                            dummy_shape=shape, force_backward=True,
                            dtype=np.float64 if args.double else np.float32)
    device = f"GPU {gpu}" if gpu is not None else "CPU"
    print(f"Timing net '{net.name or args.model}' ({args.phase}) on {device}, {len(net.layers)} layers.")
    result = time_net(net, args.iterations)
    width = max(10, max(len(name) for name in net._layer_names))
    print("Average time per layer: ")
    for i, name in enumerate(net._layer_names):
        print(f"{name:>{width}}\tforward: {result['forward'][i]:.5g} ms.")
        print(f"{name:>{width}}\tbackward: {result['backward'][i]:.5g} ms.")
    forward_ms, backward_ms = float(result["forward"].sum()), float(result["backward"].sum())
    print(f"Average Forward pass: {forward_ms:.5g} ms.")
    print(f"Average Backward pass: {backward_ms:.5g} ms.")
    print(f"Average Forward-Backward: {result['total_ms'] / args.iterations:.5g} ms.")
    print(f"Total Time: {result['total_ms']:.5g} ms.")
    print("*** Benchmark ends ***")

    rows = []
    for i, layer in enumerate(net.layers):
        if layer.type not in ELEMENTWISE:
            continue
        fwd = forward_bytes(net.bottom_vecs[i], net.top_vecs[i], layer.blobs)
        rows.append((net._layer_names[i], layer.type, fwd, result["forward"][i],
                     2 * fwd, result["backward"][i]))
    copy = copy_bandwidth()
    if rows:
        print("Memory traffic of element-wise layers (forward: bottoms read + tops written + parameters; "
              "backward: 2x forward; GB = 1e9 bytes):")
        print(f"{'layer':>{width}}  {'type':<9} {'fwd MB':>9} {'fwd GB/s':>9} {'bwd MB':>9} {'bwd GB/s':>9}")
        for name, kind, fwd, fwd_ms, bwd, bwd_ms in rows:
            print(f"{name:>{width}}  {kind:<9} {fwd / 1e6:9.3f} {_rate(fwd, fwd_ms):>9} "
                  f"{bwd / 1e6:9.3f} {_rate(bwd, bwd_ms):>9}")
    print(f"Copy bandwidth ({device}, {COPY_BYTES >> 20} MiB array copy, read + write): {copy:.1f} GB/s")
    return 0


def _rate(nbytes: int, ms: float) -> str:
    return f"{nbytes / (ms * 1e-3) / 1e9:.2f}" if ms > 0 else "-"
