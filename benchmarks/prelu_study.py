"""PReLU studies on MNIST, each one command: the Theano tutorial's CNN with PReLU against its ReLU twin
(models/mnist_prelu_cnn), and the Keras comparison of PReLU slopes initialised to 0 and to 0.25
against ReLU (models/lenet_prelu, models/lenet), over several seeds.

    python benchmarks/prelu_study.py cnn      # ~7 min on 2 cores: 20 epochs each of the PReLU and ReLU CNN
    python benchmarks/prelu_study.py keras    # ~8 min on 2 cores: 3 seeds x (PReLU 0, PReLU 0.25, ReLU)
    python benchmarks/prelu_study.py cnn --quick     # a smoke test: a few short "epochs"
    options: --mnist DIR, --work DIR (keep the logs, CSVs and PNG), --no-write (BENCHMARKS.md untouched)

Data as benchmarks/train_mnist.py makes it (its prepare()): MNIST's t10k set, the first 8,000 images for
training and the last 2,000 for the test. Every run is `minicaffe train` on a copy of the model's solver
and net with the data paths, snapshot prefix, iterations and seed set here.

cnn: an epoch is 80 iterations of batch 100 (8,000 images); the test of all 2,000 test images follows
each. Printed per epoch: test accuracy and wall time of both nets (wall time between the ends of two
tests: the epoch's training and one test), and the mean slope of every PReLU layer, from
`minicaffe train --watch PReLU`'s CSV. The slope trace is drawn by `minicaffe plot-params --watch-csv`
into prelu_slopes.png (in --work, or the current folder).

keras: each model for 1,500 iterations of batch 64 (the shipped solvers run 2,000; cut to fit ~8
minutes), seeds 1, 2, 3 (random_seed: weights, data order and dropout). The mean and the spread (min ..
max, and the sample standard deviation) of the final test accuracy; the difference of two means is
called within noise when it is smaller than the larger of the two standard deviations times 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_mnist.py, markdown_section.py, beside this
from markdown_section import markers, update_section  # noqa: E402
from train_mnist import machine, minicaffe_command, prepare  # noqa: E402

CNN = {"PReLU": "models/mnist_prelu_cnn/prelu_solver.prototxt",
       "ReLU": "models/mnist_prelu_cnn/relu_solver.prototxt"}
KERAS = {"PReLU, slopes from 0": ("models/lenet_prelu/solver.prototxt", 0.0),
         "PReLU, slopes from 0.25": ("models/lenet_prelu/solver.prototxt", 0.25),
         "ReLU": ("models/lenet/lenet_solver.prototxt", None)}
EPOCH_ITERATIONS, TEST_BATCHES = 80, 20  # batch 100: 8,000 training and 2,000 test images
CNN_EPOCHS, KERAS_ITERATIONS, SEEDS = 20, 1500, (1, 2, 3)
# --quick: three "epochs" of 10 iterations (1,000 images), tested on 500 images; keras: 2 seeds x 60.
QUICK = {"epoch_iterations": 10, "test_batches": 5, "epochs": 3, "keras_iterations": 60, "seeds": (1, 2)}


def study_copy(solver_file: str, name: str, work: Path, dbs: dict[str, Path], *, max_iter: int,
               seed: int | None = None, test_interval: int | None = None, test_iter: int | None = None,
               display: int | None = None, slope: float | None = None) -> Path:
    """The solver and its net, copied into work/name with the data paths and snapshot prefix there,
    and the given settings (slope: the constant initial value of every PReLU slope)."""
    from minicaffe import io
    from minicaffe.proto import caffe_pb2

    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    solver = io.read_solver_param(REPO / solver_file)
    net_file = REPO / solver.net
    net = io.read_net_param(net_file)
    for layer in net.layer:
        if layer.type == "Data":
            source = Path(layer.data_param.source).name
            layer.data_param.source = str(dbs["train" if "train" in source else "test"])
        if layer.type == "PReLU" and slope is not None:
            layer.prelu_param.filler.CopyFrom(caffe_pb2.FillerParameter(type="constant", value=slope))
    io.write_text(folder / net_file.name, net)
    solver.net = str(folder / net_file.name)
    solver.snapshot_prefix = str(folder / "model")
    solver.snapshot = 0
    solver.max_iter = max_iter
    for field, value in (("random_seed", seed), ("test_interval", test_interval), ("test_iter", test_iter),
                         ("display", display)):
        if value is not None:
            if field == "test_iter":
                solver.test_iter[:] = [value]
            else:
                setattr(solver, field, value)
    io.write_text(folder / "solver.prototxt", solver)
    return folder / "solver.prototxt"


def train(solver: Path, watch: bool = False) -> dict:
    """`minicaffe train` (with --watch PReLU); its test rows (parse-log's: NumIters, Seconds, accuracy),
    wall time, log and watch CSV."""
    from minicaffe.commands.parse_log import parse_log

    log_path = solver.parent / "train.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        result = subprocess.run(minicaffe_command("train", "--solver", str(solver),
                                                  *(["--watch", "PReLU"] if watch else [])),
                                stderr=log, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"minicaffe train --solver {solver} failed ({result.returncode}):\n"
                           f"{log_path.read_text()[-3000:]}")
    _, tests = parse_log(log_path)
    if not tests:
        raise RuntimeError(f"no test in {log_path}")
    return {"tests": tests, "wall_s": wall, "log": log_path, "watch_csv": solver.parent / "model_watch.csv"}


# -- cnn ----------------------------------------------------------------------------------------------

def slopes_by_epoch(csv_path: Path, epoch_iterations: int) -> dict[str, dict[int, float]]:
    """{PReLU layer: {epoch: mean slope}} from the --watch CSV (epoch 0: the initial slopes)."""
    from minicaffe.watch import read_watch_csv

    out: dict[str, dict[int, float]] = {}
    for row in read_watch_csv(csv_path):
        if row["iteration"] % epoch_iterations == 0:
            out.setdefault(row["layer"], {})[row["iteration"] // epoch_iterations] = row["mean"]
    return out


def epochs_of(run: dict, epoch_iterations: int) -> list[dict]:
    """Per epoch (0: before training): test accuracy and the seconds since the previous test ended."""
    rows, previous = [], None
    for test in run["tests"]:
        seconds = None if previous is None else test["Seconds"] - previous
        rows.append({"epoch": test["NumIters"] // epoch_iterations, "accuracy": test["accuracy"],
                     "seconds": seconds})
        previous = test["Seconds"]
    return rows


def plot_slopes(csv_path: Path, png: Path, epoch_iterations: int) -> None:
    subprocess.run(minicaffe_command("plot-params", "--watch-csv", str(csv_path), "--epoch-iterations",
                                     str(epoch_iterations), "-o", str(png)),
                   check=True, capture_output=True, text=True)


def run_cnn(work: Path, dbs: dict[str, Path], quick: bool, epochs: int | None, png: Path) -> dict:
    epoch_iterations = QUICK["epoch_iterations"] if quick else EPOCH_ITERATIONS
    test_batches = QUICK["test_batches"] if quick else TEST_BATCHES
    epochs = epochs or (QUICK["epochs"] if quick else CNN_EPOCHS)
    runs = {}
    for name, solver_file in CNN.items():
        print(f"training the {name} CNN for {epochs} epochs ...", file=sys.stderr, flush=True)
        solver = study_copy(solver_file, f"cnn_{name.lower()}", work, dbs, max_iter=epochs * epoch_iterations,
                            test_interval=epoch_iterations, test_iter=test_batches, display=epoch_iterations)
        runs[name] = train(solver, watch=name == "PReLU")
    result = {"epochs": epochs, "epoch_iterations": epoch_iterations, "test_images": test_batches * 100,
              "train_images": epoch_iterations * 100,
              "per_epoch": {name: epochs_of(run, epoch_iterations) for name, run in runs.items()},
              "slopes": slopes_by_epoch(runs["PReLU"]["watch_csv"], epoch_iterations),
              "wall_s": {name: run["wall_s"] for name, run in runs.items()}, "png": png}
    plot_slopes(runs["PReLU"]["watch_csv"], png, epoch_iterations)
    return result


def cnn_table(result: dict) -> list[str]:
    layers = sorted(result["slopes"])
    lines = ["| epoch | PReLU test accuracy | ReLU test accuracy | PReLU s | ReLU s | " +
             " | ".join(f"{layer} slope" for layer in layers) + " |",
             "|" + "---:|" * (5 + len(layers))]
    prelu, relu = result["per_epoch"]["PReLU"], result["per_epoch"]["ReLU"]
    for p, r in zip(prelu, relu):
        def seconds(row):
            return "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        slopes = [f"{result['slopes'][layer].get(p['epoch'], float('nan')):.4f}" for layer in layers]
        lines.append(f"| {p['epoch']} | {100 * p['accuracy']:.2f}% | {100 * r['accuracy']:.2f}% | "
                     f"{seconds(p)} | {seconds(r)} | " + " | ".join(slopes) + " |")
    return lines


def cnn_markdown(result: dict, command: str, where: str) -> str:
    begin, end = markers("benchmarks/prelu_study.py cnn")
    best = max(row["accuracy"] for row in result["per_epoch"]["PReLU"])
    final = {name: rows[-1]["accuracy"] for name, rows in result["per_epoch"].items()}
    lines = [begin, "## PReLU CNN on a 10,000-image MNIST subset (benchmarks/prelu_study.py cnn)", "",
             f"Reproduce: `{command}` (updates this section, writes the slope plot). Measured "
             f"{dt.date.today().isoformat()} on {where}.", "",
             "models/mnist_prelu_cnn: the Theano tutorial's CNN (3x3 convolutions of 32, 64, 128 channels, "
             "the first with a full border, 2x2 max pooling with ceil rounding, 625 units, 10 outputs, "
             "dropout) with PReLU after each hidden layer (slopes from 0.5 / 0.5 / 0.3 / 0.1) and its ReLU "
             f"twin, RMSProp at lr 0.001, batch 100, {result['epochs']} epochs of the first "
             f"{result['train_images']:,} t10k images, tested after each epoch on the last "
             f"{result['test_images']:,}. Seconds: wall time of the epoch and its test. Slopes: the mean "
             "over each PReLU layer's channels (`minicaffe train --watch PReLU`); the plot of them per "
             "epoch, with their min .. max, is `minicaffe plot-params --watch-csv` of that CSV.", "",
             *cnn_table(result), "",
             f"Final test accuracy: PReLU {100 * final['PReLU']:.2f}%, ReLU {100 * final['ReLU']:.2f}% "
             f"(best PReLU epoch {100 * best:.2f}%; the study reports 98.3% for PReLU on its 10k subset). "
             f"Whole runs: PReLU {result['wall_s']['PReLU']:.0f} s, ReLU {result['wall_s']['ReLU']:.0f} s.",
             "", end]
    return "\n".join(lines)


# -- keras --------------------------------------------------------------------------------------------

def run_keras(work: Path, dbs: dict[str, Path], quick: bool) -> dict:
    iterations = QUICK["keras_iterations"] if quick else KERAS_ITERATIONS
    seeds = QUICK["seeds"] if quick else SEEDS
    test_interval = iterations // 3
    finals: dict[str, list[float]] = {}
    for name, (solver_file, slope) in KERAS.items():
        for seed in seeds:
            print(f"training {name}, seed {seed} ...", file=sys.stderr, flush=True)
            folder = f"keras_{'relu' if slope is None else f'prelu{slope:g}'}_seed{seed}"
            solver = study_copy(solver_file, folder, work, dbs, max_iter=iterations, seed=seed,
                                test_interval=test_interval, slope=slope,
                                test_iter=QUICK["test_batches"] if quick else None)
            run = train(solver)
            finals.setdefault(name, []).append(run["tests"][-1]["accuracy"])
    return {"iterations": iterations, "seeds": seeds, "finals": finals}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def verdict(finals: dict[str, list[float]], a: str, b: str) -> str:
    sa, sb = spread(finals[a]), spread(finals[b])
    difference = sa["mean"] - sb["mean"]
    noise = 2 * max(sa["std"], sb["std"])
    within = abs(difference) < noise
    return (f"{a} - {b}: {100 * difference:+.2f} points, "
            + ("within noise" if within else "larger than the noise")
            + f" (2 x the larger standard deviation: {100 * noise:.2f} points)")


def keras_table(result: dict) -> list[str]:
    lines = ["| model | seeds | final test accuracies | mean | min .. max | std |",
             "|---|---:|---|---:|---:|---:|"]
    for name, values in result["finals"].items():
        s = spread(values)
        lines.append(f"| {name} | {len(values)} | " + ", ".join(f"{100 * v:.2f}%" for v in values) +
                     f" | {100 * s['mean']:.2f}% | {100 * s['min']:.2f} .. {100 * s['max']:.2f}% | "
                     f"{100 * s['std']:.2f} |")
    return lines


def keras_verdicts(result: dict) -> list[str]:
    return [verdict(result["finals"], "PReLU, slopes from 0.25", "ReLU"),
            verdict(result["finals"], "PReLU, slopes from 0", "ReLU"),
            verdict(result["finals"], "PReLU, slopes from 0.25", "PReLU, slopes from 0")]


def keras_markdown(result: dict, command: str, where: str) -> str:
    begin, end = markers("benchmarks/prelu_study.py keras")
    lines = [begin, "## PReLU against ReLU over seeds, Keras-style (benchmarks/prelu_study.py keras)", "",
             f"Reproduce: `{command}` (updates this section). Measured {dt.date.today().isoformat()} on "
             f"{where}.", "",
             "models/lenet_prelu with its PReLU slopes initialised to 0 and to 0.25 (constant filler), and "
             f"models/lenet (ReLU), {result['iterations']:,} iterations of batch 64 (the shipped solvers "
             "run 2,000; cut so that the nine runs fit about 8 minutes on 2 cores), random_seed "
             f"{', '.join(map(str, result['seeds']))}; the first 8,000 t10k images for training, the "
             "last 2,000 for the test. The Keras comparison reported 99.29% (PReLU) against 99.30% "
             "(ReLU) on the full MNIST. Within noise: the difference of the means is below twice the "
             "larger standard deviation over the seeds.", "", *keras_table(result), "",
             *[f"- {line}" for line in keras_verdicts(result)], "", end]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=("cnn", "keras"), help="cnn: PReLU CNN and its ReLU twin per epoch; "
                        "keras: LeNet PReLU (slopes from 0, 0.25) against ReLU over seeds")
    shared = Path(os.environ.get("MINICAFFE_SHARED") or REPO.parent / "shared")  # as the tests find it
    parser.add_argument("--mnist", type=Path, default=shared / "data" / "mnist",
                        help="folder with t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (default: "
                             "$MINICAFFE_SHARED/data/mnist, else ../shared/data/mnist)")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder (default: a temporary one, and the PNG in the current one)")
    parser.add_argument("--epochs", type=int, default=None, help=f"cnn: epochs (default {CNN_EPOCHS})")
    parser.add_argument("--quick", action="store_true", help="a smoke test: short epochs, fewer seeds")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md", help="markdown file to update")
    args = parser.parse_args(argv)
    if not (args.mnist / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"MNIST not found in {args.mnist}", file=sys.stderr)
        return 1
    command = f"python benchmarks/prelu_study.py {args.study}" + (" --quick" if args.quick else "") + (
        f" --epochs {args.epochs}" if args.epochs else "")
    where = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        dbs = prepare(args.mnist, work)
        if args.study == "cnn":
            png = (args.work or Path.cwd()) / "prelu_slopes.png"
            result = run_cnn(work, dbs, args.quick, args.epochs, png)
            for p, r in zip(result["per_epoch"]["PReLU"], result["per_epoch"]["ReLU"]):
                slopes = ", ".join(f"{layer} {values.get(p['epoch'], float('nan')):.4f}"
                                   for layer, values in sorted(result["slopes"].items()))
                seconds = ("" if p["seconds"] is None
                           else f" ({p['seconds']:.1f} s, ReLU {r['seconds']:.1f} s)")
                print(f"epoch {p['epoch']}: PReLU {100 * p['accuracy']:.2f}%, ReLU {100 * r['accuracy']:.2f}%"
                      f"{seconds}; slopes {slopes}")
            print("\n".join(cnn_table(result)))
            print(f"slope plot: {png}")
            section = cnn_markdown(result, command, where)
        else:
            result = run_keras(work, dbs, args.quick)
            print("\n".join(keras_table(result)))
            print("\n".join(keras_verdicts(result)))
            section = keras_markdown(result, command, where)
    if not args.no_write:
        update_section(args.output, f"benchmarks/prelu_study.py {args.study}", section)
        print(f"updated {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
