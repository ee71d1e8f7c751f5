"""`minicaffe time`, `summary`, `parse-log`, `plot`, `device_query` and `draw`."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
from conftest import one_line_error

import minicaffe as caffe
from minicaffe.cli import main
from minicaffe.commands.draw import net_to_dot
from minicaffe.commands.summary import summarize
from minicaffe.io import parse_text
from minicaffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
LENET_PRELU = REPO / "models" / "lenet_prelu" / "train_test.prototxt"

# Caffe's LeNet (examples/mnist/lenet.prototxt), one 28x28 image.
LENET_DEPLOY = """
name: "LeNet"
layer { name: "data" type: "Input" top: "data" input_param { shape: { dim: 1 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 50 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def lenet(tmp_path) -> Path:
    path = tmp_path / "lenet.prototxt"
    path.write_text(LENET_DEPLOY)
    return path


@pytest.fixture
def lenet_prelu() -> Path:
    return LENET_PRELU


# -- time ---------------------------------------------------------------------------------------------

def parse_time_report(out: str) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    forward, backward, totals = {}, {}, {}
    for line in out.splitlines():
        match = re.match(r"^\s*(\S+)\t(forward|backward): ([\d.e+-]+) ms\.$", line)
        if match:
            (forward if match.group(2) == "forward" else backward)[match.group(1)] = float(match.group(3))
        match = re.match(r"^(Average Forward pass|Average Backward pass|Average Forward-Backward"
                         r"|Total Time): ([\d.e+-]+) ms\.$", line)
        if match:
            totals[match.group(1)] = float(match.group(2))
    return forward, backward, totals


def test_time_lenet_prelu_with_dummy_data(capsys, lenet_prelu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the LMDB sources are relative paths: they do not exist here
    code, out, err = cli(capsys, "time", "--model", lenet_prelu, "--iterations", 2, "--dummy-data", "1,28,28")
    assert code == 0, err
    layers = ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "prelu1", "ip2", "loss"]
    forward, backward, totals = parse_time_report(out)
    assert list(forward) == layers and list(backward) == layers
    assert set(totals) == {"Average Forward pass", "Average Backward pass", "Average Forward-Backward",
                           "Total Time"}
    assert totals["Average Forward pass"] == pytest.approx(sum(forward.values()), rel=1e-3, abs=1e-3)
    assert totals["Average Backward pass"] == pytest.approx(sum(backward.values()), rel=1e-3, abs=1e-3)
    assert forward["conv1"] > 0 and backward["conv1"] > 0  # force_backward: every layer runs backward
    assert out.count("forward-backward time:") == 2
    # Bandwidth of the element-wise layer: 64x500 floats in and out, in place.
    (row,) = [line.split() for line in out.splitlines() if line.strip().startswith("prelu1 ")]
    assert row[1] == "PReLU"
    assert float(row[2]) == pytest.approx((2 * 64 * 500 * 4 + 500 * 4) / 1e6, rel=1e-3)
    assert float(row[4]) == pytest.approx(2 * float(row[2]), rel=1e-3)
    assert re.search(r"Copy bandwidth \(CPU, 64 MiB array copy, read \+ write\): [\d.]+ GB/s", out)


def test_time_names_the_missing_source(capsys, lenet_prelu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "time", "--model", lenet_prelu, "--iterations", 1)
    assert one_line_error(code, err)
    assert "examples/mnist/mnist_train_lmdb" in err and "--dummy-data" in err
    # Without a shape and without the database, --dummy-data cannot know the sample shape.
    code, _, err = cli(capsys, "time", "--model", lenet_prelu, "--iterations", 1, "--dummy-data")
    assert one_line_error(code, err) and "--dummy-data 1,28,28" in err


def test_time_input_net_test_phase(capsys, lenet):
    code, out, err = cli(capsys, "time", "--model", lenet, "--iterations", 3, "--phase", "TEST")
    assert code == 0, err
    forward, backward, totals = parse_time_report(out)
    assert list(forward) == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]
    assert list(backward) == list(forward)
    assert totals["Total Time"] >= totals["Average Forward-Backward"] * 3 * 0.99
    assert "relu1" in out.split("Memory traffic")[1]


def test_time_bad_input(capsys, lenet, tmp_path):
    code, _, err = cli(capsys, "time", "--model", lenet, "--iterations", 0)
    assert one_line_error(code, err) and "--iterations" in err
    code, _, err = cli(capsys, "time", "--model", tmp_path / "missing.prototxt")
    assert one_line_error(code, err)
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layer { name: 'x' type: 'Input' top: 'x' ")
    code, _, err = cli(capsys, "time", "--model", bad)
    assert one_line_error(code, err) and "bad.prototxt" in err


# -- summary ------------------------------------------------------------------------------------------

def test_summary_lenet_hand_checked(capsys, lenet):
    net = caffe.Net(str(lenet), caffe.TEST)
    info = summarize(net)
    rows = {row["name"]: row for row in info["rows"]}
    shapes = {name: row["tops"][0][1] for name, row in rows.items()}
    assert shapes == {"data": (1, 1, 28, 28), "conv1": (1, 20, 24, 24), "pool1": (1, 20, 12, 12),
                      "conv2": (1, 50, 8, 8), "pool2": (1, 50, 4, 4), "ip1": (1, 500), "relu1": (1, 500),
                      "ip2": (1, 10), "prob": (1, 10)}
    params = {name: row["params"] for name, row in rows.items() if row["params"]}
    assert params == {"conv1": 20 * 25 + 20, "conv2": 50 * 20 * 25 + 50, "ip1": 500 * 800 + 500,
                      "ip2": 10 * 500 + 10}
    assert info["params"] == 520 + 25050 + 400500 + 5010 == 431080
    assert rows["conv1"]["activation_bytes"] == 20 * 24 * 24 * 4
    assert rows["relu1"]["activation_bytes"] == 0 and rows["relu1"]["tops"][0][2]  # in place
    assert info["param_bytes"] == 431080 * 4
    assert info["activation_bytes"] == 4 * (784 + 11520 + 2880 + 3200 + 800 + 500 + 10 + 10)

    code, out, err = cli(capsys, "summary", "--model", lenet)
    assert code == 0, err
    assert "conv1 (Convolution)" in out and "conv1 1x20x24x24" in out and "ip1 1x500 (in place)" in out
    assert "Total params: 431,080" in out
    assert "LeNet  (9 layers, float32)" in out and "automatic" not in out


def test_summary_lenet_prelu_train_phase(capsys, lenet_prelu, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "summary", "--model", lenet_prelu, "--phase", "TRAIN", "--dummy-data",
                         "1,28,28")
    assert code == 0, err
    assert "mnist (DummyData)" in out and "data 64x1x28x28" in out and "label 64" in out
    assert "prelu1 (PReLU)" in out
    assert "Total params: 431,580" in out  # LeNet + 500 slopes


def test_summary_lists_the_automatic_splits(capsys, lenet_prelu, tmp_path, monkeypatch):
    """The header's layer count is the number of rows: the Splits the net inserts are listed, marked."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "summary", "--model", lenet_prelu, "--phase", "TEST", "--dummy-data",
                         "1,28,28")
    assert code == 0, err
    count, automatic = re.search(r"\((\d+) layers, (\d+) of them automatic Splits, float32\)", out).groups()
    lines = out.splitlines()
    rule = lines[1]
    rows = [line for line in lines[4:lines.index(rule, 4)] if not line.startswith(" ")]
    assert len(rows) == int(count)
    splits = [row.split()[0] for row in rows if "(Split, automatic)" in row]
    # label feeds accuracy and loss, ip2 feeds accuracy and loss.
    assert splits == ["label_mnist_1_split", "ip2_ip2_0_split"] and int(automatic) == 2


def test_dummy_data_takes_the_shape_from_an_existing_database(capsys, tmp_path):
    import numpy as np

    from minicaffe.db import write_datum_lmdb

    images = [np.full((1, 5, 7), i, dtype=np.uint8) for i in range(4)]
    write_datum_lmdb(tmp_path / "db", images, [0, 1, 0, 1])
    model = tmp_path / "net.prototxt"
    model.write_text(f"""
        layer {{ name: "d" type: "Data" top: "data" top: "label"
                data_param {{ source: "{tmp_path / 'db'}" batch_size: 3 backend: LMDB }} }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
                inner_product_param {{ num_output: 2 }} }}
        layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
    """)
    code, out, err = cli(capsys, "summary", "--model", model, "--dummy-data")
    assert code == 0, err
    assert "d (DummyData)" in out and "data 3x1x5x7" in out and "label 3" in out
    code, out, err = cli(capsys, "summary", "--model", model)  # the real Data layer, same shapes
    assert code == 0 and "d (Data)" in out and "data 3x1x5x7" in out
    code, out, err = cli(capsys, "time", "--model", model, "--iterations", 1, "--dummy-data", "2,3,3")
    assert code == 0, err
    forward, _, _ = parse_time_report(out)
    assert list(forward) == ["d", "ip", "loss"]


# -- parse-log and plot -------------------------------------------------------------------------------

LOG = """\
Log file created at: 2024/12/31 23:59:00
I1231 23:59:00.000000 12345 solver.cpp:44] Initializing solver from parameters:
I1231 23:59:01.000000 12345 solver.cpp:289] Solving LeNet
I1231 23:59:01.100000 12345 solver.cpp:449] Iteration 0, Testing net (#0)
I1231 23:59:02.000000 12345 solver.cpp:516]     Test net output #0: accuracy = 0.1
I1231 23:59:02.000000 12345 solver.cpp:516]     Test net output #1: loss = 2.3 (* 1 = 2.3 loss)
I1231 23:59:02.500000 12345 solver.cpp:243] Iteration 0 (0 iter/s, 1.5s/100 iters), loss = 2.31
I1231 23:59:02.500000 12345 solver.cpp:259]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)
I1231 23:59:02.500000 12345 sgd_solver.cpp:107] Iteration 0, lr = 0.01
I1231 23:59:12.500000 12345 solver.cpp:243] Iteration 100 (10 iter/s, 10s/100 iters), loss = 0.5
I1231 23:59:12.500000 12345 solver.cpp:259]     Train net output #0: loss = 0.52 (* 1 = 0.52 loss)
I1231 23:59:12.500000 12345 sgd_solver.cpp:107] Iteration 100, lr = 0.00992565
I1231 23:59:22.000000 12345 solver.cpp:449] Iteration 200, Testing net (#0)
I1231 23:59:23.000000 12345 solver.cpp:516]     Test net output #0: accuracy = 0.9
I1231 23:59:23.000000 12345 solver.cpp:516]     Test net output #1: loss = 0.35 (* 1 = 0.35 loss)
I1231 23:59:23.500000 12345 solver.cpp:243] Iteration 200 (10 iter/s, 10s/100 iters), loss = 0.3
I1231 23:59:23.500000 12345 solver.cpp:259]     Train net output #0: loss = 0.28 (* 1 = 0.28 loss)
I1231 23:59:23.500000 12345 sgd_solver.cpp:107] Iteration 200, lr = 0.00985258
I0101 00:00:03.500000 12345 solver.cpp:243] Iteration 300 (10 iter/s, 10s/100 iters), loss = 0.2
I0101 00:00:03.500000 12345 solver.cpp:259]     Train net output #0: loss = 0.19 (* 1 = 0.19 loss)
I0101 00:00:03.500000 12345 sgd_solver.cpp:107] Iteration 300, lr = 0.00978075
I0101 00:00:04.000000 12345 solver.cpp:335] Optimization Done.
"""


@pytest.fixture
def train_log(tmp_path) -> Path:
    path = tmp_path / "lenet.log"
    path.write_text(LOG)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_parse_log_csv(capsys, train_log, tmp_path):
    code, out, err = cli(capsys, "parse-log", train_log, tmp_path / "out")
    assert code == 0, err
    train = read_csv(tmp_path / "out" / "lenet.log.train")
    test = read_csv(tmp_path / "out" / "lenet.log.test")
    assert list(train[0]) == ["NumIters", "Seconds", "LearningRate", "loss"]
    rows = [(r["NumIters"], float(r["Seconds"]), float(r["LearningRate"]), float(r["loss"])) for r in train]
    assert rows == [
        ("0", 1.5, 0.01, 2.31), ("100", 11.5, 0.00992565, 0.52), ("200", 22.5, 0.00985258, 0.28),
        ("300", 62.5, 0.00978075, 0.19)]  # the last row crosses new year: 23:59:01 -> 00:00:03.5
    assert list(test[0]) == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    rows = [(r["NumIters"], float(r["accuracy"]), float(r["loss"]), float(r["LearningRate"])) for r in test]
    assert rows == [
        ("0", 0.1, 2.3, 0.01), ("200", 0.9, 0.35, 0.00985258)]
    # Without OUT_DIR the files go beside the log.
    code, _, _ = cli(capsys, "parse-log", train_log)
    assert code == 0 and (tmp_path / "lenet.log.train").is_file() and (tmp_path / "lenet.log.test").is_file()


def test_parse_log_reads_the_solvers_own_log(tmp_path, capsys):
    """The glog lines our solver writes are what parse-log reads."""
    from minicaffe import log

    (tmp_path / "net.prototxt").write_text("""
        layer { name: "data" type: "DummyData" top: "x" top: "t"
                dummy_data_param { shape { dim: 4 dim: 2 } shape { dim: 4 dim: 1 }
                                   data_filler { type: "gaussian" } data_filler { type: "gaussian" } } }
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
                inner_product_param { num_output: 1 weight_filler { type: "gaussian" } } }
        layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
    """)
    solver_param = parse_text(f"""
        train_net: "{tmp_path / 'net.prototxt'}" test_net: "{tmp_path / 'net.prototxt'}"
        test_iter: 1 test_interval: 5 base_lr: 0.05 lr_policy: "step" stepsize: 5 gamma: 0.5
        max_iter: 10 display: 5 snapshot_after_train: false snapshot_prefix: "{tmp_path / 's'}"
    """, caffe_pb2.SolverParameter())
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as stream:
        log.set_stream(stream)
        try:
            caffe.get_solver(solver_param).solve()
        finally:
            log.set_stream(None)
    from minicaffe.commands.parse_log import parse_log

    train, test = parse_log(log_path)
    assert [row["NumIters"] for row in train] == [0, 5]
    assert [row["LearningRate"] for row in train] == [0.05, 0.025]
    assert all("loss" in row and row["Seconds"] >= 0 for row in train)
    assert [row["NumIters"] for row in test] == [0, 5, 10] and all("loss" in row for row in test)


def test_plot_learning_curves_png(capsys, train_log, tmp_path):
    import matplotlib.pyplot as plt
    code, out, err = cli(capsys, "plot", train_log, "-o", tmp_path / "curves.png")
    assert code == 0, err
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    image = plt.imread(tmp_path / "curves.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 300
    code, _, _ = cli(capsys, "plot", train_log)  # default: LOG.png beside the log
    assert code == 0 and (tmp_path / "lenet.log.png").stat().st_size > 10_000


def test_log_errors(capsys, tmp_path):
    code, _, err = cli(capsys, "plot", tmp_path / "missing.log")
    assert one_line_error(code, err)
    empty = tmp_path / "empty.log"
    empty.write_text("nothing to see\n")
    code, _, err = cli(capsys, "plot", empty, "-o", tmp_path / "x.png")
    assert one_line_error(code, err) and "no 'Train net output'" in err
    code, _, err = cli(capsys, "parse-log", tmp_path / "missing.log")
    assert one_line_error(code, err)


# -- device_query and draw ----------------------------------------------------------------------------

def test_device_query_cpu(capsys):
    code, out, err = cli(capsys, "device_query")
    assert code == 0, err
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["Device"].strip() == "CPU"
    assert int(fields["Cores (logical)"]) >= 1
    assert fields["BLAS (GEMM)"].strip() and fields["Kernel compiler"].strip() != "none"
    assert Path(fields["Kernel cache"].strip()).is_dir()
    code, out2, _ = cli(capsys, "device-query")
    assert code == 0 and out2.splitlines()[0] == out.splitlines()[0]


def test_device_query_gpu_without_cupy(capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    code, _, err = cli(capsys, "device_query", "--gpu", 0)
    assert one_line_error(code, err) and "CuPy" in err


def test_dot_text_of_lenet(lenet):
    net = parse_text(lenet.read_text(), caffe_pb2.NetParameter())
    dot = net_to_dot(net, "TB")
    assert dot.startswith('digraph "LeNet" {') and "rankdir=TB;" in dot and dot.rstrip().endswith("}")
    layer_nodes = re.findall(r'^  "(layer:[^"]+)" \[label=', dot, re.M)
    assert len(layer_nodes) == 9
    blob_nodes = re.findall(r'^  "(blob:[^"]+)" \[label=', dot, re.M)
    # ip1 appears twice: written by ip1 and rewritten in place by relu1.
    assert sorted(blob_nodes) == sorted(["blob:data:0", "blob:conv1:0", "blob:pool1:0", "blob:conv2:0",
                                         "blob:pool2:0", "blob:ip1:0", "blob:ip1:1", "blob:ip2:0",
                                         "blob:prob:0"])
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)";', dot, re.M)
    assert ("blob:ip1:0", "layer:6:relu1") in edges and ("layer:6:relu1", "blob:ip1:1") in edges
    assert ("blob:ip1:1", "layer:7:ip2") in edges
    assert len(edges) == 2 * 8 + 1  # each layer but the input: one bottom + one top; the input: a top
    assert "20 out, kernel 5" in dot and "MAX kernel 2, stride 2" in dot


def test_draw_command(capsys, lenet_prelu, tmp_path):
    code, out, err = cli(capsys, "draw", "--model", lenet_prelu, "-o", tmp_path / "net.dot", "--phase",
                         "TEST")
    assert code == 0, err
    text = (tmp_path / "net.dot").read_text()
    assert "accuracy" in text and text.count('"layer:') >= 10
    code, _, _ = cli(capsys, "draw", "--model", lenet_prelu, "-o", tmp_path / "all.dot")
    assert (tmp_path / "all.dot").read_text().count("(Data)") == 2  # both phases' data layers
    code, _, err = cli(capsys, "draw", "--model", lenet_prelu, "-o", tmp_path / "net.gif")
    assert one_line_error(code, err) and ".svg" in err
    code, _, err = cli(capsys, "draw", "--model", lenet_prelu, "-o", tmp_path / "net.svg")
    if shutil.which("dot"):
        assert code == 0 and (tmp_path / "net.svg").read_text().lstrip().startswith("<?xml")
    else:
        assert one_line_error(code, err) and "Graphviz" in err


# -- benchmarks/kernels.py ----------------------------------------------------------------------------

def test_kernel_benchmark_peer_answers_one_row_at_a_time():
    """PyTorch's side of kernels.py runs in its own process and measures a row when asked, so that each
    row's two sides are measured one right after the other."""
    import importlib.util

    pytest.importorskip("torch", reason="PyTorch is an optional benchmark peer")
    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    peer = bench.TorchPeer(quick=True)
    try:
        assert {"ReLU", "Convolution 3x3"} <= peer.rows and "Scale" not in peer.rows
        forward, backward = peer.row("Convolution 3x3")
        assert 0 < forward < 10_000 and 0 < backward < 10_000
    finally:
        peer.close()
    assert peer.process.returncode == 0
    rows = [{"fwd_ms": 2.0, "fwd_gbs": 1.0, "bwd_ms": 3.0, "bwd_gbs": 1.0},
            {"fwd_ms": 1.0, "fwd_gbs": 2.0, "bwd_ms": 4.0, "bwd_gbs": 0.5}]
    assert bench.lowest_of(rows) == {"fwd_ms": 1.0, "fwd_gbs": 2.0, "bwd_ms": 3.0, "bwd_gbs": 1.0}


def test_kernel_benchmark_quick_updates_its_section(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\nSomeone else's section.\n")
    assert bench.main(["--device", "cpu", "--quick", "--output", str(target)]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "PReLU" in out
    first = target.read_text()
    assert "Someone else's section." in first and first.count(bench.BEGIN) == 1
    rows = [line for line in first.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [case[0] for case in bench.CASES]
    assert "`python benchmarks/kernels.py --device cpu --quick`" in first
    assert re.search(r"the Exp row, one exp per element and nothing else, runs at \d+% of copy", first)
    bench.main(["--device", "cpu", "--quick", "--output", str(target)])  # replaces, never appends
    assert target.read_text().count(bench.BEGIN) == 1 and "Someone else's section." in target.read_text()
