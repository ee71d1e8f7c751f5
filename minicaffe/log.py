"""Logging in glog's format, so the log parsers written for Caffe (tools/extra/parse_log.py and friends)
read minicaffe's training logs unchanged:

    I1122 16:47:04.123456 12345 solver.cpp:218] Iteration 100 (12.3 iter/s, 8.1s/100 iters), loss = 0.3

Log lines go to stderr (as the `caffe` tool sets glog's alsologtostderr). When stderr is a terminal, a
one-line progress display (iteration, rate, ETA) is kept under the log lines; it is never written when
stderr is a file or a pipe, so logs stay clean.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import datetime
from typing import TextIO

_state: dict = {"stream": None, "status": "", "status_time": 0.0}
# Reentrant: a signal handler that logs may run while the main thread is inside _write.
_lock = threading.RLock()


def set_stream(stream: TextIO | None) -> None:
    """Send log lines to `stream` (None: sys.stderr at the time of each line)."""
    _state["stream"] = stream


def _stream() -> TextIO:
    return _state["stream"] or sys.stderr


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def fmt(value: float) -> str:
    """A number as C++'s default ostream prints it (6 significant digits), as Caffe's logs show them."""
    return f"{float(value):.6g}"


def format_line(level: str, message: str, where: str, now: datetime | None = None) -> str:
    now = now or datetime.now()
    return (f"{level}{now:%m%d %H:%M:%S}.{now.microsecond:06d} {threading.get_native_id() or os.getpid():5d} "
            f"{where}] {message}")


def _write(level: str, message: str, where: str) -> None:
    stream = _stream()
    line = format_line(level, message, where)
    with _lock:
        terminal = _is_terminal(stream) and _state["status"]
        if terminal:
            stream.write("\r\033[K")  # clear the progress line, write the log line, redraw it
        stream.write(line + "\n")
        if terminal:
            stream.write(_state["status"])
        stream.flush()


def info(message: str, where: str = "solver.cpp:0") -> None:
    _write("I", message, where)


def warning(message: str, where: str = "solver.cpp:0") -> None:
    _write("W", message, where)


# -- progress display (terminal only) ---------------------------------------------------------------

class Progress:
    """`[  340/2000]  57.3 iter/s  ETA 0:29  loss 0.214` on the last line of a terminal."""

    def __init__(self, start_iter: int, stop_iter: int, stream: TextIO | None = None,
                 interval: float = 0.25):
        self.start_iter, self.stop_iter = start_iter, stop_iter
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.active = _is_terminal(self._out())

    def _out(self) -> TextIO:
        return self.stream or _stream()

    def update(self, iteration: int, loss: float | None = None) -> None:
        if not self.active:
            return
        now = time.monotonic()
        if now - self.last_draw < self.interval and iteration < self.stop_iter:
            return
        self.last_draw = now
        done = iteration - self.start_iter
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        left = self.stop_iter - iteration
        eta = _duration(left / rate) if rate > 0 else "?"
        width = len(str(self.stop_iter))
        text = f"[{iteration:>{width}}/{self.stop_iter}] {rate:6.1f} iter/s  ETA {eta}"
        if loss is not None:
            text += f"  loss {loss:.4g}"
        with _lock:
            _state["status"] = text
            out = self._out()
            out.write("\r\033[K" + text)
            out.flush()

    def close(self) -> None:
        if not self.active:
            return
        with _lock:
            if _state["status"]:
                out = self._out()
                out.write("\r\033[K")
                out.flush()
            _state["status"] = ""
        self.active = False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
