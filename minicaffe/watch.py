"""Tracing parameters while a net trains (``minicaffe train --watch PATTERN``): a log line and CSV rows
with the mean, min and max of each watched parameter blob, e.g. the PReLU slopes."""

from __future__ import annotations

import csv
from io import TextIOWrapper
from pathlib import Path

import numpy as np

from . import io, log
from .inspect import matches


class ParamWatcher:
    """Prints and records the parameters of the layers matching `pattern` (a glob on layer name or
    type, any case: ``prelu*``, ``PReLU``) while a net trains.

    ``record(iteration)`` returns one log line, e.g.
    ``alpha values at iteration 100: prelu1 mean 0.25 [0.21 .. 0.3], prelu2 mean 0.24 [...]``,
    and appends one CSV row per parameter blob: iteration, layer, blob (its position in the layer),
    mean, min, max.
    """

    CSV_HEADER = ("iteration", "layer", "blob", "mean", "min", "max")

    def __init__(self, net, pattern: str, csv_path: str | Path | None = None):
        self.net, self.pattern = net, pattern
        self.layers = [layer for layer in net.layers
                       if layer.blobs and matches(pattern, layer.name, layer.type)]
        if not self.layers:
            have = ", ".join(f"{layer.name} ({layer.type})" for layer in net.layers if layer.blobs) or "none"
            raise ValueError(f"--watch '{pattern}' matches no layer with parameters "
                             f"(layers with parameters: {have})")
        self.csv_path = Path(csv_path) if csv_path is not None else None
        # "alpha" is what PReLU users call the slopes (and what the seeds print).
        self.label = "alpha values" if all(layer.type == "PReLU" for layer in self.layers) else "parameters"

    def stats(self) -> list[tuple[str, int, float, float, float]]:
        out = []
        for layer in self.layers:
            for index, blob in enumerate(layer.blobs):
                v = np.asarray(blob.data, dtype=np.float64)
                out.append((layer.name, index, float(v.mean()), float(v.min()), float(v.max())))
        return out

    def record(self, iteration: int) -> str:
        rows = self.stats()
        if self.csv_path is not None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            with open(self.csv_path, "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(self.CSV_HEADER)
                for name, index, mean, low, high in rows:
                    writer.writerow([iteration, name, index, repr(mean), repr(low), repr(high)])
        several = {name for name, index, *_ in rows if index > 0}
        parts = []
        for name, index, mean, low, high in rows:
            label = f"{name}[{index}]" if name in several else name
            parts.append(f"{label} mean {mean:.4g} [{low:.4g} .. {high:.4g}]")
        return f"{self.label} at iteration {iteration}: " + ", ".join(parts)

    def log(self, iteration: int) -> None:
        """record(iteration), and its line in the training log (glog's file:line form, so log parsers
        keep reading the log)."""
        log.info(self.record(iteration), "solver.cpp:262")


def read_watch_csv(path: str | Path) -> list[dict]:
    """The rows a ParamWatcher wrote, numbers converted."""
    with io.open_file(path) as raw, TextIOWrapper(raw, newline="") as f:
        return [{"iteration": int(r["iteration"]), "layer": r["layer"], "blob": int(r["blob"]),
                 "mean": float(r["mean"]), "min": float(r["min"]), "max": float(r["max"])}
                for r in csv.DictReader(f)]


def watch_solver(solver, pattern: str, csv_path: str | Path | None = None) -> ParamWatcher:
    """Trace the parameters of `solver`'s train net matching `pattern` at every display step (and at
    every iteration when display is 0): a log line, and a CSV row per blob in `csv_path`, by default
    ``<snapshot_prefix>_watch.csv`` beside the snapshots. Uses the solver's pycaffe-style callback,
    after the gradients (and the display lines) and before the update of that iteration. The callback
    cannot see the end of training: call ``watcher.log(solver.iter)`` after it for the final weights
    (`minicaffe train --watch` does)."""
    if csv_path is None:
        csv_path = f"{solver.param.snapshot_prefix or 'minicaffe'}_watch.csv"
    watcher = ParamWatcher(solver.net, pattern, csv_path)

    def on_gradients() -> None:
        display = solver.param.display
        if not display or solver.iter % display == 0:
            watcher.log(solver.iter)

    solver.add_callback(on_gradients=on_gradients)
    return watcher


__all__ = ["ParamWatcher", "read_watch_csv", "watch_solver"]
