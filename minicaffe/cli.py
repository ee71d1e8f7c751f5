"""The `minicaffe` command: Caffe's tool verbs (train, test, time, device_query) and more.

Each subcommand lives in its own module under minicaffe/commands/ with two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Flags follow Caffe's tool: `--solver X`,
`--solver=X` and Caffe's single-dash `-solver X` are all accepted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module under minicaffe.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a net from a solver prototxt (as caffe train; --solver quickstart: example)"),
    "test": ("test", "score a trained model on its TEST phase (as caffe test)"),
    "quickstart": ("quickstart", "train the embedded 8x8-digits example (= train --solver quickstart)"),
    "params": ("params", "statistics (and values) of parameter blobs, e.g. PReLU slopes"),
    "plot-params": ("plot_params", "per-layer parameter distributions (PReLU slopes) to a PNG"),
    "time": ("time", "per-layer forward/backward timings and element-wise bandwidth (as caffe time)"),
    "summary": ("summary", "every layer with type, top shapes, parameter count and memory"),
    "plot": ("plot", "learning curves (losses, accuracy, learning rate) from a training log to a PNG"),
    "parse-log": ("parse_log", "training log -> LOG.train and LOG.test CSV files (as Caffe's parse_log)"),
    "device_query": ("device_query", "CPU (cores, BLAS, kernel compiler) or GPU (--gpu N) properties"),
    "draw": ("draw", "the net graph as .svg/.png/.pdf (Graphviz) or .dot text"),
    "convert-mnist": ("convert_mnist", "IDX images + labels -> LMDB of Datum (as Caffe's convert_mnist_data)"),  # noqa: E501
}


def _caffe_style(argv: list[str]) -> list[str]:
    """Accept Caffe/gflags' single-dash long flags: -solver X -> --solver X."""
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2 and not arg[1].isdigit():
            out.append("-" + arg)
        else:
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicaffe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"minicaffe.commands.{module_name}")
        # Caffe spells device_query with an underscore; device-query is accepted too.
        aliases = [name.replace("_", "-")] if "_" in name else []
        command = sub.add_parser(name, help=help_text, description=help_text, aliases=aliases)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .backend import BackendError
    from .io import FormatError
    from .kernel import KernelError
    from .layer import LayerError
    from .net import NetError

    parser = build_parser()
    args = parser.parse_args(_caffe_style(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (FormatError, NetError, LayerError, KernelError, BackendError, OSError, ValueError) as error:
        print(f"minicaffe {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minicaffe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
