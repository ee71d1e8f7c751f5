"""The one owner of minicaffe's CPU threads: the kernels' (OpenMP plane loops, kernels/shim.h) and
BLAS's (numpy's GEMMs, set through threadpoolctl).

The count is the cores this process may run on (its CPU affinity: taskset, a container's cpuset),
unless $MINICAFFE_THREADS or `minicaffe --threads N` asks for fewer; it is never more than the usable
cores. `minicaffe device_query` shows it.

Policy: the kernels use all the threads, BLAS one. Threads that compute at the same moment never
exceed the usable cores: a kernel launch and a GEMM never overlap (both are synchronous calls from
the thread that runs the net), and idle threads sleep rather than spin:
  * OpenMP's threads wait passively (OMP_WAIT_POLICY=passive unless the environment says otherwise;
    libgomp reads it when the first kernel library loads it). Spinning, they thrash with any other
    busy process: the quickstart took 24-54 s instead of 3.5-6.6 s on a loaded 2-core machine.
    But only after a short spin (GOMP_SPINCOUNT=SPIN_COUNT, when the user set neither variable):
    waking a sleeping thread took 50-150 us on a 2-core VM, a third of an 8 MB element-wise launch,
    while the launches of one net follow each other within tens of microseconds.
  * OpenBLAS's threads busy-wait (the caller for its workers, and idle workers for ~0.1 s), which no
    call can turn off once numpy has loaded it. With one core taken by another process, every
    threaded GEMM then waits for a worker that is not running: the quickstart took 55-90 s with 2
    BLAS threads against 5-13 s with one (and its GEMMs are small, so one thread loses little).
So BLAS runs on the calling thread only, set through threadpoolctl (whatever OPENBLAS_NUM_THREADS
says). A large product is still spread over the cores, by minicaffe: blas.matmul and blas.cpu_gemm cut
its output into parts along its longer side, each one single-threaded BLAS call on one of the kernels'
OpenMP threads (kernels/shim.h's mc_gemm_parts, or kernel.run_parts; one team for both, so the threads
a GEMM used are still spinning when the next kernel launches, and sleep like them after). Work split
over the threads at a coarser grain (kernel.run_parts over a convolution's images) runs its kernels and
GEMMs on one thread per part (kernel_threads() is 1 there). Kernel results are the same bits for every
thread count (kernels/shim.h's PLANE_LOOP); GEMM results for the same thread count.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

ENV = "MINICAFFE_THREADS"

_threads: int | None = None  # the configured count, None until configure() runs
_part = threading.local()  # .running: True on a thread while it runs one part of kernel.run_parts

# libgomp reads its wait policy once, when the first kernel library loads it; set before that. (What the
# user had set, if anything, is kept for child processes that must run at their own defaults: the
# PyTorch peer of benchmarks/nets.py.)
USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
USER_SPIN_COUNT = os.environ.get("GOMP_SPINCOUNT")
# libgomp's spins before a waiting thread sleeps: about 0.1 ms here (a spin is a pause instruction). Not
# set when the user chose a policy: GOMP_SPINCOUNT would cut OMP_WAIT_POLICY=active's spinning short.
SPIN_COUNT = 3000
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
if USER_WAIT_POLICY is None and USER_SPIN_COUNT is None:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask on Linux, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def requested_threads() -> int | None:
    """$MINICAFFE_THREADS as a positive int, or None when unset or empty; ValueError when malformed."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{ENV}={text!r}: expected a positive number of threads")
    return count


def configure(count: int | None = None) -> int:
    """Set the number of threads: `count`, else $MINICAFFE_THREADS, else the usable cores, at most the
    usable cores. Applies it to BLAS now and to the kernels from their next launch. Returns it."""
    global _threads
    if count is not None and count < 1:
        raise ValueError(f"threads: expected a positive number, got {count}")
    wanted = count if count is not None else requested_threads()
    cores = usable_cores()
    _threads = min(wanted, cores) if wanted is not None else cores
    _limit_blas(blas_threads())
    return _threads


def kernel_threads() -> int:
    """Threads for a kernel launch's plane loops (configures with the defaults on first use); 1 inside
    a part of kernel.run_parts, which already has its core: a kernel launched there runs serially, and a
    product split there (blas.py) stays whole rather than nesting a team on threads already busy."""
    if getattr(_part, "running", False):
        return 1
    return _threads if _threads is not None else configure()


@contextlib.contextmanager
def one_part() -> Iterator[None]:
    """While this thread runs one part of kernel.run_parts: kernel_threads() is 1 here."""
    _part.running = True
    try:
        yield
    finally:
        _part.running = False


def blas_threads() -> int:
    """Threads for BLAS (numpy's GEMMs) under the policy above."""
    return 1


def _limit_blas(count: int) -> None:
    import scipy.linalg.blas  # noqa: F401  scipy's own OpenBLAS (blas.cpu_gemm's) must be loaded to be limited
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=count, user_api="blas")


def blas_pool_threads() -> str:
    """The BLAS libraries loaded and their thread counts as they are now, e.g. 'openblas 1'."""
    from threadpoolctl import threadpool_info

    pools = [f"{pool['internal_api']} {pool['num_threads']}" for pool in threadpool_info()
             if pool["user_api"] == "blas"]
    return ", ".join(pools) or "none loaded"
