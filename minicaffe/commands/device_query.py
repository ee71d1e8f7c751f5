"""`minicaffe device_query [--gpu N]` (also device-query): what runs the kernels.

Without --gpu: the CPU (model, cores, the threads the kernels and BLAS use), numpy's BLAS (used for
GEMM), the host compiler and flags that build the kernels and where they are cached, and whether CuPy
and a GPU are usable. With --gpu N: the GPU's properties, as Caffe's device_query prints them (needs
CuPy); with a list or 'all', of each."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess

import numpy as np

from .. import kernel, threads
from ..timing import blas_info, cpu_model
from .common import add_gpu_argument, parse_gpu


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_gpu_argument(parser)


def compiler_info() -> tuple[str, str]:
    try:
        compiler = kernel.host_compiler()
    except kernel.KernelError as error:
        return "none", str(error)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return shutil.which(compiler) or compiler, (version.splitlines() or ["?"])[0]


def gpu_properties(device: int) -> list[tuple[str, object]]:
    """Caffe's device_query fields, from CuPy; raises ValueError with the reason when unavailable."""
    try:
        import cupy
    except ImportError:
        raise ValueError("no GPU support: CuPy is not installed (pip install 'minicaffe[gpu]')") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CUDARuntimeError without a driver
        raise ValueError(f"no usable CUDA device ({error})") from None
    if not 0 <= device < count:
        raise ValueError(f"GPU {device} asked for, {count} present")
    p = cupy.cuda.runtime.getDeviceProperties(device)
    name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
    return [
        ("Device id", device),
        ("Major revision number", p["major"]),
        ("Minor revision number", p["minor"]),
        ("Name", name),
        ("Total global memory", p["totalGlobalMem"]),
        ("Total shared memory per block", p["sharedMemPerBlock"]),
        ("Total registers per block", p["regsPerBlock"]),
        ("Warp size", p["warpSize"]),
        ("Maximum memory pitch", p["memPitch"]),
        ("Maximum threads per block", p["maxThreadsPerBlock"]),
        ("Maximum dimension of block", ", ".join(map(str, p["maxThreadsDim"]))),
        ("Maximum dimension of grid", ", ".join(map(str, p["maxGridSize"]))),
        ("Clock rate", p["clockRate"]),
        ("Total constant memory", p["totalConstMem"]),
        ("Texture alignment", p["textureAlignment"]),
        ("Concurrent copy and execution", "Yes" if p.get("deviceOverlap") else "No"),
        ("Number of multiprocessors", p["multiProcessorCount"]),
        ("Kernel execution timeout", "Yes" if p.get("kernelExecTimeoutEnabled") else "No"),
        ("CuPy version", cupy.__version__),
        ("CUDA runtime version", cupy.cuda.runtime.runtimeGetVersion()),
    ]


def gpu_status() -> str:
    try:
        import cupy
    except ImportError:
        return "not available (CuPy not installed; pip install 'minicaffe[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return f"CuPy {cupy.__version__}, no usable CUDA device ({error})"
    return f"CuPy {cupy.__version__}, {count} device(s); query one with --gpu N"


def cpu_fields() -> list[tuple[str, object]]:
    compiler, version = compiler_info()
    try:
        cache = str(kernel.cache_dir())
    except OSError as error:
        cache = f"unavailable ({error})"
    return [
        ("Device", "CPU"),
        ("Name", cpu_model()),
        ("Machine", f"{platform.system()} {platform.machine()}"),
        ("Cores (logical)", os.cpu_count()),
        ("Cores usable by this process", threads.usable_cores()),
        ("Kernel threads", threads.kernel_threads()),
        ("Cores busy in other processes", f"{threads.busy_elsewhere_now():.1f}"),
        ("BLAS threads", threads.blas_pool_threads()),
        ("numpy", np.__version__),
        ("BLAS (GEMM)", blas_info()),
        ("Kernel compiler", compiler),
        ("Compiler version", version),
        ("Compiler flags", " ".join(kernel.CPU_FLAGS)),
        ("Kernel cache", cache),
        ("Kernel sources", str(kernel.kernel_dir())),
        ("nvcc", shutil.which("nvcc") or "not found"),
        ("GPU", gpu_status()),
    ]


def run(args: argparse.Namespace) -> int:
    ids = parse_gpu(args.gpu)
    devices = [cpu_fields()] if ids is None else [gpu_properties(i) for i in ids]
    for k, fields in enumerate(devices):
        if k:
            print()
        width = max(len(name) for name, _ in fields) + 2
        for name, value in fields:
            print(f"{name + ':':<{width}}{value}")
    return 0
