"""Every kernels/*.cu must compile with nvcc for sm_80 and sm_90, in float and in double.

The GPU build normally goes through NVRTC at run time; this catches CUDA-only mistakes on a machine
without a GPU (CI has none). Skipped where nvcc is absent. One test per (file, arch, real type); the
compiles (about a second each) run in a thread pool when the module starts, and a successful one is
remembered in the kernel cache directory (keyed by source, headers, nvcc version and flags), so
unchanged files are not rebuilt on the next run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from minicaffe.kernel import cache_dir, kernel_dir

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").is_file() else None)
SOURCES = sorted(p.name for p in kernel_dir().glob("*.cu"))
ARCHS = ["sm_80", "sm_90"]
REALS = ["float", "double"]


def build(name: str, arch: str, real: str, version: str) -> tuple[list[str], str | None]:
    """Compile one case; returns (command, None) on success or (command, compiler output)."""
    source = kernel_dir() / name
    # -std=c++14 as the NVRTC build in minicaffe.kernel uses.
    command = [NVCC, "-c", f"-arch={arch}", "-std=c++14", "-I", str(kernel_dir()), "-x", "cu",
               f"-DMC_REAL={real}", str(source), "-o", os.devnull]
    headers = [h.read_text() for h in sorted(kernel_dir().glob("*.h"))]
    key = hashlib.sha256("\0".join([source.read_text(), *headers, version, " ".join(command)]).encode())
    marker = cache_dir() / f"nvcc-ok-{source.stem}-{arch}-{real}-{key.hexdigest()[:24]}"
    if marker.exists():
        return command, None
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return command, result.stdout + result.stderr
    marker.touch()
    return command, None


@pytest.fixture(scope="module")
def nvcc_results() -> dict[tuple[str, str, str], tuple[list[str], str | None]]:
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    cases = [(name, arch, real) for name in SOURCES for arch in ARCHS for real in REALS]
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        results = pool.map(lambda case: build(*case, version), cases)
        return dict(zip(cases, results))


def test_every_kernel_file_is_listed():
    assert "relu.cu" in SOURCES and "convolution.cu" in SOURCES


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("real", REALS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SOURCES)
def test_kernel_compiles_with_nvcc(name, arch, real, nvcc_results):
    command, errors = nvcc_results[(name, arch, real)]
    assert errors is None, f"{' '.join(command)}\n{errors}"
