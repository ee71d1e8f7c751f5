"""The kernels are race-free on the GPU: checked on the CPU by the race-check build (minicaffe.kernel.
race_grid: the GPU's grid-stride loops, one OS thread per emulated GPU thread, ThreadSanitizer).

The checks run in subprocesses with ThreadSanitizer's runtime preloaded (a ctypes-loaded sanitized
library needs it). They are skipped where the C++ compiler has no ThreadSanitizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest

from minicaffe.kernel import host_compiler, kernel_dir, parse_signatures

ROOT = Path(__file__).resolve().parents[1]
RACE_EXIT = 66


@cache
def tsan_runtime() -> str | None:
    """The path of libtsan.so if the host compiler builds ThreadSanitizer programs and they run here
    (some kernels' address-space layouts defeat older runtimes), else None."""
    try:
        compiler = host_compiler()
    except RuntimeError:
        return None
    path = subprocess.run([compiler, "-print-file-name=libtsan.so"], capture_output=True,
                          text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        return None
    with tempfile.TemporaryDirectory() as folder:
        program = os.path.join(folder, "probe")
        build = subprocess.run([compiler, "-fsanitize=thread", "-x", "c++", "-", "-o", program],
                               input="int main() { return 0; }", capture_output=True, text=True)
        if build.returncode != 0 or subprocess.run([program], capture_output=True).returncode != 0:
            return None
    return path


needs_tsan = pytest.mark.skipif(tsan_runtime() is None, reason="the C++ compiler has no ThreadSanitizer")


def run_race_checked(args: list[str], grid: str = "1") -> subprocess.CompletedProcess:
    env = dict(os.environ, MINICAFFE_RACECHECK=grid, LD_PRELOAD=tsan_runtime(),
               TSAN_OPTIONS=f"halt_on_error=1 exitcode={RACE_EXIT}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)


@needs_tsan
@pytest.mark.parametrize("grid", ["1", "spread"], ids=["strided_grid", "thread_per_iteration"])
def test_every_kernel_of_the_gpu_table_is_race_free(grid):
    result = run_race_checked([str(ROOT / "tests" / "racecheck.py")], grid)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-20000:]
    launched = set(result.stdout.splitlines()[-1].split())
    every = {f"{path.name}:{name}" for path in kernel_dir().glob("*.cu")
             for name in parse_signatures(path.read_text())}
    assert every - launched == set(), "kernels the race check did not run"


# The mutation: col2im_add over all kernel columns kj in ONE launch (kj taken from the plane index)
# instead of one launch per kj. Two GPU threads (planes kj and kj + 1) then += the same pixel: a race.
COL2IM_ONE_LAUNCH = [
    ("const int image_stride, const int kj) {\n  PLANE_LOOP(p, planes) {\n",
     "const int image_stride, const int unused_kj) {\n  PLANE_LOOP(q, planes) {\n"
     "    const int kj = q % kernel_w;\n    const int p = q / kernel_w;\n"),
]

COL2IM_RUN = """
import sys
from pathlib import Path
import numpy as np
from minicaffe.kernel import KernelFile

class Copy(KernelFile):
    path = Path(sys.argv[1])

kernels = Copy("convolution.cu")
num, channels, height, width, kernel, out = 2, 2, 5, 5, 3, 3  # 3x3 kernel, stride 1, no padding
col = np.random.default_rng(0).normal(size=(channels * kernel * kernel, num, out * out)).astype(np.float32)
x = np.zeros((num, channels, height, width), np.float32)
geometry = (kernel, kernel, 0, 0, 1, 1, 1, 1, out, out, num * out * out, out * out)
one_launch = sys.argv[2] == "one_launch"
for kj in [0] if one_launch else range(kernel):
    planes = num * channels * (kernel if one_launch else 1)
    kernels.col2im_add(planes, col, x, channels, height, width, *geometry, kj, extents=(planes, out))
"""


def kernels_copy(folder: Path, replacements: list[tuple[str, str]]) -> Path:
    shutil.copytree(kernel_dir(), folder)
    path = folder / "convolution.cu"
    source = path.read_text()
    for old, new in replacements:
        assert source.count(old) == 1, f"the mutation no longer applies to convolution.cu: {old!r}"
        source = source.replace(old, new)
    path.write_text(source)
    return path


@needs_tsan
@pytest.mark.parametrize("grid", ["1", "spread"])
def test_race_check_fails_col2im_in_one_launch(tmp_path, grid):
    mutant = kernels_copy(tmp_path / "mutant", COL2IM_ONE_LAUNCH)
    result = run_race_checked(["-c", COL2IM_RUN, str(mutant), "one_launch"], grid)
    assert result.returncode == RACE_EXIT, result.stderr[-5000:]
    assert "ThreadSanitizer: data race" in result.stderr and "col2im_add" in result.stderr


@needs_tsan
def test_race_check_passes_col2im_launched_per_kernel_column(tmp_path):
    """The control: the same harness on the unchanged copy, launched as minicaffe does, finds nothing."""
    original = kernels_copy(tmp_path / "original", [])
    result = run_race_checked(["-c", COL2IM_RUN, str(original), "per_column"])
    assert result.returncode == 0, result.stderr[-5000:]


GRID_STRIDE_PROGRAM = r"""
#include "shim.h"
#include <cstdio>
// A GPU thread at inner index 2^31 - 2 of a grid 2^31 threads wide, and (as after many grid-stride
// steps) at plane 2^31 - 2: one iteration each, then the next index (+ 2^31, + 65535) must end the
// loop, not wrap to a negative int that is still < n.
int main() {
  blockDim = {256u, 1u, 1u};
  gridDim = {1u << 23, 65535u, 1u};
  blockIdx = {(1u << 23) - 1, (1u << 31) - 2, 0u};
  threadIdx = {254u, 0u, 0u};
  int inner = 0, planes = 0;
  PLANE_LOOP(p, 2147483647) {
    if (++planes > 3) break;
    INNER_LOOP(j, 2147483647) {
      if (++inner > 3) break;
    }
  }
  std::printf("%d %d\n", planes, inner);
  return 0;
}
"""


def test_grid_stride_step_does_not_overflow(tmp_path):
    """kernels/shim.h's GPU loops (built here on the CPU through MC_RACECHECK) near 2^31."""
    program = tmp_path / "grid_stride.cpp"
    program.write_text(GRID_STRIDE_PROGRAM)
    build = subprocess.run([host_compiler(), "-std=c++14", "-O1", "-DMC_RACECHECK", "-pthread",
                            "-I", str(kernel_dir()), str(program), "-o", str(tmp_path / "grid_stride")],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(tmp_path / "grid_stride")], capture_output=True, text=True, timeout=60)
    assert run.stdout.split() == ["1", "1"]


def test_gpu_check_script_parses():
    """benchmarks/gpu_check.sh runs only on a machine with a GPU; here it must at least parse."""
    result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
