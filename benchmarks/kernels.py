"""Kernel benchmark: forward and backward time of minicaffe's layers (each one launch or a few of its
kernels/*.cu kernels), the bandwidth the element-wise ones reach, and the machine's copy bandwidth.

    python benchmarks/kernels.py                # CPU (and the GPU too when CuPy sees one)
    python benchmarks/kernels.py --device gpu   # only the GPU
    python benchmarks/kernels.py --no-write     # print only; by default BENCHMARKS.md is updated
    python benchmarks/kernels.py --only ReLU,Dropout   # some rows only (as in the table); prints only

Bytes are counted as `minicaffe time` counts them: forward = bottoms read + tops written + parameters,
backward = 2x forward; GB/s = bytes / median time (1 GB = 1e9 B). Copy bandwidth counts the read and
the write of one array copy (np.copyto, best of several) of the size of the layer's bottom, so an
element-wise kernel at the copy rate is memory-bound optimal; "% copy" is a layer's forward GB/s over it.
The element-wise layers are timed at two bottom sizes: 8 MB (which the last-level cache may hold) and
256 MB (main memory; forward only, fewer runs).
Convolutions report GFLOP/s instead (2 * multiply-adds; backward = 2x forward: data and weight grads).
When PyTorch is importable the same operations are timed with it on the CPU for comparison (optional;
not a dependency). float32 throughout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from minicaffe import backend, threads, timing
from minicaffe.blob import Blob
from minicaffe.layer import TEST, TRAIN
from minicaffe.layers import batch_norm
from minicaffe.testing import layer_from_prototxt
from minicaffe.timing import copy_bandwidth, forward_bytes, synchronize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # markdown_section.py, beside this file
from markdown_section import markers, update_section  # noqa: E402

BEGIN, END = markers("benchmarks/kernels.py")

# name, prototxt body, bottom shapes, phase. Activations of 2M elements (8 MB in float32): bigger than
# the L2 caches, though a large L3 may hold them; the element-wise layers run at BIG too, and the copy
# bandwidth is measured at both sizes for comparison.
ACT = (32, 64, 32, 32)
BIG = (64, 64, 128, 128)  # 256 MiB (268 MB) in float32: the element-wise layers' main-memory size
LOGITS = (2048, 1000)  # (N, C) class scores, also 8 MB: softmax with inner == 1
CASES = [
    ("ReLU", 'type: "ReLU"', [ACT], TEST),
    ("PReLU", 'type: "PReLU"', [ACT], TEST),
    ("Power", 'type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', [ACT], TEST),
    ("Eltwise SUM", 'type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -1 }', [ACT, ACT], TEST),
    ("Eltwise PROD", 'type: "Eltwise" eltwise_param { operation: PROD }', [ACT, ACT], TEST),
    ("Sigmoid", 'type: "Sigmoid"', [ACT], TEST),
    ("TanH", 'type: "TanH"', [ACT], TEST),
    ("Exp", 'type: "Exp"', [ACT], TEST),  # one exp per element and nothing else: Sigmoid's and TanH's floor
    ("AbsVal", 'type: "AbsVal"', [ACT], TEST),
    ("Dropout", 'type: "Dropout" dropout_param { dropout_ratio: 0.5 }', [ACT], TRAIN),
    ("BatchNorm", 'type: "BatchNorm"', [ACT], TRAIN),
    ("Scale", 'type: "Scale" scale_param { bias_term: true }', [ACT], TEST),
    ("Bias", 'type: "Bias"', [ACT], TEST),
    ("Convolution 3x3", 'type: "Convolution" convolution_param { num_output: 32 kernel_size: 3 pad: 1 '
                        'weight_filler { type: "xavier" } }', [(8, 32, 32, 32)], TEST),
    ("Pooling MAX 2x2", 'type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }', [ACT], TEST),
    ("Pooling AVE 3x3/2", 'type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 }', [ACT],
     TEST),
    ("Softmax (N,C)", 'type: "Softmax"', [LOGITS], TEST),
    ("LRN", 'type: "LRN" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }', [ACT], TEST),
]
QUICK_SHAPES = {ACT: (2, 8, 16, 16), BIG: (4, 8, 16, 16), (8, 32, 32, 32): (2, 4, 8, 8), LOGITS: (16, 10)}
# The layers that read and write each element once (up to a per-channel parameter): their forward is
# also timed at BIG, and both sizes are set against the copy bandwidth (#8: >= 80% at both).
ELEMENT_WISE = ("ReLU", "PReLU", "Power", "Eltwise SUM", "Eltwise PROD", "Sigmoid", "TanH", "Exp",
                "AbsVal", "Dropout", "BatchNorm", "Scale", "Bias")


def median_time(fn, min_runs: int, min_seconds: float) -> float:
    """Median seconds of fn() after one warm-up call, over at least min_runs runs and min_seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def conv_flops(layer, bottom: Blob, top: Blob) -> float:
    p = layer.param.convolution_param
    k = p.kernel_size[0]
    return 2.0 * top.count * bottom.shape[1] * k * k / max(p.group, 1)


def bench_layer(name: str, text: str, shapes, phase: int, min_runs: int, min_seconds: float,
                backward: bool = True) -> dict:
    """The layer's forward (and backward) times and rates; without `backward`, forward only."""
    layer = layer_from_prototxt(f'name: "{name.split()[0].lower()}" {text}', phase=phase, dtype=np.float32)
    rng = np.random.default_rng(0)
    bottoms = []
    for shape in shapes:
        blob = Blob(shape, np.float32)
        blob.data[...] = rng.standard_normal(shape, dtype=np.float32)
        bottoms.append(blob)
    tops = [Blob((), np.float32)]
    layer.setup(bottoms, tops)
    if backward:
        tops[0].diff[...] = rng.standard_normal(tops[0].shape, dtype=np.float32)
    propagate = [True] * len(bottoms)

    def forward():
        layer.reshape(bottoms, tops)
        layer.forward(bottoms, tops)

    def run_backward():
        layer.backward(tops, propagate, bottoms)

    fwd_s = median_time(forward, min_runs, min_seconds)
    nbytes = forward_bytes(bottoms, tops, layer.blobs)
    result = {"name": name, "shape": "x".join(map(str, shapes[0])), "fwd_ms": fwd_s * 1e3,
              "fwd_gbs": nbytes / fwd_s / 1e9}
    if not backward:
        return result
    bwd_s = median_time(run_backward, min_runs, min_seconds)
    result.update(bwd_ms=bwd_s * 1e3, bwd_gbs=2 * nbytes / bwd_s / 1e9)
    if layer.type == "Convolution":
        flops = conv_flops(layer, bottoms[0], tops[0])
        result.update(fwd_gbs=None, bwd_gbs=None, fwd_gflops=flops / fwd_s / 1e9,
                      bwd_gflops=2 * flops / bwd_s / 1e9)
    elif layer.type == "Pooling":
        result.update(fwd_gbs=None, bwd_gbs=None)  # reads windows: not a bandwidth kernel
    return result


def torch_ops():
    """The same operations in PyTorch (CPU), or None without torch."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    slopes = {}  # per channel count (the --quick shapes have fewer channels)

    def prelu(x):
        if x.shape[1] not in slopes:
            slopes[x.shape[1]] = torch.full((x.shape[1],), 0.25, requires_grad=True)
        return F.prelu(x, slopes[x.shape[1]])

    ops = {
        "ReLU": lambda x: F.relu(x),
        "PReLU": prelu,
        "Power": lambda x: (0.5 * x + 1) ** 2,
        "Sigmoid": torch.sigmoid,
        "TanH": torch.tanh,
        "Exp": torch.exp,
        "AbsVal": torch.abs,
        "Dropout": lambda x: F.dropout(x, 0.5, training=True),
        "BatchNorm": lambda x: F.batch_norm(x, None, None, training=True),
        "Pooling MAX 2x2": lambda x: F.max_pool2d(x, 2, 2),
        "Pooling AVE 3x3/2": lambda x: F.avg_pool2d(x, 3, 2, ceil_mode=True),
        "Softmax (N,C)": lambda x: F.softmax(x, 1),
        "LRN": lambda x: F.local_response_norm(x, 5, alpha=0.0001, beta=0.75, k=1.0),
    }
    two = {"Eltwise SUM": lambda a, b: a - b, "Eltwise PROD": lambda a, b: a * b}
    return torch, F, ops, two


class TorchPeer:
    """PyTorch's side of the rows, measured by benchmarks/torch_peer.py in a process of its own at
    PyTorch's own defaults (nets.Peer, which says why). It answers one row at a time, so that the two sides
    of a row are measured seconds apart, not minutes: on a shared machine the speed drifts by tens of
    percent within minutes."""

    def __init__(self, quick: bool):
        from nets import Peer  # benchmarks/nets.py

        self.peer = Peer("kernel-rows", *(["--quick"] if quick else []))
        self.rows = set(json.loads(self.peer.ask("rows")))
        self.process = self.peer.process

    def row(self, name: str) -> tuple[float, float]:
        """(forward ms, backward ms) of the row `name` (one of self.rows)."""
        forward, backward = json.loads(self.peer.ask(name))
        return forward, backward

    def close(self) -> None:
        self.peer.close()


def lowest_of(rows: list[dict]) -> dict:
    """One row from bench_layer's rows of the same case: the forward figures of the fastest forward, the
    backward figures of the fastest backward."""
    forward = min(rows, key=lambda row: row["fwd_ms"])
    backward = min(rows, key=lambda row: row.get("bwd_ms", 0.0))
    return {**forward, **{key: value for key, value in backward.items() if key.startswith("bwd")}}


def torch_peer(quick: bool) -> TorchPeer | None:
    """The PyTorch peer process, or None without PyTorch."""
    return TorchPeer(quick) if importlib.util.find_spec("torch") is not None else None


# Each row's two sides are measured alternately, minicaffe then PyTorch, ROUNDS times; each side's time is
# the lowest of its medians (the same rule for both).
ROUNDS = 3


def torch_has(case_name: str, bundle) -> bool:
    """Whether PyTorch has the operation of the row `case_name` (bundle: torch_ops())."""
    _, _, ops, two = bundle
    return case_name in ops or case_name in two or case_name.startswith("Convolution")


def bench_torch(case_name: str, shapes, min_runs: int, min_seconds: float,
                bundle) -> tuple[float, float] | None:
    torch, F, ops, two = bundle
    if not torch_has(case_name, bundle):
        return None
    inputs = [torch.randn(*shape, requires_grad=True) for shape in shapes]
    if case_name.startswith("Convolution"):
        weight = torch.randn(32, shapes[0][1], 3, 3, requires_grad=True)

        def op(x):
            return F.conv2d(x, weight, padding=1)
    else:
        op = ops.get(case_name) or two[case_name]
    state = {}

    def forward():
        state["y"] = op(*inputs)

    forward()
    grad = torch.randn_like(state["y"])

    def backward():
        for x in inputs:
            x.grad = None
        state["y"].backward(grad, retain_graph=True)

    return (median_time(forward, min_runs, min_seconds) * 1e3,
            median_time(backward, min_runs, min_seconds) * 1e3)


def run_device(device: str, quick: bool, only: set[str] | None = None) -> dict:
    """The rows of the device's table (of the cases named in `only`, else all) and its copy bandwidths."""
    if device == "gpu":
        backend.set_mode_gpu()
    else:
        backend.set_mode_cpu()
    min_runs, min_seconds = (2, 0.0) if quick else (5, 0.4)
    big_runs = 2 if quick else 5  # a 256 MB forward takes 10-100 ms: a few runs suffice
    small, big = (QUICK_SHAPES[ACT], QUICK_SHAPES[BIG]) if quick else (ACT, BIG)
    small_bytes, big_bytes = int(np.prod(small)) * 4, int(np.prod(big)) * 4
    # The copy first: the rows print their % of it as they go. Best of many copies: the machine's rate.
    copy_small = copy_bandwidth(small_bytes, repeats=20)
    copy_big = copy_bandwidth(big_bytes, repeats=5)
    rows = []
    peer = torch_peer(quick) if device == "cpu" and not quick and only is None else None
    for name, text, shapes, phase in CASES:
        if only is not None and name not in only:
            continue
        shapes = [QUICK_SHAPES.get(s, s) for s in shapes] if quick else shapes
        rounds = ROUNDS if peer and name in peer.rows else 1
        measured, torch_times = [], []
        for _ in range(rounds):
            measured.append(bench_layer(name, text, shapes, phase, min_runs, min_seconds))
            if peer and name in peer.rows:
                torch_times.append(peer.row(name))
        row = lowest_of(measured)
        if name in ELEMENT_WISE:
            large = bench_layer(name, text, [big] * len(shapes), phase, big_runs, 0.0, backward=False)
            row.update(fwd_copy=row["fwd_gbs"] / copy_small, big_fwd_ms=large["fwd_ms"],
                       big_fwd_gbs=large["fwd_gbs"], big_fwd_copy=large["fwd_gbs"] / copy_big)
        if torch_times:
            row["torch_fwd_ms"] = min(forward for forward, _ in torch_times)
            row["torch_bwd_ms"] = min(backward for _, backward in torch_times)
        rows.append(row)
        print(format_row(row), flush=True)
    if peer:
        peer.close()
    backend.set_mode_cpu()
    return {"device": device, "rows": rows, "copy_gbs": copy_big, "copy_small_gbs": copy_small,
            "copy_small_mb": small_bytes / 1e6, "copy_large_mb": big_bytes / 1e6,
            "big_shape": "x".join(map(str, big)), "torch": peer is not None}


def copy_text(result: dict) -> str:
    return (f"copy bandwidth {result['copy_small_gbs']:.1f} GB/s at {result['copy_small_mb']:.3g} MB (the "
            f"activation size), {result['copy_gbs']:.1f} GB/s at {result['copy_large_mb']:.3g} MB "
            "(read + write of one array copy)")


HEADER = ("layer", "bottom shape", "fwd ms", "fwd GB/s", "% copy", "bwd ms", "bwd GB/s", "256 MB fwd ms",
          "256 MB fwd GB/s", "256 MB % copy", "torch fwd ms", "torch bwd ms")
WIDTHS = (-18, -12, 8, 16, 6, 8, 16, 13, 15, 13, 12, 12)  # negative: left-aligned


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def cells(row: dict) -> list[str]:
    fwd_rate = _fmt(row["fwd_gbs"]) if row.get("fwd_gbs") is not None else (
        f"{row['fwd_gflops']:.3g} GFLOP/s" if "fwd_gflops" in row else "-")
    bwd_rate = _fmt(row["bwd_gbs"]) if row.get("bwd_gbs") is not None else (
        f"{row['bwd_gflops']:.3g} GFLOP/s" if "bwd_gflops" in row else "-")
    return [row["name"], row["shape"], _fmt(row["fwd_ms"]), fwd_rate, _percent(row.get("fwd_copy")),
            _fmt(row["bwd_ms"]), bwd_rate, _fmt(row.get("big_fwd_ms")), _fmt(row.get("big_fwd_gbs")),
            _percent(row.get("big_fwd_copy")), _fmt(row.get("torch_fwd_ms")), _fmt(row.get("torch_bwd_ms"))]


def format_line(c) -> str:
    return " ".join(f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"
                    for text, width in zip(c, WIDTHS))


def format_row(row: dict) -> str:
    return format_line(cells(row))


def machine() -> str:
    return (f"{timing.machine()} ({threads.kernel_threads()} kernel threads, {threads.blas_threads()} BLAS); "
            f"{timing.software()}")


def gpu_name() -> str:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def bound_notes(result: dict) -> list[str]:
    """What keeps some element-wise rows under the copy bandwidth whatever their kernels do: the cost of
    an exponential (the Exp row: one per element and nothing else), and what Dropout computes per element."""
    rows = {row["name"]: row for row in result["rows"]}
    if rows.get("Exp", {}).get("fwd_copy") is None:
        return []

    def at(name: str, key: str) -> str:
        return _percent(rows.get(name, {}).get(key))

    return [f"Bounds at {result['copy_small_mb']:.3g} MB: the Exp row, one exp per element and nothing "
            f"else, runs at {at('Exp', 'fwd_copy')} of copy here (kernels/shim.h's float exp: ~20 vector "
            f"instructions per 16 values), so Sigmoid (an exp and a division: "
            f"{at('Sigmoid', 'fwd_copy')}) and TanH (an expm1 and a division: {at('TanH', 'fwd_copy')}) are "
            f"bound by the arithmetic at this size, not by memory; at {result['copy_large_mb']:.3g} MB, "
            "where memory is the limit, they run at "
            f"{at('Sigmoid', 'big_fwd_copy')} and {at('TanH', 'big_fwd_copy')}. BatchNorm in TRAIN reads "
            "its bottom twice (the statistics, then the normalization): a blob over "
            f"{batch_norm.STATS_CACHE_LIMIT >> 20} MiB goes through in groups of channels "
            "(layers/batch_norm.py's STATS_CACHE_LIMIT), so that the second read comes from the caches. "
            "Dropout draws a 32-bit hash (two murmur3 finalizers, four multiplies) per element and writes "
            "its one-byte mask.", ""]


def markdown(results: list[dict], command: str) -> str:
    lines = [BEGIN, "## Kernel benchmark (benchmarks/kernels.py)", "",
             f"Reproduce: `{command}` (updates this section). Measured {dt.date.today().isoformat()} on "
             f"{machine()}.", "",
             "Forward/backward of one layer (median time, float32). Bytes as `minicaffe time` counts them: "
             "forward = bottoms read + tops written + parameters, backward = 2x forward; "
             "GB/s = bytes / time. "
             "Convolutions show GFLOP/s; pooling reads overlapping windows, so no bandwidth is shown. "
             "The element-wise layers' forward is also timed with bottoms of "
             f"{results[0]['big_shape'] if results else '-'} "
             f"({results[0]['copy_large_mb'] if results else 0:.3g} MB: main memory); \"% copy\" is the "
             "forward GB/s over the copy bandwidth at the same size (np.copyto of the bottom's bytes, best "
             "of several; np.copyto runs on one thread and the kernels on all kernel threads, so a kernel "
             "may pass 100%). PyTorch's columns (torch fwd/bwd ms) come from a process of its own at its "
             f"defaults, each row measured alternately with minicaffe's, {ROUNDS} rounds, each side the "
             "lowest of its medians.", ""]
    for result in results:
        where = "CPU" if result["device"] == "cpu" else f"GPU ({result.get('gpu', '')})"
        lines.append(f"### {where}: {copy_text(result)}")
        lines.append("")
        header = list(HEADER) if result["torch"] else list(HEADER[:-2])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
        for row in result["rows"]:
            lines.append("| " + " | ".join(cells(row)[:len(header)]) + " |")
        if not result["torch"] and result["device"] == "cpu":
            lines.append("")
            lines.append("(PyTorch was not installed, so there is no comparison column.)")
        lines.append("")
        lines.extend(bound_notes(result))
    lines.append(END)
    return "\n".join(lines)


def gpu_available() -> bool:
    try:
        backend.set_mode_gpu()
    except backend.BackendError:
        return False
    finally:
        backend.set_mode_cpu()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu", "all"), default="all",
                        help="cpu, gpu, or all (default: the CPU, and the GPU when one is usable)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few runs (a smoke test)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--only", help="comma-separated layer names of the table (implies --no-write)")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update")
    args = parser.parse_args(argv)
    devices = ["cpu"] if args.device == "cpu" else ["gpu"] if args.device == "gpu" else ["cpu", "gpu"]
    if "gpu" in devices and not gpu_available():
        if args.device == "gpu":
            print("benchmarks/kernels.py: no usable GPU (needs CuPy and a CUDA device)", file=sys.stderr)
            return 1
        devices.remove("gpu")
    print(machine())
    results = []
    for device in devices:
        print(f"\n{device.upper()}")
        print(format_line(HEADER))
        result = run_device(device, args.quick, set(args.only.split(",")) if args.only else None)
        if device == "gpu":
            result["gpu"] = gpu_name()
        print(f"{device}: {copy_text(result)}")
        results.append(result)
    if not args.no_write and not args.only:
        command = "python benchmarks/kernels.py"
        if args.device != "all":
            command += f" --device {args.device}"
        if args.quick:
            command += " --quick"
        update_section(Path(args.output), "benchmarks/kernels.py", markdown(results, command))
        print(f"\nupdated {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
