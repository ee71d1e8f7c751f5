"""The `minicaffe` command: Caffe's tool verbs (train, test, time, device_query) and more.

Each subcommand lives in its own module under minicaffe/commands/ with two functions:
``add_arguments(parser)`` and ``run(args) -> int``. Flags follow Caffe's tool: `--solver X`,
`--solver=X` and Caffe's single-dash `-solver X` are all accepted.

Errors never show a Python traceback: main() turns any exception of a command into one line,
``minicaffe COMMAND: error: ...`` (the modules' messages name the file, line, layer or field), and exit
status 1; `--debug` prints the traceback as well.

`--threads N` (before or after the command) sets the CPU threads of every command, kernels and BLAS
(see minicaffe.threads); without it, $MINICAFFE_THREADS, else the cores this process may use.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np

from . import log, threads
from .backend import BackendError
from .kernel import KernelError

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
    "upgrade-net": ("upgrade_net", "a V0/V1 net (prototxt or .caffemodel) -> today's format (as upgrade_net_proto_*)"),  # noqa: E501
    "upgrade-solver": ("upgrade_solver", "a solver with the old solver_type enum -> today's format"),
    "export": ("export", "a deploy net + weights -> ONNX (--onnx), --check: compared in onnxruntime"),
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive number"  # argparse names the type in its error message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicaffe", description=__doc__.splitlines()[0])
    debug_help = "on an error, print the Python traceback as well as the one-line message"
    threads_help = (f"CPU threads for kernels and BLAS (default: ${threads.ENV}, else the cores this "
                    "process may use; never more than those)")
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--threads", type=positive_int, metavar="N", help=threads_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(f"minicaffe.commands.{module_name}")
        # Caffe spells device_query with an underscore; device-query is accepted too.
        aliases = [name.replace("_", "-")] if "_" in name else []
        command = sub.add_parser(name, help=help_text, description=help_text, aliases=aliases)
        module.add_arguments(command)
        # Also after the command; SUPPRESS: not given there, it keeps the value of `minicaffe --debug`.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        command.add_argument("--threads", type=positive_int, metavar="N", default=argparse.SUPPRESS,
                             help=threads_help)
        command.set_defaults(_run=module.run)
    return parser


# The errors of bad input or of the system (a file, a device, the kernel compiler): their message is
# the report (FormatError, NetError, LayerError, SolverError, DBError, ... are ValueErrors). Any other
# exception is a bug, reported as such, in one line too.
EXPECTED_ERRORS = (ValueError, OSError, BackendError, KernelError)


def error_line(error: BaseException) -> str:
    """One line for `error`: its message, the file first for an OSError that names one."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        files = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else error.filename
        text = f"{files}: {error.strerror}"
    elif isinstance(error, MemoryError):
        text = f"out of memory{': ' + str(error) if str(error) else ''} (a size too large for this machine?)"
    elif isinstance(error, EXPECTED_ERRORS):
        text = str(error) or type(error).__name__
    else:
        text = f"internal error: {type(error).__name__}: {error} (run again with --debug for the traceback)"
    text = " | ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= 2000 else text[:2000] + "..."


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    log.warning(f"{category.__name__}: {message}", f"{Path(filename).name}:{lineno}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_caffe_style(list(sys.argv[1:] if argv is None else argv)))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        # Overflow to inf and NaN are the training guards' to report (they name the iteration and the
        # blob); numpy's own warnings would only add lines that are neither log lines nor the error.
        # Other Python warnings become glog WARNING lines.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"), \
                warnings.catch_warnings():
            warnings.showwarning = _log_warning
            threads.configure(args.threads)
            return int(args._run(args) or 0)
    except BrokenPipeError:
        # The reader of our output has gone (`minicaffe params ... | head`): nothing to tell it, and
        # nothing left for Python to flush into the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"minicaffe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"minicaffe {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
