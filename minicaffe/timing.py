"""Timing nets and kernels: Caffe's `caffe time` loop, the bytes a layer moves, the machine's copy
bandwidth, and the machine the times are taken on (CPU model, usable cores, BLAS). Used by `minicaffe
time`, `minicaffe device_query` and the benchmarks.

  * forward bytes  = bytes of the bottoms (read) + the tops (written) + the parameter blobs (read);
    an in-place layer reads and writes the same blob and it counts twice, as the memory does move twice.
  * backward bytes = 2 x forward bytes: the top diff and the data (bottom or top) are read and the
    bottom diff (and parameter diff) written. A rough but consistent model; kernels that keep a copy or
    read more (e.g. BatchNorm's several passes) really move more than this.
  * copy bandwidth = 2 x the size of a large array copy (one read + one write) / its best time.

Times are taken between synchronize() calls, so on the GPU they cover the kernels, not their launch.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from . import backend, threads
from .threads import usable_cores

COPY_BYTES = 64 << 20


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


# -- the machine ---------------------------------------------------------------------------------------

def peer_environment() -> dict[str, str]:
    """This process's environment without what minicaffe added to it (OMP_WAIT_POLICY and GOMP_SPINCOUNT,
    unless the user had set them): for a benchmark's peer process (PyTorch) that must run at its own
    defaults."""
    env = dict(os.environ)
    if threads.USER_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY", None)
    if threads.USER_SPIN_COUNT is None:
        env.pop("GOMP_SPINCOUNT", None)
    return env


# The 1-minute load average when this module was imported, i.e. before a benchmark's runs: on a shared
# machine it says how quiet the runs were (their own load would count if it were read afterwards).
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine() -> str:
    """The line benchmarks print about the hardware: CPU model, usable cores, OS and architecture, and
    the load average before the runs."""
    load = "" if LOAD_AT_START is None else f", load average {LOAD_AT_START:.2f} before the runs"
    return f"{cpu_model()}, {usable_cores()} cores usable, {platform.system()} {platform.machine()}{load}"


def software() -> str:
    """The line benchmarks print about the software that does the arithmetic: numpy, its BLAS, minicaffe."""
    import minicaffe

    return f"numpy {np.__version__} with {blas_info().split(' (')[0]}; minicaffe {minicaffe.__version__}"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_info() -> str:
    """numpy's BLAS library (which runs the GEMMs), with its version and configuration."""
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        text = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
        detail = blas.get("openblas configuration")
        return f"{text} ({detail})" if detail else text
    except Exception:  # older numpy: no dict mode; the information is only informative
        return "unknown (numpy.show_config() for details)"
