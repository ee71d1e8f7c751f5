"""`minicaffe upgrade-net IN OUT`: a net in an older Caffe format (V0 or V1 layers, input fields, old data
transformation or BatchNorm params) rewritten in today's, as Caffe's upgrade_net_proto_text and
upgrade_net_proto_binary do, in one command.

IN is read as a text prototxt or as a binary .caffemodel by looking at its bytes (``--text`` /
``--binary`` decide instead), and OUT is written in the same format, atomically. Each upgrade step is
logged; a net already in today's format is written unchanged. The steps: minicaffe.upgrade.
"""

from __future__ import annotations

import argparse
import re

from .. import io, log
from ..files import file_name
from ..proto import caffe_pb2
from ..upgrade import net_upgrades, upgrade_net

# Bytes a prototxt does not hold but a binary protobuf almost always does early on: its tag and length
# bytes (e.g. 0x0a, then a name's length) are small numbers, control characters other than whitespace.
_BINARY_BYTES = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="the legacy net: prototxt or .caffemodel")
    parser.add_argument("output", metavar="OUT", help="where to write the upgraded net (same format as IN)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--text", dest="binary", action="store_false", default=None,
                      help="IN and OUT are text prototxt (default: decided from IN's bytes)")
    kind.add_argument("--binary", dest="binary", action="store_true",
                      help="IN and OUT are binary NetParameter (.caffemodel)")


def is_binary(path) -> bool:
    """Whether the file is a binary protobuf rather than text (judged on its first 64 KB)."""
    with io.open_file(path) as f:
        return _BINARY_BYTES.search(f.read(65536)) is not None


def run(args: argparse.Namespace) -> int:
    binary = args.binary if args.binary is not None else is_binary(args.input)
    read, write = (io.read_binary, io.write_binary) if binary else (io.read_text, io.write_text)
    net = read(args.input, caffe_pb2.NetParameter())
    source = file_name(args.input)
    if net_upgrades(net):
        upgrade_net(net, source)
    else:
        log.info(f"{source}: already in today's format; written unchanged", "upgrade_net_proto.cpp:0")
    write(args.output, net)
    kind = "binary" if binary else "text"
    log.info(f"Wrote upgraded NetParameter {kind} proto to {args.output}", "upgrade_net_proto.cpp:0")
    return 0
