"""`minicaffe plot LOG [-o out.png]`: learning curves from a training log: train and test losses,
test accuracies and the learning rate against the iteration (parsed as `minicaffe parse-log`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .parse_log import parse_log
from .plot_params import pyplot

_BASE = ("NumIters", "Seconds", "LearningRate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="training log")
    parser.add_argument("-o", "--output", help="PNG to write (default: LOG.png)")


def _series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    points = [(row["NumIters"], row[name]) for row in rows if name in row]
    return [p[0] for p in points], [p[1] for p in points]


def _outputs(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if k not in _BASE and k not in names)
    return names


def is_accuracy(name: str) -> bool:
    return "acc" in name.lower()


def run(args: argparse.Namespace) -> int:
    log = Path(args.log)
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no such log file")
    train, test = parse_log(log)
    if not train and not test:
        raise ValueError(f"{log}: no 'Train net output' or 'Test net output' lines found "
                         "(is it a training log?)")
    output = Path(args.output) if args.output else log.with_name(log.name + ".png")
    plt = pyplot()
    figure, (loss_axis, accuracy_axis, lr_axis) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for rows, phase, style in ((train, "train", "-"), (test, "test", "o-")):
        for name in _outputs(rows):
            axis = accuracy_axis if is_accuracy(name) else loss_axis
            x, y = _series(rows, name)
            axis.plot(x, y, style, markersize=3, label=f"{phase} {name}")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title(f"{log.name}", fontsize=10)
    accuracy_axis.set_ylabel("accuracy")
    rates = sorted({(row["NumIters"], row["LearningRate"]) for row in train + test})
    if rates:
        # Points where the log printed the rate, joined: the log does not say how it changed between.
        lr_axis.plot([r[0] for r in rates], [r[1] for r in rates], ".-", color="tab:green")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("iteration")
    for axis in (loss_axis, accuracy_axis, lr_axis):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    if not accuracy_axis.lines:
        accuracy_axis.text(0.5, 0.5, "no accuracy output in the log", ha="center", va="center",
                           transform=accuracy_axis.transAxes, color="gray")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    print(f"wrote {output} ({len(train)} train rows, {len(test)} test rows)")
    return 0
