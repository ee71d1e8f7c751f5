"""`minicaffe plot-params`: one panel per layer showing the distribution of its parameter values
(by default the slopes of every PReLU layer), written to a PNG. With ``--watch-csv``: one panel per layer
showing its parameters' mean (and min .. max) against the iteration or epoch, from the CSV that
`minicaffe train --watch` writes."""

from __future__ import annotations

import argparse
import math
import textwrap

import numpy as np

from .. import inspect
from .params import selected_params

TITLE_POINTS = 9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="net prototxt (optional with --weights)")
    parser.add_argument("--weights", help=".caffemodel (or a .solverstate snapshot: its .caffemodel)")
    parser.add_argument("--layer", metavar="GLOB", help="only layers whose name matches (any case)")
    parser.add_argument("--type", dest="layer_type", metavar="TYPE", default="PReLU",
                        help="layer type to draw (default PReLU; 'all' for every layer with parameters)")
    parser.add_argument("--blob", type=int, default=0,
                        help="which parameter blob of each layer (0: weights or slopes, 1: bias; default 0)")
    parser.add_argument("-o", "--output", default="params.png", help="PNG to write (default params.png)")
    parser.add_argument("--watch-csv", metavar="CSV", help="instead: the mean [min .. max] of each layer's "
                        "parameters over training, from `minicaffe train --watch`'s CSV")
    parser.add_argument("--epoch-iterations", type=int, default=None, metavar="N",
                        help="with --watch-csv: iterations per epoch, to draw against epochs")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; a clear error when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'minicaffe[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(chosen: list[inspect.LayerParams], blob: int, title: str):
    """The figure: one histogram of parameter blob `blob` per layer, under the title `title`."""
    plt = pyplot()
    columns = min(3, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    # Constrained layout keeps the figure title clear of the panels' titles.
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False,
                                layout="constrained")
    for axis in axes.flat[len(chosen):]:
        axis.set_visible(False)
    for axis, (name, kind, arrays) in zip(axes.flat, chosen):
        values = np.asarray(arrays[blob], dtype=np.float64).ravel()
        stats = inspect.blob_stats(values)
        axis.hist(values, bins=max(5, min(40, values.size // 2 or 1)), color="tab:blue", alpha=0.75)
        # The individual values as a rug: PReLU layers often have only a handful of slopes.
        axis.plot(values, np.zeros_like(values), "|", color="black", markersize=10)
        axis.axvline(stats["mean"], color="tab:red", linestyle="--", label=f"mean {stats['mean']:.3g}")
        if kind == "PReLU":
            axis.axvline(0.25, color="gray", linestyle=":", label="init 0.25")
        what = "slopes" if kind == "PReLU" else f"blob {blob} values"
        axis.set_title(f"{name} ({kind}): {values.size} {what}", fontsize=9)
        axis.set_xlabel(f"min {stats['min']:.3g}  max {stats['max']:.3g}  std {stats['std']:.3g}", fontsize=8)
        axis.legend(fontsize=7)
    # A long path is cut into lines that fit (Matplotlib only wraps at spaces, which paths rarely have).
    fitting = int(figure.get_figwidth() * 72 / (0.6 * TITLE_POINTS))
    figure.suptitle("\n".join(textwrap.wrap(title, fitting)), fontsize=TITLE_POINTS)
    return figure


def draw_trace(rows: list[dict], blob: int, title: str, epoch_iterations: int | None = None):
    """The figure: per layer, the mean of parameter blob `blob` against the iteration (or epoch), with
    its min .. max as a band; rows as `minicaffe.watch.read_watch_csv` gives them."""
    plt = pyplot()
    layers = list(dict.fromkeys(row["layer"] for row in rows if row["blob"] == blob))
    columns = min(4, len(layers))
    figure, axes = plt.subplots(math.ceil(len(layers) / columns), columns, figsize=(3.6 * columns, 3.0),
                                squeeze=False, layout="constrained")
    for axis in axes.flat[len(layers):]:
        axis.set_visible(False)
    for axis, name in zip(axes.flat, layers):
        mine = sorted((row for row in rows if row["layer"] == name and row["blob"] == blob),
                      key=lambda row: row["iteration"])
        steps = [row["iteration"] / (epoch_iterations or 1) for row in mine]
        axis.fill_between(steps, [row["min"] for row in mine], [row["max"] for row in mine], alpha=0.25,
                          color="tab:blue", label="min .. max")
        axis.plot(steps, [row["mean"] for row in mine], "o-", color="tab:blue", markersize=3, label="mean")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("epoch" if epoch_iterations else "iteration", fontsize=8)
        axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=TITLE_POINTS)
    return figure


def run(args: argparse.Namespace) -> int:
    if args.watch_csv:
        from ..watch import read_watch_csv

        rows = read_watch_csv(args.watch_csv)
        if not any(row["blob"] == args.blob for row in rows):
            raise ValueError(f"{args.watch_csv} has no rows of parameter blob {args.blob}")
        figure = draw_trace(rows, args.blob, f"{args.watch_csv}: parameter {args.blob} during training",
                            args.epoch_iterations)
        figure.savefig(args.output, dpi=100)
        pyplot().close(figure)
        print(f"wrote {args.output} ({len({row['layer'] for row in rows})} layers)")
        return 0
    if args.layer_type and args.layer_type.lower() == "all":
        args.layer_type = None
    chosen = [entry for entry in selected_params(args) if len(entry[2]) > args.blob]
    if not chosen:
        raise ValueError(f"no selected layer has a parameter blob {args.blob}")
    figure = draw(chosen, args.blob, args.weights or args.model)
    figure.savefig(args.output, dpi=100)
    pyplot().close(figure)
    print(f"wrote {args.output} ({len(chosen)} layers)")
    return 0
