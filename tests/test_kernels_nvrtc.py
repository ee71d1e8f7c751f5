"""Every kernel file compiles with NVRTC -- the compiler CuPy uses on a GPU -- with the loader's options.

NVRTC needs no GPU: the library alone (PyPI's nvidia-cuda-nvrtc, in the [test] extra on Linux x86-64)
compiles to PTX. The PTX must define an entry point for every kernel the loader parsed from the
source, so a launch by name cannot miss on the GPU. On Linux x86-64 a missing libnvrtc is a failure
(the [test] extra installs it there); elsewhere the test is skipped without it.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import platform
import sys
from pathlib import Path

import pytest

from minicaffe.kernel import REAL_TYPES, KernelFile, gpu_options, kernel_dir

KERNEL_FILES = sorted(p.name for p in kernel_dir().glob("*.cu"))


def find_nvrtc() -> ctypes.CDLL | None:
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidates += glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so*"))
        candidates += glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*"))
    candidates += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")
    for path in sorted(candidates, key=len):
        if "builtins" in path or "alt" in path:
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = find_nvrtc()


def compile_to_ptx(source: str, name: str, options: list[str]) -> tuple[int, str, str]:
    program = ctypes.c_void_p()
    NVRTC.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None)
    encoded = [o.encode() for o in options]
    result = NVRTC.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(program, log)
    ptx = ""
    if result == 0:
        NVRTC.nvrtcGetPTXSize(program, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetPTX(program, buffer)
        ptx = buffer.value.decode()
    NVRTC.nvrtcDestroyProgram(ctypes.byref(program))
    return result, log.value.decode(errors="replace"), ptx


EXTRA_HAS_NVRTC = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.mark.skipif(NVRTC is None and not EXTRA_HAS_NVRTC,
                    reason="libnvrtc not found, and the [test] extra has it only on Linux x86-64")
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("ctype", sorted(REAL_TYPES.values()))
@pytest.mark.parametrize("filename", KERNEL_FILES)
def test_nvrtc_compiles_every_kernel(filename: str, ctype: str, arch: str):
    assert NVRTC is not None, "libnvrtc not found: pip install nvidia-cuda-nvrtc (in the [test] extra)"
    kernels = KernelFile(filename)
    result, log, ptx = compile_to_ptx(kernels.source, filename, [*gpu_options(ctype), f"-arch={arch}"])
    assert result == 0, f"NVRTC failed on {filename} ({ctype}, {arch}):\n{log}"
    for name in kernels.signatures:
        assert f".entry {name}(" in ptx, f"{filename}: no PTX entry point for kernel {name}"


def test_the_test_finds_kernels():
    assert "relu.cu" in KERNEL_FILES and Path(kernel_dir(), "shim.h").is_file()
