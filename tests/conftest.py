"""Shared fixtures: where ../shared lives, and small helpers every layer test uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import minicaffe
from minicaffe.blob import Blob
from minicaffe.commands.parse_log import parse_log
from minicaffe.testing import layer_from_prototxt

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED


@pytest.fixture
def mtcnn_dir(shared_dir) -> Path:
    path = shared_dir / "models" / "mtcnn"
    if not (path / "det1.caffemodel").is_file():
        pytest.skip("MTCNN models absent from ../shared/models/mtcnn")
    return path


@pytest.fixture
def mnist_dir(shared_dir) -> Path:
    path = shared_dir / "data" / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("MNIST absent from ../shared/data/mnist")
    return path


@pytest.fixture(autouse=True)
def _cpu_mode_and_seed():
    minicaffe.set_mode_cpu()
    minicaffe.set_random_seed(1701)
    yield
    minicaffe.set_mode_cpu()


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
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
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
