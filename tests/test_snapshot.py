"""Snapshots: .caffemodel / .solverstate files in Caffe's layout, and resuming bit for bit on the CPU.

The resume tests train a net with a Data layer (LMDB of the digits) and Dropout: N iterations straight,
against N/2, snapshot, a new Solver restored from the .solverstate, and N/2 more. All parameters (and
the solver history) must be equal bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import minicaffe
from minicaffe import io
from minicaffe.datasets import digits_lmdb
from minicaffe.proto import caffe_pb2
from minicaffe.solver import Solver, SolverError

IP = """layer {{{{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}"
  param {{{{ lr_mult: 1 }}}} param {{{{ lr_mult: 2 }}}}
  inner_product_param {{{{ num_output: {n} weight_filler {{{{ type: "xavier" }}}}
                        bias_filler {{{{ type: "constant" }}}} }}}} }}}}
"""
NET = """
name: "ResumeNet"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{train}" batch_size: 16 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{test}" batch_size: 33 backend: LMDB }} }}
""" + IP.format(name="ip1", bottom="data", n=24) + """
layer {{ name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param {{ dropout_ratio: 0.3 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
""" + IP.format(name="ip2", bottom="ip1", n=10) + """
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""

RULES = {
    "SGD": 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "multistep" gamma: 0.5 '
           'stepvalue: 2 stepvalue: 3 stepvalue: 4',
    "Nesterov": 'type: "Nesterov" base_lr: 0.05 momentum: 0.9 lr_policy: "inv" gamma: 0.01 power: 0.75',
    "AdaGrad": 'type: "AdaGrad" base_lr: 0.05 lr_policy: "step" gamma: 0.5 stepsize: 4',
    "RMSProp": 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.9 lr_policy: "fixed"',
    "AdaDelta": 'type: "AdaDelta" base_lr: 1 momentum: 0.95 delta: 1e-6 lr_policy: "fixed"',
    "Adam": 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 lr_policy: "fixed"',
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return digits_lmdb(tmp_path_factory.mktemp("digits"))


pytestmark = pytest.mark.usefixtures("log_text")  # log lines captured (conftest)


def solver_param(digits, tmp_path, rule="SGD", extra="") -> caffe_pb2.SolverParameter:
    text = (f'{RULES[rule]} weight_decay: 0.001 max_iter: 10 random_seed: 5 test_iter: 1 test_interval: 5 '
            f'snapshot_prefix: "{tmp_path}/resume" snapshot_after_train: false {extra}')
    param = io.parse_text(text, caffe_pb2.SolverParameter())
    net = NET.format(train=digits[0], test=digits[1])
    param.net_param.CopyFrom(io.parse_text(net, caffe_pb2.NetParameter()))
    return param


def all_params(solver: Solver) -> list[np.ndarray]:
    return [np.array(p.blob.data) for p in solver.net.learnable_params]


@pytest.mark.parametrize("rule", list(RULES))
def test_resume_is_bitwise_identical(rule, digits, tmp_path):
    straight = Solver(solver_param(digits, tmp_path, rule))
    straight.solve()
    assert straight.iter == 10

    first = Solver(solver_param(digits, tmp_path, rule))
    first.step(5)
    model, state = first.snapshot()
    assert Path(model).name == "resume_iter_5.caffemodel" and Path(state).name == "resume_iter_5.solverstate"
    del first
    minicaffe.set_random_seed(999)  # a fresh process would start from another global state
    resumed = Solver(solver_param(digits, tmp_path, rule))
    resumed.solve(state)
    assert resumed.iter == 10
    assert resumed.current_step == straight.current_step
    for a, b in zip(all_params(straight), all_params(resumed)):
        assert np.array_equal(a, b)
    for a, b in zip(straight.history, resumed.history):
        assert np.array_equal(a.data, b.data)
    # ... and the run really is stochastic: without the snapshot's history it would differ.
    fresh = Solver(solver_param(digits, tmp_path, rule))
    fresh.net.copy_from(model)
    fresh.iter = 5
    fresh.step(5)
    assert not all(np.array_equal(a, b) for a, b in zip(all_params(straight), all_params(fresh)))


def test_resume_with_iter_size_and_periodic_snapshots(digits, tmp_path):
    extra = "iter_size: 2 snapshot: 4"
    straight = Solver(solver_param(digits, tmp_path / "a", extra=extra))
    straight.solve()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "resume_iter_4.caffemodel", "resume_iter_4.solverstate",
        "resume_iter_8.caffemodel", "resume_iter_8.solverstate"]
    resumed = Solver(solver_param(digits, tmp_path / "b", extra=extra))
    resumed.solve(str(tmp_path / "a" / "resume_iter_4.solverstate"))
    for a, b in zip(all_params(straight), all_params(resumed)):
        assert np.array_equal(a, b)
    # The resumed run's own snapshot at 8 equals the straight one's, byte for byte.
    assert (tmp_path / "b" / "resume_iter_8.caffemodel").read_bytes() == \
        (tmp_path / "a" / "resume_iter_8.caffemodel").read_bytes()


def test_dropout_and_data_are_stochastic_over_iterations(digits, tmp_path):
    solver = Solver(solver_param(digits, tmp_path))
    solver.net.forward_count = 0
    solver.net.forward_range(0, len(solver.net.layers) - 1)
    first = np.array(solver.net.blobs["ip1"].data), np.array(solver.net.blobs["label"].data)
    solver.net.forward_count = 1
    solver.net.forward_range(0, len(solver.net.layers) - 1)
    second = np.array(solver.net.blobs["ip1"].data), np.array(solver.net.blobs["label"].data)
    assert not np.array_equal(first[1], second[1])  # another batch
    solver.net.forward_count = 0
    solver.net.forward_range(0, len(solver.net.layers) - 1)
    assert np.array_equal(first[0], solver.net.blobs["ip1"].data)  # replayed: same batch and same mask
    assert (first[0] == 0).mean() > 0.2  # dropout (and ReLU) zeroes


@pytest.mark.parametrize("rule, per_param", [("SGD", 1), ("Adam", 2), ("AdaDelta", 2), ("Nesterov", 1)])
def test_solverstate_layout(rule, per_param, digits, tmp_path):
    solver = Solver(solver_param(digits, tmp_path, rule))
    solver.step(3)
    model, state_file = solver.snapshot()
    state = io.read_binary(state_file, caffe_pb2.SolverState())
    assert state.iter == 3
    assert state.learned_net == model
    assert state.current_step == solver.current_step
    params = solver.net.learnable_params
    assert len(state.history) == per_param * len(params)
    for i, proto in enumerate(state.history):
        blob = params[i % len(params)].blob
        assert tuple(proto.shape.dim) == blob.shape
        assert np.array_equal(np.asarray(proto.data, np.float32).reshape(blob.shape), solver.history[i].data)
    # The .caffemodel is a binary NetParameter with the trained blobs, no diffs, no auto Split layers.
    net = io.read_binary(model, caffe_pb2.NetParameter())
    names = [layer.name for layer in net.layer if layer.blobs]
    assert names == ["ip1", "ip2"]
    assert all(len(b.diff) == 0 for layer in net.layer for b in layer.blobs)


def test_snapshot_diff_writes_gradients(digits, tmp_path):
    solver = Solver(solver_param(digits, tmp_path, extra="snapshot_diff: true"))
    solver.step(1)
    model, _ = solver.snapshot()
    net = io.read_binary(model, caffe_pb2.NetParameter())
    assert all(len(b.diff) == len(b.data) > 0 for layer in net.layer for b in layer.blobs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_caffemodel_loads_back_identically(dtype, digits, tmp_path):
    solver = Solver(solver_param(digits, tmp_path), dtype=dtype)
    solver.step(3)
    model, _ = solver.snapshot()
    net = minicaffe.Net(solver.param.net_param, model, minicaffe.TEST, dtype=dtype)
    for name, blobs in solver.net.params.items():
        for mine, loaded in zip(blobs, net.params[name]):
            assert loaded.dtype == np.dtype(dtype)
            assert np.array_equal(mine.data, loaded.data)
    # And a fresh solver restored from the state has the same weights and history.
    other = Solver(solver_param(digits, tmp_path), dtype=dtype)
    other.restore(model.replace(".caffemodel", ".solverstate"))
    assert other.iter == 3
    for a, b in zip(all_params(solver), all_params(other)):
        assert np.array_equal(a, b)


def test_restore_finds_a_moved_snapshot(digits, tmp_path):
    solver = Solver(solver_param(digits, tmp_path / "run"))
    solver.step(2)
    model, state = solver.snapshot()
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    other = Solver(solver_param(digits, tmp_path / "elsewhere"))
    other.restore(moved / Path(state).name)
    for a, b in zip(all_params(solver), all_params(other)):
        assert np.array_equal(a, b)


def test_restore_errors(digits, tmp_path):
    sgd = Solver(solver_param(digits, tmp_path))
    sgd.step(1)
    _, state = sgd.snapshot()
    adam = Solver(solver_param(digits, tmp_path, "Adam"))
    with pytest.raises(SolverError, match="has 4 history blobs, the Adam solver of this net needs 8"):
        adam.restore(state)
    with pytest.raises(io.FormatError, match="x.solverstate.h5: cannot read"):
        sgd.restore(tmp_path / "x.solverstate.h5")
    with pytest.raises(io.FormatError, match="cannot read"):
        sgd.restore(tmp_path / "missing.solverstate")
    (tmp_path / "junk.solverstate").write_bytes(b"\xff\xff\xff junk")
    with pytest.raises(io.FormatError, match="not a binary SolverState"):
        sgd.restore(tmp_path / "junk.solverstate")


def test_a_failed_snapshot_keeps_the_previous_files(digits, tmp_path, monkeypatch):
    solver = Solver(solver_param(digits, tmp_path))
    solver.step(2)
    model, state = solver.snapshot()
    before = Path(model).read_bytes(), Path(state).read_bytes()
    solver.net.params["ip1"][0].data[...] += 1  # the next snapshot would differ

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        solver.snapshot()
    monkeypatch.undo()
    assert (Path(model).read_bytes(), Path(state).read_bytes()) == before
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["resume_iter_2.caffemodel", "resume_iter_2.solverstate"]
