"""Shared fixtures: where the data beside the repo lives, and small helpers every layer test uses."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import minicaffe
from minicaffe.blob import Blob
from minicaffe.commands.parse_log import parse_log
from minicaffe.testing import layer_from_prototxt

REPO = Path(__file__).resolve().parents[1]
SHARED_VARIABLE = "MINICAFFE_SHARED"
GLOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] ")


def shared_data(relative: str, needed_file: str) -> Path:
    """The folder `relative` of the shared data ($MINICAFFE_SHARED, else the `shared` folder beside the
    repo); skips the test, naming the variable and the path looked in, when `needed_file` is not there.
    The one place tests find MNIST and the real models (README: "The full test suite")."""
    root = Path(os.environ.get(SHARED_VARIABLE) or REPO.parent / "shared")
    path = root / relative
    if not (path / needed_file).is_file():
        pytest.skip(f"no {relative}/{needed_file} in {root}: set {SHARED_VARIABLE} to the folder holding "
                    "data/mnist and models/ (README: The full test suite)")
    return path


def one_line_error(code: int, err: str, log_lines: bool = False) -> bool:
    """The command failed as a CLI should: exit 1, one line on stderr, no traceback. With log_lines, glog
    lines (what a command logged before it failed) may come before that line."""
    lines = err.strip().splitlines()
    if log_lines:
        lines = [line for line in lines if not GLOG_LINE.match(line)]
        if lines and not err.strip().endswith(lines[-1]):
            return False  # the error must be the last line
    return code == 1 and len(lines) == 1 and "Traceback" not in err


@pytest.fixture
def mtcnn_dir() -> Path:
    """The MTCNN cascade (det1-3 .prototxt and .caffemodel, test1.jpg)."""
    return shared_data("models/mtcnn", "det1.caffemodel")


@pytest.fixture
def mnist_dir() -> Path:
    """MNIST's t10k set as the IDX gzip files LeCun's site serves."""
    return shared_data("data/mnist", "t10k-images-idx3-ubyte.gz")


@pytest.fixture(autouse=True)
def _cpu_mode_and_seed():
    minicaffe.set_mode_cpu()
    minicaffe.set_random_seed(1701)
    yield
    minicaffe.set_mode_cpu()


def data_batch(layer, top, index):
    """A two-top data layer's batch number `index` (data, label) as host arrays."""
    layer.forward_index = index
    layer.reshape([], top)
    layer.forward([], top)
    return np.array(top[0].data), np.array(top[1].data)


def run_layer(text: str, *arrays, num_top: int = 1, dtype=np.float64, phase=minicaffe.TEST,
              in_place: bool = False):
    """Set up and forward a layer given as prototxt body text; returns (layer, bottoms, tops)."""
    layer = layer_from_prototxt(text, phase=phase, dtype=dtype)
    bottom = []
    for array in arrays:
        array = np.asarray(array, dtype=dtype)
        blob = Blob(array.shape, dtype)
        blob.data[...] = array
        bottom.append(blob)
    top = [bottom[0]] if in_place else [Blob((), dtype) for _ in range(num_top)]
    layer.setup(bottom, top)
    layer.run_forward(bottom, top)
    return layer, bottom, top


def backward_layer(layer, bottom, top, top_diffs, propagate_down=None):
    """Set the top diffs, clear param diffs, run backward; returns bottom diffs (copies).

    Propagated bottom diffs that are not a top's diff start as NaN, so a backward that adds into the
    old gradient (instead of overwriting it, as Caffe's layers do) or skips elements shows."""
    propagate_down = propagate_down or [True] * len(bottom)
    for blob, down in zip(bottom, propagate_down):
        if down and not any(np.shares_memory(blob.diff, t.diff) for t in top):
            blob.diff[...] = np.nan
    for blob, diff in zip(top, top_diffs):
        blob.diff[...] = diff
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.backward(top, propagate_down, bottom)
    return [np.array(b.diff) for b in bottom]


def assert_loss_fell(log: Path) -> None:
    """The training log shows a net that learned: every train and test `loss` output is finite, and the
    last is well below the first. Accuracy alone cannot tell: NaN scores count as correct in Caffe, and
    a net whose loss sticks at 87.3365 (-log of the smallest float) once passed the accuracy tests."""
    train, test = parse_log(log)
    for kind, rows, factor in (("train", train, 0.25), ("test", test, 0.5)):
        losses = [row["loss"] for row in rows if "loss" in row]
        assert len(losses) >= 2, f"fewer than two {kind} losses in {log}"
        assert all(np.isfinite(losses)), f"{kind} losses {losses}"
        assert losses[-1] < factor * losses[0], f"{kind} loss did not fall: {losses}"


@pytest.fixture
def log_text():
    """minicaffe's log lines, captured in a StringIO (instead of stderr) for the test's duration."""
    import io as _io

    from minicaffe import log

    stream = _io.StringIO()
    log.set_stream(stream)
    yield stream
    log.set_stream(None)

