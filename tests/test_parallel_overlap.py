"""Gradient buckets whose allreduce starts while backward still runs (minicaffe.parallel.GradientExchange):
bucket order and sizes, the interleaving with the layers' backward, iter_size and shared parameters,
--no-overlap, the fake NCCL path, and 2-rank jobs under mpiexec (skipped without mpi4py and mpiexec)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_gpu_paths import fake_cupy  # noqa: F401  (the fixture)
from test_parallel import FakeNccl, digits, in_threads, mpiexec, train, weights, write_solver  # noqa: F401

import minicaffe
from minicaffe import io, parallel, rng
from minicaffe.proto import caffe_pb2


@pytest.fixture(autouse=True)
def _single_process():
    yield
    parallel.set_shard(0, 1)
    rng.set_rank(0)


# ip2 uses ip1's parameters (shared by name): their gradient is final only after ip1's backward, which
# runs after ip2's.
NET = """name: "shared"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 6 dim: 12 } shape { dim: 6 }
                     data_filler { type: "gaussian" } data_filler { type: "constant" value: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 12 weight_filler { type: "xavier" } bias_filler { type: "gaussian" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 12 } }
layer { name: "relu2" type: "ReLU" bottom: "ip2" top: "ip2" }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } bias_filler { type: "gaussian" } } }
layer { name: "ip4" type: "InnerProduct" bottom: "ip3" top: "ip4"
  inner_product_param { num_output: 10 bias_term: false weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip4" bottom: "label" top: "loss" }
"""
LAYERS = ["data", "ip1", "relu1", "ip2", "relu2", "ip3", "ip4", "loss"]


def shared_solver(**fields) -> minicaffe.Solver:
    param = caffe_pb2.SolverParameter(base_lr=0.1, momentum=0.9, weight_decay=0.001, lr_policy="fixed",
                                      max_iter=100, random_seed=7, display=0, snapshot=0)
    io.parse_text(NET, param.net_param, "<net>")
    for key, value in fields.items():
        setattr(param, key, value)
    return minicaffe.Solver(param)


class RecordingFake:
    """Rank 0 of 2: the other rank sends -0.5 everywhere (so its action counters ask for nothing);
    `events` gets ("start", size) at every allreduce start, shared with a backward recorder."""

    rank, size = 0, 2

    def __init__(self, events: list):
        self.events = events

    def start_allreduce(self, array):
        self.events.append(("start", array.size))
        return array

    def test(self, request) -> bool:
        return False

    def wait(self, request) -> None:
        request += -0.5

    def allreduce(self, array) -> None:
        self.wait(self.start_allreduce(array))

    def broadcast(self, array, root: int = 0) -> None:
        pass

    def abort(self, message: str) -> None:
        raise parallel.ParallelError(message)


def record_backward(net, events: list) -> None:
    """Log ("backward", layer name) after each layer's backward step; registered before GradientSync's
    hook, so a start logged after it happened after that layer's backward."""
    net.on_layer_backward.append(lambda i: events.append(("backward", net.layers[i].name)))


def test_buckets_take_the_parameters_in_reverse_order_up_to_the_size_limit():
    net = shared_solver().net
    learnables = net.learnable_params
    assert [(p.layer_name, p.index) for p in learnables] == [("ip1", 0), ("ip1", 1), ("ip3", 0), ("ip3", 1),
                                                             ("ip4", 0)]
    counts = [p.blob.count for p in learnables]  # 144, 12, 120, 10, 100
    limit = 4 * 135  # bytes: ip4.w (400) + ip3.b (40) fit, + ip3.w (480) not; ip3.w + ip1.b (48) fit
    buckets = parallel.plan_buckets(net, limit, 4, extra=2)
    assert [[blob.count for blob in b.blobs] for b in buckets] == [[100, 10], [120, 12], [144]]
    assert [b.blobs for b in buckets] != [] and \
        [blob for b in buckets for blob in b.blobs] == [p.blob for p in reversed(learnables)]
    # ready once backward has run the first layer that has each parameter: ip3, ip1 (for ip1 and ip2), ip1
    assert [LAYERS[b.ready_at] for b in buckets] == ["ip3", "ip1", "ip1"]
    assert [b.extra for b in buckets] == [0, 0, 2] and buckets[-1].size == 146
    single = parallel.plan_buckets(net, math.inf, 4)
    assert len(single) == 1 and single[0].size == sum(counts) and single[0].ready_at == 1


def run(overlap: bool, iter_size: int = 1, steps: int = 3, bucket_mb: float = 540e-6):
    solver = shared_solver(iter_size=iter_size)
    events: list = []
    record_backward(solver.net, events)
    sync = parallel.GradientSync(solver, RecordingFake(events), lambda: "none", overlap, bucket_mb)
    solver.add_callback(lambda: events.append(("iteration",)))  # after GradientSync's on_start
    solver.step(steps)
    return solver, events, sync


def iterations(events: list) -> list[list]:
    parts: list[list] = []
    for event in events:
        if event == ("iteration",):
            parts.append([])
        elif parts:
            parts[-1].append(event)
    return parts


def test_allreduces_start_during_backward_as_their_buckets_become_final():
    _, events, sync = run(overlap=True)
    assert sync.action() == "none"
    for part in iterations(events):
        assert part == [("backward", "loss"), ("backward", "ip4"), ("backward", "ip3"), ("start", 110),
                        ("backward", "relu2"), ("backward", "ip2"), ("backward", "relu1"),
                        ("backward", "ip1"), ("start", 132), ("start", 146), ("backward", "data")]


def test_overlap_and_one_flat_buffer_give_the_same_weights_bit_for_bit():
    overlapped, events, _ = run(overlap=True, iter_size=2)
    flat, flat_events, _ = run(overlap=False, iter_size=2)
    for a, b in zip(overlapped.net.learnable_params, flat.net.learnable_params):
        np.testing.assert_array_equal(a.blob.data, b.blob.data)
    assert flat.net.on_layer_backward == flat.net.on_layer_backward[:1]  # only the recorder: no hook
    # Without overlap: one allreduce of everything (and the counters) after both passes' backward.
    for part in iterations(flat_events):
        assert part[-1] == ("start", 144 + 12 + 120 + 10 + 100 + 2)
        assert [e for e in part if e[0] == "start"] == [part[-1]]
    # With iter_size 2, the buckets start only in the second pass: the first pass's gradients are not final.
    for part in iterations(events):
        second_pass = [i for i, e in enumerate(part) if e == ("backward", "loss")][1]
        starts = [i for i, e in enumerate(part) if e[0] == "start"]
        assert len(starts) == 3 and min(starts) > second_pass
        assert part[-1] == ("backward", "data")  # all started before backward ended


def test_the_average_over_the_ranks_reaches_every_bucket():
    """One iteration by hand: each gradient is (own - 0.5) / 2, whatever bucket carries it."""
    solver = shared_solver()
    sync = parallel.GradientSync(solver, RecordingFake([]), lambda: "none", bucket_mb=540e-6)
    sync.on_start()
    solver.net.clear_param_diffs()
    solver.net.forward_backward()
    own = [np.array(p.blob.diff) for p in solver.net.learnable_params]
    assert all(b.request is not None for b in sync.exchange.buckets)  # all started during backward
    sync.on_gradients()
    for learnable, mine in zip(solver.net.learnable_params, own):
        np.testing.assert_array_equal(learnable.blob.diff, (mine - np.float32(0.5)) * np.float32(0.5))
    assert sync.communicated_bytes == 4 * (110 + 132 + 146 + 2 * 386) + 16


def test_backward_outside_an_iteration_starts_nothing():
    """pycaffe code may run net.backward() between steps: GradientSync only acts between on_start and
    on_gradients."""
    solver = shared_solver()
    events: list = []
    parallel.GradientSync(solver, RecordingFake(events), bucket_mb=540e-6)
    solver.net.forward_backward()
    assert not events


def test_train_arguments_carry_overlap_and_bucket_size():
    from minicaffe import cli
    from minicaffe.commands import train

    args = cli.build_parser().parse_args(["train", "--solver", "s", "--no-overlap", "--bucket-mb", "4"])
    assert (args.overlap, args.bucket_mb) == (False, 4.0)
    again = cli.build_parser().parse_args([*train.gpu_rank_arguments(args), "--gpu", "1"])
    assert (again.overlap, again.bucket_mb) == (False, 4.0)
    default = cli.build_parser().parse_args(["train", "--solver", "s"])
    assert (default.overlap, default.bucket_mb) == (True, parallel.DEFAULT_BUCKET_MB)


def test_nccl_buckets_go_in_reverse_order_on_the_device(fake_cupy):  # noqa: F811
    """Rank 0 trains on the (fake) GPU with 3 buckets; rank 1, a thread, sends ones in the same buckets."""
    minicaffe.set_mode_gpu()
    nccl = FakeNccl(2)
    solver = shared_solver()
    comm = parallel.NCCLCommunicator(2, (1, 2, 3), 0, nccl=nccl)
    sync = parallel.GradientSync(solver, comm, lambda: "none", bucket_mb=540e-6)
    sizes = [b.size for b in sync.exchange.buckets]
    assert sizes == [110, 132, 146]
    peer = parallel.NCCLCommunicator(2, (1, 2, 3), 1, nccl=nccl)
    own: list = []

    def work(rank):
        if rank == 0:
            sync.on_start()
            solver.net.clear_param_diffs()
            for learnable in solver.net.learnable_params:  # the gradients as backward leaves them
                learnable.blob.mutable_diff()[...] = float(learnable.index + 1)
            own.extend(fake_cupy.asnumpy(p.blob.get_diff()).copy() for p in solver.net.learnable_params)
            sync.on_gradients()
            return
        for blob in [*sync.blobs, *solver.history]:
            peer.broadcast(fake_cupy.zeros(blob.count, dtype=np.float32))
        peer.broadcast(fake_cupy.zeros(2, dtype=np.float64))
        for size in sizes:
            flat = np.ones(size, dtype=np.float32)
            flat[size - 2 if size == sizes[-1] else size:] = 0  # the action counters: nothing asked
            peer.allreduce(fake_cupy.asarray(flat))

    in_threads(2, work)
    for learnable, mine in zip(solver.net.learnable_params, own):
        np.testing.assert_array_equal(fake_cupy.asnumpy(learnable.blob.get_diff()), (mine + 1) / 2)
    assert [c for c in nccl.calls[0] if c[0] == "allReduce"] == [("allReduce", n, np.float32) for n in sizes]
    assert nccl.calls[0] == nccl.calls[1]
    assert sync.action() == "none"


def test_two_ranks_overlapped_and_not_give_the_same_weights(digits, tmp_path):  # noqa: F811
    """Under mpiexec, iter_size 2, buckets of at most 1000 bytes (2 buckets for the tiny net) against
    --no-overlap: the same .caffemodel bytes."""
    mpiexec()
    for name, extra in (("overlap", ["--bucket-mb", "0.001"]), ("flat", ["--no-overlap"])):
        solver = write_solver(digits, tmp_path, name, 4, iter_size=2, max_iter=6, snapshot=0,
                              test_interval=0)
        train(solver, 2, *extra)
    assert weights(tmp_path / "overlap_iter_6.caffemodel")  # something was written
    assert (tmp_path / "overlap_iter_6.caffemodel").read_bytes() == \
        (tmp_path / "flat_iter_6.caffemodel").read_bytes()
