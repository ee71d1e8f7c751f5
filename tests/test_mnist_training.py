"""Acceptance: LeNet and LeNet-PReLU reach >= 98% test accuracy on MNIST within 2,000 iterations (CPU).

`minicaffe convert-mnist` turns $MINICAFFE_SHARED/data/mnist's t10k set into a training LMDB (first 8,000
images) and a test LMDB (last 2,000); then `minicaffe train` runs copies of models/lenet_prelu and
models/lenet whose only changes are the data paths and snapshot_prefix (benchmarks/train_mnist.py does
the same and records accuracy and wall time in BENCHMARKS.md). The logged losses must be finite and
fall: accuracy alone passed a net whose loss was stuck at 87.3365. Slow: about a minute or two per model on
two cores. Skips when the shared data is absent (conftest.shared_data).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import assert_loss_fell

from minicaffe import io
from minicaffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("train_mnist", REPO / "benchmarks" / "train_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mnist")


@pytest.fixture
def mnist_lmdbs(mnist_dir, work) -> tuple[Path, dict[str, Path]]:
    """The two LMDBs, converted once per module (prepare() skips existing ones)."""
    return work, bench.prepare(mnist_dir, work)


@pytest.mark.slow
def test_convert_mnist_split(mnist_lmdbs):
    from minicaffe.db import LMDBReader

    _, dbs = mnist_lmdbs
    train, test = LMDBReader(dbs["train"]), LMDBReader(dbs["test"])
    try:
        assert (len(train), len(test)) == (8000, 2000)
        key, value = test.read(0, 1)[0]
        assert key == b"00008000"  # Caffe's zero-padded keys, numbered in the source file
        datum = caffe_pb2.Datum.FromString(value)
        assert (datum.channels, datum.height, datum.width) == (1, 28, 28)
    finally:
        train.close()
        test.close()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lenet_prelu", "lenet"])
def test_lenet_reaches_98_percent(model, mnist_lmdbs):
    work, dbs = mnist_lmdbs
    result = bench.train(model, work, dbs)
    # The copies differ from models/ only in paths.
    shipped = io.read_solver_param(REPO / bench.MODELS[model][0])
    used = io.read_solver_param(work / model / Path(bench.MODELS[model][0]).name)
    for field in ("base_lr", "momentum", "weight_decay", "lr_policy", "gamma", "power", "max_iter",
                  "test_iter", "random_seed", "type"):
        assert getattr(used, field) == getattr(shipped, field)
    assert result["iterations"] == 2000 == shipped.max_iter
    assert result["accuracy"] >= 0.98, result["log"].read_text()[-3000:]
    assert_loss_fell(result["log"])
    assert (work / model / f"{model}_iter_2000.caffemodel").is_file()
    print(f"{model}: test accuracy {result['accuracy']:.4f} after {result['iterations']} iterations, "
          f"{result['wall_s']:.0f} s")
