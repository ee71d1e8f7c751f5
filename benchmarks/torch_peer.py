"""The PyTorch side of the benchmarks, in a process of its own (see nets.Peer).

    python benchmarks/torch_peer.py ROW     # a row of nets.py: lenet, or a zoo net's name
    python benchmarks/torch_peer.py kernels [--quick]   # kernels.py's PyTorch columns, as JSON

PyTorch is imported before minicaffe, so that its OpenMP runtime starts with the settings the user
started the benchmark with, not the passive wait policy minicaffe sets for its own kernels. The row's
PyTorch function is built as nets.py builds it (the same translated net, the same seeded weights and
inputs). Protocol on stdin/stdout, one line each: "ready" -> "ready"; "run" -> the seconds one run took.
"""

from __future__ import annotations

import json
import sys
import time

# isort: off
import torch  # first: see the docstring
import nets  # benchmarks/nets.py, beside this file; it imports minicaffe
# isort: on


def kernel_columns(quick: bool) -> dict[str, tuple[float, float]]:
    """{case: (forward ms, backward ms)} of kernels.py's cases that PyTorch has."""
    import kernels  # benchmarks/kernels.py

    bundle = kernels.torch_ops()
    min_runs, min_seconds = (2, 0.0) if quick else (5, 0.4)
    columns = {}
    for name, _, shapes, _ in kernels.CASES:
        shapes = [kernels.QUICK_SHAPES.get(s, s) for s in shapes] if quick else shapes
        times = kernels.bench_torch(name, shapes, min_runs, min_seconds, bundle)
        if times:
            columns[name] = times
    return columns


def main() -> int:
    row = sys.argv[1]
    if row == "kernels":
        print(json.dumps(kernel_columns("--quick" in sys.argv)))
        return 0
    if row == "lenet":
        runs = nets.lenet_runs(torch, check=False)[0]
    else:
        runs = nets.zoo_runs(nets.zoo_nets()[row], torch, check=False)[0]
    step = runs["torch"]
    for request in sys.stdin:
        if request.strip() == "run":
            start = time.perf_counter()
            step()
            print(time.perf_counter() - start, flush=True)
        else:
            print("ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
