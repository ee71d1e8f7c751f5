"""The quickstart example (`minicaffe quickstart` = `minicaffe train --solver quickstart`).

A small conv net with PReLU (minicaffe/data/digits_train_test.prototxt, solver digits_solver.prototxt)
on scikit-learn's 8x8 handwritten digits, which ship inside scikit-learn: no download. On first use the
digits are written as LMDBs of Caffe Datum records into a working folder ($MINICAFFE_CACHE_DIR/quickstart,
default ~/.cache/minicaffe/quickstart, or the folder given); the trained model and the net with its
resolved data paths are written there too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from . import io
from .datasets import digits_lmdb
from .kernel import cache_root
from .layer import TRAIN
from .proto import caffe_pb2
from .solver import Solver, read_solver

SOLVER_FILE = "digits_solver.prototxt"


def data_dir() -> Path:
    """The package's embedded prototxt folder (minicaffe/data)."""
    return Path(__file__).resolve().parent / "data"


def default_work_dir() -> Path:
    return cache_root() / "quickstart"


def quickstart_solver(work_dir=None) -> tuple[caffe_pb2.SolverParameter, Path]:
    """The quickstart's SolverParameter (net inline, data sources and snapshot_prefix in `work_dir`),
    writing the digits LMDBs first if needed; returns (param, folder of the embedded files)."""
    work = Path(work_dir) if work_dir is not None else default_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    train_db, test_db = digits_lmdb(work)
    param = read_solver(data_dir() / SOLVER_FILE)
    net = io.read_net_param(data_dir() / param.net)
    for layer in net.layer:
        if layer.type == "Data":
            train = any(rule.phase == TRAIN for rule in layer.include)
            layer.data_param.source = str((train_db if train else test_db).resolve())
    # The net with its real data paths, for `minicaffe test --model ... --weights ...` afterwards.
    io.write_text(work / "digits_train_test.prototxt", net)
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    param.snapshot_prefix = str(work / "digits")
    return param, data_dir()


def report(solver: Solver, stream: TextIO) -> None:
    """The outcome: final test accuracy, and where the model is."""
    scores = solver.test_scores[0] if solver.test_scores else {}
    work = Path(solver.param.snapshot_prefix).parent
    model = solver.snapshot_filename(".caffemodel")
    test_images = solver.param.test_iter[0] * solver.test_nets[0].blobs["data"].shape[0]
    if "accuracy" in scores:
        stream.write(f"Final test accuracy: {100 * scores['accuracy']:.1f}% on {test_images} test images "
                     f"after {solver.iter} iterations\n")
    stream.write(f"Model: {model}\n")
    stream.write(f"Check it: minicaffe test --model {work / 'digits_train_test.prototxt'} "
                 f"--weights {model} --iterations {solver.param.test_iter[0]}\n")
    stream.flush()
