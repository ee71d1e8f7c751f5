"""Printing parameter statistics (minicaffe.inspect.param_stats) as a table, CSV or JSON: the output of
`minicaffe params`. The columns are the same in all three: layer, type, blob (the parameter blob's
position in the layer: 0 weights, 1 bias, ...), shape, count, mean, std, min, max [, values]."""

from __future__ import annotations

import csv
import io
import json
from collections import OrderedDict


def _g(value: float) -> str:
    return f"{value:.6g}"


def format_json(stats: OrderedDict[str, list[dict]]) -> str:
    return json.dumps(stats, indent=2)


def format_csv(stats: OrderedDict[str, list[dict]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    with_values = any("values" in e for entries in stats.values() for e in entries)
    header = ["layer", "type", "blob", "shape", "count", "mean", "std", "min", "max"]
    writer.writerow(header + (["values"] if with_values else []))
    for name, entries in stats.items():
        for e in entries:
            row = [name, e["type"], e["blob"], "x".join(map(str, e["shape"])), e["count"],
                   repr(e["mean"]), repr(e["std"]), repr(e["min"]), repr(e["max"])]
            if with_values:
                row.append(" ".join(repr(v) for v in e.get("values", [])))
            writer.writerow(row)
    return buffer.getvalue()


def format_table(stats: OrderedDict[str, list[dict]]) -> str:
    rows = [["layer", "type", "blob", "shape", "count", "mean", "std", "min", "max"]]
    value_lines: dict[int, str] = {}
    for name, entries in stats.items():
        for e in entries:
            rows.append([name, e["type"], str(e["blob"]), "x".join(map(str, e["shape"])) or "scalar",
                         str(e["count"]), _g(e["mean"]), _g(e["std"]), _g(e["min"]), _g(e["max"])])
            if "values" in e:
                value_lines[len(rows) - 1] = "    values: " + " ".join(_g(v) for v in e["values"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for r, row in enumerate(rows):
        left = [cell.ljust(w) for cell, w in zip(row[:4], widths[:4])]
        right = [cell.rjust(w) for cell, w in zip(row[4:], widths[4:])]
        lines.append("  ".join(left + right).rstrip())
        if r == 0:
            lines.append("-" * len(lines[0]))
        if r in value_lines:
            lines.append(value_lines[r])
    return "\n".join(lines)
