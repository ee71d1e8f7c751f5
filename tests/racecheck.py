"""Runs every layer case of the GPU == CPU table (tests/test_gpu_paths.py) through the race-check build
of the kernels (minicaffe.kernel.race_grid), in CPU mode, float32 (a race does not depend on the type).

Run by tests/test_race.py in a subprocess that has ThreadSanitizer's runtime preloaded:
    MINICAFFE_RACECHECK=1 (or spread) LD_PRELOAD=$(c++ -print-file-name=libtsan.so) \
        TSAN_OPTIONS=halt_on_error=1:exitcode=66 python tests/racecheck.py
A race ends the process with exit code 66 and ThreadSanitizer's report on stderr. Otherwise the last
line of stdout lists the kernels that ran, as `file:kernel` words, for the caller's coverage check.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_gpu_paths  # noqa: E402  (the table)

from minicaffe.kernel import KernelFile, race_grid  # noqa: E402


def main() -> int:
    if race_grid() is None:
        print("racecheck.py needs MINICAFFE_RACECHECK=1 or spread (and libtsan preloaded)", file=sys.stderr)
        return 2
    launched: set[str] = set()
    launch = KernelFile.launch

    def recording_launch(self, name, extents, *args, **kwargs):
        launched.add(f"{self.filename}:{name}")
        return launch(self, name, extents, *args, **kwargs)

    KernelFile.launch = recording_launch
    no_gpu = types.SimpleNamespace(launches=[])  # run_case counts fake-GPU launches; there are none
    for name, case in sorted(test_gpu_paths.CASES.items()):
        test_gpu_paths.run_case(case, np.float32, gpu=False, cupy=no_gpu)
        print("race-free:", name, flush=True)
    sgd_steps()  # the solver's kernels
    print("race-free: SGD steps", flush=True)
    print(" ".join(sorted(launched)))
    return 0


SGD_SOLVER = """
type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed" snapshot_after_train: false
net_param {
  layer { name: "x" type: "DummyData" top: "x" top: "t"
          dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
                             data_filler { type: "gaussian" } data_filler { type: "gaussian" } } }
  layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
          inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
  layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }
}
"""


def sgd_steps() -> None:
    """Two SGD steps of a tiny net (kernels/solver.cu)."""
    from minicaffe.io import parse_text
    from minicaffe.proto import caffe_pb2
    from minicaffe.solver import get_solver

    get_solver(parse_text(SGD_SOLVER, caffe_pb2.SolverParameter())).step(2)


if __name__ == "__main__":
    sys.exit(main())
