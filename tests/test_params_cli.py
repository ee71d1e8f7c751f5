"""`minicaffe params` / `plot-params` and the slope trace (ParamWatcher, --watch)."""

from __future__ import annotations

import csv
import io as _io
import json

import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import inspect, watch
from minicaffe.cli import main
from minicaffe.proto import caffe_pb2


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def slopes_from_protobuf(path) -> dict[str, list[float]]:
    """PReLU slopes read straight from the .caffemodel with protobuf, independently of minicaffe."""
    model = caffe_pb2.NetParameter()
    with open(path, "rb") as f:
        model.ParseFromString(f.read())
    return {layer.name: list(layer.blobs[0].data) for layer in model.layer if layer.type == "PReLU"}


def test_mtcnn_det1_prelu_slopes_json(capsys, mtcnn_dir):
    weights = mtcnn_dir / "det1.caffemodel"
    code, out, err = cli(capsys, "params", "--model", str(mtcnn_dir / "det1.prototxt"), "--weights",
                         str(weights), "--type", "PReLU", "--format", "json", "--values")
    assert code == 0, err
    result = json.loads(out)
    assert list(result) == ["PReLU1", "PReLU2", "PReLU3"]
    expected = slopes_from_protobuf(weights)
    for name, count in (("PReLU1", 10), ("PReLU2", 16), ("PReLU3", 32)):
        (entry,) = result[name]
        assert entry["type"] == "PReLU" and entry["blob"] == 0
        assert entry["shape"] == [count] and entry["count"] == count
        assert entry["values"] == expected[name]  # exactly: float32 -> double is exact
        values = np.asarray(expected[name], dtype=np.float64)
        assert entry["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert entry["std"] == pytest.approx(values.std(), rel=1e-12)
        assert (entry["min"], entry["max"]) == (values.min(), values.max())


def test_weights_alone_reads_the_caffemodel(capsys, mtcnn_dir):
    weights = str(mtcnn_dir / "det1.caffemodel")
    code, out, _ = cli(capsys, "params", "--weights", weights, "--layer", "prelu*", "--format", "json",
                       "--values")
    assert code == 0
    result = json.loads(out)
    assert {name: entries[0]["values"] for name, entries in result.items()} == slopes_from_protobuf(weights)
    assert [entries[0]["type"] for entries in result.values()] == ["PReLU"] * 3


def test_table_and_csv(capsys, mtcnn_dir):
    model, weights = str(mtcnn_dir / "det1.prototxt"), str(mtcnn_dir / "det1.caffemodel")
    code, out, _ = cli(capsys, "params", "--model", model, "--weights", weights, "--type", "prelu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "type", "blob", "shape", "count", "mean", "std", "min", "max"]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1], r[3], r[4]) for r in rows] == [
        ("PReLU1", "PReLU", "10", "10"), ("PReLU2", "PReLU", "16", "16"), ("PReLU3", "PReLU", "32", "32")]

    code, out, _ = cli(capsys, "params", "--model", model, "--weights", weights, "--layer", "conv*",
                       "--format", "csv")
    rows = list(csv.DictReader(_io.StringIO(out)))
    assert [(r["layer"], r["blob"], r["shape"]) for r in rows][:2] == [("conv1", "0", "10x3x3x3"),
                                                                        ("conv1", "1", "10")]
    assert len(rows) == 10  # conv1, conv2, conv3, conv4-1, conv4-2: weights and bias each


def test_values_in_table(capsys, mtcnn_dir):
    code, out, _ = cli(capsys, "params", "--weights", str(mtcnn_dir / "det1.caffemodel"), "--layer",
                       "PReLU1", "--values")
    assert code == 0
    values = [line for line in out.splitlines() if line.strip().startswith("values:")]
    assert len(values) == 1 and len(values[0].split()) == 11


def test_weights_may_be_a_solverstate(solver_file, tmp_path, capsys):
    """A .solverstate holds no weights: params reads the .caffemodel it names (its learned_net)."""
    caffe.get_solver(str(solver_file)).solve()
    state = tmp_path / "snaps" / "watched_iter_12.solverstate"
    model = tmp_path / "snaps" / "watched_iter_12.caffemodel"
    code, from_state, err = cli(capsys, "params", "--weights", str(state), "--format", "json", "--values")
    assert code == 0, err
    code, from_model, _ = cli(capsys, "params", "--weights", str(model), "--format", "json", "--values")
    assert json.loads(from_state) == json.loads(from_model) and "prelu1" in json.loads(from_state)
    code, with_net, err = cli(capsys, "params", "--model", str(tmp_path / "train.prototxt"), "--weights",
                              str(state), "--layer", "prelu1", "--format", "json", "--values")
    assert code == 0, err
    assert json.loads(with_net)["prelu1"] == json.loads(from_model)["prelu1"]
    # The snapshot moved elsewhere together with its model: found beside it.
    moved = tmp_path / "moved"
    moved.mkdir()
    state.rename(moved / state.name)
    model.rename(moved / model.name)
    code, out, err = cli(capsys, "params", "--weights", str(moved / state.name), "--format", "json")
    assert code == 0, err
    assert "prelu1" in json.loads(out)
    # Without its model: a one-line error saying what is needed.
    (moved / model.name).unlink()
    code, _, err = cli(capsys, "params", "--weights", str(moved / state.name))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "watched_iter_12.caffemodel" in err and "give that .caffemodel" in err
    empty = tmp_path / "empty.solverstate"
    empty.write_bytes(caffe_pb2.SolverState(iter=3).SerializeToString())
    code, _, err = cli(capsys, "params", "--weights", str(empty))
    assert code == 1 and "names no learned_net" in err


def test_errors_are_one_line(capsys, tmp_path):
    for argv, needle in [
        (["params"], "give --model"),
        (["params", "--weights", str(tmp_path / "missing.caffemodel")], "cannot read"),
    ]:
        code, out, err = cli(capsys, *argv)
        assert code == 1
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\xff\xfe not a protobuf")
    code, _, err = cli(capsys, "params", "--weights", str(bad))
    assert code == 1 and len(err.strip().splitlines()) == 1


def test_no_match_names_the_layers(capsys, mtcnn_dir):
    code, _, err = cli(capsys, "params", "--weights", str(mtcnn_dir / "det1.caffemodel"), "--type", "ReLU")
    assert code == 1 and "PReLU1 (PReLU)" in err and len(err.strip().splitlines()) == 1


def test_plot_params_png(capsys, mtcnn_dir, tmp_path):
    import matplotlib.pyplot as plt
    out_png = tmp_path / "slopes.png"
    code, out, err = cli(capsys, "plot-params", "--weights", str(mtcnn_dir / "det2.caffemodel"), "-o",
                         str(out_png))
    assert code == 0, err
    assert out_png.stat().st_size > 10_000
    image = plt.imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert "4 layers" in out  # det2 (RNet) has four PReLU layers


def test_plot_params_title_clear_of_the_panels(mtcnn_dir):
    """The figure title (the file's path) lies inside the figure, above the panels and their titles,
    for one panel or several and for a long path."""
    pytest.importorskip("matplotlib")
    from minicaffe.commands.plot_params import draw, pyplot

    chosen = inspect.select(inspect.caffemodel_params(mtcnn_dir / "det2.caffemodel"), layer_type="PReLU")
    long_path = "/a/long/folder" * 10 + "/det2.caffemodel"
    for count, title in ((4, str(mtcnn_dir / "det2.caffemodel")), (1, long_path)):
        figure = draw(chosen[:count], 0, title)
        try:
            figure.canvas.draw()
            renderer = figure.canvas.get_renderer()
            assert figure.get_suptitle().replace("\n", "") == title
            box = figure._suptitle.get_window_extent(renderer)
            assert box.width > 0 and box.x0 >= 0 and box.x1 <= figure.bbox.x1 and box.y1 <= figure.bbox.y1
            for axis in figure.axes[:3]:  # the first row: each panel with its title and labels
                panel = axis.get_tightbbox(renderer)
                assert not box.overlaps(panel), (title, box, panel)
        finally:
            pyplot().close(figure)


# -- snapshots and the slope trace -----------------------------------------------------------------

TRAIN_NET = """
name: "watched"
layer { name: "data" type: "DummyData" top: "data" top: "target"
        dummy_data_param { shape { dim: 8 dim: 4 } shape { dim: 8 dim: 3 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prelu1" type: "PReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "prelu2" type: "PReLU" bottom: "ip2" top: "ip2" prelu_param { channel_shared: true } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "target" top: "loss" }
"""


@pytest.fixture
def solver_file(tmp_path):
    (tmp_path / "train.prototxt").write_text(TRAIN_NET)
    path = tmp_path / "solver.prototxt"
    path.write_text(f"""
        net: "{tmp_path / 'train.prototxt'}"
        base_lr: 0.2 lr_policy: "fixed" momentum: 0.9
        max_iter: 12 display: 4 snapshot: 12 snapshot_prefix: "{tmp_path / 'snaps' / 'watched'}"
        solver_mode: CPU random_seed: 7
    """)
    return path


def test_param_watcher_line_and_csv(tmp_path):
    net = caffe.Net(_text_net(TRAIN_NET), caffe.TRAIN)
    net.params["prelu1"][0].data[...] = [0.1, 0.2, 0.6]
    watcher = watch.ParamWatcher(net, "PRELU*", tmp_path / "w.csv")
    line = watcher.record(3)
    assert line == ("alpha values at iteration 3: prelu1 mean 0.3 [0.1 .. 0.6], "
                    "prelu2 mean 0.25 [0.25 .. 0.25]")
    watcher.record(4)
    rows = watch.read_watch_csv(tmp_path / "w.csv")
    assert [(r["iteration"], r["layer"], r["blob"]) for r in rows] == [
        (3, "prelu1", 0), (3, "prelu2", 0), (4, "prelu1", 0), (4, "prelu2", 0)]
    assert rows[0]["mean"] == pytest.approx(0.3) and rows[0]["max"] == pytest.approx(0.6)
    # Several blobs per layer are told apart; the type matches too.
    ip = watch.ParamWatcher(net, "InnerProduct")
    assert "ip1[0] mean" in ip.record(0) and "ip2[1] mean" in ip.record(0)
    with pytest.raises(ValueError, match="matches no layer.*prelu1 \\(PReLU\\)"):
        watch.ParamWatcher(net, "conv*")


def _text_net(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, caffe_pb2.NetParameter())


def test_watch_during_training_writes_changing_csv(solver_file, tmp_path, capsys):
    solver = caffe.get_solver(str(solver_file))
    watch.watch_solver(solver, "prelu*")
    solver.solve()
    csv_path = tmp_path / "snaps" / "watched_watch.csv"
    rows = watch.read_watch_csv(csv_path)
    assert sorted({r["iteration"] for r in rows}) == [0, 4, 8]
    first = {r["layer"]: r for r in rows if r["iteration"] == 0}
    last = {r["layer"]: r for r in rows if r["iteration"] == 8}
    assert first["prelu1"]["mean"] == pytest.approx(0.25)  # Caffe's default PReLU filler
    assert last["prelu1"]["mean"] != pytest.approx(0.25, abs=1e-4)
    assert last["prelu2"]["mean"] != pytest.approx(first["prelu2"]["mean"], abs=1e-4)
    err = capsys.readouterr().err
    assert "alpha values at iteration 4: prelu1 mean" in err

    # ... and the snapshot it wrote is readable by `minicaffe params`, with and without the model.
    snapshot = tmp_path / "snaps" / "watched_iter_12.caffemodel"
    code, out, _ = cli(capsys, "params", "--weights", str(snapshot), "--type", "PReLU", "--format", "json",
                       "--values")
    assert code == 0
    stored = json.loads(out)
    np.testing.assert_array_equal(stored["prelu1"][0]["values"], solver.net.params["prelu1"][0].data)
    code, out, _ = cli(capsys, "params", "--model", str(tmp_path / "train.prototxt"), "--weights",
                       str(snapshot), "--layer", "prelu2", "--format", "json")
    (entry,) = json.loads(out)["prelu2"]
    assert code == 0 and entry["shape"] == [] and entry["count"] == 1  # channel_shared: Caffe's 0-axis blob


def test_train_command_watch_flag(solver_file, tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--solver", str(solver_file), "--watch", "prelu*")
    assert code == 0, err
    rows = watch.read_watch_csv(tmp_path / "snaps" / "watched_watch.csv")
    means = [r["mean"] for r in rows if r["layer"] == "prelu1"]
    # The display steps 0, 4, 8, and the final weights at iteration 12 (those of the last snapshot).
    assert len(means) == 4 and len(set(means)) == 4
    assert [r["iteration"] for r in rows if r["layer"] == "prelu1"] == [0, 4, 8, 12]
    assert "alpha values at iteration 8" in err and "alpha values at iteration 12" in err
    final = {r["layer"]: r for r in rows if r["iteration"] == 12}
    model = tmp_path / "snaps" / "watched_iter_12.caffemodel"
    code, out, _ = cli(capsys, "params", "--weights", str(model), "--type", "PReLU", "--format", "json")
    snapshot = json.loads(out)
    assert final["prelu1"]["mean"] == snapshot["prelu1"][0]["mean"]


def test_train_watch_without_a_match_is_a_one_line_error(solver_file, capsys):
    code, _, err = cli(capsys, "train", "--solver", str(solver_file), "--watch", "conv*")
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == 1 and len(lines) == 1 and "matches no layer" in lines[0] and "Traceback" not in err
