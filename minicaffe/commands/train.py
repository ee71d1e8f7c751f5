"""minicaffe train --solver S [--weights W] [--snapshot STATE] [--gpu N]: Caffe's `caffe train`.

Trains the solver's net, logging in Caffe's format to stderr (plus a progress line on a terminal).
`--snapshot` resumes from a .solverstate; `--weights` starts from (comma-separated) .caffemodel files.
Without --gpu the solver's solver_mode decides, as in Caffe (CPU unless the file says GPU; when it
says GPU and none is usable, minicaffe warns and trains on the CPU). Ctrl-C stops after the current
iteration and writes a snapshot (Caffe's --sigint_effect stop); SIGHUP snapshots and goes on.

`--solver quickstart` trains the embedded example: a small conv net on scikit-learn's 8x8 digits,
converted to LMDB on first use; it runs offline in well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .. import backend, log
from ..proto import caffe_pb2
from ..solver import NONE, SNAPSHOT, STOP, Solver, read_solver

EFFECTS = {"stop": STOP, "snapshot": SNAPSHOT, "none": NONE}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--solver", required=True,
                        help="solver prototxt, or 'quickstart' for the embedded digits example")
    parser.add_argument("--weights", default="",
                        help="pretrained .caffemodel(s) to finetune from, comma-separated")
    parser.add_argument("--snapshot", default="", help=".solverstate to resume training from")
    add_device_arguments(parser)
    parser.add_argument("--watch", metavar="PATTERN", default=None,
                        help="at each display step, log the mean [min .. max] of the parameters of the "
                             "layers matching PATTERN (glob on name or type, e.g. 'prelu*') and append "
                             "them to <snapshot_prefix>_watch.csv")
    for name, default, what in (("sigint_effect", "stop", "Ctrl-C"), ("sighup_effect", "snapshot", "SIGHUP")):
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, default=default,
                            choices=sorted(EFFECTS), help=f"what {what} does (default {default})")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--gpu, --level and --stage, shared with `minicaffe test`."""
    parser.add_argument("--gpu", default=None,
                        help="GPU id to run on (e.g. 0; 'all' means the first); overrides solver_mode")
    parser.add_argument("--level", type=int, default=0, help="net state level (for include/exclude rules)")
    parser.add_argument("--stage", default="", help="net state stages, comma-separated")


def stages(args: argparse.Namespace) -> list[str]:
    return [s for s in args.stage.split(",") if s]


def use_device(gpu: str | None, from_solver: bool = False) -> None:
    """CPU when gpu is None, else the GPU `gpu` ('all' or a list: the first one)."""
    if gpu is None:
        log.info("Use CPU.", "caffe.cpp:230")
        backend.set_mode_cpu()
        return
    ids = [g for g in str(gpu).split(",") if g]
    first = 0 if not ids or ids[0] == "all" else int(ids[0])
    if len(ids) > 1:
        log.warning(f"minicaffe trains on one GPU; using GPU {first} of {gpu}", "caffe.cpp:236")
    try:
        backend.set_device(first)
        backend.set_mode_gpu()
    except backend.BackendError as error:
        if not from_solver:
            raise
        log.warning(f"solver_mode is GPU but {error}; training on the CPU", "caffe.cpp:240")
        backend.set_mode_cpu()
        return
    log.info(f"Using GPUs {first}", "caffe.cpp:243")


class SignalHandler:
    """Caffe's SignalHandler: SIGINT / SIGHUP become solver actions checked between iterations.
    A second Ctrl-C while the first is pending (or after a stop) interrupts at once."""

    def __init__(self, sigint_effect: str, sighup_effect: str):
        self.effects = {signal.SIGINT: EFFECTS[sigint_effect]}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = EFFECTS[sighup_effect]
        self.pending: list[str] = []
        self.stopping = False
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and (self.stopping or STOP in self.pending or SNAPSHOT in self.pending):
            raise KeyboardInterrupt
        # Only record it: the handler may interrupt the main thread anywhere (even inside a log write).
        effect = self.effects[signum]
        if effect != NONE:
            self.pending.append(effect)

    def action(self) -> str:
        if not self.pending:
            return NONE
        effect = self.pending.pop(0)
        if effect == STOP:
            self.stopping = True
            log.info("Stopping: signal received (Ctrl-C again to quit at once)", "signal_handler.cpp:40")
        return effect

    def __enter__(self) -> SignalHandler:
        for signum in self.effects:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test's thread): no handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run(args: argparse.Namespace) -> int:
    if args.snapshot and args.weights:
        raise ValueError("give --snapshot to resume training or --weights to finetune, not both")
    quickstart = args.solver == "quickstart" and not Path(args.solver).exists()
    if quickstart:
        from .quickstart import quickstart_solver

        param, base_dir = quickstart_solver()
    else:
        if not Path(args.solver).is_file():
            raise FileNotFoundError(f"solver file '{args.solver}' not found")
        param, base_dir = read_solver(args.solver), Path(args.solver).parent
    param.train_state.level = args.level
    param.train_state.stage.extend(stages(args))
    gpu = args.gpu
    from_solver = False
    if gpu is None and param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        gpu, from_solver = str(param.device_id), True
    use_device(gpu, from_solver)
    if args.snapshot:
        param.ClearField("weights")
    elif args.weights:
        param.ClearField("weights")
        param.weights.append(args.weights)
    solver = Solver(param, base_dir=base_dir, source=args.solver)
    if args.watch:
        from ..inspect import watch_solver

        watcher = watch_solver(solver, args.watch)
        log.info(f"Watching {', '.join(layer.name for layer in watcher.layers)} in {watcher.csv_path}",
                 "caffe.cpp:268")
    with SignalHandler(args.sigint_effect, args.sighup_effect) as handler:
        solver.set_action_function(handler.action)
        if args.snapshot:
            log.info(f"Resuming from {args.snapshot}", "caffe.cpp:258")
        log.info("Starting Optimization", "caffe.cpp:263")
        solver.solve(args.snapshot or None)
    if quickstart:
        from .quickstart import report

        report(solver, sys.stdout)
    return 0
