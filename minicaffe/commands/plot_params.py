"""`minicaffe plot-params`: one panel per layer showing the distribution of its parameter values
(by default the slopes of every PReLU layer), written to a PNG."""

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


def run(args: argparse.Namespace) -> int:
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
