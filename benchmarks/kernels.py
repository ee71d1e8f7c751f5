"""Kernel benchmark: forward and backward time of minicaffe's layers (each one launch or a few of its
kernels/*.cu kernels), the bandwidth the element-wise ones reach, and the machine's copy bandwidth.

    python benchmarks/kernels.py                # CPU (and the GPU too when CuPy sees one)
    python benchmarks/kernels.py --device gpu   # only the GPU
    python benchmarks/kernels.py --no-write     # print only; by default BENCHMARKS.md is updated

Bytes are counted as `minicaffe time` counts them: forward = bottoms read + tops written + parameters,
backward = 2x forward; GB/s = bytes / median time (1 GB = 1e9 B). Copy bandwidth counts the read and
the write of one large array copy, so an element-wise kernel at the copy rate is memory-bound optimal.
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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minicaffe import backend, threads, timing
from minicaffe.blob import Blob
from minicaffe.layer import TEST, TRAIN
from minicaffe.testing import layer_from_prototxt
from minicaffe.timing import copy_bandwidth, forward_bytes, synchronize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # markdown_section.py, beside this file
from markdown_section import markers, update_section  # noqa: E402

BEGIN, END = markers("benchmarks/kernels.py")

# name, prototxt body, bottom shapes, phase. Activations of 2M elements (8 MB in float32): bigger than
# the L2 caches, though a large L3 may hold them; the copy bandwidth is measured at both that size and
# at 256 MB (main memory) for comparison.
ACT = (32, 64, 32, 32)
LOGITS = (2048, 1000)  # (N, C) class scores, also 8 MB: softmax with inner == 1
CASES = [
    ("ReLU", 'type: "ReLU"', [ACT], TEST),
    ("PReLU", 'type: "PReLU"', [ACT], TEST),
    ("Power", 'type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', [ACT], TEST),
    ("Eltwise SUM", 'type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -1 }', [ACT, ACT], TEST),
    ("Eltwise PROD", 'type: "Eltwise" eltwise_param { operation: PROD }', [ACT, ACT], TEST),
    ("Sigmoid", 'type: "Sigmoid"', [ACT], TEST),
    ("TanH", 'type: "TanH"', [ACT], TEST),
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
QUICK_SHAPES = {ACT: (2, 8, 16, 16), (8, 32, 32, 32): (2, 4, 8, 8), LOGITS: (16, 10)}


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


def bench_layer(name: str, text: str, shapes, phase: int, min_runs: int, min_seconds: float) -> dict:
    layer = layer_from_prototxt(f'name: "{name.split()[0].lower()}" {text}', phase=phase, dtype=np.float32)
    rng = np.random.default_rng(0)
    bottoms = []
    for shape in shapes:
        blob = Blob(shape, np.float32)
        blob.data[...] = rng.standard_normal(shape)
        bottoms.append(blob)
    tops = [Blob((), np.float32)]
    layer.setup(bottoms, tops)
    tops[0].diff[...] = rng.standard_normal(tops[0].shape)
    propagate = [True] * len(bottoms)

    def forward():
        layer.reshape(bottoms, tops)
        layer.forward(bottoms, tops)

    def backward():
        layer.backward(tops, propagate, bottoms)

    fwd_s = median_time(forward, min_runs, min_seconds)
    bwd_s = median_time(backward, min_runs, min_seconds)
    nbytes = forward_bytes(bottoms, tops, layer.blobs)
    result = {"name": name, "shape": "x".join(map(str, shapes[0])), "fwd_ms": fwd_s * 1e3,
              "bwd_ms": bwd_s * 1e3, "fwd_gbs": nbytes / fwd_s / 1e9, "bwd_gbs": 2 * nbytes / bwd_s / 1e9}
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
    slopes = torch.full((ACT[1],), 0.25, requires_grad=True)
    ops = {
        "ReLU": lambda x: F.relu(x),
        "PReLU": lambda x: F.prelu(x, slopes),
        "Power": lambda x: (0.5 * x + 1) ** 2,
        "Sigmoid": torch.sigmoid,
        "TanH": torch.tanh,
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


def torch_peer_columns() -> dict[str, list[float]] | None:
    """PyTorch's columns, measured first by benchmarks/torch_peer.py in a process of its own at PyTorch's
    own defaults (see nets.Peer: in this process PyTorch would share minicaffe's passive OpenMP wait
    policy); None without PyTorch."""
    if importlib.util.find_spec("torch") is None:
        return None
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("torch_peer.py")), "kernels"],
                            capture_output=True, text=True, env=timing.peer_environment(), timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"the PyTorch peer process failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_torch(case_name: str, shapes, min_runs: int, min_seconds: float,
                bundle) -> tuple[float, float] | None:
    torch, F, ops, two = bundle
    if case_name not in ops and case_name not in two and not case_name.startswith("Convolution"):
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


def run_device(device: str, quick: bool) -> dict:
    if device == "gpu":
        backend.set_mode_gpu()
    else:
        backend.set_mode_cpu()
    min_runs, min_seconds = (2, 0.0) if quick else (5, 0.4)
    rows = []
    torch_columns = torch_peer_columns() if device == "cpu" and not quick else None
    for name, text, shapes, phase in CASES:
        shapes = [QUICK_SHAPES.get(s, s) for s in shapes] if quick else shapes
        row = bench_layer(name, text, shapes, phase, min_runs, min_seconds)
        if torch_columns and name in torch_columns:
            row["torch_fwd_ms"], row["torch_bwd_ms"] = torch_columns[name]
        rows.append(row)
        print(format_row(row), flush=True)
    activation_bytes = int(np.prod(QUICK_SHAPES[ACT] if quick else ACT)) * 4
    copy_small = copy_bandwidth(activation_bytes)
    copy_large = copy_bandwidth(8 << 20 if quick else 256 << 20)
    backend.set_mode_cpu()
    return {"device": device, "rows": rows, "copy_gbs": copy_large, "copy_small_gbs": copy_small,
            "copy_small_mb": activation_bytes / 1e6, "copy_large_mb": (8 << 20 if quick else 256 << 20) / 1e6,
            "torch": bool(torch_columns)}


def copy_text(result: dict) -> str:
    return (f"copy bandwidth {result['copy_small_gbs']:.1f} GB/s at {result['copy_small_mb']:.3g} MB (the "
            f"activation size), {result['copy_gbs']:.1f} GB/s at {result['copy_large_mb']:.3g} MB "
            "(read + write of one array copy)")


HEADER = ("layer", "bottom shape", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s", "torch fwd ms", "torch bwd ms")


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def cells(row: dict) -> list[str]:
    fwd_rate = _fmt(row["fwd_gbs"]) if row.get("fwd_gbs") is not None else (
        f"{row['fwd_gflops']:.3g} GFLOP/s" if "fwd_gflops" in row else "-")
    bwd_rate = _fmt(row["bwd_gbs"]) if row.get("bwd_gbs") is not None else (
        f"{row['bwd_gflops']:.3g} GFLOP/s" if "bwd_gflops" in row else "-")
    return [row["name"], row["shape"], _fmt(row["fwd_ms"]), fwd_rate, _fmt(row["bwd_ms"]), bwd_rate,
            _fmt(row.get("torch_fwd_ms")), _fmt(row.get("torch_bwd_ms"))]


def format_line(c) -> str:
    return f"{c[0]:<18} {c[1]:<12} {c[2]:>8} {c[3]:>16} {c[4]:>8} {c[5]:>16} {c[6]:>12} {c[7]:>12}"


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


def markdown(results: list[dict], command: str) -> str:
    lines = [BEGIN, "## Kernel benchmark (benchmarks/kernels.py)", "",
             f"Reproduce: `{command}` (updates this section). Measured {dt.date.today().isoformat()} on "
             f"{machine()}.", "",
             "Forward/backward of one layer (median time, float32). Bytes as `minicaffe time` counts them: "
             "forward = bottoms read + tops written + parameters, backward = 2x forward; "
             "GB/s = bytes / time. "
             "Convolutions show GFLOP/s; pooling reads overlapping windows, so no bandwidth is shown.", ""]
    for result in results:
        where = "CPU" if result["device"] == "cpu" else f"GPU ({result.get('gpu', '')})"
        lines.append(f"### {where}: {copy_text(result)}")
        lines.append("")
        header = list(HEADER) if result["torch"] else list(HEADER[:6])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|")
        for row in result["rows"]:
            lines.append("| " + " | ".join(cells(row)[:len(header)]) + " |")
        if not result["torch"] and result["device"] == "cpu":
            lines.append("")
            lines.append("(PyTorch was not installed, so there is no comparison column.)")
        lines.append("")
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
        result = run_device(device, args.quick)
        if device == "gpu":
            result["gpu"] = gpu_name()
        print(f"{device}: {copy_text(result)}")
        results.append(result)
    if not args.no_write:
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
