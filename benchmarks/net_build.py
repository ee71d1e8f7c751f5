"""Net building benchmark: the time to parse a prototxt of N layers and to build its Net, for N up to
100,000, showing that both grow linearly (the time per layer stays flat).

    python benchmarks/net_build.py                  # 1k, 10k, 100k layers; updates BENCHMARKS.md
    python benchmarks/net_build.py --layers 1000 20000 --no-write

The net is an Input of shape (1, 4) and a chain of N in-place ReLU and Power layers, alternating: the
layers are trivial, so the times are those of the net machinery itself (name checks, splits, set-up,
backward needs). "parse" reads the prototxt text (protobuf's pure-Python text parser, as
minicaffe.io.read_net_param does); "build" is Net(param, TEST) from the parsed NetParameter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import minicaffe
from minicaffe import io, timing
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # markdown_section.py, beside this file
from markdown_section import markers, update_section  # noqa: E402

BEGIN, END = markers("benchmarks/net_build.py")
LAYERS = [1_000, 10_000, 100_000]


def chain_prototxt(layers: int) -> bytes:
    lines = ['name: "chain"',
             'layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 dim: 4 } } }']
    lines += [f'layer {{ name: "act{i}" type: "{"ReLU" if i % 2 else "Power"}" bottom: "x" top: "x" }}'
              for i in range(layers)]
    return ("\n".join(lines) + "\n").encode()


def measure(layers: int) -> dict:
    text = chain_prototxt(layers)
    start = time.perf_counter()
    param = io.parse_text(text, caffe_pb2.NetParameter(), f"<{layers} layers>")
    parse_s = time.perf_counter() - start
    start = time.perf_counter()
    net = Net(param, minicaffe.TEST)
    build_s = time.perf_counter() - start
    assert len(net.layers) == layers + 1
    return {"layers": layers, "bytes": len(text), "parse_s": parse_s, "build_s": build_s}


def table(rows: list[dict]) -> list[str]:
    lines = ["| layers | prototxt | parse | build | build per layer | parse + build |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layers']:,} | {r['bytes'] / 1e6:.2f} MB | {r['parse_s']:.2f} s | "
                     f"{r['build_s']:.2f} s | {1e6 * r['build_s'] / r['layers']:.0f} µs | "
                     f"{r['parse_s'] + r['build_s']:.1f} s |")
    return lines


def machine() -> str:
    return timing.machine()


def markdown(rows: list[dict], command: str) -> str:
    lines = [BEGIN, "## Net building (benchmarks/net_build.py)", "",
             f"Reproduce: `{command}` (updates this section). Measured {dt.date.today().isoformat()}, "
             f"Python {platform.python_version()}, {machine()}.", "",
             "A prototxt of an Input and N in-place ReLU / Power layers, parsed (protobuf's text parser) "
             "and built into a Net (TEST phase, CPU). Building is linear in the number of layers: every "
             "lookup by layer or blob name goes through a dict (a list scan for duplicate names made it "
             "quadratic, so that a net of 740k layers never finished).", ""]
    lines += table(rows)
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=LAYERS, help="net sizes to time")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    rows = []
    for layers in args.layers:
        print(f"{layers} layers ...", file=sys.stderr, flush=True)
        rows.append(measure(layers))
    print("\n".join(table(rows)))
    if not args.no_write:
        update_section(REPO / "BENCHMARKS.md", "benchmarks/net_build.py",
                       markdown(rows, "python benchmarks/net_build.py"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
