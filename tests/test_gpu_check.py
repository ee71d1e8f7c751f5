"""benchmarks/gpu_check.sh, the GPU machine's one-run check, in its CI mode: the same steps on the fake
CuPy (MINICAFFE_FAKE_CUPY=1) with tiny sizes (--quick), so that the script cannot rot before a GPU runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_step_on_the_fake_cupy(tmp_path):
    env = dict(os.environ, MINICAFFE_FAKE_CUPY="1", OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("MINICAFFE_REAL_CUPY", None)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--quick"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert result.stdout.rstrip().endswith(summary.rstrip())  # the summary is what it prints last
    lines = summary.splitlines()
    assert lines[0] == "mode: fake CuPy (tests/fake_cupy), quick"
    assert "cupy 14.0.0+fake 1 device(s)" in lines
    assert "tests: 4 of 4 targets passed, 0 did not finish; totals: 4 passed " in lines
    # the kernel benchmark ran on the (fake) device: every layer row, and the device copy bandwidth
    assert any(line.startswith("Softmax (N,C) ") for line in lines)
    assert any(line.startswith("gpu: copy bandwidth ") for line in lines)
    trained = [line for line in lines if line.startswith(("cpu: | lenet_prelu | 10 |",
                                                          "gpu: | lenet_prelu | 10 |"))]
    if not any(line.startswith("training: skipped, MNIST not found") for line in lines):
        assert len(trained) == 2 and trained[0].endswith("CPU mode |") and "GPU mode (Fake CUDA" in trained[1]
    assert "compute-sanitizer: not with the fake CuPy, skipped" in lines
    assert "two GPUs: skipped, 0 GPU(s) (fake CuPy)" in lines
    assert lines[-1].endswith("all steps passed")
    assert all(line.split(": exit ")[1].startswith("0 ") for line in lines if ": exit " in line)
