"""One kernel source, two builds.

Each ``kernels/NAME.cu`` file is compiled
  * on the GPU by CuPy/NVRTC into a RawModule, launched as RawKernels, and
  * on the CPU by the host C++ compiler into a shared library (cached by source hash + flags),
    called through ctypes.
``kernels/shim.h`` maps the CUDA loop idioms to plain loops for the CPU build.

Kernel signatures are read from the source, so the ctypes argument types are never written twice:

    RELU = KernelFile("relu.cu")
    RELU.relu_forward(count, x, y, slope, extents=count)

Whether the CPU or the GPU build runs is decided by the arrays passed (numpy or cupy), and the
float/double build by their dtype.

Integer arguments and loop extents must fit the kernels' 32-bit ints: a launch with a count of 2^31 or
more is refused on both devices (KernelError naming the file, kernel, argument and value) rather than
wrapped to a negative count by ctypes or refused later by CuPy.

On the CPU a launch of at least PARALLEL_MIN_WORK elements (planes * inner, or the `work` it declares)
over more than one plane, or of an element-wise kernel (ELEMENT_LOOP), runs its loops on
minicaffe.threads.kernel_threads() OpenMP threads, through the wrapper mc_cpu_NAME(threads, args...)
built with each kernel; the results are the same bits for any count.

With MINICAFFE_RACECHECK=1 (or =spread) the CPU launches run the race-check build instead (see
`race_grid`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from . import threads

REAL_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# -fopenmp: the plane loops run on threads (and `omp simd` still vectorizes the inner loops); links libgomp.
CPU_FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-march=native", "-std=c++14"]
# A CPU launch of fewer elements (planes * inner) runs on one thread: waking the others and joining
# them costs more than they save on small planes (e.g. LeNet's 10-wide inner product rows).
PARALLEL_MIN_WORK = 1 << 15
# Threads per GPU block: a power of two that covers a plane's inner extent, at least a warp (a smaller
# block would leave the rest of its warp idle anyway) and at most 256 (see `launch_geometry`).
GPU_BLOCKS = (32, 256)
GPU_MAX_GRID_X = 4096
GPU_MAX_GRID_Y = 65535
INT_RANGES = {"int": (-2**31, 2**31 - 1), "uint": (0, 2**32 - 1)}
# The race-check build's emulated GPU: the GPU's geometry (`launch_geometry`) with smaller blocks and,
# for MINICAFFE_RACECHECK=1, small caps, so that a launch is at most 256 OS threads and the grid-stride
# loops stride; for =spread, no caps: every (plane, inner) iteration is a thread of its own, so no two
# iterations share a thread and escape the check (for small test shapes only).
RACE_BLOCKS = (1, 4)
RACE_MAX_GRID = {"1": (4, 16), "spread": (2**31 - 1, 65535)}
RACE_FLAGS = ["-O1", "-g", "-fPIC", "-shared", "-fsanitize=thread", "-std=c++14", "-DMC_RACECHECK",
              "-DMC_NO_MVEC"]


def _array_data_offset() -> int | None:
    """Where a numpy array object holds its data pointer, if it can be read there on this interpreter.

    numpy's PyArrayObject is the object header followed by `char *data`, and on CPython id() is the
    object's address. Reading the pointer there costs about 0.15 us, where __array_interface__ builds a
    dict for it (1 us per array, a few per launch, hundreds of launches per training step). Checked
    against __array_interface__ on a few arrays; None (use __array_interface__) if it disagrees or the
    interpreter is not CPython."""
    if sys.implementation.name != "cpython":
        return None
    offset = object.__basicsize__  # the object header (larger on free-threaded builds)
    base = np.arange(8, dtype=np.float64)
    for probe in (base, base[3:], np.zeros((2, 3), np.uint8)[1], np.empty(0, np.float32)):
        read = ctypes.c_void_p.from_address(id(probe) + offset).value or 0
        if read != probe.__array_interface__["data"][0]:
            return None
    return offset


_DATA_OFFSET = _array_data_offset()
_pointer_at = ctypes.c_void_p.from_address


def data_address(array) -> int:
    """Where a numpy or CuPy array's data starts (for a ctypes call, or to tell whether two arrays share
    their data); numpy's read as _array_data_offset says."""
    if _DATA_OFFSET is not None and type(array) is np.ndarray:
        return _pointer_at(id(array) + _DATA_OFFSET).value or 0
    if isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0]
    return array.data.ptr


class KernelError(RuntimeError):
    """A kernel could not be built or was called with the wrong arguments."""


def kernel_dir() -> Path:
    """Where the .cu sources are: ``kernels/`` in a source tree, ``minicaffe/kernels`` when installed."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "shim.h").is_file():
            return candidate
    raise KernelError(f"kernel sources not found beside {here} (looked for kernels/shim.h)")


def cache_root() -> Path:
    """minicaffe's cache folder: $MINICAFFE_CACHE_DIR, else $XDG_CACHE_HOME/minicaffe (~/.cache/minicaffe)."""
    return Path(os.environ.get("MINICAFFE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minicaffe"))


def cache_dir() -> Path:
    """Where the CPU kernel libraries are cached (created if needed)."""
    path = cache_root() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def host_compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise KernelError(
        "minicaffe builds its CPU kernels with a C++ compiler and found none "
        "(tried $CXX, c++, g++, clang++). Install one, e.g. `apt-get install g++`, or set CXX."
    )


def _cpu_signature() -> str:
    """Compiler identity and CPU model go into the cache key: -march=native code is per machine."""
    compiler = host_compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        pass
    return compiler + version + cpu


# ---------------------------------------------------------------------------------------------
# Signatures: parsed from `KERNEL void name(type arg, ...)` declarations.

_DECL = re.compile(r"KERNEL\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)
_SCALARS = {"int": "int", "unsigned": "uint", "unsigned int": "uint", "real": "real",
            "unsigned char": "uchar"}
# The element type of each pointer kind that is not real* (real* arrays have the build's real type).
POINTER_DTYPES = {"int*": np.dtype(np.int32), "uchar*": np.dtype(np.uint8)}


def parse_parameters(source: str) -> dict[str, list[tuple[str, str]]]:
    """Map kernel name -> list of (argument kind, argument name); kinds as in `parse_signatures`."""
    parameters = {}
    for name, params in _DECL.findall(source):
        kinds = []
        for param in params.split(","):
            words = param.replace("*", " * ").split()
            words = [w for w in words if w not in ("const", "__restrict__")]
            pointer = "*" in words
            base = " ".join(w for w in words[:-1] if w != "*")
            if base not in _SCALARS:
                raise KernelError(f"kernel {name}: unsupported parameter type in '{param.strip()}'")
            kind = _SCALARS[base]
            if kind == "uchar" and not pointer:
                raise KernelError(f"kernel {name}: unsigned char is supported as a pointer only "
                                  f"('{param.strip()}')")
            kinds.append((kind + "*" if pointer else kind, words[-1]))
        parameters[name] = kinds
    return parameters


def parse_signatures(source: str) -> dict[str, list[str]]:
    """Map kernel name -> list of argument kinds: 'int', 'uint', 'real', 'real*', 'int*', 'uchar*'."""
    return {name: [kind for kind, _ in params] for name, params in parse_parameters(source).items()}


def launch_geometry(extents: tuple[int, int], blocks: tuple[int, int], max_x: int,
                    max_y: int) -> tuple[tuple[int, int], int]:
    """The launch (grid, block) for loop extents (planes, inner), both > 0.

    The kernels' PLANE_LOOP runs over grid.y and their INNER_LOOP over a plane's grid.x * block
    threads. So the block is the smallest power of two >= inner within `blocks` (min, max): a plane
    with a short inner loop, e.g. a row of an (N, C) blob (inner 1), takes a warp instead of 256
    threads that have nothing to do. grid.x covers inner in such blocks, grid.y the planes, each
    capped at max_x, max_y (the kernels' grid-stride loops do the rest)."""
    planes, inner = extents
    smallest, largest = blocks
    block = min(max(1 << (inner - 1).bit_length(), smallest), largest)
    return (min((inner + block - 1) // block, max_x), min(planes, max_y)), block


def race_grid() -> tuple[int, int] | None:
    """The race check's grid caps (x, y) when MINICAFFE_RACECHECK is 1 or spread (see RACE_MAX_GRID), else
    None. With it, CPU launches run the race-check build: the kernel source compiled with the GPU's
    grid-stride loops (kernels/shim.h, MC_RACECHECK) under ThreadSanitizer, each emulated GPU thread an
    OS thread. The process must have libtsan preloaded (LD_PRELOAD); a race is reported, and with
    TSAN_OPTIONS=halt_on_error=1 ends the process."""
    return RACE_MAX_GRID.get(os.environ.get("MINICAFFE_RACECHECK", ""))


RACE_GRID = race_grid()  # read once: the race check sets the variable before it starts the process


INT_MIN, INT_MAX = INT_RANGES["int"]


@dataclass(frozen=True)
class ArgumentPlan:
    """A kernel's parameter kinds and the positions of each kind, for launch's checks and conversions."""
    kinds: list[str]
    reals: tuple[int, ...]  # real* arrays: one dtype, float32 or float64
    pointers: tuple[int, ...]  # every array (real*, int*, uchar*): checked, passed by address
    int_ranges: tuple[tuple[int, int, int], ...]  # (position, low, high) of each int / uint
    scalars: tuple[int, ...]  # real scalars

    @classmethod
    def of(cls, params: list[tuple[str, str]]) -> ArgumentPlan:
        kinds = [kind for kind, _ in params]
        return cls(kinds, tuple(i for i, k in enumerate(kinds) if k == "real*"),
                   tuple(i for i, k in enumerate(kinds) if k.endswith("*")),
                   tuple((i, *INT_RANGES[k]) for i, k in enumerate(kinds) if k in INT_RANGES),
                   tuple(i for i, k in enumerate(kinds) if k == "real"))


class KernelFile:
    """The kernels of one ``kernels/*.cu`` file; attribute access gives a launcher per kernel.

    One object per file (``KernelFile("loss.cu")`` is the same object in every layer that asks), so
    each file is read and built once."""

    # Keyed by class too: a subclass (e.g. a test's copy of a file at another path) is its own object.
    _files: dict[tuple[type, str], KernelFile] = {}

    def __new__(cls, filename: str) -> KernelFile:
        self = cls._files.get((cls, filename))
        if self is None:
            self = cls._files[(cls, filename)] = super().__new__(cls)
            self.filename = filename
            self._cpu_libs: dict[str, ctypes.CDLL] = {}
            self._cpu_functions: dict[tuple[str, str], Any] = {}
            self._gpu_modules: dict[tuple[str, int], Any] = {}
        return self

    @cached_property
    def path(self) -> Path:
        return kernel_dir() / self.filename

    @cached_property
    def source(self) -> str:
        return self.path.read_text()

    @cached_property
    def parameters(self) -> dict[str, list[tuple[str, str]]]:
        return parse_parameters(self.source)

    @cached_property
    def element_wise(self) -> frozenset[str]:
        """The kernels whose body is an ELEMENT_LOOP (kernels/shim.h): their one plane is split over the
        CPU threads, which the plane loop of other one-plane kernels cannot be."""
        starts = [(match.start(), match.group(1)) for match in _DECL.finditer(self.source)]
        ends = [start for start, _ in starts[1:]] + [len(self.source)]
        return frozenset(name for (start, name), end in zip(starts, ends)
                         if "ELEMENT_LOOP(" in self.source[start:end])

    @cached_property
    def signatures(self) -> dict[str, list[str]]:
        """Kernel name -> argument kinds (`parameters` without the names)."""
        return {name: [kind for kind, _ in params] for name, params in self.parameters.items()}

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self.signatures:
            raise AttributeError(f"{self.filename} has no kernel named {name!r}")
        launcher = lambda *args, extents, work=None: self.launch(name, extents, *args, work=work)  # noqa: E731
        setattr(self, name, launcher)  # found directly from now on: __getattr__ runs once per name
        return launcher

    @cached_property
    def plans(self) -> dict[str, ArgumentPlan]:
        """Kernel name -> where its arguments of each kind are (ArgumentPlan), worked out once."""
        return {name: ArgumentPlan.of(params) for name, params in self.parameters.items()}

    # -- launching ---------------------------------------------------------------------------
    def launch(self, name: str, extents: int | tuple[int, int], *args, work: int | None = None) -> None:
        """Run kernel `name` over its loop extents: (planes, inner), or just inner for one plane.

        The GPU launch covers them with a grid (capped; the kernels' grid-stride loops do the rest);
        the CPU build's loops take their bounds from the kernel's own arguments. `work`: the elements
        the launch handles when a plane's own loops cover more than `inner` (e.g. a softmax row of C
        classes run by one thread), for the CPU's choice of threads (PARALLEL_MIN_WORK); by default
        planes * inner.
        This runs before every kernel, hundreds of times per training step: its checks go through the
        kernel's ArgumentPlan rather than its parameter list (a 16-element launch took 12.5 us, now 6.8)."""
        plan = self.plans[name]
        if len(args) != len(plan.kinds):
            raise KernelError(f"{self.filename}:{name} takes {len(plan.kinds)} arguments, got {len(args)}")
        real = self._real_dtype(name, plan, args)
        extents = extents if isinstance(extents, tuple) else (1, extents)
        self._check_ints(name, plan, extents, args)
        first = args[plan.reals[0]]
        if type(first) is not np.ndarray and type(first).__module__.startswith("cupy"):
            self._launch_gpu(name, extents, plan, args, real)
        else:
            self._launch_cpu(name, extents, plan, args, real, work)

    def _check_ints(self, name: str, plan: ArgumentPlan, extents: tuple[int, int], args) -> None:
        """Integer arguments and extents must fit the kernel's 32-bit ints (see the module docstring)."""
        for which, value in zip(("extents[0] (planes)", "extents[1] (inner)"), extents):
            if not INT_MIN <= value <= INT_MAX:
                self._int_error(name, which, "int", value)
        for i, low, high in plan.int_ranges:
            if not low <= args[i] <= high:
                kind, arg_name = self.parameters[name][i]
                self._int_error(name, f"argument {i} ({arg_name})", kind, args[i])

    def _int_error(self, name: str, what: str, kind: str, value) -> None:
        low, high = INT_RANGES[kind]
        raise KernelError(f"{self.filename}:{name} {what} = {int(value)} is outside the kernel's "
                          f"{kind} range {low}..{high} (counts of 2^31 or more are not supported)")

    def _real_dtype(self, name: str, plan: ArgumentPlan, args) -> np.dtype:
        real = getattr(args[plan.reals[0]], "dtype", None)
        if real in REAL_TYPES:
            for i in plan.reals[1:]:
                if getattr(args[i], "dtype", None) != real:
                    break
            else:
                return real
        dtypes = {getattr(args[i], "dtype", None) for i in plan.reals}
        raise KernelError(
            f"{self.filename}:{name} needs its real arrays all float32 or all float64, got {dtypes}")

    def _check_array(self, name: str, index: int, kind: str, arg, real: np.dtype) -> None:
        want = real if kind == "real*" else POINTER_DTYPES[kind]
        if getattr(arg, "dtype", None) != want or not arg.flags.c_contiguous:
            raise KernelError(
                f"{self.filename}:{name} argument {index} must be a C-contiguous {want} array, "
                f"got {type(arg).__name__} {getattr(arg, 'dtype', '')}"
            )

    def _launch_cpu(self, name, extents, plan: ArgumentPlan, args, real, work=None) -> None:
        values = list(args)  # plain Python values: the entry point's argtypes convert them (_cpu_function)
        for i in plan.pointers:
            self._check_array(name, i, plan.kinds[i], args[i], real)
            values[i] = data_address(args[i])
        for i, _, _ in plan.int_ranges:  # numpy integers and floats too (ctypes takes only Python's)
            if type(values[i]) is not int:
                values[i] = int(values[i])
        for i in plan.scalars:
            if type(values[i]) is not float:
                values[i] = float(values[i])
        caps = RACE_GRID
        if caps is None:
            planes, inner = extents
            splits = planes > 1 or name in self.element_wise
            work = planes * inner if work is None else work
            count = threads.working_threads() if splits and work >= PARALLEL_MIN_WORK else 1
            self._cpu_function(real, "mc_cpu_" + name, plan.kinds, 1)(count, *values)
        elif min(extents) > 0:
            grid, block = launch_geometry(extents, RACE_BLOCKS, *caps)
            self._cpu_function(real, "mc_race_" + name, plan.kinds, 3)(*grid, block, *values)

    def _cpu_function(self, real: np.dtype, entry: str, kinds: list[str], leading_ints: int):
        """The library's entry point `entry` (mc_cpu_NAME or mc_race_NAME), its argtypes set once from the
        kernel's parameter kinds after `leading_ints` ints: a call then converts plain Python values, which
        took a small launch from about 23 to 15 us (a ctypes object made per argument cost most of that)."""
        key = (REAL_TYPES[real], entry)
        function = self._cpu_functions.get(key)
        if function is None:
            scalar = ctypes.c_float if real == np.float32 else ctypes.c_double
            types = {"int": ctypes.c_int, "uint": ctypes.c_uint, "real": scalar}
            function = getattr(self._cpu_library(real, race_check=entry.startswith("mc_race_")), entry)
            function.argtypes = [ctypes.c_int] * leading_ints + [
                ctypes.c_void_p if kind.endswith("*") else types[kind] for kind in kinds]
            function.restype = None
            self._cpu_functions[key] = function
        return function

    def _launch_gpu(self, name, extents, plan: ArgumentPlan, args, real) -> None:
        import cupy

        if min(extents) <= 0:
            return
        grid, block = launch_geometry(extents, GPU_BLOCKS, GPU_MAX_GRID_X, GPU_MAX_GRID_Y)
        gpu_args = []
        for i, (kind, arg) in enumerate(zip(plan.kinds, args)):
            if kind.endswith("*"):
                self._check_array(name, i, kind, arg, real)
                gpu_args.append(arg)
            elif kind == "int":
                gpu_args.append(np.int32(arg))
            elif kind == "uint":
                gpu_args.append(np.uint32(arg))
            else:
                gpu_args.append(real.type(arg))
        module = self._gpu_module(real, cupy.cuda.Device().id)
        module.get_function(name)(grid, (block,), tuple(gpu_args))

    # -- building ----------------------------------------------------------------------------
    def _cpu_library(self, real: np.dtype, race_check: bool = False) -> ctypes.CDLL:
        ctype = REAL_TYPES[real]
        key = "race-" + ctype if race_check else ctype
        if key not in self._cpu_libs:
            self._cpu_libs[key] = ctypes.CDLL(str(self.build_cpu(ctype, race_check)))
        return self._cpu_libs[key]

    def wrappers(self, race_check: bool = False) -> str:
        """C++ appended to the source, one entry point per kernel NAME that the launcher calls:
        `mc_cpu_NAME(threads, args...)` runs NAME with its plane loops on `threads` threads (shim.h's
        mc_threads); for the race-check build, `mc_race_NAME(grid_x, grid_y, block_x, args...)`
        launches NAME through shim.h's mc_launch. (NAME itself stays exported: serial on the CPU.)"""
        c_types = {"int": "int", "uint": "unsigned", "real": "real", "real*": "real*", "int*": "int*",
                   "uchar*": "unsigned char*"}
        wrappers = []
        for name, params in self.parameters.items():
            declared = ", ".join(f"{c_types[kind]} {arg}" for kind, arg in params)
            passed = ", ".join(arg for _, arg in params)
            if race_check:
                wrappers.append(f'extern "C" void mc_race_{name}(int grid_x, int grid_y, int block_x, '
                                f"{declared}) {{ mc_launch({name}, grid_x, grid_y, block_x, {passed}); }}")
            else:
                wrappers.append(f'extern "C" void mc_cpu_{name}(int threads, {declared}) '
                                f"{{ mc_threads = threads; {name}({passed}); mc_threads = 1; }}")
        return "\n".join(wrappers) + "\n"

    def build_cpu(self, ctype: str, race_check: bool = False) -> Path:
        """Compile for the host (cached); returns the shared library's path. With `race_check`, the
        race-check build (see `race_grid()`): GPU loops, one thread per GPU thread, ThreadSanitizer."""
        # Every header (shim.h, reduce.h, ...) goes into the cache key: a kernel may include any of them.
        headers = "".join(path.read_text() for path in sorted(self.path.parent.glob("*.h")))
        wrappers = self.wrappers(race_check)
        flags = (RACE_FLAGS if race_check else CPU_FLAGS) + [f"-DMC_REAL={ctype}"]
        key = hashlib.sha256(
            "\0".join([self.source + wrappers, headers, " ".join(flags), _cpu_signature()]).encode()
        ).hexdigest()[:24]
        target = cache_dir() / f"{self.path.stem}-{'race-' if race_check else ''}{ctype}-{key}.so"
        if target.exists():
            return target
        compiler = host_compiler()
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            tmp_lib = Path(tmp) / target.name
            # The source, then the wrappers (compiler and race reports still name the .cu file's lines).
            unit = Path(tmp) / f"{self.path.stem}-{'race' if race_check else 'cpu'}.cpp"
            unit.write_text(f'#include "{self.path}"\n' + wrappers)
            base = [compiler, *flags, "-I", str(self.path.parent), "-x", "c++", str(unit),
                    "-o", str(tmp_lib)]
            # Link glibc's vector math library where there is one (vectorized exp/log/pow/tanh);
            # elsewhere build without it (MC_NO_MVEC), with scalar math calls; and with a compiler
            # that has no OpenMP runtime (Apple's clang), with serial plane loops (-fopenmp-simd).
            attempts = [base + ["-lmvec"], base + ["-DMC_NO_MVEC"]]
            if "-fopenmp" in base:
                serial = ["-fopenmp-simd" if word == "-fopenmp" else word for word in base]
                attempts.append(serial + ["-DMC_NO_MVEC"])
            for command in attempts:
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode == 0:
                    break
            else:
                raise KernelError(f"building {self.path} for the CPU failed:\n{' '.join(base)}\n"
                                  f"{result.stderr}")
            os.replace(tmp_lib, target)  # atomic: parallel test workers may race here
        return target

    def _gpu_module(self, real: np.dtype, device: int):
        key = (REAL_TYPES[real], device)
        if key not in self._gpu_modules:
            import cupy

            module = cupy.RawModule(code=self.source, options=gpu_options(REAL_TYPES[real]))
            self._gpu_modules[key] = module
        return self._gpu_modules[key]


_PART = ctypes.CFUNCTYPE(None, ctypes.c_int)
# Every CPU kernel library has shim.h's host functions (mc_run_parts, mc_gemm_parts); nearly every net
# loads this one anyway.
_PARTS_LIBRARY = "eltwise.cu"


def run_parts(count: int, parts: int, task: Callable[[int, int], None]) -> None:
    """task(start, stop) over [0, count) cut into `parts` contiguous ranges (at most
    threads.kernel_threads()), run at the same time on the kernels' OpenMP threads (kernels/shim.h's
    mc_run_parts; the calling thread runs the first range), or as many at a time as
    threads.working_threads() while other processes keep cores busy (the same ranges: the same bits).
    ctypes lets go of the GIL for that call and each range takes it back while it runs Python, so ranges
    overlap where they release it (BLAS, kernel launches). Exceptions from any range are raised here,
    after all ranges have finished (one cannot cross the C frames). Within a range,
    threads.kernel_threads() is 1."""
    parts = max(1, min(parts, threads.kernel_threads(), count))
    if parts == 1:
        task(0, count)
        return
    bounds = [count * i // parts for i in range(parts + 1)]
    errors: list[BaseException] = []

    def part(index: int) -> None:
        try:
            with threads.one_part():
                task(bounds[index], bounds[index + 1])
        except BaseException as error:  # noqa: BLE001 -- raised below, on the calling thread
            errors.append(error)

    workers = min(parts, threads.working_threads())
    _parts_library_function("mc_run_parts", np.dtype(np.float32))(parts, workers, _PART(part))
    if errors:
        raise errors[0]


def gemm_parts(parts: int, gemm_address: int, index_bits: int, by_rows: bool, trans_a: int, trans_b: int,
               m: int, n: int, k: int, alpha: float, a, lda: int, b, ldb: int, beta: float, c,
               ldc: int, count: int = 1, strides: tuple[int, int, int] = (0, 0, 0)) -> None:
    """c = alpha op(a) op(b) + beta c by the row-major CBLAS ?gemm at gemm_address, cut into `parts`
    ranges of c's rows (by_rows) or columns on the kernels' OpenMP threads (kernels/shim.h's
    mc_gemm_parts; minicaffe.blas.Cblas.gemm), at most threads.working_threads() at a time; or, with
    count > 1, the stack of `count` such products `strides` (elements) apart in a, b and c, cut into
    ranges of whole products. a, b and c are numpy arrays of c's dtype."""
    function = _parts_library_function("mc_gemm_parts", c.dtype)
    workers = min(parts, threads.working_threads())
    function(parts, workers, gemm_address, index_bits, int(by_rows), count, *strides, trans_a, trans_b, m, n,
             k, alpha, data_address(a), lda, data_address(b), ldb, beta, data_address(c), ldc)


@functools.cache
def _parts_library_function(name: str, dtype: np.dtype):
    """shim.h's host function `name` (mc_run_parts or mc_gemm_parts) in the CPU library of `dtype`, its
    argument types set."""
    function = getattr(KernelFile(_PARTS_LIBRARY)._cpu_library(dtype), name)
    real = ctypes.c_float if dtype == np.float32 else ctypes.c_double
    size, pointer = ctypes.c_longlong, ctypes.c_void_p
    function.argtypes = {
        "mc_run_parts": [ctypes.c_int, ctypes.c_int, _PART],
        "mc_gemm_parts": [ctypes.c_int, ctypes.c_int, pointer, *[ctypes.c_int] * 3, size, size, size,
                          *[ctypes.c_int] * 2, size, size, size, real, pointer, size, pointer, size, real,
                          pointer, size],
    }[name]
    function.restype = None
    return function


def gpu_options(ctype: str) -> tuple[str, ...]:
    """NVRTC options for a build with element type `ctype` (the device's arch is added by CuPy)."""
    return ("-I" + str(kernel_dir()), f"-DMC_REAL={ctype}", "--std=c++14")

