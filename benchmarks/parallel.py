"""Data-parallel training over MPI on this machine: 1 and 2 ranks, iterations/s and the time spent in the
gradient allreduce, for LeNet-PReLU and SphereFace-20.

    python benchmarks/parallel.py [--iters 20] [--ranks 1,2] [--no-write]

Each row runs `mpiexec -n K python benchmarks/parallel.py --worker ...`: every rank builds the net (LeNet:
the Input-layer train net of benchmarks/nets.py, batch 64; SphereFace-20: the zoo deploy net, batch 1,
random weights), and each iteration is forward + backward + the allreduce of all gradients
(minicaffe.parallel.GradientExchange, as in training; K = 1: no exchange): with K > 1, one row with buckets
of the default size started during backward (overlap), one with one flat buffer after backward. Each
rank runs one CPU thread, so K ranks use K cores: on a machine with fewer cores than ranks the ranks
share cores and the table says so.

The expected scaling column does not depend on this machine's cores: from the measured compute time per
iteration t (1 rank) and the gradient bytes per iteration V, a ring allreduce over K ranks moves
2 (K-1)/K V bytes per rank, so on a link of bandwidth W the K ranks process K batches in
t + 2 (K-1)/K V / W: speed-up K t / (t + 2 (K-1)/K V / W), given for 8 ranks at 10 and 100 Gbit/s.
Updates the section of this script in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
SCRIPT = "benchmarks/parallel.py"
NETS = ("LeNet-PReLU", "SphereFace-20")
LINKS_GBIT = (10, 100)
SCALING_RANKS = 8


def build(name: str):
    """(net, one_iteration) for a benchmark net: one_iteration runs forward and backward."""
    import nets as bench  # benchmarks/nets.py

    if name == "LeNet-PReLU":
        net = bench.lenet_solver().net
        rng = np.random.default_rng(0)
        net.blobs["data"].data[...] = rng.random(net.blobs["data"].shape, dtype=np.float32)
        net.blobs["label"].data[...] = rng.integers(0, 10, net.blobs["label"].shape)
        return net, net.forward_backward
    path = bench.zoo_nets().get(name)
    if path is None:
        raise SystemExit(f"no {name} deploy net in {bench.zoo_dir()} (set MINICAFFE_SHARED)")
    net = bench.zoo_net(path)
    rng = np.random.default_rng(1)
    for blob in net.inputs:
        net.blobs[blob].data[...] = rng.standard_normal(net.blobs[blob].shape, dtype=np.float32)

    def forward_backward():
        net.forward_range(0, len(net.layers) - 1)
        for output in net.outputs:
            net.blobs[output].diff[...] = 1.0
        net.backward_range(len(net.layers) - 1, 0)

    return net, forward_backward


def worker(name: str, iters: int, overlap: bool) -> None:
    """One rank: `iters` timed iterations after 2 warm-up ones; rank 0 prints a JSON line."""
    import math

    from minicaffe import parallel, threads

    threads.configure(1)
    comm = parallel.MPICommunicator() if parallel.launched_size() > 1 else None
    net, forward_backward = build(name)
    exchange = None
    if comm is not None:
        exchange = parallel.GradientExchange(net, comm, np.float32,
                                             parallel.DEFAULT_BUCKET_MB if overlap else math.inf)
        if overlap:
            net.on_layer_backward.append(exchange.start_ready)
    for i in range(iters + 2):
        if i == 2:
            start = time.perf_counter()
            communication = exchange.seconds if exchange else 0.0
        net.clear_param_diffs()
        forward_backward()
        if exchange is not None:
            exchange.finish()
    seconds = time.perf_counter() - start
    communication = exchange.seconds - communication if exchange else 0.0
    if comm is None or comm.rank == 0:
        print(json.dumps({"net": name, "ranks": comm.size if comm else 1, "iter_per_s": iters / seconds,
                          "comm_ms": 1e3 * communication / iters, "overlap": overlap and comm is not None,
                          "bytes": 4 * sum(p.blob.count for p in net.learnable_params),
                          "buckets": len(exchange.buckets) if exchange else 0,
                          "batch": int(net.blobs[net.inputs[0]].shape[0])}))


def run_row(name: str, ranks: int, iters: int, overlap: bool = True) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--iters", str(iters)]
    command += [] if overlap else ["--no-overlap"]
    if ranks > 1:
        beside = Path(sys.executable).parent / "mpiexec"
        mpiexec = str(beside) if beside.exists() else shutil.which("mpiexec") or "mpiexec"
        command = [mpiexec, "-n", str(ranks), *command]
    env = {**os.environ, "MINICAFFE_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def expected_speedup(seconds: float, volume: int, ranks: int, gbit: float) -> float:
    transfer = 2 * (ranks - 1) / ranks * volume / (gbit * 1e9 / 8)
    return ranks * seconds / (seconds + transfer)


def section(rows: list[dict], command: str) -> str:
    from markdown_section import markers

    from minicaffe import threads, timing

    begin, end = markers(SCRIPT)
    cores = threads.usable_cores()
    links = " | ".join(f"{SCALING_RANKS} ranks at {g} Gbit/s" for g in LINKS_GBIT)
    lines = [begin, f"## Data-parallel training over MPI ({SCRIPT})", "",
             f"Reproduce: `{command}` (updates this section). Measured {dt.date.today().isoformat()} on "
             f"{timing.machine()} (other processes busy on the cores); MPICH from the `mpi` extra, one CPU "
             "thread per rank.", "",
             f"**This machine has {cores} cores**: ranks beyond {cores} share cores, and the other "
             "processes of the machine compete for them, so the 2-rank rows show the exchange's cost, not "
             "a speed-up one would see with a core (or a GPU) per rank. The expected speed-up columns "
             "come from the measured 1-rank compute time t and the gradient bytes V per iteration, for a "
             "ring allreduce (each rank sends 2 (K-1)/K V): K t / (t + 2 (K-1)/K V / bandwidth). The "
             "allreduce time includes waiting for the slower rank.", "",
             f"| net | batch per rank | ranks | exchange | iterations/s (per rank) | samples/s (all ranks) | "
             f"allreduce ms per iteration | gradient MB | expected speed-up, {links} |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(LINKS_GBIT)]
    single = {row["net"]: row for row in rows if row["ranks"] == 1}
    for row in rows:
        base = single.get(row["net"])
        expected = ["-"] * len(LINKS_GBIT)
        if row["ranks"] == 1 and base is not None:
            t = 1.0 / base["iter_per_s"]
            expected = [f"{expected_speedup(t, base['bytes'], SCALING_RANKS, g):.2f}x" for g in LINKS_GBIT]
        samples = row["iter_per_s"] * row["batch"] * row["ranks"]
        exchange = "-" if row["ranks"] == 1 else \
            f"{row['buckets']} bucket{'s' * (row['buckets'] > 1)}, overlapped" if row["overlap"] \
            else "1 buffer after backward"
        lines.append(f"| {row['net']} | {row['batch']} | {row['ranks']} | {exchange} | "
                     f"{row['iter_per_s']:.2f} | {samples:.1f} | {row['comm_ms']:.3f} | "
                     f"{row['bytes'] / 1e6:.2f} | " + " | ".join(expected) + " |")
    lines += ["", "The results are the same as one process with K times the batch to float rounding (the "
              "sum's order; tests/test_parallel.py checks 1e-6 relative). Overlapped buckets and one buffer "
              "give the same weights bit for bit with 2 ranks (tests/test_parallel_overlap.py). With overlap "
              "the allreduce time counts starting the buckets and polling them during backward, and the "
              "wait after it.", end]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="NET", help=argparse.SUPPRESS)
    parser.add_argument("--no-overlap", dest="overlap", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.iters, args.overlap)
        return 0
    from markdown_section import update_section

    rows = [run_row(name, k, args.iters, overlap) for name in args.nets.split(",")
            for k in map(int, args.ranks.split(",")) for overlap in ((True, False) if k > 1 else (True,))]
    text = section(rows, "python " + " ".join([SCRIPT, *(argv if argv is not None else sys.argv[1:])]))
    print(text)
    if not args.no_write:
        update_section(REPO / "BENCHMARKS.md", SCRIPT, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
