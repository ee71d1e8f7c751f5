"""snapshot_format: HDF5 -- Caffe's .caffemodel.h5 / .solverstate.h5 layout, written and read both ways.

The "Caffe-written" files here are built with h5py directly, in the layout of Caffe's Net::ToHDF5 and
SGDSolver::SnapshotSolverStateToHDF5 (1-element int datasets, a fixed-length string learned_net, one
group per layer, datasets named by blob index), independently of minicaffe's writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error
from test_snapshot import all_params, digits, solver_param  # noqa: F401 (digits: a fixture)

import minicaffe
from minicaffe import io
from minicaffe.cli import main
from minicaffe.net import Net, NetError
from minicaffe.proto import caffe_pb2
from minicaffe.solver import Solver

h5py = pytest.importorskip("h5py")

pytestmark = pytest.mark.usefixtures("log_text")

HDF5 = "snapshot_format: HDF5"


@pytest.mark.parametrize("rule", ["SGD", "Adam"])
def test_resume_from_hdf5_is_bitwise_identical(rule, digits, tmp_path):  # noqa: F811
    straight = Solver(solver_param(digits, tmp_path / "a", rule, HDF5))
    straight.solve()
    first = Solver(solver_param(digits, tmp_path / "b", rule, HDF5))
    first.step(5)
    model, state = first.snapshot()
    assert Path(model).name == "resume_iter_5.caffemodel.h5"
    assert Path(state).name == "resume_iter_5.solverstate.h5"
    minicaffe.set_random_seed(999)
    resumed = Solver(solver_param(digits, tmp_path / "c", rule, HDF5))
    resumed.solve(state)
    assert resumed.iter == 10 and resumed.current_step == straight.current_step
    for a, b in zip(all_params(straight), all_params(resumed)):
        assert np.array_equal(a, b)
    for a, b in zip(straight.history, resumed.history):
        assert np.array_equal(a.data, b.data)


def test_files_have_caffes_layout(digits, tmp_path):  # noqa: F811
    solver = Solver(solver_param(digits, tmp_path, "SGD", HDF5 + " snapshot_diff: true"))
    solver.step(2)
    model, state = solver.snapshot()
    with h5py.File(model, "r") as f:
        assert sorted(f) == ["data", "diff"]
        # every layer of the net has a group; the InnerProducts have their weights and biases
        assert {"data", "ip1", "drop1", "relu1", "ip2", "loss"} <= set(f["data"])
        assert sorted(f["data/ip1"]) == ["0", "1"] and len(f["data/relu1"]) == 0
        assert f["data/ip1/0"].shape == (24, 64) and f["data/ip1/0"].dtype == np.float32
        assert f["data/ip2/1"].shape == (10,)
        assert np.array_equal(f["data/ip2/0"][()], solver.net.params["ip2"][0].data)
        assert np.array_equal(f["diff/ip2/0"][()], solver.net.params["ip2"][0].diff)
    with h5py.File(state, "r") as f:
        assert f["iter"].shape == (1,) and int(f["iter"][0]) == 2
        assert f["current_step"].shape == (1,)
        assert f["learned_net"][()].decode() == model
        assert sorted(f["history"]) == ["0", "1", "2", "3"]
        assert np.array_equal(f["history/0"][()], solver.history[0].data)


NET = """name: "tiny" input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 } }
layer { name: "c" type: "PReLU" bottom: "b" top: "c" }
"""


def tiny_net(tmp_path) -> Net:
    path = tmp_path / "tiny.prototxt"
    path.write_text(NET)
    return Net(str(path), minicaffe.TEST)


def write_caffe_style(path, arrays: dict[str, list[np.ndarray]]) -> None:
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for layer, blobs in arrays.items():
            group = data.create_group(layer)
            for j, blob in enumerate(blobs):
                group.create_dataset(str(j), data=np.asarray(blob, dtype=np.float32))


def test_caffe_written_weights_load(tmp_path):
    net = tiny_net(tmp_path)
    weight = np.arange(9, dtype=np.float32).reshape(3, 3) / 10
    # The shared w and b are only in their owner's group, as Caffe writes them; "gone" is not in the net.
    write_caffe_style(tmp_path / "w.caffemodel.h5",
                      {"a": [weight, [1, 2, 3]], "b": [], "c": [[0.5, 0.1, 0.2]], "gone": [[1.0]]})
    net.copy_from(tmp_path / "w.caffemodel.h5")
    assert np.array_equal(net.params["a"][0].data, weight)
    assert np.array_equal(net.params["b"][0].data, weight)  # shared
    assert np.array_equal(net.params["c"][0].data, np.float32([0.5, 0.1, 0.2]))
    out = net.forward(x=np.ones((2, 3), np.float32))["c"]
    a = weight @ np.ones(3) + [1, 2, 3]
    b = weight @ a + [1, 2, 3]
    np.testing.assert_allclose(out[0], b, rtol=1e-6)  # all positive: PReLU passes them


def test_save_hdf5_round_trip_writes_shared_blobs_once(tmp_path):
    net = tiny_net(tmp_path)
    net.params["c"][0].data[...] = [0.3, 0.2, 0.1]
    net.save_hdf5(tmp_path / "net.caffemodel.h5")
    with h5py.File(tmp_path / "net.caffemodel.h5", "r") as f:
        assert sorted(f["data/a"]) == ["0", "1"] and len(f["data/b"]) == 0
    other = tiny_net(tmp_path)
    other.load_hdf5(tmp_path / "net.caffemodel.h5")
    for name in ("a", "b", "c"):
        for mine, theirs in zip(net.params[name], other.params[name]):
            assert np.array_equal(mine.data, theirs.data)


def test_bad_weights_files(tmp_path):
    net = tiny_net(tmp_path)
    write_caffe_style(tmp_path / "short.h5", {"a": [np.zeros((3, 3))]})
    with pytest.raises(NetError, match=r"short.h5: layer 'a' blob 1 is missing"):
        net.copy_from(tmp_path / "short.h5")
    write_caffe_style(tmp_path / "shape.h5", {"a": [np.zeros((3, 2)), np.zeros(3)]})
    with pytest.raises(NetError, match=r"layer 'a' blob 0: shape mismatch, file has \[3, 2\]"):
        net.copy_from(tmp_path / "shape.h5")
    write_caffe_style(tmp_path / "many.h5", {"c": [np.zeros(3), np.zeros(3)]})
    with pytest.raises(NetError, match="layer 'c' has 2 blobs in the file"):
        net.copy_from(tmp_path / "many.h5")
    write_caffe_style(tmp_path / "other.h5", {"x1": [np.zeros(3)]})
    with pytest.raises(NetError, match="none of its 1 layers"):
        net.copy_from(tmp_path / "other.h5")
    with h5py.File(tmp_path / "nodata.h5", "w") as f:
        f.create_dataset("iter", data=[1])
    with pytest.raises(NetError, match="no 'data' group"):
        net.copy_from(tmp_path / "nodata.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(io.FormatError, match="junk.h5: not an HDF5 file"):
        net.copy_from(tmp_path / "junk.h5")


def test_caffe_written_solver_state_restores(digits, tmp_path):  # noqa: F811
    solver = Solver(solver_param(digits, tmp_path, "SGD"))
    solver.step(3)
    model = tmp_path / "caffe_iter_3.caffemodel.h5"
    write_caffe_style(model, {name: [b.data for b in blobs] for name, blobs in solver.net.params.items()})
    history = [np.array(b.data) + 1 for b in solver.history]
    state = tmp_path / "caffe_iter_3.solverstate.h5"
    with h5py.File(state, "w") as f:
        f.create_dataset("iter", data=np.int32([3]))
        f.create_dataset("learned_net", data=np.bytes_(str(model)))
        f.create_dataset("current_step", data=np.int32([1]))
        group = f.create_group("history")
        for j, values in enumerate(history):
            group.create_dataset(str(j), data=values)
    other = Solver(solver_param(digits, tmp_path / "other", "SGD"))
    other.restore(state)
    assert other.iter == 3 and other.current_step == 1
    for a, b in zip(all_params(solver), all_params(other)):
        assert np.array_equal(a, b)
    for mine, expected in zip(other.history, history):
        assert np.array_equal(mine.data, expected)


def test_cli_resumes_and_reads_hdf5_snapshots(digits, tmp_path, capsys):  # noqa: F811
    param = solver_param(digits, tmp_path, "SGD", HDF5)
    param.max_iter, param.snapshot = 4, 2
    solver_file = tmp_path / "solver.prototxt"
    io.write_text(solver_file, param)
    assert main(["train", "--solver", str(solver_file)]) == 0
    state = tmp_path / "resume_iter_2.solverstate.h5"
    assert state.exists() and (tmp_path / "resume_iter_4.caffemodel.h5").exists()
    assert main(["train", "--solver", str(solver_file), "--snapshot", str(state)]) == 0
    capsys.readouterr()
    assert main(["params", "--weights", str(state)]) == 0
    out = capsys.readouterr().out
    assert "ip1" in out and "ip2" in out
    (tmp_path / "bad.solverstate.h5").write_bytes(b"junk")
    code = main(["train", "--solver", str(solver_file), "--snapshot", str(tmp_path / "bad.solverstate.h5")])
    assert one_line_error(code, capsys.readouterr().err)


def test_binaryproto_snapshots_are_unchanged(digits, tmp_path):  # noqa: F811
    solver = Solver(solver_param(digits, tmp_path))
    solver.step(1)
    model, state = solver.snapshot()
    assert model.endswith(".caffemodel") and state.endswith(".solverstate")
    assert io.read_binary(model, caffe_pb2.NetParameter()).layer
