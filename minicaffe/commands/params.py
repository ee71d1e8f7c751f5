"""`minicaffe params`: statistics (and values) of the parameter blobs of a net or a .caffemodel."""

from __future__ import annotations

import argparse

from .. import inspect, param_format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="net prototxt (optional: with --weights alone the layers, types "
                                        "and blobs are read straight from the .caffemodel)")
    parser.add_argument("--weights", help=".caffemodel to read the parameters from (or a .solverstate "
                                          "snapshot: its .caffemodel)")
    parser.add_argument("--layer", metavar="GLOB", help="only layers whose name matches (e.g. 'prelu*', "
                                                        "any case)")
    parser.add_argument("--type", dest="layer_type", metavar="TYPE", help="only layers of this type "
                                                                          "(e.g. PReLU)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--values", action="store_true", help="also print every value")


def selected_params(args: argparse.Namespace) -> list[inspect.LayerParams]:
    params = inspect.load_params(args.model, args.weights)
    chosen = inspect.select(params, args.layer, args.layer_type)
    if not chosen:
        have = ", ".join(f"{name} ({kind})" for name, kind, _ in params) or "none"
        filters = " ".join(f"{flag} {value}" for flag, value in (("--layer", args.layer),
                                                                 ("--type", args.layer_type)) if value)
        raise ValueError(f"no layer with parameters matches {filters or 'the net'} "
                         f"(layers with parameters: {have})")
    return chosen


def run(args: argparse.Namespace) -> int:
    stats = inspect.param_stats(selected_params(args), values=args.values)
    formatter = {"table": param_format.format_table, "csv": param_format.format_csv,
                 "json": param_format.format_json}
    text = formatter[args.format](stats)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0
