"""The GEMMs of the layers: matmul (out = a @ b) and gemm_accumulate (c += a @ b, with BLAS's beta = 1).

On the CPU a large product is split over minicaffe's threads (in C, kernels/shim.h's mc_gemm_parts,
for numpy's OpenBLAS; else kernel.run_parts), each part one BLAS call on a single-threaded BLAS: the
cores work on one GEMM without BLAS's own thread pool, whose spinning workers thrash on a busy machine
(see threads.py). The output is cut along its longer side:
a convolution's (32 x 288) @ (288 x 8192) cut into two column halves took 1.2 ms, into two row halves
1.4-3.0 ms (each part packs all of b, and 16 rows leave BLAS's micro-kernel half idle), on one thread
2.6 ms. A stack of as many matrices on both sides (Winograd's 36 products) is cut into ranges of whole
products instead. Small products stay whole: a hand-off to another thread costs tens of microseconds.
Each output element is computed by one BLAS call either way.

Parameter gradients add into the parameter's diff (``diff += dy.T @ x``). Written with numpy, that first
makes a temporary the size of the parameter (150 MB for AlexNet's fc6) on every step and pays its page
faults; BLAS's gemm computes ``c = alpha * a @ b + beta * c`` straight into c. On the CPU this calls
numpy's own OpenBLAS through its CBLAS interface by ctypes (Cblas; scipy's BLAS wrappers where numpy's
BLAS is another build), on the GPU cuBLAS through CuPy.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from types import ModuleType

import numpy as np

from . import backend, kernel, threads
from .kernel import data_address

# A product of fewer floating-point operations per part than this is not split (a part should take
# well over the ~20-50 us that handing it to another thread costs; BLAS does ~50 GFLOP/s per core).
PARALLEL_MIN_FLOPS = 4e6
# Rows (or columns) per part at least: fewer leave the BLAS micro-kernel (a few rows wide) mostly idle.
PARALLEL_MIN_ROWS = 8


def _parts(out, inner: int) -> tuple[int, bool]:
    """How to cut the product `out` (..., rows, cols), each element a sum of `inner` products: the number
    of parts, and whether along the rows (else the columns; the longer side)."""
    rows, cols = out.shape[-2:]
    by_rows = rows > cols
    length = rows if by_rows else cols
    return max(1, min(threads.kernel_threads(), length // PARALLEL_MIN_ROWS,
                      int(2.0 * out.size * inner // PARALLEL_MIN_FLOPS))), by_rows


def _split(a, b, out, product: Callable[[object, object, object], None]) -> None:
    """product(a, b, out) for out = a @ b (the last two axes), in parts along out's longer side."""
    rows, cols = out.shape[-2:]
    parts, by_rows = _parts(out, a.shape[-1])
    if parts == 1:
        product(a, b, out)
    elif by_rows:
        kernel.run_parts(rows, parts, lambda lo, hi: product(a[..., lo:hi, :], b, out[..., lo:hi, :]))
    else:
        kernel.run_parts(cols, parts, lambda lo, hi: product(a, b[..., lo:hi], out[..., lo:hi]))


def matmul(a, b, out) -> None:
    """out = a @ b, as numpy/cupy matmul (stacked over leading axes, transposed views without copies);
    on the CPU split over the threads when large (see the module docstring)."""
    if not isinstance(out, np.ndarray):
        backend.xp().matmul(a, b, out=out)
        return
    cblas = numpy_cblas()
    if out.ndim > 2 and out.size == out.shape[-2] * out.shape[-1] > 0:  # a stack of one product (group 1)
        a, b, out = (_matrix(x) for x in (a, b, out))
    if cblas is not None and cblas.takes(a, b, out):  # a 2-d product or a stack of them: split in C
        cblas.gemm(1.0, a, b, 0.0, out)
        return
    _split(a, b, out, lambda a, b, out: np.matmul(a, b, out=out))


def _matrix(x):
    """x as a 2-d view when it is a stack of one matrix (its leading axes all 1), else x."""
    return x.reshape(x.shape[-2:]) if x.ndim > 2 and x.size == x.shape[-2] * x.shape[-1] else x


def gemm_accumulate(a, b, c) -> None:
    """c += a @ b for 2-d arrays; c must be C-contiguous and is written in place.

    a and b may be transposed views (e.g. ``x.T``): the transposes go to BLAS as flags, not copies."""
    if a.ndim != 2 or b.ndim != 2 or c.ndim != 2 or c.shape != (a.shape[0], b.shape[1]) \
            or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm_accumulate: shapes {a.shape} @ {b.shape} do not give {c.shape}")
    if not c.flags.c_contiguous:
        raise ValueError("gemm_accumulate: the output must be C-contiguous (it is written in place)")
    if isinstance(c, np.ndarray):
        cpu_gemm(1.0, a, b, 1.0, c)
    else:  # cuBLAS through CuPy, which takes C- or F-ordered operands (transposed views) without copies
        import cupy

        operands = [m if m.flags.c_contiguous or m.flags.f_contiguous else cupy.ascontiguousarray(m)
                    for m in (a, b)]
        cupy.cublas.gemm("N", "N", *operands, out=c, alpha=1.0, beta=1.0)


def load_cpu_blas() -> ModuleType:
    """scipy's BLAS wrappers, imported on first use (scipy.linalg takes a few tenths of a second).

    scipy ships its own OpenBLAS, a second library beside numpy's with its own thread pool: threads.py,
    which sets BLAS thread counts (threadpoolctl limits only the libraries already loaded), imports it
    first."""
    from scipy.linalg import blas

    return blas


def cpu_gemm(alpha: float, a, b, beta: float, c: np.ndarray) -> None:
    """c = alpha * a @ b + beta * c in place (also what tests/fake_cupy's cuBLAS runs): by numpy's own
    OpenBLAS through its CBLAS interface when it is a known build (see numpy_cblas), split over
    minicaffe's threads when large; else by scipy's BLAS wrappers, whole."""
    cblas = numpy_cblas()
    if cblas is not None and c.dtype in cblas.functions:
        cblas.gemm(alpha, a, b, beta, c)
        return
    blas = load_cpu_blas()
    gemm = {np.dtype(np.float32): blas.sgemm, np.dtype(np.float64): blas.dgemm}[c.dtype]
    # BLAS is column-major: a C-contiguous c is the Fortran-ordered c.T, and c.T += b.T @ a.T.
    # Each operand goes in as a Fortran-ordered array, transposed by flag when that is what is stored.
    first, trans_first = _fortran_operand(b.T)
    second, trans_second = _fortran_operand(a.T)
    out = gemm(alpha, first, second, beta=beta, c=c.T, trans_a=trans_first, trans_b=trans_second,
               overwrite_c=True)
    if not np.shares_memory(out, c):  # scipy copies c when it cannot write into it; never silently
        raise RuntimeError("scipy's gemm did not write in place")


def _fortran_operand(matrix) -> tuple[np.ndarray, int]:
    """(array, trans) with array Fortran-ordered and op(array) == matrix, without a copy if possible."""
    if matrix.flags.f_contiguous:
        return matrix, 0
    if matrix.flags.c_contiguous:
        return matrix.T, 1
    return np.asfortranarray(matrix), 0


class Cblas:
    """cblas_sgemm / cblas_dgemm of a loaded OpenBLAS, called through ctypes, or for a product large
    enough to split, by kernels/shim.h's mc_gemm_parts: its parts are BLAS calls on the kernels' threads
    straight from C. (Parts handed out from Python, each taking the GIL to start and to return, cost
    about 0.1 ms more per product: a 64x144 @ 144x3136 took 0.50 ms so, 0.34 ms from C, 0.67 ms on one
    thread.) scipy's wrappers hold the GIL (two threads took as long as one doing both)."""

    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

    def __init__(self, library: ctypes.CDLL, names: tuple[str, str], index_type):
        self.index_type = index_type
        self.index_bits = 8 * ctypes.sizeof(index_type)
        self.addresses = {}  # dtype -> the C function's address, for mc_gemm_parts
        self.functions = {}
        for dtype, name, scalar in ((np.dtype(np.float32), names[0], ctypes.c_float),
                                    (np.dtype(np.float64), names[1], ctypes.c_double)):
            function = getattr(library, name)
            function.restype = None
            function.argtypes = [ctypes.c_int] * 3 + [index_type] * 3 + [
                scalar, ctypes.c_void_p, index_type, ctypes.c_void_p, index_type, scalar, ctypes.c_void_p,
                index_type]
            self.functions[dtype] = function
            self.addresses[dtype] = ctypes.cast(function, ctypes.c_void_p).value

    def takes(self, a, b, c) -> bool:
        """Whether matmul should compute c = a @ b with gemm: numpy arrays of one dtype it has, c's rows
        contiguous, and neither side of c 1 (numpy's matmul calls BLAS's matrix-vector product there,
        faster than ?gemm: AlexNet's fc6 at batch 1 took 1.4x as long through gemm); 2-d, or stacks of
        as many matrices at even steps that BLAS takes as they are, large enough to split (Winograd's 36
        products: cut in C into ranges of whole products, 0.27-0.34 ms where Python parts took
        0.40-0.46; a stack on one thread stays with numpy's matmul, 56 against 75 us for 36 small ones)."""
        if not (type(a) is type(b) is type(c) is np.ndarray and a.ndim == b.ndim == c.ndim
                and a.dtype == b.dtype == c.dtype and c.dtype in self.functions):
            return False
        matrix_c = c if c.ndim == 2 else c[0] if c.ndim == 3 and c.shape[0] == a.shape[0] == b.shape[0] > 0 \
            else None
        if matrix_c is None or min(matrix_c.shape) <= 1 or matrix_c.strides[1] != c.itemsize \
                or matrix_c.strides[0] < matrix_c.shape[1] * c.itemsize:
            return False
        if c.ndim == 2:
            return True
        return (min(_parts(c, a.shape[-1])[0], c.shape[0]) > 1
                and all(x.strides[0] % x.itemsize == 0 and self._as_is(x[0]) for x in (a, b, c)))

    @classmethod
    def _as_is(cls, matrix: np.ndarray) -> bool:
        """Whether BLAS takes the 2-d view as it is (operand would not copy it)."""
        return cls.operand(matrix)[0] is matrix

    @classmethod
    def operand(cls, matrix: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(array, trans, leading dimension) in row-major CBLAS terms for a 2-d view, copied only when
        neither of its axes is contiguous."""
        item, (rows, cols), (row_step, col_step) = matrix.itemsize, matrix.shape, matrix.strides
        if col_step == item and row_step % item == 0 and row_step >= max(1, cols) * item:
            return matrix, cls.NO_TRANS, row_step // item
        if row_step == item and col_step % item == 0 and col_step >= max(1, rows) * item:
            return matrix, cls.TRANS, col_step // item
        matrix = np.ascontiguousarray(matrix)
        return matrix, cls.NO_TRANS, max(1, cols)

    def gemm(self, alpha: float, a: np.ndarray, b: np.ndarray, beta: float, c: np.ndarray) -> None:
        """c = alpha * a @ b + beta * c; c's rows must be contiguous (it is written in place). a, b and c
        2-d, or stacks (3-d) that `takes` accepts."""
        if c.ndim == 3:
            self._gemm_stack(alpha, a, b, beta, c)
            return
        (rows, inner), cols = a.shape, c.shape[1]
        row_step = c.strides[0]
        if c.strides[1] != c.itemsize or row_step % c.itemsize or (rows > 1 and row_step < cols * c.itemsize):
            raise ValueError("gemm: the output's rows must be contiguous")
        if c.size == 0:
            return
        if inner == 0:
            c *= beta
            return
        a, trans_a, lda = self.operand(a)
        b, trans_b, ldb = self.operand(b)
        ldc = max(1, row_step // c.itemsize)
        parts, by_rows = _parts(c, inner)
        if parts > 1:
            kernel.gemm_parts(parts, self.addresses[c.dtype], self.index_bits, by_rows, trans_a, trans_b,
                              rows, cols, inner, alpha, a, lda, b, ldb, beta, c, ldc)
            return
        self.functions[c.dtype](self.ROW_MAJOR, trans_a, trans_b, rows, cols, inner, alpha, data_address(a),
                                lda, data_address(b), ldb, beta, data_address(c), ldc)

    def _gemm_stack(self, alpha: float, a: np.ndarray, b: np.ndarray, beta: float, c: np.ndarray) -> None:
        """c[i] = alpha * a[i] @ b[i] + beta * c[i] for a stack that `takes` accepts: in C, the products
        cut into ranges of whole ones over the threads (mc_gemm_parts)."""
        (count, rows, inner), cols = a.shape, c.shape[2]
        if inner == 0:
            c *= beta
            return
        (_, trans_a, lda), (_, trans_b, ldb), (_, _, ldc) = (self.operand(x[0]) for x in (a, b, c))
        strides = tuple(x.strides[0] // x.itemsize for x in (a, b, c))
        parts = min(_parts(c, inner)[0], count)
        kernel.gemm_parts(parts, self.addresses[c.dtype], self.index_bits, False, trans_a, trans_b, rows,
                          cols, inner, alpha, a, lda, b, ldb, beta, c, ldc, count=count, strides=strides)


# CBLAS entry points of the OpenBLAS builds numpy's wheels ship (scipy-openblas): ILP64 with the
# "scipy_" prefix and "64_" suffix, or LP64 with the prefix alone. Another BLAS (MKL, a system library)
# is left to scipy's wrappers.
CBLAS_NAMES = ((("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_"), ctypes.c_int64),
               (("scipy_cblas_sgemm", "scipy_cblas_dgemm"), ctypes.c_int))


@functools.cache
def numpy_cblas() -> Cblas | None:
    """numpy's OpenBLAS (found by threadpoolctl) as a Cblas, or None when it is not a known build."""
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool["internal_api"] != "openblas" or "numpy" not in pool["filepath"]:
            continue
        library = ctypes.CDLL(pool["filepath"])
        for names, index_type in CBLAS_NAMES:
            if all(hasattr(library, name) for name in names):
                return Cblas(library, names, index_type)
    return None
