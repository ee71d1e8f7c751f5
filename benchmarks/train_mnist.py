"""Train models/lenet and models/lenet_prelu on MNIST with `minicaffe train` and record the results.

    python benchmarks/train_mnist.py [--mnist ../shared/data/mnist] [--work DIR] [--no-write]
    python benchmarks/train_mnist.py --gpu 0 --models lenet_prelu --no-quickstart --no-write  # on a GPU

The MNIST set at hand is the 10,000-image t10k set: its first 8,000 images become the training LMDB and
the last 2,000 the test LMDB (`minicaffe convert-mnist --start/--count`). Each model's solver and net
are copied into the work folder with their data paths and snapshot_prefix pointed there; otherwise they
are the files in models/ (2,000 iterations, batch 64, test on all 2,000 test images). Prints a table
(model, iterations, final test accuracy, wall time, machine) and updates a section of BENCHMARKS.md.

tests/test_mnist_training.py uses prepare() and train() from here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {"lenet": ("models/lenet/lenet_solver.prototxt", "models/lenet/lenet_train_test.prototxt"),
          "lenet_prelu": ("models/lenet_prelu/solver.prototxt", "models/lenet_prelu/train_test.prototxt")}
TRAIN_COUNT, TEST_COUNT = 8000, 2000
sys.path.insert(0, str(Path(__file__).resolve().parent))  # markdown_section.py, beside this file
from markdown_section import markers, update_section  # noqa: E402

BEGIN, END = markers("benchmarks/train_mnist.py")


def minicaffe_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "minicaffe.cli", *args]


def prepare(mnist_dir: Path, work: Path) -> dict[str, Path]:
    """Convert MNIST (first 8,000 -> train, last 2,000 -> test) into work/examples/mnist, unless done."""
    images, labels = mnist_dir / "t10k-images-idx3-ubyte.gz", mnist_dir / "t10k-labels-idx1-ubyte.gz"
    dbs = {"train": work / "examples" / "mnist" / "mnist_train_lmdb",
           "test": work / "examples" / "mnist" / "mnist_test_lmdb"}
    ranges = {"train": ("0", str(TRAIN_COUNT)), "test": (str(TRAIN_COUNT), str(TEST_COUNT))}
    for name, db in dbs.items():
        if (db / "data.mdb").is_file():
            continue
        start, count = ranges[name]
        subprocess.run(minicaffe_command("convert-mnist", str(images), str(labels), str(db),
                                         "--start", start, "--count", count, "--overwrite"),
                       check=True, capture_output=True, text=True)
    return dbs


def adjusted_copy(model: str, work: Path, dbs: dict[str, Path], max_iter: int | None = None) -> Path:
    """The model's solver and net, copied into work/model with the data and snapshot paths there."""
    from minicaffe import io

    solver_file, net_file = (REPO / p for p in MODELS[model])
    folder = work / model
    folder.mkdir(parents=True, exist_ok=True)
    net = io.read_net_param(net_file)
    for layer in net.layer:
        if layer.type == "Data":
            source = Path(layer.data_param.source).name
            layer.data_param.source = str(dbs["train" if "train" in source else "test"])
    io.write_text(folder / net_file.name, net)
    solver = io.read_solver_param(solver_file)
    solver.net = str(folder / net_file.name)
    solver.snapshot_prefix = str(folder / model)
    if max_iter is not None:
        solver.max_iter = max_iter
        solver.test_interval = min(solver.test_interval, max_iter)  # so that the last iteration is tested
    io.write_text(folder / solver_file.name, solver)
    return folder / solver_file.name


def train(model: str, work: Path, dbs: dict[str, Path], max_iter: int | None = None,
          gpu: str | None = None) -> dict:
    """Run `minicaffe train` on the adjusted copy (with `--gpu gpu` if given); returns the final test
    accuracy, iterations, wall time and the log's path."""
    solver = adjusted_copy(model, work, dbs, max_iter)
    log_path = solver.parent / "train.log"
    start = time.perf_counter()
    # Threads as minicaffe sets them (minicaffe.threads): the README's command is what is measured.
    with open(log_path, "w") as log:
        device = ["--gpu", gpu] if gpu is not None else []
        result = subprocess.run(minicaffe_command("train", "--solver", str(solver), *device), stderr=log,
                                stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    text = log_path.read_text()
    if result.returncode != 0:
        raise RuntimeError(f"minicaffe train --solver {solver} failed ({result.returncode}):\n{text[-3000:]}")
    tests = test_accuracies(text)
    if not tests:
        raise RuntimeError(f"no test accuracy in {log_path}")
    iteration, accuracy = tests[-1]
    return {"model": model, "iterations": iteration, "accuracy": accuracy, "wall_s": wall, "log": log_path,
            "accuracies": tests}


def quickstart(work: Path, gpu: str | None = None) -> dict:
    """`minicaffe quickstart` (the README's example), timed once its LMDBs are written."""
    folder = work / "quickstart"
    from minicaffe.example import quickstart_solver

    quickstart_solver(folder)  # writes the LMDBs
    log_path = folder / "train.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        device = ["--gpu", gpu] if gpu is not None else []
        subprocess.run(minicaffe_command("quickstart", "--work-dir", str(folder), *device), stderr=log,
                       stdout=subprocess.PIPE, check=True)
    wall = time.perf_counter() - start
    tests = test_accuracies(log_path.read_text())
    return {"model": "quickstart (8x8 digits)", "iterations": tests[-1][0], "accuracy": tests[-1][1],
            "wall_s": wall, "log": log_path, "accuracies": tests}


def test_accuracies(log_text: str) -> list[tuple[int, float]]:
    """(iteration, accuracy) of each test in a Caffe-format training log."""
    found, iteration = [], None
    for line in log_text.splitlines():
        testing = re.search(r"Iteration (\d+), Testing net \(#0\)", line)
        if testing:
            iteration = int(testing.group(1))
        score = re.search(r"Test net output #\d+: accuracy = ([\d.]+)", line)
        if score and iteration is not None:
            found.append((iteration, float(score.group(1))))
            iteration = None
    return found


def machine(gpu: str | None = None) -> str:
    import numpy

    from minicaffe import timing

    mode = "CPU mode" if gpu is None else f"GPU mode ({gpu_name(int(gpu.split(',')[0]))})"
    return f"{timing.machine()}, numpy {numpy.__version__}, {mode}"


def gpu_name(device: int) -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(device)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def table(results: list[dict], where: str) -> list[str]:
    lines = ["| model | iterations | final test accuracy | wall time | machine |", "|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['iterations']} | {100 * r['accuracy']:.2f}% | {r['wall_s']:.0f} s "
                     f"| {where} |")
    return lines


def markdown(results: list[dict], command: str, where: str) -> str:
    lines = [BEGIN, "## MNIST training (benchmarks/train_mnist.py)", "",
             f"Reproduce: `{command}` (updates this section). Measured {dt.date.today().isoformat()}.", "",
             "`minicaffe train` on models/lenet and models/lenet_prelu as shipped (SGD, lr 0.01, momentum "
             "0.9, weight_decay 5e-4, inv policy, batch 64, 2,000 iterations, fixed seed), on the MNIST "
             f"t10k images: the first {TRAIN_COUNT:,} for training, the last {TEST_COUNT:,} for testing "
             "(the last 5,000 of t10k are the harder half). Wall time is the whole `minicaffe train` run: "
             "start-up, five tests of the 2,000 test images, snapshots; threads as minicaffe sets them "
             "(README, Training). "
             "The last row is `minicaffe quickstart` (= `minicaffe train --solver quickstart`, the README's "
             "example: 1,500 training and 297 test images of scikit-learn's 8x8 digits), timed once its "
             "LMDBs exist and the kernels are built (a first run on a fresh machine adds their build).",
             ""]
    lines += table(results, where)
    lines += ["", "Test accuracy during training (iteration: accuracy): " + "; ".join(
        f"{r['model']}: " + ", ".join(f"{i}: {100 * a:.2f}%" for i, a in r["accuracies"]) for r in results),
        "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist",
                        help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--gpu", default=None, metavar="ID", help="train on this GPU (minicaffe train --gpu)")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="stop after this many iterations (a smoke test; default: the solver's)")
    parser.add_argument("--no-quickstart", action="store_true", help="do not time `minicaffe quickstart`")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not (args.mnist / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"MNIST not found in {args.mnist}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        dbs = prepare(args.mnist, work)
        results = []
        for model in args.models:
            print(f"training {model} ...", file=sys.stderr, flush=True)
            results.append(train(model, work, dbs, args.max_iter, args.gpu))
        if not args.no_quickstart:
            print("training the quickstart ...", file=sys.stderr, flush=True)
            results.append(quickstart(work, args.gpu))
    where = machine(args.gpu)
    print("\n".join(table(results, where)))
    if not args.no_write:
        command = "python benchmarks/train_mnist.py" + (f" --gpu {args.gpu}" if args.gpu is not None else "")
        section = markdown(results, command, where)
        update_section(REPO / "BENCHMARKS.md", "benchmarks/train_mnist.py", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
