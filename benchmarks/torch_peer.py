"""The PyTorch side of the benchmarks, in a process of its own (see nets.Peer).

    python benchmarks/torch_peer.py ROW     # a row of nets.py: lenet, or a zoo net's name
    python benchmarks/torch_peer.py kernel-rows [--quick]   # kernels.py's PyTorch rows, one per request

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


def serve_kernel_rows(quick: bool) -> None:
    """kernels.py's rows one at a time: "ready" -> "ready"; "rows" -> the JSON list of the rows PyTorch
    has; a row's name -> its JSON [forward ms, backward ms], measured then."""
    import kernels  # benchmarks/kernels.py

    bundle = kernels.torch_ops()
    min_runs, min_seconds = (2, 0.0) if quick else (5, 0.4)
    cases = {name: [kernels.QUICK_SHAPES.get(s, s) for s in shapes] if quick else shapes
             for name, _, shapes, _ in kernels.CASES}
    rows = [name for name in cases if kernels.torch_has(name, bundle)]
    for request in sys.stdin:
        name = request.strip()
        if name == "ready":
            print("ready", flush=True)
        elif name == "rows":
            print(json.dumps(rows), flush=True)
        else:
            times = kernels.bench_torch(name, cases[name], min_runs, min_seconds, bundle)
            print(json.dumps(times), flush=True)


def main() -> int:
    row = sys.argv[1]
    if row == "kernel-rows":
        serve_kernel_rows("--quick" in sys.argv)
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
