"""`minicaffe time`: per-layer forward and backward timings, as Caffe's `caffe time`.

Like Caffe, backward runs on every layer (the net is built with force_backward), after one untimed
forward-backward pass that also builds the kernels. In addition to Caffe's report, for element-wise
layers it prints the bytes each pass moves and the resulting bandwidth, next to the machine's measured
copy bandwidth:

  * forward bytes  = bytes of the bottoms (read) + the tops (written) + the parameter blobs (read);
    an in-place layer reads and writes the same blob and it counts twice, as the memory does move twice.
  * backward bytes = 2 x forward bytes: the top diff and the data (bottom or top) are read and the
    bottom diff (and parameter diff) written. A rough but consistent model; kernels that keep a copy or
    read more (e.g. BatchNorm's several passes) really move more than this.
  * GB/s           = bytes / average time, with 1 GB = 1e9 bytes.
  * copy bandwidth = 2 x the size of a large array copy (one read + one write) / its best time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .. import backend, inspect
from ..layer import TEST, TRAIN

ELEMENTWISE = {"ReLU", "PReLU", "Power", "Eltwise", "Sigmoid", "TanH", "AbsVal", "Dropout", "BatchNorm",
               "Scale", "Bias"}
COPY_BYTES = 64 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="net prototxt")
    parser.add_argument("--weights", help="optional .caffemodel (timings rarely depend on it)")
    parser.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50, as Caffe)")
    parser.add_argument("--gpu", type=int, default=None, help="GPU id to run on (default: CPU)")
    parser.add_argument("--phase", choices=("TRAIN", "TEST"), default="TRAIN",
                        help="net phase (default TRAIN, as Caffe)")
    parser.add_argument("--dummy-data", nargs="?", const="", default=None, metavar="SHAPE",
                        help="replace data layers (Data, ImageData, HDF5Data) by DummyData of the same "
                             "shape, so no database is needed; SHAPE (e.g. 1,28,28: one sample) when "
                             "the source cannot be read to find it")
    parser.add_argument("--double", action="store_true", help="float64 blobs (default float32)")


def synchronize() -> None:
    if backend.on_gpu():
        backend.xp().cuda.runtime.deviceSynchronize()


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = 5) -> float:
    """GB/s of one large copy in the current mode (counting the read and the write)."""
    xp = backend.xp()
    source = xp.ones(nbytes // 4, dtype=np.float32)
    target = xp.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        xp.copyto(target, source)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def forward_bytes(bottoms, tops, params) -> int:
    return sum(blob.count * blob.dtype.itemsize for blob in [*bottoms, *tops, *params])


def set_mode(gpu: int | None) -> None:
    if gpu is None:
        backend.set_mode_cpu()
        return
    try:
        backend.set_device(gpu)
        backend.set_mode_gpu()
    except backend.BackendError as error:
        raise ValueError(str(error)) from None


def time_net(net, iterations: int, report=print) -> dict:
    """Caffe's timing loop. Returns {"forward": [ms per layer], "backward": [...], "total_ms": ...}."""
    n = len(net.layers)
    forward_s, backward_s = np.zeros(n), np.zeros(n)
    net.forward_backward()  # warm-up: kernel builds, first allocations (untimed, as Caffe's initial pass)
    report("*** Benchmark begins ***")
    report(f"Testing for {iterations} iterations.")
    total_start = time.perf_counter()
    for iteration in range(1, iterations + 1):
        iter_start = time.perf_counter()
        for i, layer in enumerate(net.layers):
            layer.forward_index = net.forward_count
            synchronize()
            start = time.perf_counter()
            layer.run_forward(net.bottom_vecs[i], net.top_vecs[i])
            synchronize()
            forward_s[i] += time.perf_counter() - start
        net.forward_count += 1
        for i in reversed(range(n)):
            if not net.layer_need_backward[i]:
                continue
            synchronize()
            start = time.perf_counter()
            net.layers[i].run_backward(net.top_vecs[i], net.bottom_need_backward[i], net.bottom_vecs[i])
            synchronize()
            backward_s[i] += time.perf_counter() - start
        report(f"Iteration: {iteration} forward-backward time: "
               f"{(time.perf_counter() - iter_start) * 1e3:.3f} ms.")
    total_ms = (time.perf_counter() - total_start) * 1e3
    return {"forward": forward_s * 1e3 / iterations, "backward": backward_s * 1e3 / iterations,
            "total_ms": total_ms}


def run(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise ValueError(f"--iterations must be at least 1, got {args.iterations}")
    set_mode(args.gpu)
    phase = TRAIN if args.phase == "TRAIN" else TEST
    shape = inspect.parse_shape(args.dummy_data) if args.dummy_data else None
    net = inspect.build_net(args.model, phase, args.weights, dummy_data=args.dummy_data is not None,
                            dummy_shape=shape, force_backward=True,
                            dtype=np.float64 if args.double else np.float32)
    device = f"GPU {args.gpu}" if args.gpu is not None else "CPU"
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
