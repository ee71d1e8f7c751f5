"""type: "Python" as pycaffe has it: python_param { module layer param_str }, a class with setup / reshape /
forward / backward on numpy, learned blobs from self.blobs.add_blob, in training, snapshots, `minicaffe
time`, GPU mode, and clear errors. The example is models/python_layer (pyloss.py, as pycaffe's)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, one_line_error
from pylayers import ChannelScale, Recorder, reference_scale
from test_gpu_paths import assert_same, fake_cupy, set_mode  # noqa: F401  (fake_cupy: a fixture)

import minicaffe as caffe
from minicaffe import cli, io
from minicaffe.layer import LayerError
from minicaffe.net import NetError
from minicaffe.proto import caffe_pb2
from minicaffe.solver import Solver
from minicaffe.testing import check_layer, layer_from_prototxt

EXAMPLE = REPO / "models" / "python_layer"
README_COMMAND = "PYTHONPATH=models/python_layer minicaffe train --solver models/python_layer/solver.prototxt"


@pytest.fixture
def example_on_path(monkeypatch):
    """models/python_layer on sys.path, as PYTHONPATH puts it there."""
    monkeypatch.syspath_prepend(str(EXAMPLE))


def net_text(layers: str, shape=(2, 3, 2)) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'force_backward: true\n'
            f'layer {{ name: "in" type: "Input" top: "a" top: "b" '
            f'input_param {{ shape {{ {dims} }} shape {{ {dims} }} }} }}\n{layers}')


def build(text: str, phase=caffe.TRAIN, dtype=np.float32) -> caffe.Net:
    return caffe.Net(io.parse_text(text, caffe_pb2.NetParameter(), "<net>"), phase, dtype=dtype)


def python_layer(module: str, cls: str, extra: str = "", bottoms=("a",), top="y", name="py") -> str:
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms)
    return (f'layer {{ name: "{name}" type: "Python" {bottom} top: "{top}" '
            f'python_param {{ module: "{module}" layer: "{cls}" {extra} }} }}\n')


# -- the example: pycaffe's Euclidean loss in numpy ------------------------------------------------------

def test_pyloss_equals_the_builtin_euclidean_loss(example_on_path):
    a = np.array([[1, 2], [3, 4]], np.float32)
    b = np.array([[0, 0], [1, 1]], np.float32)
    results = {}
    for kind in ("python", "builtin"):
        loss = (python_layer("pyloss", "EuclideanLossLayer", bottoms=("a", "b"), top="loss")
                .replace("}\n", "loss_weight: 1 }\n") if kind == "python"
                else 'layer { name: "py" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss" }\n')
        net = build(net_text(loss, shape=(2, 2)))
        out = net.forward(a=a, b=b)
        diffs = net.backward()
        results[kind] = (float(out["loss"].reshape(-1)[0]), np.array(diffs["a"]), np.array(diffs["b"]))
    loss, da, db = results["python"]
    # sum((a - b)^2) / (2 N): (1 + 4 + 4 + 9) / 4; d/da = (a - b) / N
    assert loss == 4.5
    np.testing.assert_array_equal(da, [[0.5, 1], [1, 1.5]])
    np.testing.assert_array_equal(db, -da)
    for got, want in zip(results["python"], results["builtin"]):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def builtin_solver(folder: Path) -> Solver:
    """The example's solver with the built-in EuclideanLoss in place of the Python layer."""
    param = io.parse_text((EXAMPLE / "solver.prototxt").read_text(), caffe_pb2.SolverParameter(), "solver")
    net = io.parse_text((EXAMPLE / "net.prototxt").read_text(), caffe_pb2.NetParameter(), "net.prototxt")
    (loss,) = [layer for layer in net.layer if layer.type == "Python"]
    loss.type = "EuclideanLoss"
    loss.ClearField("python_param")
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    param.snapshot_prefix = str(folder / "builtin")
    return Solver(param)


def test_example_trains_with_import_minicaffe_as_caffe_like_the_builtin_loss(example_on_path, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)  # the solver's snapshot_prefix is relative to the current folder
    solver = caffe.get_solver(str(EXAMPLE / "solver.prototxt"))
    assert solver.net.layer_dict["loss"].type == "Python"
    python_losses = train(solver, 150)
    reference = builtin_solver(tmp_path)
    assert python_losses[-1] < python_losses[0] / 1000  # the student learns the teacher
    np.testing.assert_allclose(python_losses, train(reference, 150), rtol=1e-3, atol=1e-7)
    for name in ("student", "teacher"):
        for got, want in zip(solver.net.params[name], reference.net.params[name]):
            np.testing.assert_allclose(got.data, want.data, rtol=1e-4, atol=1e-6)


def train(solver: Solver, iterations: int) -> np.ndarray:
    """Step `solver`; the loss of each iteration."""
    losses = []
    for _ in range(iterations):
        solver.step(1)
        losses.append(solver.smoothed_loss)  # average_loss 1: this iteration's loss
    return np.array(losses)


def cli_env(*paths: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (REPO, *paths))}


def glog_losses(err: str) -> list[float]:
    return [float(x) for x in re.findall(r"Iteration \d+ \(.*\), loss = (\S+)", err)]


def test_readme_command_trains_the_example_from_the_command_line(tmp_path):
    """What README.md shows, run from another folder: PYTHONPATH finds pyloss; the snapshot is written."""
    assert README_COMMAND in (REPO / "README.md").read_text()
    args = README_COMMAND.split()[2:]  # after PYTHONPATH=... and `minicaffe`
    args = [str(REPO / a) if a.startswith("models/") else a for a in args]
    run = subprocess.run([sys.executable, "-m", "minicaffe.cli", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=cli_env(EXAMPLE))
    assert run.returncode == 0, run.stderr[-2000:]
    losses = glog_losses(run.stderr)
    assert len(losses) >= 5 and losses[-1] < losses[0] / 1000, losses
    assert (tmp_path / "python_layer_iter_200.caffemodel").is_file()
    # Without the module's folder on the path: one line naming the layer, module, class and the fix.
    run = subprocess.run([sys.executable, "-m", "minicaffe.cli", *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=cli_env())
    assert one_line_error(run.returncode, run.stderr, log_lines=True), run.stderr
    assert ("layer 'loss' (Python, module 'pyloss', class 'EuclideanLossLayer'): no module 'pyloss' on the "
            "Python path: put its folder on PYTHONPATH") in run.stderr


def test_minicaffe_time_runs_python_layers(example_on_path, capsys, tmp_path):
    assert cli.main(["time", "--model", str(EXAMPLE / "net.prototxt"), "--iterations", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"loss\tforward: \S+ ms\.", out) and re.search(r"loss\tbackward: \S+ ms\.", out)
    model = tmp_path / "scale.prototxt"
    model.write_text(SCALE_NET)  # a Python layer with a learned blob, backward forced on every layer
    assert cli.main(["time", "--model", str(model), "--iterations", "2", "--double"]) == 0
    assert re.search(r"scale\tbackward: \S+ ms\.", capsys.readouterr().out)


# -- learned blobs: training, snapshots --------------------------------------------------------------

SCALE_NET = """name: "scale"
layer { name: "x" type: "DummyData" top: "x"
        dummy_data_param { shape { dim: 8 dim: 3 dim: 2 dim: 2 } data_filler { type: "gaussian" } } }
layer { name: "target" type: "Power" bottom: "x" top: "target" power_param { scale: 2 } }
layer { name: "scale" type: "Python" bottom: "x" top: "pred"
        python_param { module: "pylayers" layer: "ChannelScale" param_str: "0.5" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "pred" bottom: "target" top: "loss" }
"""


def scale_solver(folder: Path, **fields) -> Solver:
    param = caffe_pb2.SolverParameter(base_lr=0.05, momentum=0.9, lr_policy="fixed", display=0,
                                      max_iter=100, random_seed=5, snapshot_prefix=str(folder / "s"),
                                      **fields)
    param.net_param.CopyFrom(io.parse_text(SCALE_NET, caffe_pb2.NetParameter(), "<net>"))
    return Solver(param)


def test_python_layer_blobs_are_learned(tmp_path):
    solver = scale_solver(tmp_path)
    (a,) = solver.net.params["scale"]
    np.testing.assert_array_equal(a.data, [0.5] * 3)  # param_str reached setup
    assert isinstance(solver.net.layer_dict["scale"].python, ChannelScale)
    losses = train(solver, 200)
    np.testing.assert_allclose(a.data, [2.0] * 3, rtol=1e-3)  # target = 2 x
    assert losses[-1] < losses[0] / 1000


def test_python_layer_blobs_are_snapshotted_and_restored(tmp_path):
    straight = scale_solver(tmp_path / "straight")
    straight.step(6)
    (tmp_path / "split").mkdir()
    first = scale_solver(tmp_path / "split")
    first.step(3)
    model, state = first.snapshot()
    saved = caffe.Net(io.parse_text(SCALE_NET, caffe_pb2.NetParameter(), "<net>"), model, caffe.TEST)
    np.testing.assert_array_equal(saved.params["scale"][0].data, first.net.params["scale"][0].data)
    assert not np.all(saved.params["scale"][0].data == 0.5)  # trained, not the start value
    resumed = scale_solver(tmp_path / "split")
    resumed.restore(state)
    resumed.step(3)
    # the learned value and its momentum history came back: the same bits as the uninterrupted run
    np.testing.assert_array_equal(resumed.net.params["scale"][0].data, straight.net.params["scale"][0].data)


def test_channel_scale_forward_and_gradients():
    layer = layer_from_prototxt('name: "s" type: "Python" '
                                'python_param { module: "pylayers" layer: "ChannelScale" param_str: "3" }')
    x = np.array([[[1.0, -2.0]], [[0.5, 4.0]]])  # (N=2, C=1, 2)
    bottom, top = [caffe.Blob(x.shape, np.float64)], [caffe.Blob((), np.float64)]
    bottom[0].data[...] = x
    layer.setup(bottom, top)
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, [[[3.0, -6.0]], [[1.5, 12.0]]])
    np.testing.assert_array_equal(top[0].data, reference_scale(x, np.array([3.0])))
    layer = layer_from_prototxt('name: "s" type: "Python" '
                                'python_param { module: "pylayers" layer: "ChannelScale" param_str: "0.7" }')
    check_layer(layer, [np.random.default_rng(0).normal(size=(2, 3, 4))], exhaustive=True,
                stepsize=1e-3, threshold=1e-6)


# -- what a Python layer sees ---------------------------------------------------------------------------

@pytest.mark.parametrize("phase", [caffe.TRAIN, caffe.TEST])
def test_param_str_phase_blob_accessors_and_the_layer_object(phase):
    net = build(net_text(python_layer("pylayers", "Recorder", 'param_str: "{\'k\': 3}"')), phase)
    layer = net.layer_dict["py"]
    assert layer.type == "Python" and isinstance(layer.python, Recorder)
    # pycaffe's net.layers[i] is the Python object: its attributes and methods are reached through it
    assert layer.seen == {"param_str": "{'k': 3}", "phase": phase, "num": 2, "channels": 3, "count": 12}
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    np.testing.assert_array_equal(net.forward(a=x, b=x)["y"], x)
    assert layer.times_run() == 1
    np.testing.assert_array_equal(net.backward(y=x + 1)["a"], x + 1)
    with pytest.raises(AttributeError):
        layer.no_such_attribute  # noqa: B018


def test_netspec_writes_a_python_layer_as_pycaffe_does(example_on_path):
    """pycaffe's L.Python(..., module=, layer=, param_str=): the python_param fields; share_in_parallel
    (deprecated in Caffe) is accepted and changes nothing."""
    from minicaffe import layers as L

    n = caffe.NetSpec()
    n.a, n.b = L.Input(shape=[dict(dim=[2, 3]), dict(dim=[2, 3])], ntop=2)
    n.loss = L.Python(n.a, n.b, module="pyloss", layer="EuclideanLossLayer", loss_weight=1,
                      share_in_parallel=True)
    proto = n.to_proto()
    assert proto.layer[1].python_param == caffe_pb2.PythonParameter(
        module="pyloss", layer="EuclideanLossLayer", share_in_parallel=True)
    net = caffe.Net(proto, caffe.TRAIN)
    out = net.forward(a=np.ones((2, 3)), b=np.zeros((2, 3)))
    np.testing.assert_array_equal(out["loss"], [1.5])  # 6 / 2 / 2


def test_a_layer_without_backward_runs_until_a_gradient_is_needed():
    text = ('layer { name: "in" type: "DummyData" top: "a" dummy_data_param { shape { dim: 2 dim: 3 } } }\n'
            + python_layer("pylayers", "NoBackward"))
    build(text).forward_backward()  # nothing needs its backward (no bottom gradient, no blobs)
    net = build(net_text(python_layer("pylayers", "NoBackward")))
    net.forward()
    expected = (r"^layer 'py' \(Python, module 'pylayers', class 'NoBackward'\): the net needs its "
                r"gradients, but its class defines no backward$")
    with pytest.raises(LayerError, match=expected):
        net.backward()


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, cls, message", [
    ("no_such_module_xyz", "Layer", "no module 'no_such_module_xyz' on the Python path: put its folder on "
                                    "PYTHONPATH"),
    ("pylayers", "Missing", "module 'pylayers' (*/tests/pylayers.py) has no class 'Missing'"),
    ("pylayers", "NotALayer", "'NotALayer' of module 'pylayers' (*) is not a subclass of minicaffe.Layer "
                              "(caffe.Layer after `import minicaffe as caffe`)"),
    ("pylayers", "NOT_A_CLASS", "'NOT_A_CLASS' of module 'pylayers' (*) is not a subclass of minicaffe.*"),
    ("pylayers", "NoForward", "class 'NoForward' defines no forward (a Python layer defines setup, reshape, "
                              "forward, backward, as in pycaffe)"),
    ("models/python_layer/pyloss", "EuclideanLossLayer",
     "python_param.module 'models/python_layer/pyloss' is a file path; give the name of a module on the "
     "Python path (its folder on PYTHONPATH)*"),
    ("pyloss.py", "EuclideanLossLayer", "python_param.module 'pyloss.py' is a file path*"),
    ("/tmp/evil.py", "X", "python_param.module '/tmp/evil.py' is a file path*"),
    ("..pylayers", "Recorder", "python_param.module '..pylayers' is not a module name"),
    ("", "Recorder", "python_param needs a module (a module name on the Python path) and a layer*"),
    ("pylayers", "", "python_param needs a module*"),
])
def test_a_bad_python_param_names_layer_module_and_class(module, cls, message):
    with pytest.raises(NetError) as caught:
        build(net_text(python_layer(module, cls)))
    text = str(caught.value)
    assert "\n" not in text
    prefix = f"<NetParameter>: layer 'py' (Python, module '{module}', class '{cls}'): "
    assert re.fullmatch(re.escape(prefix + message).replace(r"\*", ".*"), text), text


def test_an_import_failure_inside_the_module_is_reported_as_such(tmp_path, monkeypatch):
    (tmp_path / "needs_missing.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "explodes.py").write_text("raise RuntimeError('cannot load the table')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = (r"module 'needs_missing', class 'X'\): importing module 'needs_missing' failed: "
                r"ModuleNotFoundError: No module named 'no_such_dependency_xyz'$")
    with pytest.raises(NetError, match=expected):
        build(net_text(python_layer("needs_missing", "X")))
    with pytest.raises(NetError, match=r"module 'explodes', class 'X'\): importing module 'explodes' failed: "
                                       r"RuntimeError: cannot load the table$") as caught:
        build(net_text(python_layer("explodes", "X")))
    assert causes(caught.value)[-1].args == ("cannot load the table",)  # for --debug's traceback


def causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


@pytest.mark.parametrize("method", ["setup", "reshape", "forward", "backward"])
def test_an_exception_in_the_users_code_names_layer_module_class_and_message(method):
    expected = (rf"layer 'py' \(Python, module 'pylayers', class 'FailsIn'\): {method} raised RuntimeError: "
                rf"planned failure in {method}$")
    with pytest.raises(ValueError, match=expected) as caught:  # NetError, or LayerError from backward
        net = build(net_text(python_layer("pylayers", "FailsIn", f'param_str: "{method}"')))
        net.forward()
        net.backward()
    raised = causes(caught.value)[-1]
    assert isinstance(raised, RuntimeError) and raised.__traceback__ is not None  # the user's, kept


def test_the_cli_reports_a_user_exception_in_one_line_and_debug_shows_its_traceback(tmp_path, capsys):
    model = tmp_path / "net.prototxt"
    model.write_text(net_text(python_layer("pylayers", "FailsIn", 'param_str: "forward"')))
    line = ("minicaffe time: error: layer 'py' (Python, module 'pylayers', class 'FailsIn'): forward raised "
            "RuntimeError: planned failure in forward\n")
    assert cli.main(["time", "--model", str(model), "--iterations", "1"]) == 1
    out, err = capsys.readouterr()
    assert err == line
    assert cli.main(["time", "--model", str(model), "--iterations", "1", "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith(line)
    assert 'pylayers.py", line' in err and "in check" in err  # the user's own frames


# -- GPU mode: the layer computes on host arrays, the blobs sync ---------------------------------------

def train_example(gpu: bool, folder: Path) -> dict[str, np.ndarray]:
    set_mode(gpu)
    param = io.parse_text((EXAMPLE / "solver.prototxt").read_text(), caffe_pb2.SolverParameter(), "solver")
    param.net = str(EXAMPLE / "net.prototxt")
    param.snapshot_prefix = str(folder / "s")
    solver = Solver(param)
    losses = train(solver, 15)
    results = {f"{name} {i}": np.array(blob.data) for name, blobs in solver.net.params.items()
               for i, blob in enumerate(blobs)}
    return {"losses": losses, **results}


def test_gpu_mode_trains_the_example_as_cpu_mode(fake_cupy, example_on_path, tmp_path):  # noqa: F811
    """The InnerProducts run on the (fake) device, which refuses host arrays in device math; the Python
    loss reads and writes host copies, which the blobs carry up and down."""
    cpu = train_example(False, tmp_path)
    gpu = train_example(True, tmp_path)
    assert_same(gpu, cpu)
