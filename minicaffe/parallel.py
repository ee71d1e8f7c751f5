"""Data-parallel training: K processes (ranks), each with its own net and its own share of the data,
averaging their parameter gradients after every backward pass, as Caffe's NCCL solver does.

    mpirun -n 2 minicaffe train --solver S        # K processes over MPI (mpi4py; pip install ".[mpi]")
    minicaffe train --solver S --gpu 0,1          # one process per GPU, gradients over NCCL (CuPy)

What every rank does (see GradientSync):
  * data: Data, HDF5Data and ImageData layers in the TRAIN phase read the records r, r+K, r+2K, ... of
    their source on rank r (record(): Caffe's multi-GPU reader), so K ranks with batch B read, together,
    the records one process with batch K*B reads;
  * start: rank 0's weights (and solver history, after a resume) are broadcast to all ranks;
  * each iteration, before clipping, regularization and the update: the gradients of all learnable
    parameters are summed over the ranks and divided by K. The losses being means over each rank's batch,
    the average is the gradient of the mean over all K*B records: K ranks train as one process with K
    times the batch (to float rounding: the sum's order differs). The sums go in buckets of about 25 MB
    (bucket_mb), in reverse net order, each started (nonblocking) as soon as backward is past the layers
    that have its parameters, so the exchange overlaps the rest of backward; `overlap=False` (`train
    --no-overlap`): one flat buffer after backward. Both give the same weights (GradientExchange);
  * signals: the last bucket carries two counters, "someone asked to stop" and "to snapshot", so a
    SIGINT or SIGTERM on any rank stops every rank after the same iteration, with no extra message;
  * only rank 0 logs, tests and snapshots (Solver.root is False elsewhere); the others' logs go nowhere;
  * random numbers: ranks > 0 add their rank to every random key (rng.set_rank), so each rank draws its
    own dropout masks and crops, reproducibly; data orders (shuffles, rand_skip) use rng.shared_stream,
    the same on every rank, since the ranks share one order out between them.

A rank that dies: every collective is nonblocking and polled against a deadline (`timeout`, default
DEFAULT_TIMEOUT seconds, `minicaffe train --sync-timeout`); when it passes, the rank writes a one-line
error naming the step and aborts the whole job (MPI_Abort), instead of waiting forever. MPI errors
(ERRORS_RETURN) become the same error. mpiexec also ends the job on its own when a rank is killed.
The deadline must exceed the longest time one rank can spend away from the others: rank 0's test phase.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NoReturn, Protocol

import numpy as np

from . import backend, log, rng
from .proto import caffe_pb2

if TYPE_CHECKING:  # the data layers import this module, and the solver imports them
    from .solver import Solver

DEFAULT_TIMEOUT = 600.0  # seconds a rank waits for the others in one collective before giving up
DEFAULT_BUCKET_MB = 25.0  # gradient bucket size, PyTorch DDP's default
# The longest pause between two polls of a collective in flight (the pauses grow from 10 us), in the first
# LONG_WAIT seconds of a wait; then 10 ms (e.g. while rank 0 tests). Short: MPICH moves a collective on only
# inside MPI calls, and a large one takes many rounds between the ranks, each waiting for the next poll on
# both sides (a 10 ms pause made a 1.7 MB allreduce take 10 ms instead of 0.7 ms on 2 ranks).
POLL_PAUSE, LONG_WAIT = 1e-4, 1.0
# Environment variables by which launchers announce the number of processes of the job: Open MPI's mpirun,
# and PMI (MPICH's mpiexec, srun --mpi=pmi2). Not SLURM_NTASKS: a batch script has it without srun.
LAUNCHER_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class ParallelError(RuntimeError):
    """A data-parallel run cannot go on: a rank died or hangs, or the launch is inconsistent."""


# -- which records a rank reads -------------------------------------------------------------------

class Shard(NamedTuple):
    rank: int
    count: int


_shard = {"value": Shard(0, 1)}


def set_shard(rank: int, count: int) -> None:
    """This process is rank `rank` of `count`: its TRAIN data layers read every count-th record."""
    if not 0 <= rank < count:
        raise ValueError(f"rank {rank} of {count} ranks")
    _shard["value"] = Shard(int(rank), int(count))


def shard() -> Shard:
    return _shard["value"]


def stride(phase: int) -> int:
    """How far apart in the source are the records this rank reads one after the other: K in TRAIN, 1 in
    TEST (only rank 0 tests, on all records, as Caffe's reader keeps every record in TEST)."""
    return shard().count if phase == caffe_pb2.TRAIN else 1


def record(position: int, phase: int) -> int:
    """The source position of this rank's `position`-th read: position * K + rank in TRAIN, so that the
    ranks' reads interleave as the reads of one process with K times the batch."""
    rank, count = shard()
    return position * count + rank if phase == caffe_pb2.TRAIN else position


# -- communicators -----------------------------------------------------------------------------------

class Communicator(Protocol):
    """What GradientSync needs: in-place sum (nonblocking: start_allreduce, then test or wait on what it
    returns; allreduce does both) and broadcast of one contiguous array over `size` ranks, and abort (end
    every rank after an error)."""

    rank: int
    size: int

    def start_allreduce(self, array): ...
    def test(self, request) -> bool: ...
    def wait(self, request) -> None: ...
    def allreduce(self, array) -> None: ...
    def broadcast(self, array, root: int = 0) -> None: ...
    def abort(self, message: str) -> None: ...


def poll(done: Callable[[], bool], timeout: float, on_timeout: Callable[[], object]) -> None:
    """Call done() until it is true, with pauses (see POLL_PAUSE); on_timeout() once `timeout` seconds
    have passed (it ends the job)."""
    start, pause = time.monotonic(), 1e-5
    while not done():
        waited = time.monotonic() - start
        if waited > timeout:
            on_timeout()
        time.sleep(pause)
        pause = min(pause * 2, POLL_PAUSE if waited < LONG_WAIT else 0.01)


def launched_size() -> int:
    """The number of processes a launcher (mpirun, mpiexec, srun) started, from its environment; 1 when
    this process was not started by one."""
    for name in LAUNCHER_SIZES:
        text = os.environ.get(name, "").strip()
        if text.isdigit():
            return int(text)
    return 1


class MPICommunicator:
    """MPI_COMM_WORLD through mpi4py, host (numpy) arrays. Collectives are nonblocking and polled until
    `timeout` seconds, so that a dead rank is an error rather than a hang."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, comm=None):
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise ParallelError(f"training over MPI needs mpi4py and an MPI library: pip install "
                                f"'minicaffe[mpi]' ({error})") from None
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)  # errors raise MPI.Exception instead of aborting
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(timeout)
        self.step = "start-up"  # named in the error when a collective times out

    def start_allreduce(self, array):
        """Begin summing `array` in place over the ranks; the request to pass to test() and wait()."""
        try:
            return self.comm.Iallreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        except self.MPI.Exception as error:
            self._failed(error, "allreduce")

    def allreduce(self, array) -> None:
        self.wait(self.start_allreduce(array))

    def broadcast(self, array, root: int = 0) -> None:
        try:
            request = self.comm.Ibcast(array, root=root)
        except self.MPI.Exception as error:
            self._failed(error, "broadcast")
        self.wait(request, "broadcast")

    def test(self, request, what: str = "allreduce") -> bool:
        """Whether `request` is done. Each call also moves it on: MPICH progresses a nonblocking
        collective only inside MPI calls (no progress thread by default)."""
        try:
            return request.Test()
        except self.MPI.Exception as error:
            self._failed(error, what)

    def wait(self, request, what: str = "allreduce") -> None:
        """Until `request` is done, or abort at the deadline."""
        poll(lambda: self.test(request, what), self.timeout, lambda: self.abort(
            f"rank {self.rank} of {self.size}: no {what} from the other ranks within {self.timeout:g} s at "
            f"{self.step}: a rank died or hangs (see its log; --sync-timeout sets this deadline)"))

    def _failed(self, error, what: str) -> NoReturn:
        self.abort(f"rank {self.rank} of {self.size}: MPI {what} failed at {self.step}: "
                   f"{error.Get_error_string()} (a rank died?)")

    def abort(self, message: str) -> NoReturn:
        """Write `message` as minicaffe's one-line error and end every rank of the job. MPI_Finalize
        would wait for the lost rank, so a plain exit is no way out."""
        sys.stderr.write(f"minicaffe train: error: {message}\n")
        sys.stderr.flush()
        time.sleep(0.5)  # the launcher forwards our output: give it the line before the teardown
        self.comm.Abort(1)
        raise ParallelError(message)  # not reached: Abort ends this process too


class NCCLCommunicator:
    """A NCCL communicator (CuPy's binding) over device arrays of the current GPU, rank `rank` of `size`,
    all sharing `unique_id` (nccl.get_unique_id() on one rank, handed to the others: by the launching
    process, or over MPI across machines). Collectives run on the current stream, polled against the
    same deadline as MPICommunicator's. `nccl`: the module, for tests (default cupy.cuda.nccl)."""

    def __init__(self, size: int, unique_id, rank: int, timeout: float = DEFAULT_TIMEOUT, nccl=None):
        if nccl is None:
            from cupy.cuda import nccl
        self.nccl, self.rank, self.size, self.timeout = nccl, int(rank), int(size), float(timeout)
        self.types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}
        self.comm = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self.stream = None  # the collectives' own stream (made on first use), so they overlap compute
        self.step = "start-up"

    def start_allreduce(self, array):
        """Begin summing `array` in place over the ranks on the communication stream, after the work
        queued so far on the current stream (which wrote `array`); the event to pass to test() and wait()."""
        return self._launch(lambda stream: self.comm.allReduce(
            array.data.ptr, array.data.ptr, array.size, self.types[str(array.dtype)], self.nccl.NCCL_SUM,
            stream.ptr))

    def allreduce(self, array) -> None:
        self.wait(self.start_allreduce(array))

    def broadcast(self, array, root: int = 0) -> None:
        self.wait(self._launch(lambda stream: self.comm.bcast(
            array.data.ptr, array.size, self.types[str(array.dtype)], root, stream.ptr)), "broadcast")

    def _launch(self, call):
        import cupy

        if self.stream is None:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        written = cupy.cuda.Event(disable_timing=True)
        written.record(cupy.cuda.get_current_stream())
        self.stream.wait_event(written)
        call(self.stream)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        return done

    def test(self, request, what: str = "allreduce") -> bool:
        return request.done

    def wait(self, request, what: str = "allreduce") -> None:
        poll(lambda: request.done, self.timeout, lambda: self.abort(
            f"rank {self.rank} of {self.size}: no NCCL {what} from the other ranks within {self.timeout:g} s "
            f"at {self.step}: a rank died or hangs"))

    def abort(self, message: str) -> None:
        sys.stderr.write(f"minicaffe train: error: {message}\n")
        sys.stderr.flush()
        self.comm.abort()
        os._exit(1)  # the stream waits on a peer that is gone: no clean way out of this process


def unique_id_text(unique_id) -> str:
    """nccl.get_unique_id()'s tuple of ints as text for an environment variable (and back: id_from_text)."""
    return ",".join(str(int(value)) for value in unique_id)


def id_from_text(text: str) -> tuple[int, ...]:
    return tuple(int(value) for value in text.split(","))


# Environment of the processes `minicaffe train --gpu 0,1` starts, one per GPU.
GPU_RANK, GPU_SIZE, GPU_ID = "MINICAFFE_GPU_RANK", "MINICAFFE_GPU_SIZE", "MINICAFFE_NCCL_ID"


def launch_gpus(gpus: list[int], arguments: list[str]) -> int:
    """`minicaffe train --gpu 0,1`: start one `minicaffe <arguments> --gpu <id>` process per GPU, rank i on
    gpus[i], sharing a NCCL id; wait for them all. SIGINT and SIGTERM are passed on (each rank agrees to
    stop through GradientSync); when one process fails, the others are ended. Returns the exit status."""
    import signal
    import subprocess

    from cupy.cuda import nccl

    unique_id = unique_id_text(nccl.get_unique_id())
    processes = []
    for rank, gpu in enumerate(gpus):
        env = {**os.environ, GPU_RANK: str(rank), GPU_SIZE: str(len(gpus)), GPU_ID: unique_id}
        command = [sys.executable, "-m", "minicaffe.cli", *arguments, "--gpu", str(gpu)]
        processes.append(subprocess.Popen(command, env=env))
    forward = lambda signum, frame: [p.send_signal(signum) for p in processes if p.poll() is None]  # noqa: E731
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in processes]
            if all(code is not None for code in codes):
                return max(codes, key=abs)
            if any(code for code in codes if code is not None):  # one failed: the others would wait
                for p in processes:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def gpu_rank_communicator(timeout: float = DEFAULT_TIMEOUT) -> NCCLCommunicator | None:
    """In a process launch_gpus started: its NCCL communicator; else None."""
    if GPU_RANK not in os.environ:
        return None
    return NCCLCommunicator(int(os.environ[GPU_SIZE]), id_from_text(os.environ[GPU_ID]),
                            int(os.environ[GPU_RANK]), timeout)


LOCAL_RANKS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


def local_rank(comm) -> int:
    """This rank's index among the ranks of its machine (from the launcher), else its rank."""
    for name in LOCAL_RANKS:
        text = os.environ.get(name, "").strip()
        if text.isdigit():
            return int(text)
    return comm.rank


def nccl_over_mpi(comm: MPICommunicator) -> NCCLCommunicator:
    """One MPI rank per GPU, across machines: rank 0 makes the NCCL id, MPI hands it to the others."""
    unique_id = None
    if comm.rank == 0:
        from cupy.cuda import nccl

        unique_id = nccl.get_unique_id()
    unique_id = comm.comm.bcast(unique_id, root=0)
    return NCCLCommunicator(comm.size, unique_id, comm.rank, comm.timeout)


# -- the solver side ---------------------------------------------------------------------------------

def init(comm: Communicator) -> None:
    """Make this process rank comm.rank of comm.size before its nets are built: data shards, random
    keys, and (rank > 0) no log lines."""
    set_shard(comm.rank, comm.size)
    rng.set_rank(comm.rank)
    if comm.rank != 0:
        log.set_stream(open(os.devnull, "w"))  # noqa: SIM115 (for the life of the process)


def worker_param(param: caffe_pb2.SolverParameter, rank: int) -> caffe_pb2.SolverParameter:
    """The solver of rank `rank`: as given on rank 0; without test nets elsewhere (rank 0 tests)."""
    if rank == 0:
        return param
    worker = caffe_pb2.SolverParameter()
    worker.CopyFrom(param)
    for name in ("test_net", "test_net_param", "test_iter", "test_state"):
        worker.ClearField(name)
    worker.test_interval = 0
    return worker


def mpi_solver(param_or_path, dtype=None, timeout: float = DEFAULT_TIMEOUT, overlap: bool = True,
               bucket_mb: float = DEFAULT_BUCKET_MB) -> Solver:
    """pycaffe's habit under mpirun: a solver whose step() and solve() train data-parallel over
    MPI_COMM_WORLD (each rank: this call, then the same steps). Its ``root`` is True on rank 0, whose
    ``net`` is the one to look at; rank 0 alone logs, tests and snapshots. `overlap`, `bucket_mb`: see
    GradientSync.

        solver = minicaffe.parallel.mpi_solver("solver.prototxt"); solver.step(100)
    """
    from .solver import Solver, _solver_param, _source

    comm = MPICommunicator(timeout)
    init(comm)
    source = _source(param_or_path, None)
    param = worker_param(_solver_param(param_or_path, source), comm.rank)
    base_dir = Path(param_or_path).parent if isinstance(param_or_path, (str, Path)) else None
    solver = Solver(param, dtype or np.float32, base_dir=base_dir, source=source)
    GradientSync(solver, comm, overlap=overlap, bucket_mb=bucket_mb)
    return solver


class Bucket:
    """Gradients exchanged in one allreduce: `blobs` (in the order backward finishes them), all final once
    backward has run layer `ready_at`; `extra` more values (GradientExchange's) after them in `flat`."""

    __slots__ = ("blobs", "ready_at", "extra", "flat", "request")

    def __init__(self, blobs: list, ready_at: int, extra: int = 0):
        self.blobs, self.ready_at, self.extra = blobs, ready_at, extra
        self.flat = None  # the bucket's buffer, allocated on first use
        self.request = None  # the allreduce in flight

    @property
    def size(self) -> int:
        return sum(blob.count for blob in self.blobs) + self.extra


def plan_buckets(net, bucket_bytes: float, itemsize: int, extra: int = 0) -> list[Bucket]:
    """The net's learnable parameters in reverse order, cut into buckets of at most `bucket_bytes` (a
    larger parameter makes a bucket of its own; math.inf: one bucket); the last bucket also holds `extra`
    values. Reverse order is the order in which backward finishes the gradients: a parameter's gradient is
    final once backward has run the first layer that has it (its owner, which net.learnable_params names:
    it lists a shared parameter once), and the owners come in net order."""
    position = {name: i for i, name in enumerate(net.layer_dict)}
    buckets: list[Bucket] = []
    blobs: list = []
    ready_at, size = len(net.layers) - 1, 0
    for learnable in reversed(net.learnable_params):
        nbytes = learnable.blob.count * itemsize
        if blobs and size + nbytes > bucket_bytes:
            buckets.append(Bucket(blobs, ready_at))
            blobs, size = [], 0
        blobs.append(learnable.blob)
        size += nbytes
        ready_at = position[learnable.layer_name]
    buckets.append(Bucket(blobs, ready_at if blobs else 0, extra))
    return buckets


class GradientExchange:
    """Sums a net's parameter gradients over the ranks of `comm` in buckets (plan_buckets), then divides
    by the rank count. start_ready(i), called once backward has run layer i (Net.on_layer_backward),
    starts the allreduces of the buckets that are final by then, so they run while backward goes on
    (overlap); finish() starts the rest, waits for all and writes the averages back into the diffs. With
    `bucket_mb` math.inf and no start_ready calls: one flat allreduce after backward.

    The same sum either way: each element is summed over the ranks alone, whatever bucket holds it; with 2
    ranks it is one float addition (commutative), bit for bit. With more, MPI may associate the K terms in
    another order for another message size (its algorithm choice), so buckets agree to float rounding."""

    def __init__(self, net, comm: Communicator, dtype, bucket_mb: float = DEFAULT_BUCKET_MB,
                 extra: Callable[[], list[float]] | None = None):
        self.comm = comm
        self.dtype = np.dtype(dtype)
        self.extra = extra  # values summed with the last bucket (read when it starts)
        self.buckets = plan_buckets(net, bucket_mb * 1e6, self.dtype.itemsize, 2 if extra else 0)
        self.started = 0  # how many buckets of the current exchange have started
        self.seconds = 0.0  # time spent starting, polling and waiting on the allreduces
        self.bytes = 0

    def start_ready(self, layer: int) -> None:
        """Backward has run layer `layer`: start the buckets that are final (in order: every rank must
        start the same collectives in the same order), and let the ones in flight progress."""
        begun = time.perf_counter()
        while self.started < len(self.buckets) and self.buckets[self.started].ready_at >= layer:
            self._start(self.buckets[self.started])
        for bucket in self.buckets[:self.started]:
            self.comm.test(bucket.request)
        self.seconds += time.perf_counter() - begun

    def finish(self) -> list[float]:
        """Start the buckets not started yet, wait for all, and write the averages into the diffs. Returns
        the summed extra values."""
        begun = time.perf_counter()
        while self.started < len(self.buckets):
            self._start(self.buckets[self.started])
        scale = 1.0 / self.comm.size
        for bucket in self.buckets:
            self.comm.wait(bucket.request)
            bucket.request = None
            offset = 0
            for blob in bucket.blobs:
                diff = blob.mutable_diff()
                diff.reshape(-1)[...] = bucket.flat[offset:offset + blob.count]
                diff *= scale
                offset += blob.count
        self.seconds += time.perf_counter() - begun
        self.started = 0  # the next exchange
        last = self.buckets[-1]
        return [float(v) for v in backend.to_host(last.flat[last.size - last.extra:])]

    def _start(self, bucket: Bucket) -> None:
        if bucket.flat is None:
            bucket.flat = backend.xp().zeros(bucket.size, dtype=self.dtype)
        offset = 0
        for blob in bucket.blobs:
            bucket.flat[offset:offset + blob.count] = blob.get_diff().reshape(-1)
            offset += blob.count
        if bucket.extra:
            bucket.flat[offset:] = backend.xp().asarray(self.extra(), dtype=self.dtype)
        bucket.request = self.comm.start_allreduce(bucket.flat)
        self.bytes += bucket.flat.nbytes
        self.started += 1


class GradientSync:
    """Hooks a solver into a data-parallel run over `comm` (solver callbacks, Caffe's NCCL class):
    on_start broadcasts rank 0's weights and history once, on_gradients averages the gradients and
    agrees on the signal actions that `local_action` (e.g. SignalHandler.action) reports on each rank.

    With `overlap` (the default), the gradients go in buckets of about `bucket_mb` MB that start their
    allreduce during the backward of the iteration's last micro-batch (iter_size), as soon as backward is
    past every layer that has their parameters (GradientExchange); without, in one buffer after backward.
    The weights are the same bit for bit either way with 2 ranks (see GradientExchange).

        comm = MPICommunicator(); parallel.init(comm)
        solver = Solver(parallel.worker_param(param, comm.rank)); GradientSync(solver, comm)
        solver.solve()
    """

    def __init__(self, solver: Solver, comm: Communicator, local_action=None, overlap: bool = True,
                 bucket_mb: float = DEFAULT_BUCKET_MB):
        from .solver import NONE

        self.solver, self.comm, self.local_action = solver, comm, local_action
        solver.root = comm.rank == 0
        self.blobs = [learnable.blob for learnable in solver.net.learnable_params]
        self.exchange = GradientExchange(solver.net, comm, solver.dtype, bucket_mb if overlap else math.inf,
                                         self._requests)
        self.overlap = overlap
        self.passes = 0  # backward passes (micro-batches) run in this iteration
        self.armed = False  # between on_start and on_gradients: backward passes are the iteration's
        self.started = False
        self.agreed = NONE
        self.broadcast_seconds, self.broadcast_bytes = 0.0, 0
        solver.add_callback(self.on_start, self.on_gradients)
        solver.set_action_function(self.action)
        if overlap:
            solver.net.on_layer_backward.append(self.on_layer_backward)

    @property
    def communication_seconds(self) -> float:
        """Time spent in collectives so far."""
        return self.broadcast_seconds + self.exchange.seconds

    @property
    def communicated_bytes(self) -> int:
        return self.broadcast_bytes + self.exchange.bytes

    def _name_step(self, what: str) -> None:
        if getattr(self.comm, "step", None) is not None:
            self.comm.step = f"iteration {self.solver.iter} ({what})"

    def on_start(self) -> None:
        """Before each iteration's passes; once, before the first: every rank starts from rank 0's
        weights and solver state (fillers draw per rank; a resumed rank 0 is the reference)."""
        self.passes, self.armed = 0, self.overlap
        if self.started:
            return
        self.started = True
        start = time.perf_counter()
        self._name_step("broadcast of the weights")
        for blob in [*self.blobs, *self.solver.history]:
            data = blob.mutable_data()
            self.comm.broadcast(data.reshape(-1))
            self.broadcast_bytes += data.nbytes
        iteration = backend.xp().asarray([self.solver.iter, self.solver.current_step], dtype="float64")
        self._name_step("broadcast of the iteration")
        self.comm.broadcast(iteration)
        self.broadcast_bytes += iteration.nbytes
        self.broadcast_seconds += time.perf_counter() - start
        root_iter = int(backend.to_host(iteration)[0])
        if root_iter != self.solver.iter:
            self.comm.abort(f"rank {self.comm.rank} is at iteration {self.solver.iter}, rank 0 at "
                            f"{root_iter}: resume every rank from the same snapshot")

    def on_layer_backward(self, layer: int) -> None:
        """Net.on_layer_backward: in the last pass of the iteration, start the buckets that are final."""
        if not self.armed:
            return
        if self.passes == self.solver.param.iter_size - 1:
            self._name_step("allreduce of the gradients")
            self.exchange.start_ready(layer)
        if layer == 0:
            self.passes += 1

    def _requests(self) -> list[float]:
        """This rank's action requests, summed over the ranks with the last bucket: stop, snapshot."""
        from .solver import NONE, SNAPSHOT, STOP

        request = self.local_action() if self.local_action is not None else NONE
        return [request == STOP, request == SNAPSHOT]

    def on_gradients(self) -> None:
        """Sum the gradients (and the action requests) over the ranks, then divide by K."""
        from .solver import NONE, SNAPSHOT, STOP

        self.armed = False
        self._name_step("allreduce of the gradients")
        stop, snapshot = self.exchange.finish()
        self.agreed = STOP if stop > 0 else SNAPSHOT if snapshot > 0 else NONE

    def action(self) -> str:
        """The action all ranks agreed on at this iteration's allreduce (asked once per iteration by
        the solver; NONE during rank 0's tests, whose batches the other ranks do not wait on)."""
        from .solver import NONE

        agreed, self.agreed = self.agreed, NONE
        return agreed
