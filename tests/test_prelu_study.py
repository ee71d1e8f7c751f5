"""models/mnist_prelu_cnn and benchmarks/prelu_study.py: the Theano tutorial CNN's shapes and slopes, its
ReLU twin, the slope trace plot (`minicaffe plot-params --watch-csv`), and (slow, MNIST) short runs of
both studies: the learning curve rises and the PReLU slopes move away from their initial values."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from minicaffe import io
from minicaffe.inspect import build_net
from minicaffe.layer import TEST, TRAIN

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models" / "mnist_prelu_cnn"


def _bench():
    spec = importlib.util.spec_from_file_location("prelu_study", REPO / "benchmarks" / "prelu_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _bench()


def test_cnn_shapes_follow_the_theano_tutorial():
    """Full border on conv1 (28 -> 30), valid after; ceil pooling 15 -> 13 -> 7 -> 5 -> 3; 128 x 3 x 3
    into 625 units; constant initial slopes 0.5 / 0.5 / 0.3 / 0.1, one per channel."""
    net = build_net(str(MODELS / "prelu_train_test.prototxt"), TRAIN, None, dummy_data=True,
                    dummy_shape=(1, 28, 28))
    shapes = {name: tuple(net.blobs[name].shape[1:]) for name in ("conv1", "pool1", "conv2", "pool2", "conv3",
                                                                   "pool3", "ip1", "ip2")}
    assert shapes == {"conv1": (32, 30, 30), "pool1": (32, 15, 15), "conv2": (64, 13, 13),
                      "pool2": (64, 7, 7), "conv3": (128, 5, 5), "pool3": (128, 3, 3),
                      "ip1": (625,), "ip2": (10,)}
    slopes = {layer.name: np.asarray(layer.blobs[0].data) for layer in net.layers if layer.type == "PReLU"}
    assert {name: (s.shape, set(s.ravel().tolist())) for name, s in slopes.items()} == {
        "prelu1": ((32,), {0.5}), "prelu2": ((64,), {0.5}), "prelu3": ((128,), {np.float32(0.3)}),
        "prelu4": ((625,), {np.float32(0.1)})}


def test_relu_twin_differs_only_in_the_activations():
    def layers(name, activation):
        """(every other layer as text, the (bottoms, tops) of the activations)"""
        net = io.read_net_param(MODELS / name)
        return ([str(layer) for layer in net.layer if layer.type != activation],
                [(list(layer.bottom), list(layer.top)) for layer in net.layer if layer.type == activation])

    prelu_layers, prelu_acts = layers("prelu_train_test.prototxt", "PReLU")
    relu_layers, relu_acts = layers("relu_train_test.prototxt", "ReLU")
    assert prelu_layers == relu_layers and prelu_acts == relu_acts and len(relu_acts) == 4
    solvers = [io.read_solver_param(MODELS / f"{kind}_solver.prototxt") for kind in ("prelu", "relu")]
    for solver in solvers:
        assert (solver.type, solver.base_lr, solver.lr_policy) == ("RMSProp", pytest.approx(0.001), "fixed")
        assert solver.test_interval == bench.EPOCH_ITERATIONS
        assert list(solver.test_iter) == [bench.TEST_BATCHES]
    net = build_net(str(MODELS / "relu_train_test.prototxt"), TEST, None, dummy_data=True,
                    dummy_shape=(1, 28, 28))
    assert not any(layer.type == "PReLU" for layer in net.layers)


def test_plot_params_draws_a_watch_trace(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from minicaffe import cli

    csv = tmp_path / "watch.csv"
    csv.write_text("iteration,layer,blob,mean,min,max\n0,prelu1,0,0.5,0.5,0.5\n0,prelu2,0,0.3,0.3,0.3\n"
                   "80,prelu1,0,0.45,0.2,0.6\n80,prelu2,0,0.31,0.25,0.4\n")
    png = tmp_path / "slopes.png"
    assert cli.main(["plot-params", "--watch-csv", str(csv), "--epoch-iterations", "80", "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 layers" in capsys.readouterr().out


def test_verdict_says_within_noise_or_not():
    finals = {"a": [0.990, 0.992, 0.991], "b": [0.989, 0.991, 0.990], "c": [0.950, 0.951, 0.952]}
    assert "within noise" in bench.verdict(finals, "a", "b")
    assert "larger than the noise" in bench.verdict(finals, "a", "c")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder for the slow tests: the MNIST LMDBs are made once (prepare() skips existing ones)."""
    return tmp_path_factory.mktemp("prelu_study")


@pytest.mark.slow
def test_cnn_study_quick_learns_and_moves_the_slopes(mnist_dir, work, tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    assert bench.main(["cnn", "--quick", "--mnist", str(mnist_dir), "--work", str(work),
                       "--output", str(output)]) == 0
    text = output.read_text()
    assert "## PReLU CNN on a 10,000-image MNIST subset" in text and "prelu4 slope" in text
    assert (work / "prelu_slopes.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("prelu", "relu"):
        from minicaffe.commands.parse_log import parse_log

        _, tests = parse_log(work / f"cnn_{name}" / "train.log")
        accuracies = [row["accuracy"] for row in tests]
        assert len(accuracies) == bench.QUICK["epochs"] + 1
        assert accuracies[0] < 0.2 and accuracies[-1] > accuracies[0] + 0.4, accuracies  # the curve rises
    from minicaffe.watch import read_watch_csv

    rows = read_watch_csv(work / "cnn_prelu" / "model_watch.csv")
    initial = {"prelu1": 0.5, "prelu2": 0.5, "prelu3": 0.3, "prelu4": 0.1}
    last = max(row["iteration"] for row in rows)
    for layer, start in initial.items():
        first = next(row for row in rows if row["layer"] == layer and row["iteration"] == 0)
        end = next(row for row in rows if row["layer"] == layer and row["iteration"] == last)
        assert first["min"] == first["max"] == pytest.approx(start)
        assert max(end["max"] - start, start - end["min"]) > 1e-3, (layer, end)  # slopes moved


@pytest.mark.slow
def test_keras_study_quick_reports_every_model(mnist_dir, work, tmp_path):
    output = tmp_path / "BENCHMARKS.md"
    assert bench.main(["keras", "--quick", "--mnist", str(mnist_dir), "--work", str(work),
                       "--output", str(output)]) == 0
    text = output.read_text()
    for name in bench.KERAS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {len(bench.QUICK['seeds'])} |" in row
    assert text.count("noise") >= 3
    # The initial slope reached the net: a run's copied net has the constant filler asked for.
    net = io.read_net_param(work / "keras_prelu0_seed1" / "train_test.prototxt")
    (prelu,) = [layer for layer in net.layer if layer.type == "PReLU"]
    assert prelu.prelu_param.filler.type == "constant" and prelu.prelu_param.filler.value == 0.0
