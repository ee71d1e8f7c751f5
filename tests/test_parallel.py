"""Data-parallel training (minicaffe.parallel): shards, gradient averaging, and 2-rank CPU jobs under
mpiexec (skipped without mpi4py and an mpiexec: pip install ".[mpi]")."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_layers import hdf5_files, hdf5_layer, hdf5_run
from test_gpu_paths import fake_cupy  # noqa: F401  (the fixture)

import minicaffe
from minicaffe import example, io, parallel, rng
from minicaffe.blob import Blob
from minicaffe.proto import caffe_pb2
from minicaffe.testing import layer_from_prototxt

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_process():
    yield
    parallel.set_shard(0, 1)
    rng.set_rank(0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The quickstart's digits LMDBs (8x8 images)."""
    folder = tmp_path_factory.mktemp("digits")
    example.quickstart_solver(folder)
    return folder


# -- shards, in one process ------------------------------------------------------------------------

def test_record_interleaves_the_ranks_in_train_only():
    parallel.set_shard(1, 3)
    assert [parallel.record(p, caffe_pb2.TRAIN) for p in range(4)] == [1, 4, 7, 10]
    assert [parallel.record(p, caffe_pb2.TEST) for p in range(4)] == [0, 1, 2, 3]
    assert parallel.stride(caffe_pb2.TRAIN) == 3 and parallel.stride(caffe_pb2.TEST) == 1
    with pytest.raises(ValueError):
        parallel.set_shard(3, 3)


def data_batch(text: str, index: int) -> list[np.ndarray]:
    layer = layer_from_prototxt(text, phase=caffe_pb2.TRAIN, dtype=np.float32)
    top = [Blob((), np.float32), Blob((), np.float32)]
    layer.setup([], top)
    layer.forward_index = index
    layer.reshape([], top)
    layer.forward([], top)
    return [np.array(t.data) for t in top]


def interleave(parts: list[np.ndarray]) -> np.ndarray:
    """Rank r's row i is row i*K + r of the single batch."""
    return np.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])


@pytest.mark.parametrize("ranks", [2, 3])
def test_lmdb_ranks_read_together_the_batch_of_one_process(digits, ranks):
    text = ('name: "d" type: "Data" top: "data" top: "label" data_param {{ source: "{}" batch_size: {} '
            'rand_skip: 100 prefetch: 0 }}')
    source = digits / "digits_train_lmdb"
    for index in (0, 7, 31):  # 31 * 4 * 3 wraps around the 1,500 records
        single = data_batch(text.format(source, 4 * ranks), index)
        parts = []
        for rank in range(ranks):
            parallel.set_shard(rank, ranks)
            parts.append(data_batch(text.format(source, 4), index))
        parallel.set_shard(0, 1)
        for k in range(2):
            np.testing.assert_array_equal(interleave([p[k] for p in parts]), single[k])


def test_hdf5_shuffled_ranks_share_one_order(tmp_path):
    pytest.importorskip("h5py")
    source, _, _ = hdf5_files(tmp_path, rows=(3, 5, 4))
    for index in range(5):
        layer, top = hdf5_layer(source, 4, shuffle=True)
        layer.phase = caffe_pb2.TRAIN
        single = hdf5_run(layer, top, index)
        parts = []
        for rank in range(2):
            parallel.set_shard(rank, 2)
            rng.set_rank(rank)  # the order is drawn alike on every rank (rng.shared_stream)
            layer, top = hdf5_layer(source, 2, shuffle=True)
            layer.phase = caffe_pb2.TRAIN
            parts.append(hdf5_run(layer, top, index))
        parallel.set_shard(0, 1)
        rng.set_rank(0)
        for k in range(2):
            np.testing.assert_array_equal(interleave([p[k] for p in parts]), single[k])


def test_rank_keys_streams_but_not_shared_streams():
    rank0 = rng.stream("dropout", "x").random(3), rng.shared_stream("data", "x").random(3), rng.key32("d")
    rng.set_rank(1)
    rank1 = rng.stream("dropout", "x").random(3), rng.shared_stream("data", "x").random(3), rng.key32("d")
    assert not np.array_equal(rank0[0], rank1[0]) and rank0[2] != rank1[2]
    np.testing.assert_array_equal(rank0[1], rank1[1])
    rng.set_rank(0)
    np.testing.assert_array_equal(rng.stream("dropout", "x").random(3), rank0[0])


# -- GradientSync against a fake communicator -------------------------------------------------------

class TwoRankFake:
    """Rank 0 of 2: the other rank's buffers are `other(array)`; records every collective's size and
    dtype, in order."""

    rank, size = 0, 2

    def __init__(self, other):
        self.other, self.calls = other, []

    def start_allreduce(self, array):
        self.calls.append(("allreduce", array.size, array.dtype))
        return array

    def test(self, request) -> bool:
        return False

    def wait(self, request) -> None:
        request += self.other(request)

    def allreduce(self, array) -> None:
        self.wait(self.start_allreduce(array))

    def broadcast(self, array, root: int = 0) -> None:
        self.calls.append(("broadcast", array.size, array.dtype))

    def abort(self, message: str) -> None:
        raise parallel.ParallelError(message)


def tiny_solver(digits: Path, batch: int, **fields) -> minicaffe.Solver:
    param = solver_param(digits, digits, "fake", batch, **fields)
    return minicaffe.Solver(param)


def test_gradients_are_averaged_and_actions_agreed(digits):
    solver = tiny_solver(digits, 8, max_iter=1, test_interval=0)
    sizes = [p.blob.count for p in solver.net.learnable_params]
    other_stop = {"value": 0.0}

    def other(array):  # the other rank's gradient: 1 everywhere; its stop counter: other_stop
        values = np.ones_like(array)
        values[-2:] = [other_stop["value"], 0]
        return values

    comm = TwoRankFake(other)
    sync = parallel.GradientSync(solver, comm, lambda: "none")
    solver.net.clear_param_diffs()
    solver.net.forward_backward()
    mine = [np.array(p.blob.diff) for p in solver.net.learnable_params]
    sync.on_start()
    sync.on_gradients()
    for learnable, own in zip(solver.net.learnable_params, mine):
        np.testing.assert_allclose(learnable.blob.diff, (own + 1) / 2, rtol=1e-6)
    blobs = len(sizes) + len(solver.history)
    assert [c[0] for c in comm.calls] == ["broadcast"] * (blobs + 1) + ["allreduce"]
    assert comm.calls[-1][1:] == (sum(sizes) + 2, np.float32)
    assert sync.action() == "none"
    other_stop["value"] = 1.0  # the other rank got SIGTERM: this one stops after the same iteration
    sync.on_gradients()
    assert sync.action() == "stop" and sync.action() == "none"
    assert solver.root and sync.communicated_bytes == 4 * (2 * (sum(sizes) + 2) + sum(sizes) * 2) + 16


# -- 2-rank jobs under mpiexec ----------------------------------------------------------------------

def mpiexec() -> str:
    pytest.importorskip("mpi4py")
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec (pip install '.[mpi]')")
    return found


NET = """name: "tiny"
layer {{ name: "digits" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{data}/digits_train_lmdb" batch_size: {batch} }} }}
layer {{ name: "digits" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{data}/digits_test_lmdb" batch_size: 99 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 16 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


def solver_param(digits: Path, folder: Path, name: str, batch: int, **fields) -> caffe_pb2.SolverParameter:
    param = caffe_pb2.SolverParameter(
        test_iter=[1], test_interval=10, base_lr=0.1, momentum=0.9, weight_decay=0.0005, lr_policy="fixed",
        display=5, max_iter=20, snapshot=10, snapshot_prefix=str(folder / name), random_seed=1701)
    io.parse_text(NET.format(data=digits, batch=batch), param.net_param, "<net>")
    for key, value in fields.items():
        setattr(param, key, value)
    if not param.test_interval:
        param.ClearField("test_iter")
    return param


def write_solver(digits: Path, folder: Path, name: str, batch: int, **fields) -> Path:
    path = folder / f"{name}.prototxt"
    io.write_text(path, solver_param(digits, folder, name, batch, **fields))
    return path


def train_command(solver: Path, ranks: int, *extra: str, timeout: str = "60") -> list[str]:
    launcher = [mpiexec(), "-n", str(ranks)] if ranks > 1 else []
    return [*launcher, sys.executable, "-m", "minicaffe.cli", "--threads", "1", "train",
            "--solver", str(solver), "--sync-timeout", timeout, *extra]


def environment() -> dict:
    paths = [str(REPO), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def train(solver: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(solver, ranks, *extra), capture_output=True, text=True, timeout=120,
                            env=environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(path: Path) -> dict:
    net = io.read_binary(path, caffe_pb2.NetParameter())
    return {(layer.name, i): np.array(blob.data) for layer in net.layer for i, blob in enumerate(layer.blobs)}


def assert_close(a: dict, b: dict, rtol: float = 1e-6) -> None:
    """Each blob equal within rtol relative to the blob's norm (float32 sums in another order)."""
    assert a.keys() == b.keys() and a
    for key in a:
        assert np.linalg.norm(a[key] - b[key]) <= rtol * np.linalg.norm(a[key]), key


def test_two_ranks_train_as_one_process_with_double_batch_and_resume(digits, tmp_path):
    mpiexec()
    single = write_solver(digits, tmp_path, "single", 16)
    ranks = write_solver(digits, tmp_path, "ranks", 8)
    train(single, 1)
    result = train(ranks, 2)
    # Rank 0 alone logs, tests and snapshots: one "Solving" line, one set of snapshot files.
    assert result.stderr.count("] Solving tiny") == 1
    assert result.stderr.count("Testing net (#0)") == 3
    for iteration in (10, 20):
        assert_close(weights(tmp_path / f"single_iter_{iteration}.caffemodel"),
                     weights(tmp_path / f"ranks_iter_{iteration}.caffemodel"))
    # Resume the 2-rank run from its iteration-10 snapshot: the same weights at 20 as straight through.
    resumed = write_solver(digits, tmp_path, "resumed", 8)
    result = train(resumed, 2, "--snapshot", str(tmp_path / "ranks_iter_10.solverstate"))
    assert "Resuming from" in result.stderr
    assert (tmp_path / "resumed_iter_20.caffemodel").read_bytes() == \
        (tmp_path / "ranks_iter_20.caffemodel").read_bytes()


def visible_gpus() -> int:
    """GPUs nvidia-smi lists (0 without it); the 2-GPU test needs real CuPy (MINICAFFE_REAL_CUPY=1)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listing.splitlines())


@pytest.mark.skipif(os.environ.get("MINICAFFE_REAL_CUPY") != "1" or visible_gpus() < 2,
                    reason="needs two GPUs and MINICAFFE_REAL_CUPY=1 (benchmarks/gpu_check.sh runs it)")
def test_two_gpus_train_as_one_gpu_with_double_batch(digits, tmp_path):
    """`train --gpu 0,1` (one process per GPU, NCCL) against `--gpu 0` with double the batch: the same
    weights within float rounding (cuBLAS and the allreduce add in other orders than the CPU)."""
    commands = {"two": ("0,1", 8), "one": ("0", 16)}
    for name, (gpus, batch) in commands.items():
        solver = write_solver(digits, tmp_path, name, batch, test_interval=0)
        command = [sys.executable, "-m", "minicaffe.cli", "train", "--solver", str(solver), "--gpu", gpus]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment())
        assert result.returncode == 0, result.stderr[-3000:]
    for iteration in (10, 20):
        assert_close(weights(tmp_path / f"one_iter_{iteration}.caffemodel"),
                     weights(tmp_path / f"two_iter_{iteration}.caffemodel"), rtol=1e-5)


def rank_pid(solver: Path, rank: int, deadline: float = 30.0) -> int:
    """The process id of `rank` of the job training `solver` (its PMI_RANK, MPICH's hydra)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"minicaffe.cli" in command and str(solver).encode() in command \
                    and f"PMI_RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.1)
    pytest.fail(f"no rank {rank} process for {solver}")


def start_long_job(digits: Path, folder: Path, name: str, timeout: str):
    solver = write_solver(digits, folder, name, 8, max_iter=1000000, snapshot=0, display=20, test_interval=0)
    # stdout too: mpiexec reports there a rank that died.
    process = subprocess.Popen(train_command(solver, 2, timeout=timeout), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=environment())
    lines = []
    for line in process.stdout:  # rank 0's log: wait until training runs
        lines.append(line)
        if "Iteration 40 (" in line:
            break
    return solver, process, lines


def finish(process, lines: list[str], seconds: float) -> tuple[float, str]:
    start = time.monotonic()
    try:
        rest, _ = process.communicate(timeout=seconds)
    finally:
        if process.poll() is None:
            process.kill()
    return time.monotonic() - start, "".join(lines) + rest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_sigterm_on_one_rank_stops_every_rank_after_a_snapshot(digits, tmp_path):
    mpiexec()
    solver, process, lines = start_long_job(digits, tmp_path, "term", "60")
    os.kill(rank_pid(solver, 1), signal.SIGTERM)
    elapsed, text = finish(process, lines, 60)
    assert process.returncode == 0, text[-3000:]
    assert "Optimization stopped early." in text
    snapshots = list(tmp_path.glob("term_iter_*.solverstate"))
    assert len(snapshots) == 1, text[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_hung_rank_ends_the_job_with_an_error(digits, tmp_path, how):
    mpiexec()
    solver, process, lines = start_long_job(digits, tmp_path, "dead", "3")
    victim = rank_pid(solver, 1)
    os.kill(victim, how)
    try:
        elapsed, text = finish(process, lines, 30)
    finally:
        if how == signal.SIGSTOP:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert process.returncode != 0, text[-3000:]
    assert elapsed < 20
    if how == signal.SIGSTOP:  # alive but silent: rank 0's deadline ends the job, naming the cause
        assert "minicaffe train: error: rank 0 of 2: no allreduce from the other ranks within 3 s" in text
    else:  # mpiexec sees the death and ends the job
        assert "BAD TERMINATION" in text or "error: rank 0 of 2" in text, text[-3000:]


# -- NCCL, through a fake communicator on the fake CuPy --------------------------------------------


class FakeNccl:
    """cupy.cuda.nccl's names that NCCLCommunicator uses. Communicators made with the same unique id form
    one world, whose ranks run in threads; every call is recorded per rank as (what, count, dtype, op or
    root), and allReduce really sums the buffers behind the raw pointers."""

    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    DTYPES = {7: np.float32, 8: np.float64}

    def __init__(self, size: int):
        import threading

        self.barrier = threading.Barrier(size)
        self.buffers: dict[int, np.ndarray] = {}
        self.calls: dict[int, list] = {rank: [] for rank in range(size)}
        self.aborted = False
        fake = self

        class NcclCommunicator:
            def __init__(self, size, unique_id, rank):
                assert unique_id == (1, 2, 3) and size == len(fake.calls)
                self.rank = rank

            def _view(self, ptr, count, datatype):
                import ctypes
                dtype = np.dtype(fake.DTYPES[datatype])
                return np.frombuffer((ctypes.c_char * (count * dtype.itemsize)).from_address(ptr), dtype)

            def allReduce(self, send, recv, count, datatype, op, stream):  # noqa: N802 (NCCL's name)
                assert send == recv and op == fake.NCCL_SUM and stream == 0
                fake.calls[self.rank].append(("allReduce", count, fake.DTYPES[datatype]))
                fake.buffers[self.rank] = self._view(send, count, datatype)
                fake.barrier.wait()
                total = sum(fake.buffers[r].copy() for r in sorted(fake.buffers))
                fake.barrier.wait()
                fake.buffers[self.rank][...] = total
                fake.barrier.wait()

            def bcast(self, buffer, count, datatype, root, stream):
                fake.calls[self.rank].append(("bcast", count, fake.DTYPES[datatype]))
                fake.buffers[self.rank] = self._view(buffer, count, datatype)
                fake.barrier.wait()
                source = fake.buffers[root].copy()
                fake.barrier.wait()
                fake.buffers[self.rank][...] = source
                fake.barrier.wait()

            def abort(self):
                fake.aborted = True

        self.NcclCommunicator = NcclCommunicator


def in_threads(size: int, work) -> list:
    """work(rank) in `size` threads; their results by rank (an error in any is raised)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(work, range(size)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nccl_communicator_sums_and_broadcasts_device_buffers(fake_cupy, dtype):  # noqa: F811
    nccl = FakeNccl(3)
    comms = [parallel.NCCLCommunicator(3, (1, 2, 3), rank, nccl=nccl) for rank in range(3)]

    def work(rank):
        values = fake_cupy.asarray(np.arange(5, dtype=dtype) * (rank + 1))
        comms[rank].allreduce(values)
        shared = fake_cupy.asarray(np.full(2, rank, dtype=dtype))
        comms[rank].broadcast(shared, root=2)
        return fake_cupy.asnumpy(values), fake_cupy.asnumpy(shared)

    for summed, shared in in_threads(3, work):
        np.testing.assert_array_equal(summed, np.arange(5) * 6)
        np.testing.assert_array_equal(shared, [2, 2])
    assert all(calls == [("allReduce", 5, dtype), ("bcast", 2, dtype)] for calls in nccl.calls.values())


def test_gradient_sync_over_nccl_averages_on_the_device(fake_cupy, digits):  # noqa: F811
    """Rank 0 trains a real solver on the (fake) GPU; rank 1 is a thread sending a gradient of ones."""
    minicaffe.set_mode_gpu()
    nccl = FakeNccl(2)
    solver = tiny_solver(digits, 8, max_iter=1, test_interval=0)
    sizes = [p.blob.count for p in solver.net.learnable_params]
    comm = parallel.NCCLCommunicator(2, (1, 2, 3), 0, nccl=nccl)
    sync = parallel.GradientSync(solver, comm, lambda: "none")
    solver.net.clear_param_diffs()
    solver.net.forward_backward()
    own = [fake_cupy.asnumpy(p.blob.get_diff()).copy() for p in solver.net.learnable_params]
    peer = parallel.NCCLCommunicator(2, (1, 2, 3), 1, nccl=nccl)

    # The peer's side of the exchange, in the order rank 0 makes it: weights, history, iteration,
    # then one allreduce of every gradient plus the two action counters.
    def peer_work(rank):
        if rank == 0:
            sync.on_start()
            sync.on_gradients()
            return
        for size in sizes + [blob.count for blob in solver.history]:
            peer.broadcast(fake_cupy.zeros(size, dtype=np.float32))
        peer.broadcast(fake_cupy.zeros(2, dtype=np.float64))
        flat = np.ones(sum(sizes) + 2, dtype=np.float32)
        flat[-2:] = 0
        peer.allreduce(fake_cupy.asarray(flat))

    in_threads(2, peer_work)
    for learnable, mine in zip(solver.net.learnable_params, own):
        np.testing.assert_allclose(fake_cupy.asnumpy(learnable.blob.get_diff()), (mine + 1) / 2, rtol=1e-6)
    expected = [("bcast", size, np.float32) for size in sizes + [b.count for b in solver.history]]
    expected += [("bcast", 2, np.float64), ("allReduce", sum(sizes) + 2, np.float32)]
    assert nccl.calls[0] == expected == nccl.calls[1]
    assert sync.action() == "none"


def test_gpu_rank_arguments_carry_the_flags():
    from minicaffe import cli
    from minicaffe.commands import train

    args = cli.build_parser().parse_args(["train", "--solver", "s.prototxt", "--gpu", "0,1", "--weights", "w",
                                          "--stage", "a,b", "--allow-nan", "--sync-timeout", "30"])
    arguments = train.gpu_rank_arguments(args)
    assert arguments[:3] == ["train", "--solver", "s.prototxt"] and "--gpu" not in arguments
    for pair in (["--weights", "w"], ["--stage", "a,b"], ["--sync-timeout", "30.0"]):
        assert any(arguments[i:i + 2] == pair for i in range(len(arguments)))
    assert "--allow-nan" in arguments and "--snapshot" not in arguments
    again = cli.build_parser().parse_args([*arguments, "--gpu", "1"])
    assert (again.weights, again.stage, again.allow_nan, again.gpu) == ("w", "a,b", True, "1")


def test_pycaffe_mpi_solver_steps_on_every_rank(digits, tmp_path):
    solver = write_solver(digits, tmp_path, "py", 8, snapshot=0)
    script = ("import sys; from minicaffe import parallel; s = parallel.mpi_solver(sys.argv[1]); s.step(3); "
              "print(f'rank root={s.root} iter={s.iter} tests={len(s.test_nets)}')")
    result = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", script, str(solver)],
                            capture_output=True, text=True, timeout=120,
                            env={**environment(), "MINICAFFE_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # mpiexec forwards each rank's output in its own chunks: find the two lines wherever they are.
    lines = re.findall(r"rank root=\w+ iter=\d+ tests=\d+", result.stdout)
    assert sorted(lines) == ["rank root=False iter=3 tests=0", "rank root=True iter=3 tests=1"], result.stdout
