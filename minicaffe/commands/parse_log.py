"""`minicaffe parse-log LOG [OUT_DIR]`: training log -> LOG.train and LOG.test CSV files, as Caffe's
tools/extra/parse_log.py.

Columns: NumIters, Seconds (since the solver started), LearningRate, then every net output by name
(e.g. loss, accuracy), from the glog-format lines the solver prints:

    I1122 16:47:04.123456 12345 solver.cpp:218] Iteration 100 (12.3 iter/s, 8.1s/100 iters), loss = 0.3
    I1122 16:47:04.123500 12345 solver.cpp:237]     Train net output #0: loss = 0.3 (* 1 = 0.3 loss)
    I1122 16:47:04.123600 12345 sgd_solver.cpp:105] Iteration 100, lr = 0.01
    I1122 16:47:09.000000 12345 solver.cpp:330] Iteration 500, Testing net (#0)
    I1122 16:47:09.500000 12345 solver.cpp:397]     Test net output #0: accuracy = 0.98

Unlike Caffe's script, the last row is kept even when it is the only one of its kind.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import re
from pathlib import Path

from .. import io

_ITERATION = re.compile(r"Iteration (\d+)")
_TRAIN = re.compile(r"Train net output #(\d+): (\S+) = ([-+.\deEinfa]+)")
_TEST = re.compile(r"Test net output #(\d+): (\S+) = ([-+.\deEinfa]+)")
_LR = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")
_STAMP = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+)")
_CREATED = re.compile(r"Log file created at: (\d{4})/")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", help="training log (what `minicaffe train` prints, or Caffe's)")
    parser.add_argument("output_dir", nargs="?", default=None,
                        help="where to write LOG.train and LOG.test (default: beside the log)")
    parser.add_argument("--delimiter", default=",", help="CSV column separator (default ',')")


def line_time(line: str, year: int) -> dt.datetime | None:
    match = _STAMP.match(line)
    if not match:
        return None
    month, day, hour, minute, second, fraction = match.groups()
    try:
        return dt.datetime(year, int(month), int(day), int(hour), int(minute), int(second),
                           int(fraction.ljust(6, "0")[:6]))
    except ValueError:
        return None


def parse_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows); each row a dict NumIters, Seconds, LearningRate, outputs..."""
    lines = io.read_file(path).decode(errors="replace").splitlines()
    year = dt.date.today().year
    for line in lines[:5]:
        created = _CREATED.search(line)
        if created:
            year = int(created.group(1))
    # Seconds count from the solver's start ("Solving ..."), else from the first timestamped line.
    start = None
    for line in lines:
        if "Solving" in line and line_time(line, year):
            start = line_time(line, year)
            break
    if start is None:
        start = next((t for t in (line_time(line, year) for line in lines) if t), None)

    rows: dict[str, list[dict]] = {"train": [], "test": []}
    pending: dict[str, dict | None] = {"train": None, "test": None}
    iteration, seconds = None, math.nan
    last = start
    for number, line in enumerate(lines, 1):
        stamp = line_time(line, year)
        if stamp is not None and last is not None and stamp < last - dt.timedelta(days=1):
            year += 1  # the log crossed new year (glog lines carry no year)
            stamp = line_time(line, year)
        if stamp is not None:
            last = stamp
            seconds = (stamp - start).total_seconds() if start else math.nan
        match = _ITERATION.search(line)
        if match:
            iteration = int(match.group(1))
        if iteration is None:
            continue
        for kind, regex in (("train", _TRAIN), ("test", _TEST)):
            match = regex.search(line)
            if not match:
                continue
            row = pending[kind]
            if row is None or row["NumIters"] != iteration or match.group(2) in row:
                if row is not None:
                    rows[kind].append(row)
                row = pending[kind] = {"NumIters": iteration, "Seconds": seconds, "LearningRate": math.nan}
            try:
                row[match.group(2)] = float(match.group(3))
            except ValueError:
                raise io.FormatError(f"{path}:{number}: {kind} net output '{io.excerpt(match.group(2))}' "
                                     f"has the value '{io.excerpt(match.group(3))}', not a number") from None
    for kind in rows:
        if pending[kind] is not None:
            rows[kind].append(pending[kind])
    _fill_learning_rates(lines, rows)
    return rows["train"], rows["test"]


def _fill_learning_rates(lines: list[str], rows: dict[str, list[dict]]) -> None:
    """Each row's LearningRate: the lr the solver printed for that iteration (Caffe prints it right
    after the outputs), else the latest before it."""
    by_iteration: dict[int, float] = {}
    iteration = None
    for line in lines:
        match = _ITERATION.search(line)
        if match:
            iteration = int(match.group(1))
        match = _LR.search(line)
        if match and iteration is not None:
            by_iteration[iteration] = float(match.group(1))
    known = sorted(by_iteration)
    for kind_rows in rows.values():
        for row in kind_rows:
            earlier = [i for i in known if i <= row["NumIters"]]
            if earlier:
                row["LearningRate"] = by_iteration[earlier[-1]]
            elif known:
                row["LearningRate"] = by_iteration[known[0]]  # Caffe's fix for the first row


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter=delimiter, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _number(value) for key, value in row.items()})


def _number(value):
    return repr(value) if isinstance(value, float) else value


def run(args: argparse.Namespace) -> int:
    log = Path(args.log)
    train, test = parse_log(log)
    out_dir = Path(args.output_dir) if args.output_dir else log.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, rows in ((".train", train), (".test", test)):
        path = out_dir / (log.name + suffix)
        write_csv(path, rows, args.delimiter)
        print(f"wrote {path} ({len(rows)} rows)")
    return 0
