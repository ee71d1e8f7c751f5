"""What several commands share: the --gpu flag and the device it selects, the net state flags
(--level, --stage), and the signal handling of the training commands."""

from __future__ import annotations

import argparse
import signal

from .. import backend, log
from ..solver import NONE, SNAPSHOT, STOP

EFFECTS = {"stop": STOP, "snapshot": SNAPSHOT, "none": NONE}


# -- the device ---------------------------------------------------------------------------------------

def add_gpu_argument(parser: argparse.ArgumentParser, default_text: str = "the CPU") -> None:
    """Caffe's -gpu: one id, a comma-separated list or 'all'."""
    parser.add_argument("--gpu", default=None, metavar="ID",
                        help=f"GPU to use: an id (0), a list (0,1: the first is used) or 'all' "
                             f"(default: {default_text})")


def gpu_count() -> int:
    """CUDA devices CuPy sees (0 without CuPy or a driver)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, or CuPy's CUDARuntimeError without a driver
        return 0


def parse_gpu(value: str | None) -> list[int] | None:
    """The GPU ids of a --gpu value: None (the CPU) when not given, '0' -> [0], '0,1' -> [0, 1],
    'all' -> every device present (an error when there is none)."""
    if value is None:
        return None
    text = str(value).strip()
    if text == "all":
        count = gpu_count()
        if not count:
            raise ValueError("--gpu all: no usable GPU (needs CuPy and a CUDA device)")
        return list(range(count))
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise ValueError(f"--gpu: give a GPU id (0), a list (0,1) or 'all', got '{value}'")
    return ids


def use_device(gpu: str | None, from_solver: bool = False, quiet: bool = False) -> int | None:
    """Set the mode: the CPU when gpu is None, else the first GPU of the --gpu value `gpu`. Returns the
    GPU id, or None for the CPU.

    from_solver: the GPU comes from the solver's solver_mode, and falls back to the CPU with a warning
    when it cannot be used (as an explicit --gpu cannot: that raises BackendError). quiet: no info log
    lines ("Use CPU.", "Using GPUs 0"), for commands whose report is their own output."""
    ids = parse_gpu(gpu)
    if ids is None:
        if not quiet:
            log.info("Use CPU.", "caffe.cpp:230")
        backend.set_mode_cpu()
        return None
    first = ids[0]
    if len(ids) > 1:
        log.warning(f"minicaffe runs on one GPU; using GPU {first} of {gpu}", "caffe.cpp:236")
    try:
        backend.set_device(first)
        backend.set_mode_gpu()
    except backend.BackendError as error:
        if not from_solver:
            raise
        log.warning(f"solver_mode is GPU but {error}; training on the CPU", "caffe.cpp:240")
        backend.set_mode_cpu()
        return None
    if not quiet:
        log.info(f"Using GPUs {first}", "caffe.cpp:243")
    return first


# -- the net state ------------------------------------------------------------------------------------

def add_state_arguments(parser: argparse.ArgumentParser) -> None:
    """--level and --stage: the NetState that layers' include/exclude rules test."""
    parser.add_argument("--level", type=int, default=0, help="net state level (for include/exclude rules)")
    parser.add_argument("--stage", default="", help="net state stages, comma-separated")


def stages(args: argparse.Namespace) -> list[str]:
    return [s for s in args.stage.split(",") if s]


# -- signals ------------------------------------------------------------------------------------------

class SignalHandler:
    """Caffe's SignalHandler: SIGINT / SIGHUP (and SIGTERM, which Caffe leaves to kill the process)
    become solver actions checked between iterations. A second Ctrl-C, or a second signal whose effect
    is stop, while the first is pending (or after a stop) interrupts at once."""

    def __init__(self, sigint_effect: str, sighup_effect: str, sigterm_effect: str = "stop"):
        self.effects = {signal.SIGINT: EFFECTS[sigint_effect], signal.SIGTERM: EFFECTS[sigterm_effect]}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = EFFECTS[sighup_effect]
        self.pending: list[str] = []
        self.stopping = False
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        effect = self.effects[signum]
        busy = self.stopping or STOP in self.pending or SNAPSHOT in self.pending
        if busy and (signum == signal.SIGINT or effect == STOP):
            raise KeyboardInterrupt
        # Only record it: the handler may interrupt the main thread anywhere (even inside a log write).
        if effect != NONE:
            self.pending.append(effect)

    def action(self) -> str:
        if not self.pending:
            return NONE
        effect = self.pending.pop(0)
        if effect == STOP:
            self.stopping = True
            log.info("Stopping: signal received (Ctrl-C or the signal again to quit at once)",
                     "signal_handler.cpp:40")
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
