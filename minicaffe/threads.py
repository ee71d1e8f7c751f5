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

Two counts, so that a busy machine changes speed and not bits: kernel_threads() cuts the work (a GEMM's
parts, a convolution's ranges of images: what the results depend on), working_threads() is how many OS
threads run it now. That is kernel_threads(), fewer while other processes keep some of the usable cores
busy: a part or a plane then waits for a thread that is running rather than for one that shares its core
with another process. Every LOAD_SAMPLE_SECONDS a look at /proc counts the cores busy outside this
process (/proc/stat) and the time this process's threads waited for a core (their run-queue time,
/proc/self/task/*/schedstat). Threads are taken away only while they wait (another process that runs
while this one is idle, e.g. a benchmark's peer taking turns with it, competes with nothing), and given
back when the other processes leave cores free. LeNet's training step on the 2-core VM with another
process spinning on one core: 22.8 ms on 2 threads (its threads waited 0.62 s per second; quiet, under
0.04), 20.3-20.9 ms on one; quiet 12.4-16 ms.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

ENV = "MINICAFFE_THREADS"

_threads: int | None = None  # the configured count, None until configure() runs
# Seconds between two looks at the load (~70 us each: /proc/stat and a schedstat file per thread).
LOAD_SAMPLE_SECONDS = 0.25
# Run-queue seconds of this process's threads per second from which they compete for cores: 0.62 on 2
# threads with another process spinning on one of the 2 cores; quiet, under 0.04; up to 0.17 while a
# process with spinning OpenMP threads takes turns with this one (benchmarks/nets.py's PyTorch peer).
CONTENTION_WAIT = 0.3
# Looks without waiting after which a thread taken away is given back to try (taken again at the next
# look if its threads wait): the other processes' load cannot tell whether cores are free while they
# run when this one is idle, e.g. taking turns with it.
PROBE_LOOKS = 8
# The next look's time; the last look (monotonic time, busy seconds of the usable cores, this process's
# CPU seconds, its threads' run-queue seconds); the cores other processes kept busy between the two looks
# before; and the cores the kernels may work on (working_threads()).
_next_look = 0.0
_last_look: tuple[float, float, float, float] | None = None
_busy_elsewhere = 0.0
_free_cores = 1 << 30
_calm_looks = 0  # looks without waiting since the last with it
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


def working_threads() -> int:
    """OS threads that run a kernel launch's planes or a split's parts now: kernel_threads(), or fewer
    after a look at the load found this process's threads waiting for cores that other processes keep
    busy (at least 1)."""
    count = kernel_threads()
    if count == 1:
        return 1
    now = time.monotonic()
    if now >= _next_look:
        _look_at_the_load(now)
    return min(count, _free_cores)


def busy_elsewhere_now() -> float:
    """The cores other processes keep busy: two looks at the load, LOAD_SAMPLE_SECONDS apart (what
    `minicaffe device_query` shows; at any thread count, where working_threads() looks only when it
    has threads to take away)."""
    _look_at_the_load(time.monotonic())
    time.sleep(LOAD_SAMPLE_SECONDS)
    _look_at_the_load(time.monotonic())
    return _busy_elsewhere


def _look_at_the_load(now: float) -> None:
    """Updates _busy_elsewhere (the usable cores' busy time since the last look less this process's own
    CPU time, per second) and _free_cores: down to the usable cores less _busy_elsewhere (to the nearest
    core, at least 1) when this process's threads waited for a core CONTENTION_WAIT of the time; when
    they did not, up to it, or one up after PROBE_LOOKS such looks. All cores where /proc cannot be
    read (not Linux), and after a pause of more than two periods without a launch (this look only
    starts the next period)."""
    global _next_look, _last_look, _busy_elsewhere, _free_cores, _calm_looks
    _next_look = now + LOAD_SAMPLE_SECONDS
    busy, own, waited = busy_core_seconds(), time.process_time(), run_queue_seconds()
    cores = usable_cores()
    if busy is None or waited is None:
        _last_look, _busy_elsewhere, _free_cores = None, 0.0, cores
        return
    last, _last_look = _last_look, (now, busy, own, waited)
    if last is None or not 0 < now - last[0] <= 2 * LOAD_SAMPLE_SECONDS:
        _busy_elsewhere, _free_cores = 0.0, cores
        return
    seconds = now - last[0]
    _busy_elsewhere = max(0.0, (busy - last[1]) - (own - last[2])) / seconds
    free = max(1, int(cores - _busy_elsewhere + 0.5))
    if (waited - last[3]) / seconds >= CONTENTION_WAIT:
        _free_cores, _calm_looks = min(_free_cores, free), 0
        return
    _calm_looks += 1
    if _calm_looks >= PROBE_LOOKS:
        free, _calm_looks = max(free, _free_cores + 1), 0
    _free_cores = min(cores, max(_free_cores, free))


def run_queue_seconds() -> float | None:
    """Seconds this process's threads have waited on a run queue for a core (the second field of each
    /proc/self/task/*/schedstat), or None where that cannot be read."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended since the listing
            continue
    return total / 1e9


def busy_core_seconds() -> float | None:
    """Seconds the usable cores have been busy since boot (user, system, interrupts and time the
    hypervisor took: /proc/stat's cpuN lines), or None where that cannot be read."""
    try:
        cpus = os.sched_getaffinity(0)
        with open("/proc/stat") as stat:
            lines = stat.read().splitlines()
    except (AttributeError, OSError):
        return None
    ticks = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0][3:].isdigit() and fields[0].startswith("cpu") and int(fields[0][3:]) in cpus:
            # user nice system idle iowait irq softirq steal: all but idle and iowait
            ticks += sum(int(value) for index, value in enumerate(fields[1:9]) if index not in (3, 4))
    return ticks / os.sysconf("SC_CLK_TCK")


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
