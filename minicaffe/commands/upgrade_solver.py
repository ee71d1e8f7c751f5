"""`minicaffe upgrade-solver IN OUT`: a solver prototxt with the old ``solver_type`` enum rewritten with
today's ``type`` string (as Caffe's upgrade_solver_proto_text); nets written inside the solver
(net_param, train_net_param, test_net_param) are upgraded as `minicaffe upgrade-net` does. OUT is written
atomically; each upgrade is logged.
"""

from __future__ import annotations

import argparse

from .. import io, log
from ..files import file_name
from ..solver import upgrade_solver
from ..upgrade import net_upgrades, upgrade_net


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="the legacy solver prototxt")
    parser.add_argument("output", metavar="OUT", help="where to write the upgraded solver prototxt")


def run(args: argparse.Namespace) -> int:
    param = io.read_solver_param(args.input)
    source = file_name(args.input)
    changed = param.HasField("solver_type")
    upgrade_solver(param, source)
    if changed:
        log.info(f"{source}: upgraded the deprecated 'solver_type' enum to type '{param.type}'",
                 "upgrade_proto.cpp:0")
    nets = [param.net_param] if param.HasField("net_param") else []
    nets += [param.train_net_param] if param.HasField("train_net_param") else []
    nets += list(param.test_net_param)
    for net in nets:
        if net_upgrades(net):
            upgrade_net(net, f"{source} (net '{net.name}')")
            changed = True
    if not changed:
        log.info(f"{source}: already in today's format; written unchanged", "upgrade_proto.cpp:0")
    io.write_text(args.output, param)
    log.info(f"Wrote upgraded SolverParameter text proto to {args.output}", "upgrade_proto.cpp:0")
    return 0
