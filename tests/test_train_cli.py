"""`minicaffe train` / `minicaffe test` / the quickstart, end to end on the embedded digits example."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_loss_fell

from minicaffe import cli, example, io
from minicaffe.proto import caffe_pb2

GLOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [a-z_]+\.cpp:\d+\] ")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The quickstart's LMDBs and its net with resolved data paths (digits_train_test.prototxt)."""
    folder = tmp_path_factory.mktemp("quickstart")
    example.quickstart_solver(folder)
    return folder


def write_solver(folder: Path, work: Path, name: str = "solver", **fields) -> Path:
    """A short version of the quickstart solver, with the net file of `work`."""
    param = io.read_solver_param(example.data_dir() / example.SOLVER_FILE)
    param.net = str(work / "digits_train_test.prototxt")
    values = dict(max_iter=40, snapshot=20, display=10, test_interval=20, snapshot_prefix=str(folder / name))
    values.update(fields)
    for key, value in values.items():
        setattr(param, key, value)
    if not param.test_interval:
        param.ClearField("test_iter")
    path = folder / f"{name}.prototxt"
    io.write_text(path, param)
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def minicaffe_process(args: list[str], **kwargs):
    return subprocess.run([sys.executable, "-m", "minicaffe.cli", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_quickstart_trains_and_reports_accuracy(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(example, "default_work_dir", lambda: tmp_path / "qs")
    code, out, err = run_cli(["train", "--solver", "quickstart"], capsys)
    assert code == 0, err
    accuracy = float(re.search(r"Final test accuracy: ([\d.]+)% on 297 test images after 600 iterations",
                               out).group(1))
    assert accuracy > 90
    assert (tmp_path / "qs" / "digits_iter_600.caffemodel").is_file()
    assert (tmp_path / "qs" / "digits_iter_600.solverstate").is_file()
    lines = err.splitlines()
    assert all(GLOG.match(line) for line in lines), [line for line in lines if not GLOG.match(line)][:3]
    assert "\r" not in err and "ETA" not in err  # no progress display when stderr is not a terminal
    last_test = re.findall(r"Test net output #0: accuracy = ([\d.]+)", err)[-1]
    assert float(last_test) * 100 == pytest.approx(accuracy, abs=0.051)
    assert lines[-1].endswith("] Optimization Done.")
    (tmp_path / "train.log").write_text(err)
    assert_loss_fell(tmp_path / "train.log")

    # `minicaffe test` on the trained model gives the same accuracy on the same 297 images.
    model = tmp_path / "qs" / "digits_iter_600.caffemodel"
    code, _, err = run_cli(["test", "--model", str(tmp_path / "qs" / "digits_train_test.prototxt"),
                            "--weights", str(model), "--iterations", "3"], capsys)
    assert code == 0, err
    assert re.search(r"\] Batch 0, accuracy = [\d.]+$", err, re.M)
    assert re.search(r"\] Loss: [\d.e+-]+$", err, re.M)
    assert re.search(r"\] loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)$", err, re.M)
    final = re.search(r"\] accuracy = ([\d.]+)$", err, re.M).group(1)
    assert final == last_test


def test_quickstart_verb(tmp_path, capsys):
    code, out, err = run_cli(["quickstart", "--work-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert "Final test accuracy: " in out
    assert (tmp_path / "digits_train_test.prototxt").is_file()
    (tmp_path / "train.log").write_text(err)
    assert_loss_fell(tmp_path / "train.log")


def test_train_logs_snapshots_and_flag_spellings(work, tmp_path, capsys):
    solver = write_solver(tmp_path, work)
    code, out, err = run_cli(["train", f"--solver={solver}"], capsys)
    assert code == 0, err
    assert re.search(r"\] Use CPU\.$", err, re.M)
    assert re.search(r"\] Iteration 10 \([\d.e+-]+ iter/s, [\d.e+-]+s/10 iters\), loss = [\d.e+-]+$",
                     err, re.M)
    assert re.search(r"\]     Train net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)$", err, re.M)
    assert re.search(r"\] Iteration 10, lr = [\d.e+-]+$", err, re.M)
    assert re.findall(r"\] Iteration (\d+), Testing net \(#0\)$", err, re.M) == ["0", "20", "40"]
    assert re.search(r"\]     Test net output #0: accuracy = [\d.]+$", err, re.M)
    assert f"] Snapshotting to binary proto file {tmp_path / 'solver'}_iter_20.caffemodel" in err
    state = tmp_path / "solver_iter_40.solverstate"
    assert f"] Snapshotting solver state to binary proto file {state}" in err
    assert sorted(p.name for p in tmp_path.glob("solver_iter_*")) == [
        "solver_iter_20.caffemodel", "solver_iter_20.solverstate",
        "solver_iter_40.caffemodel", "solver_iter_40.solverstate"]
    assert err.rstrip().endswith("] Optimization Done.")
    # Caffe's single-dash flags.
    other = write_solver(tmp_path, work, "caffe_style", max_iter=2, snapshot=0, display=1, test_interval=0)
    code, _, err = run_cli(["train", "-solver", str(other)], capsys)
    assert code == 0, err
    assert (tmp_path / "caffe_style_iter_2.caffemodel").is_file()


def test_resume_in_a_fresh_process_matches_a_straight_run(work, tmp_path):
    straight = write_solver(tmp_path, work, "straight", max_iter=30, snapshot=15, display=0)
    result = minicaffe_process(["train", "--solver", str(straight)])
    assert result.returncode == 0, result.stderr
    resumed = write_solver(tmp_path, work, "resumed", max_iter=30, snapshot=15, display=0)
    result = minicaffe_process(["train", "--solver", str(resumed),
                                "--snapshot", str(tmp_path / "straight_iter_15.solverstate")])
    assert result.returncode == 0, result.stderr
    assert "] Resuming from " in result.stderr
    assert re.findall(r"Iteration (\d+), Testing net", result.stderr) == ["20"]
    assert (tmp_path / "resumed_iter_30.caffemodel").read_bytes() == \
        (tmp_path / "straight_iter_30.caffemodel").read_bytes()
    assert not (tmp_path / "resumed_iter_15.caffemodel").exists()


def test_weights_start_a_finetuning_run(work, tmp_path, capsys):
    first = write_solver(tmp_path, work, "first", max_iter=5, snapshot=0)
    assert run_cli(["train", "--solver", str(first)], capsys)[0] == 0
    weights = tmp_path / "first_iter_5.caffemodel"
    # max_iter 0: the snapshot written at the end holds the starting weights.
    zero = write_solver(tmp_path, work, "zero", max_iter=0, snapshot=0, test_interval=0)
    code, _, err = run_cli(["train", "--solver", str(zero), "--weights", str(weights)], capsys)
    assert code == 0, err
    start = io.read_binary(tmp_path / "zero_iter_0.caffemodel", caffe_pb2.NetParameter())
    trained = io.read_binary(weights, caffe_pb2.NetParameter())
    blobs = lambda net: {(layer.name, i): list(b.data) for layer in net.layer  # noqa: E731
                         for i, b in enumerate(layer.blobs)}
    assert blobs(start) == blobs(trained) and blobs(start)


def test_sigint_snapshots_and_stops(work, tmp_path):
    solver = write_solver(tmp_path, work, "long", max_iter=100000, snapshot=0, display=5, test_interval=0)
    process = subprocess.Popen([sys.executable, "-m", "minicaffe.cli", "train", "--solver", str(solver)],
                               stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if "Iteration 10 (" in line:
                process.send_signal(signal.SIGINT)
                break
        _, rest = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    text = "".join(lines) + rest
    assert process.returncode == 0, text
    assert "Optimization stopped early." in text
    snapshots = list(tmp_path.glob("long_iter_*.caffemodel"))
    assert len(snapshots) == 1, text
    iteration = int(re.search(r"_iter_(\d+)\.caffemodel", snapshots[0].name).group(1))
    assert 10 < iteration < 100000
    assert (tmp_path / f"long_iter_{iteration}.solverstate").is_file()


def test_solver_mode_gpu_without_a_gpu_falls_back_to_cpu(work, tmp_path, capsys):
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present")
    except Exception:
        pass
    solver = write_solver(tmp_path, work, "gpu", max_iter=2, snapshot=0, test_interval=0,
                          solver_mode=caffe_pb2.SolverParameter.GPU)
    code, _, err = run_cli(["train", "--solver", str(solver)], capsys)
    assert code == 0, err
    assert re.search(r"^W.*\] solver_mode is GPU but .*; training on the CPU$", err, re.M)
    # An explicit --gpu that cannot be honoured is an error.
    code, _, err = run_cli(["train", "--solver", str(solver), "--gpu", "0"], capsys)
    assert code == 1
    assert err.startswith("minicaffe train: error: GPU mode")


@pytest.mark.parametrize("args, message", [
    (["train", "--solver", "no_such_solver.prototxt"], "solver file 'no_such_solver.prototxt' not found"),
    (["train", "--solver", "{bad}"], "bad.prototxt:2:"),
    (["train", "--solver", "{solver}", "--snapshot", "a.solverstate", "--weights", "b.caffemodel"],
     "not both"),
    (["train", "--solver", "{solver}", "--snapshot", "{tmp}/missing.solverstate"], "cannot read"),
    (["train", "--solver", "{unknown_type}"], "unknown solver type 'Sgd'"),
    (["test", "--model", "{tmp}/missing.prototxt", "--weights", "w.caffemodel"], "not found"),
    (["test", "--model", "{net}", "--weights", "{solver}"], "not a binary NetParameter"),
    (["test", "--model", "{net}", "--weights", "x", "--iterations", "0"], "--iterations must be >= 1"),
])
def test_bad_input_gives_a_one_line_error(args, message, work, tmp_path, capsys):
    (tmp_path / "bad.prototxt").write_text('base_lr: 0.1\nlr_policy: "fixed" nonsense_field: 3\n')
    files = {"bad": tmp_path / "bad.prototxt", "tmp": tmp_path, "net": work / "digits_train_test.prototxt",
             "solver": write_solver(tmp_path, work, max_iter=1),
             "unknown_type": write_solver(tmp_path, work, "unknown", type="Sgd")}
    code, out, err = run_cli([a.format(**files) for a in args], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"minicaffe {args[0]}: error: ")
    assert message in lines[-1]
    assert all(GLOG.match(line) for line in lines[:-1])  # only log lines before the error line


NET_BESIDE = """
name: "beside"
layer { name: "data" type: "DummyData" top: "x" top: "t"
        dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 1 }
                           data_filler { type: "gaussian" } data_filler { type: "gaussian" } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        inner_product_param { num_output: 1 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
"""


def test_solver_from_another_folder_finds_its_net(tmp_path, monkeypatch, capsys):
    """A solver whose net path is relative to the repository root (as models/*/solver.prototxt), used from
    another folder: the net is found beside the solver by its file name."""
    folder = tmp_path / "repo" / "models" / "beside"
    folder.mkdir(parents=True)
    (folder / "net.prototxt").write_text(NET_BESIDE)
    (folder / "solver.prototxt").write_text(f"""
        net: "models/beside/net.prototxt"
        base_lr: 0.01 lr_policy: "fixed" max_iter: 2 display: 1
        snapshot_prefix: "{tmp_path / 'out' / 'beside'}"
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(["train", "--solver", str(folder / "solver.prototxt")], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "beside_iter_2.caffemodel").is_file()
    # From the repository root the path works as written (Caffe's rule), and from inside the folder too.
    for cwd in (tmp_path / "repo", folder):
        monkeypatch.chdir(cwd)
        code, _, err = run_cli(["train", "--solver", str(folder / "solver.prototxt")], capsys)
        assert code == 0, err
    # A net that is nowhere: the error lists where it was looked for.
    (folder / "net.prototxt").unlink()
    code, _, err = run_cli(["train", "--solver", str(folder / "solver.prototxt")], capsys)
    assert code == 1
    assert "net file 'models/beside/net.prototxt' not found" in err and str(folder / "net.prototxt") in err


def test_shipped_lenet_prelu_solver_from_another_folder(tmp_path, monkeypatch, capsys):
    """models/lenet_prelu/solver.prototxt from elsewhere: the net is found; what is missing there is the
    MNIST database (relative to the current folder, as in Caffe)."""
    solver = Path(__file__).resolve().parents[1] / "models" / "lenet_prelu" / "solver.prototxt"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", "--solver", str(solver)], capsys)
    assert code == 1
    assert "not found" not in err and "examples/mnist/mnist_train_lmdb" in err
    assert "Creating training net from net models/lenet_prelu/train_test.prototxt" in err


def test_gpu_values_and_quiet_device_selection(capsys):
    from minicaffe.commands import common

    assert common.parse_gpu(None) is None
    assert common.parse_gpu("0") == [0] and common.parse_gpu("1,0") == [1, 0] and common.parse_gpu(2) == [2]
    for bad in ("x", "", "-1", "0,a"):
        with pytest.raises(ValueError, match="--gpu: give a GPU id"):
            common.parse_gpu(bad)
    assert common.use_device(None) is None
    assert "] Use CPU." in capsys.readouterr().err
    assert common.use_device(None, quiet=True) is None
    assert capsys.readouterr().err == ""
    # The same flag everywhere: a bad value is the same one-line error, before any work is done.
    for command in (["train", "--solver", "quickstart"], ["time", "--model", "m"], ["quickstart"],
                    ["device_query"]):
        code, _, err = run_cli([*command, "--gpu", "x"], capsys)
        assert code == 1 and err.strip().splitlines()[-1] == \
            f"minicaffe {command[0]}: error: --gpu: give a GPU id (0), a list (0,1) or 'all', got 'x'"


def test_test_command_scores_as_the_solver(tmp_path, capsys):
    """`minicaffe test` logs the solver's test scores: the loss weight of a loss blob that a later
    in-place layer rewrites is kept (that layer has no loss weight of its own)."""
    import minicaffe as caffe

    net_file = tmp_path / "net.prototxt"
    net_file.write_text(NET_BESIDE + """
layer { name: "same" type: "Power" bottom: "loss" top: "loss" power_param { power: 1 } }
""")
    net = caffe.Net(str(net_file), caffe.TEST)
    net.save(str(tmp_path / "w.caffemodel"))
    code, _, err = run_cli(["test", "--model", str(net_file), "--weights", str(tmp_path / "w.caffemodel"),
                            "--iterations", "2"], capsys)
    assert code == 0, err
    batches = [float(v) for v in re.findall(r"\] Batch \d, loss = ([\d.e+-]+)$", err, re.M)]
    mean = re.search(r"\] loss = ([\d.e+-]+) \(\* 1 = ([\d.e+-]+) loss\)$", err, re.M)
    assert len(batches) == 2 and mean, err
    assert float(mean.group(1)) == pytest.approx(sum(batches) / 2, rel=1e-5)


@pytest.mark.parametrize("losses, message", [
    ([2.3, 1.1, 0.2], None),
    ([87.3365, 87.3365, 87.3365], "train loss did not fall"),  # -log(FLT_MIN): every prediction wrong
    ([2.3, float("nan"), float("nan")], "train losses"),
])
def test_assert_loss_fell_reads_the_log(losses, message, tmp_path):
    stamp = "I1130 13:18:04.802437 19779 solver.cpp:259]"
    lines = []
    for i, loss in enumerate(losses):
        lines += [f"{stamp} Iteration {100 * i}, Testing net (#0)",
                  f"{stamp}     Test net output #0: loss = {2.3 / (i + 1)} (* 1 = {2.3 / (i + 1)} loss)",
                  f"{stamp} Iteration {100 * i} (1 iter/s, 1s/100 iters), loss = {loss}",
                  f"{stamp}     Train net output #0: loss = {loss} (* 1 = {loss} loss)"]
    (tmp_path / "train.log").write_text("\n".join(lines) + "\n")
    if message is None:
        assert_loss_fell(tmp_path / "train.log")
    else:
        with pytest.raises(AssertionError, match=message):
            assert_loss_fell(tmp_path / "train.log")
