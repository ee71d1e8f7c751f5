"""Training guards (issue #9, item 5): NaN shows and stops training, bad solver fields and untrainable nets
are refused at start-up, with a one-line error in the CLI.

The NaN runs train a tiny softmax classifier on an 8-sample LMDB (batch 4): batch 0 is clean and batch 1
holds one NaN, so iteration 0 updates and snapshots, and iteration 1 meets the NaN.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_layer

import minicaffe
from minicaffe import cli
from minicaffe.db import write_datum_lmdb
from minicaffe.io import parse_text, write_text
from minicaffe.proto import caffe_pb2
from minicaffe.solver import NonFiniteLossError, Solver, SolverError, learning_rate

NET = """
name: "guards"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  data_param {{ source: "{source}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""

SOLVER = """net: "{net}" base_lr: 0.1 lr_policy: "fixed" max_iter: 4 display: 1 snapshot: 1
snapshot_prefix: "{prefix}" solver_mode: CPU
"""

# No files: DummyData features and constant labels, for the start-up checks.
DUMMY_NET = """
name: "dummy"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 5 } shape { dim: 4 }
                     data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


pytestmark = pytest.mark.usefixtures("log_text")  # log lines captured (conftest)


def with_fields(text: str, extra: str) -> caffe_pb2.SolverParameter:
    """The solver `text` with the fields of `extra` set over it."""
    param = parse_text(text, caffe_pb2.SolverParameter())
    param.MergeFrom(parse_text(extra, caffe_pb2.SolverParameter()))
    return param


def write_run(folder: Path, nan_row: int | None = 5, extra: str = "") -> Path:
    """An LMDB of 8 (2, 2, 2) samples (a NaN at `nan_row`), its net and a solver; returns the solver path."""
    samples = np.random.default_rng(0).normal(size=(8, 2, 2, 2)).astype(np.float32)
    if nan_row is not None:
        samples[nan_row, 1, 0, 1] = np.nan
    write_datum_lmdb(folder / "lmdb", list(samples), [i % 3 for i in range(8)])
    (folder / "net.prototxt").write_text(NET.format(source=folder / "lmdb"))
    param = with_fields(SOLVER.format(net=folder / "net.prototxt", prefix=folder / "run"), extra)
    write_text(folder / "solver.prototxt", param)
    return folder / "solver.prototxt"


def solver_param(extra: str, net: str = DUMMY_NET) -> caffe_pb2.SolverParameter:
    param = with_fields('base_lr: 0.01 lr_policy: "fixed" max_iter: 10', extra)
    if net:
        param.net_param.CopyFrom(parse_text(net, caffe_pb2.NetParameter()))
    param.snapshot_after_train = False
    return param


def assert_snapshot_is_good(prefix: Path, iteration: int) -> None:
    """The snapshot of `iteration` loads, holds finite weights, and resumes."""
    model = prefix.parent / f"{prefix.name}_iter_{iteration}.caffemodel"
    net = minicaffe.Net(str(prefix.parent / "net.prototxt"), minicaffe.TEST, weights=str(model))
    assert all(np.isfinite(blob.data).all() for blobs in net.params.values() for blob in blobs)
    solver = Solver(prefix.parent / "solver.prototxt")
    solver.restore(prefix.parent / f"{prefix.name}_iter_{iteration}.solverstate")
    assert solver.iter == iteration


# -- NaN in the data -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_loss_propagates_nan(dtype):
    # The clamp max(p, FLT_MIN) turned a NaN probability into FLT_MIN, a loss of 87.3365.
    scores = np.array([[0.5, np.nan, 1.0], [0.1, 0.2, 0.3]])
    _, _, top = run_layer('type: "SoftmaxWithLoss"', scores, [0, 2], dtype=dtype)
    assert np.isnan(top[0].data)
    # A finite probability that underflows is still clamped as in Caffe: -ln(FLT_MIN).
    _, _, top = run_layer('type: "SoftmaxWithLoss"', [[0.0, 1e5]], [0], dtype=dtype)
    assert float(top[0].data) == pytest.approx(87.3365, abs=1e-4)


def test_nan_in_the_data_stops_training_and_keeps_the_snapshots(tmp_path, log_text):
    solver = Solver(write_run(tmp_path))
    assert solver.allow_nan is False
    with pytest.raises(NonFiniteLossError) as caught:
        solver.solve()
    message = str(caught.value)
    assert isinstance(caught.value, SolverError) and "\n" not in message
    assert re.search(r"iteration 1: loss = nan is not finite; the first NaN or inf \(in forward order\) is "
                     r"in blob 'data' \(top of layer 'data', Data\)", message), message
    assert message.startswith(str(tmp_path / "solver.prototxt"))
    text = log_text.getvalue()
    assert re.search(r"\] Iteration 1 \(.*\), loss = nan$", text, re.M)
    assert re.search(r"Train net output #0: loss = nan", text)
    assert "87.3365" not in text
    # Iteration 0's snapshot is kept and good; nothing was written after the NaN.
    assert sorted(p.name for p in tmp_path.glob("run_iter_*")) == ["run_iter_1.caffemodel",
                                                                   "run_iter_1.solverstate"]
    assert_snapshot_is_good(tmp_path / "run", 1)


def test_allow_nan_keeps_training_as_caffe(tmp_path, log_text):
    solver = Solver(write_run(tmp_path))
    solver.allow_nan = True
    solver.solve()
    assert solver.iter == 4
    warnings = [line for line in log_text.getvalue().splitlines() if line.startswith("W")]
    assert len(warnings) == 1 and "Iteration 1, loss = nan is not finite" in warnings[0]
    assert not np.isfinite(solver.net.params["ip"][0].data).all()
    assert (tmp_path / "run_iter_4.caffemodel").is_file()


def test_nan_in_the_weights_is_named_first(tmp_path):
    solver = Solver(write_run(tmp_path, nan_row=None))
    solver.step(2)
    solver.net.params["ip"][1].data[1] = np.inf  # the bias: every output row, then the loss
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: loss = nan is not finite; .* is in "
                                                 r"parameter 1 of layer 'ip' \(InnerProduct\)"):
        solver.step(1)


def test_weights_made_non_finite_by_an_update_are_not_snapshotted(tmp_path):
    solver = Solver(write_run(tmp_path, nan_row=None))
    poisoned = []

    def overflow_gradient():  # as a gradient that overflowed while the loss was still finite
        if solver.iter == 2:
            solver.net.params["ip"][0].diff[0, 0] = -np.inf
            poisoned.append(solver.iter)

    solver.add_callback(on_gradients=overflow_gradient)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: parameter 0 of layer 'ip' is not finite "
                                                 r"\(NaN or inf\) after the update, so it is not snapshot"):
        solver.solve()
    assert poisoned == [2]
    assert not (tmp_path / "run_iter_3.caffemodel").exists()
    assert_snapshot_is_good(tmp_path / "run", 2)


def test_cli_nan_is_a_one_line_error_and_allow_nan_trains(tmp_path, capsys, log_text):
    solver = write_run(tmp_path)
    assert cli.main(["train", "--solver", str(solver)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"minicaffe train: error: {solver}: iteration 1: loss = nan is not finite")
    assert "blob 'data'" in last and "--allow-nan" in last
    assert re.search(r"\] Iteration 1 \(.*\), loss = nan$", log_text.getvalue(), re.M)
    assert not (tmp_path / "run_iter_2.caffemodel").exists()
    assert_snapshot_is_good(tmp_path / "run", 1)

    log_text.truncate(0)
    assert cli.main(["train", "--solver", str(solver), "--allow-nan"]) == 0
    text = log_text.getvalue()
    assert "loss = nan is not finite" in text and text.rstrip().endswith("Optimization Done.")


# -- solver fields -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    ('type: "Adam" momentum: 1.0', r"momentum must be in \[0, 1\) for Adam \(beta1\), got 1"),
    ('type: "Adam" momentum: 0.9 momentum2: 1.0', r"momentum2 must be in \[0, 1\) for Adam \(beta2\), got 1"),
    ('type: "AdaDelta" momentum: 1.5', r"momentum must be in \[0, 1\] for AdaDelta, got 1.5"),
    ('type: "AdaGrad" delta: 0', r"delta must be > 0 for AdaGrad"),
    ('type: "RMSProp" delta: -1e-8', r"delta must be > 0 for RMSProp"),
    ('type: "AdaDelta" momentum: 0.9 delta: 0', r"delta must be > 0 for AdaDelta"),
    ('type: "Adam" momentum: 0.9 delta: 0', r"delta must be > 0 for Adam"),
    ('lr_policy: "exp" gamma: 1e10', r"lr_policy 'exp' with base_lr 0.01, gamma 1e\+10 gives learning rate "
                                     r"1e\+88 at iteration 9, not a finite float32 number"),
    ('lr_policy: "exp" gamma: 1e10 max_iter: 100', r"lr_policy 'exp' .* gives learning rate inf at iteration "
                                                   r"99"),
    ('lr_policy: "exp" gamma: 1.5 max_iter: 300', r"lr_policy 'exp' .* at iteration 299"),
    ('lr_policy: "step" gamma: 1e30 stepsize: 1', r"lr_policy 'step' with base_lr 0.01, gamma 1e\+30, "
                                                  r"stepsize 1 gives learning rate 1e\+268 at iteration 9"),
    ('lr_policy: "multistep" gamma: 1e30 stepvalue: 2 stepvalue: 4',
     r"lr_policy 'multistep' with base_lr 0.01, gamma 1e\+30, stepvalue \[2, 4\] gives learning rate 1e\+58"),
    ('lr_policy: "inv" gamma: -0.5 power: 0.75', r"lr_policy 'inv' with base_lr 0.01, gamma -0.5, power 0.75 "
                                                 r"gives learning rate nan at iteration 9"),
    ('lr_policy: "inv" gamma: -0.125 power: 1 max_iter: 9', r"lr_policy 'inv' .* gives learning rate inf"),
    ('lr_policy: "inv" gamma: -0.25 power: 1',
     r"lr_policy 'inv' .* gives learning rate -0.008 at iteration 9, not a finite float32 number >= 0"),
    ('lr_policy: "poly" power: 1 max_iter: 0', r"lr_policy 'poly' needs max_iter > 0"),
    ('lr_policy: "step" stepsize: 0', r"lr_policy 'step' needs stepsize > 0"),
    ('max_iter: -1', r"max_iter must be >= 0, got -1"),
    ('base_lr: -0.1', r"base_lr must be >= 0, got -0.1"),
    ('base_lr: nan', r"base_lr must be a finite number, got nan"),
    ('momentum: inf', r"momentum must be a finite number, got inf"),
])
def test_bad_solver_fields_are_refused_at_start_up(extra, message):
    with pytest.raises(SolverError, match=r"^<SolverParameter>: " + message):
        Solver(solver_param(extra))


def test_missing_net_is_refused():
    with pytest.raises(SolverError, match="no train net: give one of net, net_param, train_net, "
                                          "train_net_param"):
        Solver(solver_param("", net=""))


def test_learning_rate_does_not_raise_on_large_numbers():
    param = solver_param('lr_policy: "exp" gamma: 1e10')
    assert learning_rate(param, 100) == (math.inf, 0)
    param = solver_param('lr_policy: "inv" gamma: -1 power: 0.5')
    assert math.isnan(learning_rate(param, 3)[0])
    assert learning_rate(param, 1)[0] == math.inf  # 0 to a negative power


def test_sigmoid_with_a_steep_gamma_is_a_step_as_in_caffe():
    # exp() overflows past the step: Caffe's C++ gives 1 / (1 + inf) = 0, not an error.
    param = solver_param('lr_policy: "sigmoid" gamma: -10000 stepsize: 5')
    assert learning_rate(param, 0)[0] == pytest.approx(0.01)
    assert learning_rate(param, 4)[0] == pytest.approx(0.01)
    assert learning_rate(param, 6)[0] == 0.0
    assert learning_rate(param, 10 ** 6)[0] == 0.0
    solver = Solver(param)
    solver.step(8)
    assert solver.iter == 8


def test_a_schedule_that_overflows_past_max_iter_stops_at_that_iteration():
    # step() may run past max_iter (pycaffe); the rate is checked at every iteration.
    solver = Solver(solver_param('lr_policy: "exp" gamma: 2'))
    solver.iter = 100
    assert solver.learning_rate() == pytest.approx(0.01 * 2.0 ** 100)
    solver.iter = 200  # 0.01 * 2^200 > float32 max
    with pytest.raises(SolverError, match=r"lr_policy 'exp' with base_lr 0.01, gamma 2 gives learning rate "
                                          r"1.6\d*e\+58 at iteration 200, not a finite float32 number"):
        solver.learning_rate()
    solver = Solver(solver_param('lr_policy: "exp" gamma: 2'), dtype=np.float64)
    solver.iter = 200  # a finite float64 number
    assert solver.learning_rate() == pytest.approx(0.01 * 2.0 ** 200)


def test_cli_bad_field_is_a_one_line_error(tmp_path, capsys):
    solver = write_run(tmp_path, nan_row=None, extra='type: "Adam" momentum: 1.0')
    assert cli.main(["train", "--solver", str(solver)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"minicaffe train: error: {solver}: momentum must be in [0, 1) for Adam "
                                "(beta1), got 1"]
    (tmp_path / "exp").mkdir()
    solver = write_run(tmp_path / "exp", nan_row=None, extra='lr_policy: "exp" gamma: 1e10 max_iter: 100')
    assert cli.main(["train", "--solver", str(solver)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "lr_policy 'exp' with base_lr 0.1, gamma 1e+10 gives learning rate inf at iteration 99" in err


# -- nets that cannot be trained ----------------------------------------------------------------------

NO_LOSS = DUMMY_NET.replace('type: "SoftmaxWithLoss"', 'type: "Softmax"').replace(' bottom: "label"', "")
FROZEN = DUMMY_NET.replace('inner_product_param', 'param { lr_mult: 0 } param { lr_mult: 0 } '
                                                  'inner_product_param')
NO_PARAMS = DUMMY_NET.replace('type: "InnerProduct" bottom: "data" top: "ip"\n  inner_product_param '
                              '{ num_output: 3 weight_filler { type: "xavier" } }',
                              'type: "Power" bottom: "data" top: "ip"')
TEST_ONLY = DUMMY_NET.replace('top: "label"\n', 'top: "label" include { phase: TEST }\n').replace(
    'top: "ip"\n', 'top: "ip" include { phase: TEST }\n').replace(
    'top: "loss" }', 'top: "loss" include { phase: TEST } }')


@pytest.mark.parametrize("net, message", [
    ('name: "empty"', "has no layers in phase TRAIN"),
    (TEST_ONLY, "has no layers in phase TRAIN"),
    (NO_LOSS, "has no loss: no top has a nonzero loss_weight"),
    (DUMMY_NET.replace('top: "loss" }', 'top: "loss" loss_weight: 0 }'), "has no loss"),
    (FROZEN, "has nothing to learn: no learnable parameter with a nonzero lr_mult"),
    (NO_PARAMS, "has nothing to learn"),
])
def test_untrainable_nets_are_refused(net, message, tmp_path):
    with pytest.raises(SolverError, match=r"^<SolverParameter>: the train net \(net_param\) " + message):
        Solver(solver_param("", net=net))
    # From a file, the error names the net file; nothing is written.
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.01 max_iter: 2 '
                                              f'lr_policy: "fixed" snapshot_prefix: "{tmp_path}/x"')
    with pytest.raises(SolverError, match=f"the train net '{tmp_path / 'net.prototxt'}' {message}"):
        Solver(tmp_path / "solver.prototxt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt", "solver.prototxt"]


def test_a_trainable_dummy_net_trains():
    # The nets above differ from this one by what makes them untrainable.
    solver = Solver(solver_param("", net=DUMMY_NET))
    solver.step(3)
    assert solver.iter == 3 and math.isfinite(solver.smoothed_loss)
