"""CPU threads: the kernels' plane loops on OpenMP threads and minicaffe.threads, the one owner of the
kernel and BLAS thread counts (--threads, $MINICAFFE_THREADS, the usable cores)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import backward_layer, run_layer

import minicaffe
from minicaffe import kernel, threads
from minicaffe.cli import main
from minicaffe.kernel import KernelFile

PROBE = """#include "shim.h"
#include <omp.h>
// Each plane records the OpenMP thread that ran it.
KERNEL void plane_threads(const int planes, const int inner, real* out) {
  PLANE_LOOP(p, planes) {
    const int thread = omp_get_thread_num();
    INNER_LOOP(j, inner) { out[(size_t)p * inner + j] = real(thread); }
  }
}
// Each element records the OpenMP thread that ran it.
KERNEL void element_threads(const int count, real* out) {
  ELEMENT_LOOP(i, count) { out[i] = real(omp_get_thread_num()); }
}
"""


@pytest.fixture
def four_threads(monkeypatch):
    """Kernels on 4 threads whatever this machine has (more threads than cores is only slower), and
    every launch of more than one plane large enough for them, all of them working whatever else runs
    on this machine (no look at its load). The thread count is restored after."""
    monkeypatch.setattr(threads, "_threads", None)
    monkeypatch.setattr(threads, "_next_look", float("inf"))
    monkeypatch.setattr(threads, "_free_cores", 4)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(kernel, "PARALLEL_MIN_WORK", 0)
    threads.configure(4)


@pytest.fixture
def probe(tmp_path, monkeypatch) -> KernelFile:
    monkeypatch.setenv("MINICAFFE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "probe.cu").write_text(PROBE)
    shutil.copy(kernel.kernel_dir() / "shim.h", tmp_path / "shim.h")

    class Probe(KernelFile):
        path = tmp_path / "probe.cu"

    return Probe("probe.cu")


def plane_threads(probe: KernelFile, planes: int, inner: int = 3, work: int | None = None) -> list[int]:
    out = np.full((planes, inner), -1, np.float32)
    probe.plane_threads(planes, inner, out, extents=(planes, inner), work=work)
    assert (out == out[:, :1]).all()
    return out[:, 0].astype(int).tolist()


def test_plane_loop_runs_on_the_configured_threads(four_threads, probe, monkeypatch):
    # Contiguous blocks of planes per thread (static schedule).
    assert plane_threads(probe, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    threads.configure(2)
    assert plane_threads(probe, 8) == [0] * 4 + [1] * 4
    threads.configure(1)
    assert plane_threads(probe, 8) == [0] * 8


def test_small_launches_stay_on_one_thread(four_threads, probe, monkeypatch):
    monkeypatch.setattr(kernel, "PARALLEL_MIN_WORK", 8 * 3 + 1)
    assert plane_threads(probe, 8) == [0] * 8  # 24 elements: below the threshold
    assert plane_threads(probe, 9) == [0, 0, 0, 1, 1, 2, 2, 3, 3]  # 27: above
    # A launch whose planes loop over more than `inner` (a softmax row of C classes) declares its work.
    assert plane_threads(probe, 8, work=8 * 3 * 100) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plane_threads(probe, 9, work=9) == [0] * 9
    monkeypatch.setattr(kernel, "PARALLEL_MIN_WORK", 0)
    assert plane_threads(probe, 1, inner=1000) == [0]  # one plane: nothing to split


def test_element_wise_kernels_split_their_one_plane(four_threads, probe):
    assert probe.element_wise == {"element_threads"}
    block = 4096  # MC_ELEMENT_BLOCK: the elements go to the threads in blocks of this many
    out = np.full(8 * block + 5, -1, np.float32)
    probe.element_threads(out.size, out, extents=out.size)
    per_block = out[::block].astype(int).tolist()
    assert per_block == [0, 0, 0, 1, 1, 2, 2, 3, 3]  # 9 blocks (the last one short), static schedule
    assert (out.reshape(-1)[:8 * block].reshape(8, block) == out[:8 * block:block, None]).all()
    threads.configure(1)
    probe.element_threads(out.size, out, extents=out.size)
    assert (out == 0).all()


def test_work_inside_a_part_of_run_parts_runs_on_its_own_thread(four_threads, probe, monkeypatch):
    """A part already has its core: kernel launches in it are serial and a product in it stays whole
    (a nested team would wait on threads already busy); outside, the configured threads again."""
    from minicaffe import blas

    monkeypatch.setattr(blas, "PARALLEL_MIN_FLOPS", 1.0)
    seen = {}

    def part(start, stop):
        out = np.empty((40, 20))
        blas.matmul(np.ones((40, 30)), np.ones((30, 20)), out)  # would be split into 4 parts outside
        seen[start] = (threads.kernel_threads(), plane_threads(probe, 8), out[0, 0])

    kernel.run_parts(4, 4, part)
    assert seen == {i: (1, [0] * 8, 30.0) for i in range(4)}
    assert threads.kernel_threads() == 4 and plane_threads(probe, 8) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_run_parts_runs_its_parts_at_once_on_the_kernel_threads(four_threads):
    """Each part on its own thread, the caller's first, all at the same time (each waits at a barrier
    for the others: parts run one after another would time out); an exception is raised after all
    parts finished, on the calling thread."""
    import threading

    barrier = threading.Barrier(4, timeout=20)
    ran = {}

    def part(start, stop):
        ran[start] = (stop, threading.get_native_id())
        barrier.wait()

    kernel.run_parts(8, 4, part)
    assert sorted(ran) == [0, 2, 4, 6] and [ran[s][0] for s in sorted(ran)] == [2, 4, 6, 8]
    assert len({ident for _, ident in ran.values()}) == 4
    assert ran[0][1] == threading.get_native_id()

    finished = []

    def failing(start, stop):
        if start == 2:
            raise ValueError("part 1 failed")
        finished.append(start)

    with pytest.raises(ValueError, match="part 1 failed"):
        kernel.run_parts(8, 4, failing)
    assert sorted(finished) == [0, 4, 6]


def test_large_matmuls_are_split_along_the_longer_side_over_the_threads(four_threads, monkeypatch):
    """2-d products through numpy's OpenBLAS are cut in C (kernel.gemm_parts), rows or columns, whichever
    side is longer, with operands transposed or strided; stacks of matrices on both sides too, into ranges
    of whole products; a stack times one matrix through kernel.run_parts."""
    from minicaffe import blas

    calls = []
    run_parts, gemm_parts = kernel.run_parts, kernel.gemm_parts
    monkeypatch.setattr(kernel, "run_parts", lambda count, parts, task: (
        calls.append(("python", count, parts)), run_parts(count, parts, task)))

    def recording_gemm_parts(parts, address, bits, by_rows, trans_a, trans_b, m, n, *rest, count=1, **more):
        calls.append(("C", m if by_rows else n, parts) if count == 1 else ("C stack", count, parts))
        gemm_parts(parts, address, bits, by_rows, trans_a, trans_b, m, n, *rest, count=count, **more)

    monkeypatch.setattr(kernel, "gemm_parts", recording_gemm_parts)
    monkeypatch.setattr(blas, "PARALLEL_MIN_FLOPS", 1.0)
    cblas = blas.numpy_cblas() is not None
    two_d = "C" if cblas else "python"
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 30)), rng.normal(size=(30, 20))
    out = np.empty((40, 20))
    blas.matmul(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)
    stacked = np.empty((3, 40, 20))
    blas.matmul(rng.normal(size=(3, 40, 30)), b, stacked)
    expected = [(two_d, 40, 4), ("python", 40, 4)]  # 40 rows: 4 parts of 10 rows
    at = rng.normal(size=(30, 40))
    blas.matmul(at.T, b, out)  # rows of a transposed a: its columns
    np.testing.assert_allclose(out, at.T @ b, rtol=1e-12)
    expected.append((two_d, 40, 4))
    if cblas:  # gemm_accumulate too, through numpy's OpenBLAS's CBLAS
        c = np.ones((40, 20))
        blas.gemm_accumulate(a, np.repeat(b, 2, axis=1)[:, ::2], c)  # b strided on both axes: copied
        np.testing.assert_allclose(c, a @ b + 1, rtol=1e-12)
        expected.append(("C", 40, 4))
    # A wide output is cut into column ranges (a convolution's (M, K) @ (K, positions)).
    wide, wide_out = rng.normal(size=(30, 48)), np.empty((3, 40, 48))
    blas.matmul(a, wide, wide_out[1])
    np.testing.assert_allclose(wide_out[1], a @ wide, rtol=1e-12)
    blas.matmul(rng.normal(size=(3, 40, 30)), wide, wide_out)  # stacked, columns of every matrix
    expected += [(two_d, 48, 4), ("python", 48, 4)]
    if cblas:  # c += a @ b.T into a column range of c, b a transposed view
        c, bt = np.ones((40, 48)), rng.normal(size=(48, 30))
        blas.gemm_accumulate(a, bt.T, c)
        np.testing.assert_allclose(c, a @ bt.T + 1, rtol=1e-12)
        expected.append(("C", 48, 4))
    if cblas:  # a stack times a stack (Winograd's 36 products), a transposed: 6 products over 4 threads
        a_stack, b_stack = rng.normal(size=(6, 30, 40)), rng.normal(size=(6, 30, 20))
        c_stack = np.empty((6, 40, 20))
        blas.matmul(a_stack.transpose(0, 2, 1), b_stack, c_stack)
        np.testing.assert_allclose(c_stack, a_stack.transpose(0, 2, 1) @ b_stack, rtol=1e-12)
        expected.append(("C stack", 6, 4))
    assert calls == expected
    monkeypatch.setattr(blas, "PARALLEL_MIN_FLOPS", 1e12)
    blas.matmul(a, b, out)
    assert len(calls) == len(expected)  # small: one call on this thread


def test_products_split_in_c_have_the_bits_of_the_parts_split_in_python(four_threads, monkeypatch):
    """The parts cut in C (mc_gemm_parts) are the products numpy computes on the same ranges: the same
    bits, in float32 and float64, by rows, by columns and by whole products of a stack. (A split
    product's bits may differ from the whole product's: BLAS's blocking follows the part's shape.)"""
    from minicaffe import blas

    if blas.numpy_cblas() is None:
        pytest.skip("numpy's BLAS is not a known OpenBLAS build")
    monkeypatch.setattr(blas, "PARALLEL_MIN_FLOPS", 1.0)
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        for shape_a, shape_b in (((64, 70), (70, 300)), ((300, 70), (70, 64))):
            a, b = rng.normal(size=shape_a).astype(dtype), rng.normal(size=shape_b).astype(dtype)
            in_c, in_python = (np.empty((a.shape[0], b.shape[1]), dtype) for _ in range(2))
            blas.matmul(a, b, in_c)
            blas._split(a, b, in_python, lambda a, b, out: np.matmul(a, b, out=out))
            np.testing.assert_array_equal(in_c, in_python)
        # a stack cut in C into whole products: each product numpy's, whole
        a, b = rng.normal(size=(5, 33, 70)).astype(dtype), rng.normal(size=(5, 70, 41)).astype(dtype)
        in_c = np.empty((5, 33, 41), dtype)
        blas.matmul(a, b, in_c)
        for i in range(5):
            np.testing.assert_array_equal(in_c[i], np.matmul(a[i], b[i]))


LAYERS = {
    "convolution": ('type: "Convolution" convolution_param { num_output: 5 kernel_size: 3 stride: 2 pad: 1 '
                    'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }',
                    (3, 4, 11, 9)),
    "max pooling": ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', (3, 4, 11, 9)),
    "average pooling": ('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }',
                        (3, 4, 11, 9)),
    "prelu": ('type: "PReLU" prelu_param { filler { type: "gaussian" std: 0.5 } }', (3, 4, 5, 7)),
    "lrn": ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 }', (3, 6, 5, 7)),
    "softmax": ('type: "Softmax"', (3, 6, 5, 7)),
    "batch norm": ('type: "BatchNorm"', (3, 4, 5, 7)),
    # element-wise kernels (ELEMENT_LOOP): 12,876 elements, 4 blocks of the one plane over the threads
    "relu": ('type: "ReLU" relu_param { negative_slope: 0.1 }', (3, 4, 37, 29)),
    "tanh": ('type: "TanH"', (3, 4, 37, 29)),
    "dropout": ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', (3, 4, 37, 29)),
    "power": ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', (3, 4, 37, 29)),
    "elu": ('type: "ELU" elu_param { alpha: 0.5 }', (3, 4, 37, 29)),
    "inner product": ('type: "InnerProduct" inner_product_param { num_output: 40 '
                      'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }',
                      (48, 30)),
}


def forward_backward(text: str, shape: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    layer, bottom, top = run_layer(text, rng.normal(size=shape), dtype=np.float32,
                                   phase=minicaffe.TRAIN)
    diffs = backward_layer(layer, bottom, top, [rng.normal(size=top[0].shape)])
    return [np.array(top[0].data), *diffs, *(np.array(blob.diff) for blob in layer.blobs)]


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_results_are_the_same_bits_on_one_and_on_four_threads(name, four_threads):
    """Each plane runs on one thread exactly as in the serial loop (kernels/shim.h's PLANE_LOOP), so
    the thread count cannot change a bit."""
    text, shape = LAYERS[name]
    parallel = forward_backward(text, shape)
    threads.configure(1)
    serial = forward_backward(text, shape)
    for a, b in zip(parallel, serial):
        assert a.tobytes() == b.tobytes()


def test_busy_cores_elsewhere_leave_fewer_threads_working_on_the_same_parts(four_threads, probe):
    """With 2 of the 4 cores busy in other processes, 2 threads take the planes and the 4 parts of a
    split in turn (the caller's thread parts 0 and 2): the parts are cut as for 4 threads."""
    import threading

    threads._free_cores = 2
    assert threads.kernel_threads() == 4 and threads.working_threads() == 2
    assert plane_threads(probe, 8) == [0] * 4 + [1] * 4
    ran = {}
    kernel.run_parts(8, 4, lambda start, stop: ran.__setitem__(start, (stop, threading.get_native_id())))
    assert sorted(ran) == [0, 2, 4, 6] and [ran[s][0] for s in sorted(ran)] == [2, 4, 6, 8]
    assert ran[0][1] == ran[4][1] == threading.get_native_id() and ran[2][1] == ran[6][1] != ran[0][1]
    threads._free_cores = 1
    assert threads.working_threads() == 1 and plane_threads(probe, 8) == [0] * 8


def test_one_working_thread_gives_the_bits_of_four(four_threads, monkeypatch):
    """A convolution's ranges of images (whose weight gradients add up in their order) and its products'
    ranges are cut by kernel_threads(), whatever runs them: one working thread (the other cores busy
    elsewhere) gives the same bits as four. (Ranges cut by the working threads would not.)"""
    from minicaffe import blas
    from minicaffe.layers import convolution

    monkeypatch.setattr(blas, "PARALLEL_MIN_FLOPS", 1.0)
    monkeypatch.setattr(convolution, "PARALLEL_MIN_FLOPS", 1.0)  # the 3 images in 3 ranges
    text, shape = LAYERS["convolution"]
    parallel = forward_backward(text, shape)
    threads._free_cores = 1
    assert threads.working_threads() == 1
    serial = forward_backward(text, shape)
    for a, b in zip(parallel, serial):
        assert a.tobytes() == b.tobytes()


def test_threads_are_taken_away_while_they_wait_for_cores_others_keep_busy(monkeypatch):
    """A look counts the busy seconds of the usable cores less this process's CPU seconds, per second
    (the cores busy elsewhere); the kernels then work on the usable cores less those (to the nearest
    core, at least 1): fewer only while this process's threads waited for a core (their run-queue time),
    more as soon as the others leave cores free, or one more to try after 8 looks without waiting.
    After a pause without launches, all of them."""
    readings = iter([  # (busy, own CPU, run-queue) seconds at each look, 0.25 s apart
        (100.0, 10.0, 1.0),
        (100.375, 10.125, 1.0),    # 1 core busy elsewhere, but no waiting: 4 cores
        (100.9, 10.25, 1.1),       # 1.6 elsewhere, waited 0.4 s per second: 2.4 cores free -> 2
        (101.2, 10.5, 1.1),        # 0.2 elsewhere: 4 again
        (102.45, 10.525, 1.2),     # 4.9 elsewhere, waiting: 1 (at least one)
        (103.2, 10.775, 1.2),      # 2.0 elsewhere, no waiting: up to 2
        (104.2, 11.025, 1.2),      # 3.0 elsewhere, no waiting: stays at 2 (given back, not taken)
        (110.0, 12.0, 2.0),        # after 9 s without a launch: all 4
        (111.0, 12.0, 2.5),        # 0.5 s (two periods still count): 2 elsewhere, waiting -> 2
        *[(111.0 + 0.75 * i, 12.0, 2.5) for i in range(1, 9)],  # 3 elsewhere, no waiting: 2, ...
        ])                         # ... and after 8 such looks, 3 to try
    current = {}

    def busy():
        current["busy"], current["own"], current["waited"] = next(readings)
        return current["busy"]

    monkeypatch.setattr(threads, "busy_core_seconds", busy)
    monkeypatch.setattr(threads, "run_queue_seconds", lambda: current["waited"])
    monkeypatch.setattr(threads.time, "process_time", lambda: current["own"])
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "LOAD_SAMPLE_SECONDS", 0.25)
    monkeypatch.setattr(threads, "PROBE_LOOKS", 8)
    for name, value in [("_last_look", None), ("_busy_elsewhere", 0.0), ("_free_cores", 4),
                        ("_calm_looks", 0)]:
        monkeypatch.setattr(threads, name, value)
    looks = []
    times = (50.0, 50.25, 50.5, 50.75, 51.0, 51.25, 51.5, 60.5, 61.0, *[61.0 + 0.25 * i for i in range(1, 9)])
    for now in times:
        threads._look_at_the_load(now)
        looks.append((round(threads._busy_elsewhere, 6), threads._free_cores))
        assert threads._next_look == now + threads.LOAD_SAMPLE_SECONDS
    assert looks == [(0.0, 4), (1.0, 4), (1.6, 2), (0.2, 4), (4.9, 1), (2.0, 2), (3.0, 2), (0.0, 4),
                     (2.0, 2), *[(3.0, 2)] * 7, (3.0, 3)]
    monkeypatch.setattr(threads, "busy_core_seconds", lambda: None)  # no /proc/stat: all cores
    threads._free_cores = 1
    threads._look_at_the_load(62.0)
    assert (threads._busy_elsewhere, threads._free_cores, threads._last_look) == (0.0, 4, None)


@pytest.mark.skipif(threads.usable_cores() < 2 or threads.busy_core_seconds() is None,
                    reason="needs 2 usable cores and /proc")
def test_a_process_spinning_on_a_core_takes_a_working_thread_away(monkeypatch):
    """Kernels on all the cores while another process spins on one: their threads wait for it, and a
    thread is taken away. device_query (in a process of its own) sees the core busy elsewhere too, also
    with one kernel thread (no thread to take away)."""
    import time

    monkeypatch.setattr(threads, "_threads", None)
    monkeypatch.setattr(threads, "_last_look", None)
    monkeypatch.setattr(threads, "_free_cores", threads.usable_cores())
    threads.configure()
    layer = minicaffe.testing.layer_from_prototxt('type: "ReLU"', dtype=np.float32)
    blob = minicaffe.blob.Blob((1 << 22,), np.float32)
    layer.setup([blob], [blob])
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # started
        working = []
        start = time.monotonic()
        while time.monotonic() - start < 3.0 and min(working, default=1 << 30) >= threads.usable_cores():
            layer.forward([blob], [blob])  # element-wise launches of 4M values: on all working threads
            working.append(threads.working_threads())
        assert min(working) <= threads.usable_cores() - 1
        for flags, kernel_threads in [([], threads.usable_cores()), (["--threads", "1"], 1)]:
            result = subprocess.run([sys.executable, "-m", "minicaffe.cli", *flags, "device_query"],
                                    capture_output=True, text=True, timeout=120)
            fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
            assert int(fields["Kernel threads"]) == kernel_threads
            assert float(fields["Cores busy in other processes"]) >= 0.75  # seen on one thread too
    finally:
        spinner.kill()
        spinner.wait()
        threads._next_look = 0.0  # the next launch looks again


# -- the thread owner --------------------------------------------------------------------------------

def device_query_threads(*args: str, env: dict | None = None) -> tuple[int, str]:
    """(kernel threads, BLAS threads line) that `minicaffe device_query` prints in a new process."""
    result = subprocess.run([sys.executable, "-m", "minicaffe.cli", *args, "device_query"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **(env or {})))
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    return int(fields["Kernel threads"]), fields["BLAS threads"].strip()


@pytest.mark.skipif(threads.usable_cores() < 2, reason="needs 2 usable cores to see a count below them")
def test_threads_flag_and_environment_variable_are_honoured():
    cores = threads.usable_cores()
    assert device_query_threads(env={threads.ENV: ""})[0] == cores
    assert device_query_threads(env={threads.ENV: "1"})[0] == 1
    assert device_query_threads("--threads", "1", env={threads.ENV: ""})[0] == 1
    # The flag wins over the environment variable.
    assert device_query_threads("--threads", "1", env={threads.ENV: str(cores)})[0] == 1


def test_threads_flag_after_the_command_and_bad_values(capsys, monkeypatch):
    monkeypatch.setattr(threads, "_threads", None)
    assert main(["device_query", "--threads", "1"]) == 0
    assert re.search(r"^Kernel threads: +1$", capsys.readouterr().out, re.M)
    monkeypatch.setenv(threads.ENV, "many")
    assert main(["device_query"]) == 1
    assert "MINICAFFE_THREADS='many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["device_query", "--threads", "0"])


def test_never_more_threads_than_usable_cores():
    """Asked for more threads than the process may use (its affinity set to one core), the owner
    configures one kernel thread and one BLAS thread."""
    code = ("import os, sys\n"
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from minicaffe import threads\n"
            "from threadpoolctl import threadpool_info\n"
            "kernel = threads.configure(64)\n"
            "blas = [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
            "print(threads.usable_cores(), kernel, max(blas))\n")
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1", "1"]


def test_blas_threads_set_by_the_owner_not_the_environment(monkeypatch):
    """OPENBLAS_NUM_THREADS in the environment does not decide: the owner sets BLAS's threads."""
    code = ("from minicaffe import threads\n"
            "from threadpoolctl import threadpool_info\n"
            "threads.configure()\n"
            "print(max(p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'),"
            " threads.blas_threads())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OPENBLAS_NUM_THREADS="3"))
    assert result.returncode == 0, result.stderr
    configured, policy = result.stdout.split()
    assert configured == policy and int(policy) <= threads.usable_cores()


def test_every_blas_library_is_limited_scipys_too():
    """The gradient GEMMs go through scipy's BLAS (minicaffe.blas), a second OpenBLAS beside numpy's
    with its own pool: configuring threads loads and limits it too."""
    code = ("from minicaffe import threads\n"
            "from threadpoolctl import threadpool_info\n"
            "threads.configure()\n"
            "pools = [p for p in threadpool_info() if p['user_api'] == 'blas']\n"
            "print(len({p['filepath'] for p in pools}), max(p['num_threads'] for p in pools))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    libraries, most = map(int, result.stdout.split())
    assert libraries >= 2 and most == threads.blas_threads()


@pytest.mark.parametrize("user, expected", [
    ({}, f"passive {threads.SPIN_COUNT} -"),  # minicaffe's defaults: sleep after a short spin
    ({"GOMP_SPINCOUNT": "7"}, "passive 7 7"),  # the user's spin count is kept
    ({"OMP_WAIT_POLICY": "active"}, "active - -"),  # no spin count would cut the user's policy short
])
def test_wait_policy_and_spin_count_defaults_leave_the_users_settings(user, expected):
    """Importing minicaffe sets OpenMP's waiting (threads.py) only where the user set nothing, and the
    PyTorch peer's environment (timing.peer_environment) drops what minicaffe added."""
    code = ("import os\n"
            "from minicaffe import timing\n"
            "peer = timing.peer_environment().get('GOMP_SPINCOUNT', '-')\n"
            "print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT', '-'), peer)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**env, **user})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
