"""minicaffe's GPU code paths, run on a CPU-only machine through a fake CuPy (tests/fake_cupy).

The fake (see its docstring) keeps device arrays apart from numpy as CuPy does -- mixing a host array
into device math, or converting a device array to numpy implicitly, is an error -- and validates every
kernel launch (grid, block, argument kinds and widths) before running the CPU build of the same kernel.
So these tests check the host/device discipline and the launch arguments of every layer, the Blob
sync, the Net, the solvers, the data layers and `minicaffe train --gpu`, and that GPU mode computes what
CPU mode computes. They do not check CUDA itself: tests/test_kernels_nvrtc.py compiles the kernels.

The fake is on sys.path and in sys.modules only inside the `fake_cupy` fixture; afterwards it is gone,
CPU mode is back, and no kernel keeps a module built by it.

With MINICAFFE_REAL_CUPY=1 (benchmarks/gpu_check.sh, on a machine with a GPU) the same tests run on real
CuPy and the real device instead: the fixture gives real CuPy (launches recorded as the fake records
them), the tests of the fake itself are skipped, and GPU results are compared with CPU results within
a tolerance (CUDA's math library and cuBLAS round differently from glibc and the host BLAS) instead of
bit for bit.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np
import pytest

import minicaffe
from minicaffe import backend, io
from minicaffe.blob import Blob
from minicaffe.kernel import (
    GPU_BLOCKS,
    GPU_MAX_GRID_X,
    GPU_MAX_GRID_Y,
    RACE_BLOCKS,
    KernelError,
    KernelFile,
    gpu_options,
    launch_geometry,
)
from minicaffe.layers import convolution
from minicaffe.net import Net, NetError
from minicaffe.proto import caffe_pb2
from minicaffe.solver import Solver
from minicaffe.testing import layer_from_prototxt

FAKE_PATH = str(Path(__file__).resolve().parent / "fake_cupy")
DTYPES = [np.float32, np.float64]
REAL_CUPY = os.environ.get("MINICAFFE_REAL_CUPY") == "1"
fake_only = pytest.mark.skipif(REAL_CUPY, reason="tests the fake CuPy (MINICAFFE_REAL_CUPY=1 is set)")


def _cupy_modules() -> list[str]:
    return [name for name in sys.modules if name == "cupy" or name.startswith("cupy.")]


def _clear_gpu_modules() -> None:
    """Forget the RawModules that kernels cached per (dtype, device): they came from the fake.
    (Looking at every module's globals touches deprecated names of other packages, e.g. torch's: their
    warnings are not ours.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in list(sys.modules.values()):
            for value in list(getattr(module, "__dict__", {}).values()):
                if isinstance(value, KernelFile):
                    value._gpu_modules.clear()


class RealCupy:
    """Real CuPy, with the kernel launches recorded in `launches` as the fake records them."""

    def __init__(self, module):
        self.module, self.launches = module, []

    def __getattr__(self, name: str):
        return getattr(self.module, name)


class RecordedModule:
    """A RawModule whose kernels append (name, grid, block) to `launches` when launched."""

    def __init__(self, module, launches: list):
        self.module, self.launches = module, launches

    def get_function(self, name: str):
        function = self.module.get_function(name)

        def launch(grid, block, args, **kwargs):
            self.launches.append((name, grid, block))
            return function(grid, block, args, **kwargs)

        return launch


@pytest.fixture
def fake_cupy(monkeypatch):
    """The fake CuPy importable as `cupy` (real CuPy with MINICAFFE_REAL_CUPY=1), in CPU mode to start
    with; all undone afterwards."""
    if REAL_CUPY:
        yield from real_cupy(monkeypatch)
        return
    saved_modules = {name: sys.modules.pop(name) for name in _cupy_modules()}  # a real CuPy, if any
    saved_state = dict(backend._state)
    _clear_gpu_modules()
    sys.path.insert(0, FAKE_PATH)
    try:
        import cupy

        assert getattr(cupy, "IS_FAKE", False), cupy.__file__
        cupy.launches.clear()
        yield cupy
    finally:
        minicaffe.set_mode_cpu()
        backend._state.update(saved_state)
        sys.path.remove(FAKE_PATH)
        for name in _cupy_modules():
            del sys.modules[name]
        sys.modules.update(saved_modules)
        _clear_gpu_modules()


def real_cupy(monkeypatch):
    import cupy

    assert not getattr(cupy, "IS_FAKE", False), f"MINICAFFE_REAL_CUPY=1 but {cupy.__file__} is the fake"
    saved_state = dict(backend._state)
    _clear_gpu_modules()
    real = RealCupy(cupy)
    gpu_module = KernelFile._gpu_module
    monkeypatch.setattr(KernelFile, "_gpu_module",
                        lambda self, *args: RecordedModule(gpu_module(self, *args), real.launches))
    try:
        yield real
    finally:
        minicaffe.set_mode_cpu()
        backend._state.update(saved_state)
        _clear_gpu_modules()


def set_mode(gpu: bool) -> None:
    minicaffe.set_mode_gpu() if gpu else minicaffe.set_mode_cpu()


def on_device(array) -> bool:
    return type(array).__module__.startswith("cupy")


# GPU vs CPU on a real device (MINICAFFE_REAL_CUPY=1): rtol, atol per dtype
REAL_TOLERANCE = {np.dtype(np.float32): (2e-4, 1e-5), np.dtype(np.float64): (1e-10, 1e-12)}


def assert_same(gpu: dict, cpu: dict) -> None:
    """Bit for bit through the fake (both sides run the same CPU build); within REAL_TOLERANCE on a real
    GPU, where serialized bytes (e.g. a .caffemodel's) are not compared."""
    assert gpu.keys() == cpu.keys()
    for key in cpu:
        if not REAL_CUPY:
            np.testing.assert_array_equal(gpu[key], cpu[key], err_msg=key, strict=True)
        elif cpu[key].dtype in REAL_TOLERANCE:
            rtol, atol = REAL_TOLERANCE[cpu[key].dtype]
            np.testing.assert_allclose(gpu[key], cpu[key], rtol=rtol, atol=atol, err_msg=key)
        elif cpu[key].dtype != np.uint8:
            np.testing.assert_array_equal(gpu[key], cpu[key], err_msg=key)


# -- the fake itself: as strict as CuPy, no stricter ---------------------------------------------------

@fake_only
def test_fake_refuses_what_cupy_refuses(fake_cupy):
    cp = fake_cupy
    dev = cp.arange(6, dtype=np.float32).reshape(2, 3)
    host = np.ones((2, 3), np.float32)
    for implicit in (lambda: np.asarray(dev), lambda: np.array(dev), lambda: host.__setitem__(..., dev),
                     lambda: np.float32(dev)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
            implicit()
    for mixed in (lambda: dev + host, lambda: host * dev, lambda: np.add(dev, host),
                  lambda: dev.__iadd__(host), lambda: np.concatenate([dev, host]),
                  lambda: cp.dot(dev, host.T), lambda: dev @ host.T, lambda: cp.where(dev > 1, host, 0),
                  lambda: cp.add(host, 1)):
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            mixed()
    with pytest.raises(ValueError, match="non-scalar numpy.ndarray cannot be used for fill"):
        dev[...] = host
    with pytest.raises(TypeError):
        float(dev)  # more than one element
    assert not isinstance(dev, np.ndarray)


@fake_only
def test_fake_allows_what_cupy_allows(fake_cupy):
    cp = fake_cupy
    dev = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))  # explicit upload
    assert on_device(dev) and on_device(dev.sum()) and dev.sum().shape == ()
    assert float(dev.sum()) == 15.0 and int(dev[1, 2]) == 5 and bool(dev[0, 0] == 0)
    assert dev.tolist() == [[0, 1, 2], [3, 4, 5]] and dev[1, 1].item() == 4.0
    assert on_device(np.float32(2) * dev) and on_device(2 * dev) and on_device(np.sqrt(dev))
    assert on_device(np.sum(dev)) and on_device(dev @ dev.T) and on_device(dev[np.array([True, False])])
    out = np.empty((2, 3), np.float32)
    assert dev.get(out=out) is out and out[1, 2] == 5
    dev.set(np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(cp.asnumpy(dev), 0)
    view = dev[0, 1]  # a 0-d view, as in CuPy
    view[...] = 7
    assert dev.get()[0, 1] == 7 and f"{dev[0, 1]:g}" == "7"
    with pytest.raises(TypeError, match="cannot be set"):
        dev.set(np.zeros((2, 3)))  # float64 into float32


@fake_only
def test_fake_fresh_memory_is_garbage(fake_cupy):
    """cupy.empty memory holds whatever was there: the fake makes reads of unwritten memory show."""
    cp = fake_cupy
    for fresh in (cp.empty((2, 3), np.float32), cp.empty_like(cp.zeros(4)), cp.ndarray((3,), np.float64)):
        assert np.isnan(fresh.get()).all()
    ints = cp.empty(64, np.int32).get()
    assert (ints != 0).all() and len(set(ints.tolist())) > 1
    assert (cp.zeros(3).get() == 0).all()


@fake_only
def test_fake_kernel_launch_checks(fake_cupy):
    relu = KernelFile("relu.cu")
    module = fake_cupy.RawModule(code=relu.source, options=gpu_options("float"))
    launch = module.get_function("relu_forward")
    x = fake_cupy.asarray(np.array([-1.0, 2.0], np.float32))
    y = fake_cupy.empty(2, np.float32)
    launch((1, 1), (256,), (np.int32(2), x, y, np.float32(0.5)))
    np.testing.assert_array_equal(y.get(), [-0.5, 2.0])
    bad = [((1, 1), (256,), (2, x, y, np.float32(0.5))),  # Python int: 64 bits on the GPU
           ((1, 1), (256,), (np.int32(2), x, y, 0.5)),
           ((1, 1), (256,), (np.int32(2), x, y, np.float64(0.5))),  # double into a float build
           ((1, 1), (256,), (np.int64(2), x, y, np.float32(0.5))),
           ((1, 1), (256,), (np.int64(2**31), x, y, np.float32(0.5))),  # a 64-bit count
           ((1, 1), (256,), (np.uint32(2), x, y, np.float32(0.5))),
           ((2**31, 1), (256,), (np.int32(2), x, y, np.float32(0.5))),
           ((1, 1), (256,), (np.int32(2), x.get(), y, np.float32(0.5))),  # host array
           ((1, 1), (256,), (np.int32(2), x.astype(np.float64), y, np.float32(0.5))),
           ((1, 1), (256,), (np.int32(2), x, y)),
           ((1, 65536), (256,), (np.int32(2), x, y, np.float32(0.5))),
           ((0, 1), (256,), (np.int32(2), x, y, np.float32(0.5))),
           ((1, 1), (2048,), (np.int32(2), x, y, np.float32(0.5))),
           ([1, 1], (256,), (np.int32(2), x, y, np.float32(0.5)))]
    for grid, block, args in bad:
        with pytest.raises(fake_cupy.KernelLaunchError):
            launch(grid, block, args)
    strided = fake_cupy.empty(4, np.float32)[::2]
    with pytest.raises(fake_cupy.KernelLaunchError, match="C-contiguous"):
        launch((1, 1), (256,), (np.int32(2), x, strided, np.float32(0.5)))


def test_fixture_leaves_no_trace():
    """Runs after the tests above in file order: the fake is gone and CPU mode is back."""
    assert not any(getattr(sys.modules.get(n), "IS_FAKE", False) for n in _cupy_modules())
    assert FAKE_PATH not in sys.path
    assert backend.mode() == "cpu" and backend.xp() is np
    from minicaffe.layers import relu

    assert relu.KERNELS._gpu_modules == {}


# -- every layer: GPU mode == CPU mode ------------------------------------------------------------------

@dataclass
class Case:
    text: str
    shapes: list  # bottom shapes; ("label", shape, classes) for integer labels
    num_top: int = 1
    phase: int = minicaffe.TEST
    in_place: bool = False
    propagate: list | None = None  # propagate_down; default all True
    backward: bool = True
    kernels: bool = True  # the layer launches kernels
    inputs: list = field(default_factory=list)  # fixed bottom arrays instead of random ones
    top_survives: bool = False  # as a Net sets it when no later layer writes the top (Layer.lean_keep)
    settings: dict = field(default_factory=dict)  # module constants set for the case: {(module, name): value}
    before_forward: object = None  # called as before_forward(layer, bottom, dtype) before each forward


def after_batch_norm(scale, bottom, dtype) -> None:
    """Run the Scale as a Net runs it after an in-place BatchNorm with global statistics (net.py's fused
    pair): the BatchNorm only computes its statistics, the Scale normalizes, scales and biases in one pass
    and gives the BatchNorm's input gradient with its own."""
    bn = getattr(scale, "case_batch_norm", None)
    if bn is None:
        bn = layer_from_prototxt('name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true }',
                                 dtype=dtype)
        bn.setup(bottom, bottom)
        rng = np.random.default_rng(3)
        channels = bottom[0].shape[1]
        bn.blobs[0].data[...] = 1.5 * rng.normal(size=channels)
        bn.blobs[1].data[...] = 1.5 * rng.uniform(0.5, 2.0, size=channels)
        bn.blobs[2].data[...] = 1.5
        bn.scale_normalizes = bn.scale_propagates = True
        scale.case_batch_norm = scale.normalizing = scale.propagating_for = bn
    bn.run_forward(bottom, bottom)  # the statistics, on this pass's device


WINOGRAD_ALWAYS = {(convolution, "WINOGRAD_CHOICE"): "always"}
FILL = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 }'
X = (2, 3, 5, 4)
CASES = {
    "relu": Case('type: "ReLU"', [X]),
    "relu_leaky_in_place": Case('type: "ReLU" relu_param { negative_slope: 0.1 }', [X], in_place=True),
    "prelu": Case('type: "PReLU" prelu_param { filler { type: "gaussian" std: 0.5 } }', [X]),
    "prelu_shared_in_place": Case('type: "PReLU" prelu_param { channel_shared: true }', [X], in_place=True),
    # Lean in place (a byte mask, x read back from y); inner 63: whole rows of 32 lanes and a tail.
    "prelu_lean_in_place": Case('type: "PReLU" prelu_param { filler { type: "gaussian" std: 0.5 } }',
                                [(2, 3, 7, 9)], in_place=True, top_survives=True),
    "prelu_2d": Case('type: "PReLU" prelu_param { filler { type: "gaussian" std: 0.5 } }', [(6, 5)]),
    # inner 1: the *_rows kernels, also lean in place (mask) and channel-shared
    "prelu_2d_lean_in_place": Case('type: "PReLU" prelu_param { filler { type: "gaussian" std: 0.5 } }',
                                   [(7, 37)], in_place=True, top_survives=True),
    "prelu_2d_shared": Case('type: "PReLU" prelu_param { channel_shared: true }', [(6, 5, 1)]),
    "sigmoid": Case('type: "Sigmoid"', [X]),
    "tanh_in_place": Case('type: "TanH"', [X], in_place=True),
    "absval": Case('type: "AbsVal"', [X]),
    "absval_in_place": Case('type: "AbsVal"', [X], in_place=True),
    "power": Case('type: "Power" power_param { power: 2 scale: 0.5 shift: 1.5 }', [X]),
    "power_in_place": Case('type: "Power" power_param { power: 3 scale: -1 }', [X], in_place=True),
    "power_linear": Case('type: "Power" power_param { power: 1 scale: 2 shift: -0.5 }', [X]),
    "power_constant": Case('type: "Power" power_param { power: 0.5 scale: 0 shift: 4 }', [X], kernels=False),
    "dropout_train": Case('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [X],
                          phase=minicaffe.TRAIN),
    "dropout_train_in_place": Case('type: "Dropout"', [X], phase=minicaffe.TRAIN, in_place=True),
    "dropout_test": Case('type: "Dropout"', [X], kernels=False),
    "convolution": Case(f'type: "Convolution" convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 '
                        f'stride: 2 {FILL} }}', [X]),
    "convolution_group_dilation": Case(
        f'type: "Convolution" convolution_param {{ num_output: 4 group: 2 kernel_h: 2 kernel_w: 3 '
        f'dilation: 2 bias_term: false {FILL} }}', [(2, 4, 7, 8)]),
    "convolution_two_bottoms": Case(f'type: "Convolution" convolution_param {{ num_output: 2 kernel_size: 2 '
                                    f'{FILL} }}', [X, X], num_top=2),
    "convolution_depthwise": Case(f'type: "Convolution" convolution_param {{ num_output: 3 group: 3 '
                                  f'kernel_h: 3 kernel_w: 2 pad: 1 stride_h: 1 stride_w: 2 dilation: 2 '
                                  f'{FILL} }}', [X]),
    "convolution_depthwise_same": Case(f'type: "Convolution" convolution_param {{ num_output: 3 group: 3 '
                                       f'kernel_size: 3 pad: 1 {FILL} }}', [X]),
    # >= 512 values a plane: the border rows in blocks of their own (small enough for the race check's
    # thread per iteration; test_convolution.py covers several blocks of rows)
    "convolution_depthwise_same_border_blocks": Case(
        f'type: "Convolution" convolution_param {{ num_output: 2 group: 2 kernel_h: 5 kernel_w: 3 pad_h: 2 '
        f'pad_w: 1 {FILL} }}', [(1, 2, 20, 30)]),
    "convolution_depthwise_no_bias": Case(f'type: "Convolution" convolution_param {{ num_output: 3 group: 3 '
                                          f'kernel_size: 2 bias_term: false {FILL} }}', [X]),
    # Winograd F(4x4, 3x3) at any size (WINOGRAD_CHOICE always): tiles cut by the output's edges
    "convolution_winograd": Case(f'type: "Convolution" convolution_param {{ num_output: 4 kernel_size: 3 '
                                 f'pad: 1 {FILL} }}', [X], settings=WINOGRAD_ALWAYS),
    "convolution_winograd_pad_2_no_bias": Case(
        f'type: "Convolution" convolution_param {{ num_output: 2 kernel_size: 3 pad: 2 bias_term: false '
        f'{FILL} }}', [(2, 3, 6, 9)], settings=WINOGRAD_ALWAYS),
    "convolution_1x1": Case(f'type: "Convolution" convolution_param {{ num_output: 2 kernel_size: 1 '
                            f'{FILL} }}', [X], kernels=False),
    "inner_product": Case(f'type: "InnerProduct" inner_product_param {{ num_output: 5 {FILL} }}', [X],
                          kernels=False),
    "inner_product_transpose": Case(f'type: "InnerProduct" inner_product_param {{ num_output: 3 axis: 2 '
                                    f'transpose: true {FILL} }}', [X], kernels=False),
    "pooling_max_two_tops": Case('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', [X],
                                 num_top=2),
    "pooling_max_disjoint": Case('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }', [X]),
    # rows of >= 16 cells: the backward's gather (pool_max_backward_2x2); odd sizes, a clipped last window
    "pooling_max_2x2_wide": Case('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }',
                                 [(1, 2, 5, 33)]),
    # padded: clipped windows left, right, top and bottom around full ones (pool_max_forward's ranges)
    "pooling_max_pad": Case('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }',
                            [(1, 2, 9, 11)]),
    "pooling_ave_pad": Case('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }',
                            [X]),
    "pooling_global": Case('type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [X]),
    "lrn_across": Case('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 }', [X]),
    "lrn_within": Case('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 norm_region: WITHIN_CHANNEL }',
                       [X]),
    "batch_norm_train": Case('type: "BatchNorm"', [X], phase=minicaffe.TRAIN),
    "batch_norm_train_in_place": Case('type: "BatchNorm"', [X], phase=minicaffe.TRAIN, in_place=True),
    # Planes of 63: the sums' stage-1 kernels (for planes of at most 32, stage 2 sums the values directly).
    "batch_norm_train_big_planes": Case('type: "BatchNorm"', [(2, 3, 7, 9)], phase=minicaffe.TRAIN),
    "bias_big_planes": Case('type: "Bias" bias_param { filler { type: "gaussian" } }', [(2, 3, 7, 9)]),
    "batch_norm_global": Case('type: "BatchNorm" batch_norm_param { use_global_stats: true }', [X]),
    "scale_bias_term": Case('type: "Scale" scale_param { axis: 1 num_axes: 1 bias_term: true '
                            'filler { type: "gaussian" } bias_filler { type: "gaussian" } }', [X]),
    "scale_bias_term_trailing_axes": Case('type: "Scale" scale_param { axis: 2 num_axes: 2 bias_term: true '
                                          'filler { type: "gaussian" } bias_filler { type: "gaussian" } }',
                                          [X]),  # inner 1: broadcast_mul_add_rows
    # Without dx the two parameter gradients come from reduce.cu's sum_and_product_partials instead.
    "scale_bias_term_no_dx": Case('type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } }',
                                  [X], propagate=[False]),
    "scale_after_batch_norm": Case('type: "Scale" scale_param { bias_term: true filler { type: "gaussian" } '
                                   'bias_filler { type: "gaussian" } }', [(2, 3, 7, 9)], in_place=True,
                                   before_forward=after_batch_norm),  # inner 63: 32-lane rows and a tail
    "scale_two_bottoms": Case('type: "Scale" scale_param { axis: 1 }', [X, (3, 5)]),
    "scale_in_place": Case('type: "Scale" scale_param { filler { type: "gaussian" } }', [X], in_place=True),
    "scale_trailing_axes": Case('type: "Scale" scale_param { axis: 2 num_axes: 2 '
                                'filler { type: "gaussian" } }', [X]),  # inner 1: the _rows kernels
    "bias": Case('type: "Bias" bias_param { filler { type: "gaussian" } }', [X]),
    "bias_two_bottoms": Case('type: "Bias" bias_param { axis: 0 }', [X, (2, 3)]),
    "bias_trailing_axes": Case('type: "Bias" bias_param { axis: 2 num_axes: 2 filler { type: "gaussian" } }',
                               [X]),
    "eltwise_sum": Case('type: "Eltwise" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }',
                        [X, X, X]),
    "eltwise_prod": Case('type: "Eltwise" eltwise_param { operation: PROD }', [X, X, X]),
    "eltwise_prod_quotient": Case('type: "Eltwise" eltwise_param { operation: PROD '
                                  'stable_prod_grad: false }', [X, X]),
    "eltwise_max": Case('type: "Eltwise" eltwise_param { operation: MAX }', [X, X, X]),
    "softmax": Case('type: "Softmax"', [X]),
    "softmax_axis_2": Case('type: "Softmax" softmax_param { axis: 2 }', [X]),
    "softmax_rows_in_place": Case('type: "Softmax"', [(6, 37)], in_place=True),  # inner 1: a row per thread
    "softmax_loss": Case('type: "SoftmaxWithLoss"', [X, ("label", (2, 5, 4), 3)], num_top=2,
                         propagate=[True, False]),
    "softmax_loss_ignore": Case('type: "SoftmaxWithLoss" loss_param { ignore_label: 1 }',
                                [(6, 4), ("label", (6,), 4)], propagate=[True, False]),
    "softmax_loss_batch_size": Case('type: "SoftmaxWithLoss" loss_param { normalization: BATCH_SIZE }',
                                    [(6, 4), ("label", (6,), 4)], propagate=[True, False]),
    "euclidean_loss": Case('type: "EuclideanLoss"', [(4, 3, 2), (4, 3, 2)]),
    "accuracy": Case('type: "Accuracy" accuracy_param { top_k: 2 }', [(6, 4), ("label", (6,), 4)],
                     num_top=2, propagate=[False, False]),
    "accuracy_ignore": Case('type: "Accuracy" accuracy_param { ignore_label: 0 axis: 1 }',
                            [X, ("label", (2, 5, 4), 3)], propagate=[False, False]),
    "flatten": Case('type: "Flatten"', [X], kernels=False),
    "reshape": Case('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } }', [X], kernels=False),
    "concat": Case('type: "Concat"', [X, (2, 2, 5, 4)]),
    "concat_axis_0": Case('type: "Concat" concat_param { axis: 0 }', [X, (1, 3, 5, 4)]),
    "slice": Case('type: "Slice" slice_param { slice_point: 1 slice_point: 3 axis: 2 }', [X], num_top=3),
    "split": Case('type: "Split"', [X], num_top=3),  # backward: Eltwise's sum kernels
    "silence": Case('type: "Silence"', [X, X], num_top=0, kernels=False),
    # issue 10: python layer (numpy on host copies; tests/pylayers.py, on the path under pytest)
    "python_channel_scale": Case('type: "Python" python_param { module: "pylayers" layer: "ChannelScale" '
                                 'param_str: "0.5" }', [X], kernels=False),
    # issue 10: losses
    "sigmoid_cross_entropy_loss": Case('type: "SigmoidCrossEntropyLoss"', [X, ("label", X, 2)],
                                       propagate=[True, False]),
    # Planes of 35: the loss sum's stage 1 over rows of 32 lanes and a tail; half the targets ignored.
    "sigmoid_cross_entropy_loss_ignore": Case('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: 1 '
                                              'normalization: VALID }', [(2, 5, 7), ("label", (2, 5, 7), 2)],
                                              propagate=[True, False]),
    "hinge_loss": Case('type: "HingeLoss"', [(6, 40), ("label", (6,), 40)], propagate=[True, False]),
    "hinge_loss_l2": Case('type: "HingeLoss" hinge_loss_param { norm: L2 }', [X, ("label", (2,), 60)],
                          propagate=[True, False]),
    "infogain_loss": Case('type: "InfogainLoss"', [X, ("label", (2, 5, 4), 3), (3, 3)], num_top=2,
                          propagate=[True, False, False]),
    "infogain_loss_rows_ignore": Case('type: "InfogainLoss" loss_param { ignore_label: 1 }',
                                      [(40, 4), ("label", (40,), 4), (4, 4)], propagate=[True, False, False]),
    "multinomial_logistic_loss": Case('type: "MultinomialLogisticLoss"', [(40, 3, 1, 1), ("label", (40,), 3)],
                                      propagate=[True, False]),
    "contrastive_loss": Case('type: "ContrastiveLoss" contrastive_loss_param { margin: 8 }',
                             [(6, 40), (6, 40), ("label", (6,), 2)], propagate=[True, True, False]),
    "contrastive_loss_legacy": Case('type: "ContrastiveLoss" contrastive_loss_param { legacy_version: true '
                                    'margin: 6 }', [(5, 3), (5, 3), ("label", (5,), 2)],
                                    propagate=[True, True, False]),
    # issue 10: conv family (Deconvolution, Crop, Im2col, SPP)
    "deconvolution": Case(f'type: "Deconvolution" convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 '
                          f'stride: 2 {FILL} }}', [X]),
    "deconvolution_group_dilation": Case(
        f'type: "Deconvolution" convolution_param {{ num_output: 6 group: 3 kernel_h: 2 kernel_w: 3 '
        f'dilation: 2 bias_term: false {FILL} }}', [X]),
    "deconvolution_bilinear_depthwise": Case(
        'type: "Deconvolution" convolution_param { num_output: 3 group: 3 kernel_size: 4 stride: 2 pad: 1 '
        'weight_filler { type: "bilinear" } bias_filler { type: "gaussian" } }', [X]),
    "deconvolution_1x1": Case(f'type: "Deconvolution" convolution_param {{ num_output: 2 kernel_size: 1 '
                              f'{FILL} }}', [X], kernels=False),
    "crop": Case('type: "Crop" crop_param { offset: 1 offset: 2 }', [X, (1, 1, 3, 2)]),
    "crop_axis_1": Case('type: "Crop" crop_param { axis: 1 offset: 1 }', [X, (2, 2, 3, 3)]),
    "im2col": Case('type: "Im2col" convolution_param { kernel_size: 3 pad: 1 stride: 2 }', [X]),
    "spp_max": Case('type: "SPP" spp_param { pyramid_height: 2 }', [X]),
    "spp_ave": Case('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [X]),
    # issue 10: recurrent
    "lstm_unit": Case('type: "LSTMUnit"', [(1, 3, 5), (1, 3, 20), (1, 3)], num_top=2,
                      propagate=[True, True, False]),
    "lstm": Case(f'type: "LSTM" recurrent_param {{ num_output: 3 {FILL} }}', [(3, 2, 4), (3, 2)],
                 propagate=[True, False]),
    "lstm_expose_hidden_static": Case(f'type: "LSTM" recurrent_param {{ num_output: 3 expose_hidden: true '
                                      f'{FILL} }}', [(3, 2, 4), (3, 2), (2, 5), (1, 2, 3), (1, 2, 3)],
                                      num_top=3, propagate=[True, False, True, True, True]),
    "rnn_static": Case(f'type: "RNN" recurrent_param {{ num_output: 3 {FILL} }}', [(3, 2, 4), (3, 2), (2, 5)],
                       propagate=[True, False, True]),
    # issue 10: neurons (ELU, Exp, Log, BNLL, Threshold, Clip, Swish)
    "elu": Case('type: "ELU" elu_param { alpha: 0.5 }', [X]),
    "elu_in_place_reads_top": Case('type: "ELU"', [X], in_place=True, top_survives=True),  # keeps nothing
    "elu_negative_alpha_in_place": Case('type: "ELU" elu_param { alpha: -0.3 }', [X], in_place=True,
                                        top_survives=True),  # y does not give the branch: a copy of x
    "exp": Case('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', [X]),
    "exp_reads_top": Case('type: "Exp" exp_param { scale: -0.7 }', [X], top_survives=True),
    "log": Case('type: "Log" log_param { base: 10 scale: 2 shift: 9 }', [X]),
    "log_in_place": Case('type: "Log" log_param { shift: 8 }', [X], in_place=True),
    "bnll": Case('type: "BNLL"', [X]),
    "bnll_in_place": Case('type: "BNLL"', [X], in_place=True),
    "swish": Case('type: "Swish" swish_param { beta: 1.5 }', [X]),
    "swish_in_place": Case('type: "Swish"', [X], in_place=True),
    "clip": Case('type: "Clip" clip_param { min: -0.5 max: 1 }', [X]),
    "clip_in_place": Case('type: "Clip" clip_param { min: -0.5 max: 1 }', [X], in_place=True),  # a mask
    "threshold": Case('type: "Threshold" threshold_param { threshold: 0.2 }', [X], backward=False),
    # issue 10: misc (ArgMax, MVN, Reduction, Tile, Embed, Parameter, Filter, BatchReindex)
    "argmax": Case('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', [X], backward=False),
    "argmax_axis": Case('type: "ArgMax" argmax_param { top_k: 3 axis: 2 }', [X], backward=False),
    "argmax_top1": Case('type: "ArgMax" argmax_param { out_max_val: true }', [X], backward=False),
    "argmax_top1_axis": Case('type: "ArgMax" argmax_param { axis: 1 }', [(2, 3, 7, 9)], backward=False),
    "mvn": Case('type: "MVN"', [X]),
    "mvn_across_in_place": Case('type: "MVN" mvn_param { across_channels: true }', [X], in_place=True),
    "mvn_mean_only_big_rows": Case('type: "MVN" mvn_param { normalize_variance: false }', [(2, 3, 7, 9)]),
    "reduction_sum": Case('type: "Reduction" reduction_param { axis: 1 coeff: 0.5 }', [X]),
    "reduction_asum_all": Case('type: "Reduction" reduction_param { operation: ASUM }', [X]),
    "reduction_sumsq": Case('type: "Reduction" reduction_param { operation: SUMSQ axis: 2 }', [X]),
    "reduction_mean": Case('type: "Reduction" reduction_param { operation: MEAN axis: -1 coeff: -2 }', [X]),
    "tile": Case('type: "Tile" tile_param { tiles: 3 }', [X]),
    "tile_axis_0": Case('type: "Tile" tile_param { axis: 0 tiles: 2 }', [X]),
    "embed": Case('type: "Embed" embed_param { num_output: 4 input_dim: 5 weight_filler { type: "gaussian" } '
                  'bias_filler { type: "gaussian" } }', [("label", (3, 4), 5)], propagate=[False]),
    "embed_no_bias": Case('type: "Embed" embed_param { num_output: 37 input_dim: 3 bias_term: false '
                          'weight_filler { type: "gaussian" } }', [("label", (6,), 3)], propagate=[False]),
    "parameter": Case('type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', []),
    "filter": Case('type: "Filter"', [(6, 3, 4), (6, 5), ("label", (6,), 2)], num_top=2,
                   propagate=[True, True, False]),
    "batch_reindex": Case('type: "BatchReindex"', [(4, 3, 5), ("label", (7,), 4)], propagate=[True, False]),
}


def make_inputs(case: Case, dtype, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for shape in case.shapes:
        if shape[0] == "label":
            arrays.append(rng.integers(0, shape[2], shape[1]).astype(dtype))
        else:
            arrays.append(rng.normal(size=shape).astype(dtype))
    return arrays


def run_case(case: Case, dtype, gpu: bool | tuple[bool, bool], cupy) -> dict[str, np.ndarray]:
    """Set up, then twice (new inputs, next forward index): forward, backward; every top, bottom diff
    and parameter (data and accumulated diff) as host copies. `gpu` may give the mode of each pass."""
    saved = {(module, name): getattr(module, name) for module, name in case.settings}
    try:
        for (module, name), value in case.settings.items():
            setattr(module, name, value)
        return _run_case(case, dtype, gpu, cupy)
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def _run_case(case: Case, dtype, gpu: bool | tuple[bool, bool], cupy) -> dict[str, np.ndarray]:
    modes = gpu if isinstance(gpu, tuple) else (gpu, gpu)
    set_mode(modes[0])
    minicaffe.set_random_seed(1701)
    launches = len(cupy.launches)
    layer = layer_from_prototxt(case.text, phase=case.phase, dtype=dtype)
    passes = [make_inputs(case, dtype, seed) for seed in (0, 1)]
    bottom = [Blob(a.shape, dtype) for a in passes[0]]
    for blob, array in zip(bottom, passes[0]):
        blob.data[...] = array  # host writes: uploaded when a GPU layer reads them
    top = [bottom[0]] if case.in_place else [Blob((), dtype) for _ in range(case.num_top)]
    layer.setup(bottom, top)
    layer.top_data_survives = case.top_survives
    propagate = case.propagate or [True] * len(bottom)
    out = {}
    for index, (arrays, gpu) in enumerate(zip(passes, modes)):
        set_mode(gpu)
        layer.forward_index = index
        for blob, array in zip(bottom, arrays):
            blob.data[...] = array
        if case.before_forward is not None:
            case.before_forward(layer, bottom, dtype)
        layer.run_forward(bottom, top)
        if gpu:
            assert all(on_device(t.get_data()) for t in top)
        for i, t in enumerate(top):
            out[f"pass {index} top {i}"] = np.array(t.data)
        if not case.backward:
            continue
        rng = np.random.default_rng(10 + index)
        for t in top:
            t.diff[...] = rng.normal(size=t.shape)
        layer.run_backward(top, propagate, bottom)
        for i, b in enumerate(bottom):
            if propagate[i]:
                out[f"pass {index} bottom diff {i}"] = np.array(b.diff)
        for i, p in enumerate(layer.blobs):
            out[f"pass {index} param {i} data"] = np.array(p.data)
            out[f"pass {index} param {i} diff"] = np.array(p.diff)
    if modes[1] and case.kernels:
        assert len(cupy.launches) > launches, "no kernel ran on the (fake) GPU"
    if not any(modes):
        assert len(cupy.launches) == launches
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_gpu_equals_cpu(fake_cupy, name, dtype):
    case = CASES[name]
    cpu = run_case(case, dtype, gpu=False, cupy=fake_cupy)
    gpu = run_case(case, dtype, gpu=True, cupy=fake_cupy)
    assert_same(gpu, cpu)


@pytest.mark.parametrize("modes", [(False, True), (True, False)], ids=["cpu_then_gpu", "gpu_then_cpu"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_survives_a_mode_switch_between_passes(fake_cupy, name, modes):
    """Arrays a layer keeps between passes (masks, saved inputs, scratch) follow the mode, as the blobs do."""
    case = CASES[name]
    cpu = run_case(case, np.float32, gpu=False, cupy=fake_cupy)
    assert_same(run_case(case, np.float32, gpu=modes, cupy=fake_cupy), cpu)


def test_launch_grids_stay_within_cuda_limits(fake_cupy):
    """More planes than grid.y allows, and more inner elements than grid.x covers: the launcher caps the
    grid (the fake refuses an oversized one) and the kernels' grid-stride loops cover the rest."""
    for case, kernel, grid, block in [
            (Case('type: "Softmax"', [(70000, 2)]), "softmax_forward", (1, 65535), (32,)),  # rows: inner 1
            (Case('type: "ReLU"', [(1100000,)]), "relu_forward", (4096, 1), (256,))]:
        cpu = run_case(case, np.float32, gpu=False, cupy=fake_cupy)
        assert_same(run_case(case, np.float32, gpu=True, cupy=fake_cupy), cpu)
        assert (kernel, grid, block) in fake_cupy.launches


def test_launch_geometry_follows_the_plane_shape():
    """A block covers a plane's inner extent (a power of two, a warp at least, 256 at most), so that the
    rows of an (N, C) blob (inner 1) do not each hold a 256-thread block."""
    geometry = {extents: launch_geometry(extents, GPU_BLOCKS, GPU_MAX_GRID_X, GPU_MAX_GRID_Y)
                for extents in [(64, 1), (64, 10), (8, 33), (8, 100), (8, 256), (8, 257), (1, 10**9),
                                (10**6, 1)]}
    assert geometry == {(64, 1): ((1, 64), 32), (64, 10): ((1, 64), 32), (8, 33): ((1, 8), 64),
                        (8, 100): ((1, 8), 128), (8, 256): ((1, 8), 256), (8, 257): ((2, 8), 256),
                        (1, 10**9): ((4096, 1), 256), (10**6, 1): ((1, 65535), 32)}
    # the race check's emulated GPU: the same function, with blocks of 1 to 4 threads
    assert launch_geometry((64, 1), RACE_BLOCKS, 4, 16) == ((1, 16), 1)
    assert launch_geometry((3, 3), RACE_BLOCKS, 4, 16) == ((1, 3), 4)
    assert launch_geometry((3, 100), RACE_BLOCKS, 4, 16) == ((4, 3), 4)


def test_class_score_rows_launch_a_warp_per_row(fake_cupy):
    """Softmax and SoftmaxWithLoss on (N, C) scores: each row is one plane of a warp-sized block."""
    case = Case('type: "SoftmaxWithLoss"', [(64, 10), ("label", (64,), 10)], propagate=[True, False])
    assert_same(run_case(case, np.float32, gpu=True, cupy=fake_cupy),
                run_case(case, np.float32, gpu=False, cupy=fake_cupy))
    geometry = {name: (grid, block) for name, grid, block in fake_cupy.launches}
    assert geometry["softmax_forward"] == ((1, 64), (32,))  # one row per plane, one thread per row
    assert geometry["softmax_loss_forward"] == ((1, 64), (32,))
    assert geometry["softmax_loss_backward"] == ((1, 64), (32,))  # a row's 10 channels in one warp


def test_counts_past_32_bits_are_refused_alike_on_both_devices(fake_cupy):
    """ctypes would wrap 2^31 to a negative count (the CPU kernel would do nothing), np.int32 would raise
    OverflowError on the GPU: the launcher refuses such counts first, with the same message for both."""
    relu, dropout = KernelFile("relu.cu"), KernelFile("dropout.cu")
    messages = []
    for xp in (np, fake_cupy):
        x, y, mask = (xp.zeros(4, np.float32) for _ in range(3))
        errors = []
        for kernel, args, extents in [(relu.relu_forward, (2**31, x, y, 0.0), 4),
                                      (relu.relu_forward, (4, x, y, 0.0), (1, 2**31)),
                                      (relu.relu_forward, (4, x, y, 0.0), (2**31, 4)),
                                      (dropout.dropout_forward, (4, x, y, mask, 2**32, 0, 0.5, 2.0), 4),
                                      (dropout.dropout_forward, (4, x, y, mask, -1, 0, 0.5, 2.0), 4)]:
            with pytest.raises(KernelError) as error:
                kernel(*args, extents=extents)
            errors.append(str(error.value))
        messages.append(errors)
        assert fake_cupy.launches == []
    assert messages[0] == messages[1]
    assert messages[0][0].startswith("relu.cu:relu_forward argument 0 (count) = 2147483648 is outside the "
                                     "kernel's int range -2147483648..2147483647")
    assert "relu.cu:relu_forward extents[1] (inner) = 2147483648" in messages[0][1]
    assert "relu.cu:relu_forward extents[0] (planes) = 2147483648" in messages[0][2]
    assert "dropout.cu:dropout_forward argument 4 (key) = 4294967296 is outside the kernel's uint range" \
        in messages[0][3]
    assert "argument 4 (key) = -1" in messages[0][4]
    # the largest counts that fit still launch
    x, y = np.zeros(4, np.float32), np.zeros(4, np.float32)
    relu.relu_forward(4, x, y, 0.0, extents=(2**31 - 1, 4))


@pytest.mark.parametrize("text, labels, message", [
    ('type: "SoftmaxWithLoss"', [0, 5], "label 5 is outside 0..2"),
    ('type: "Accuracy"', [-1, 1], "label -1 is outside 0..2"),
])
def test_label_errors_on_gpu(fake_cupy, text, labels, message):
    minicaffe.set_mode_gpu()
    layer = layer_from_prototxt(text, dtype=np.float32)
    scores, label = Blob((2, 3), np.float32), Blob((2,), np.float32)
    scores.data[...] = np.arange(6).reshape(2, 3)
    label.data[...] = labels
    top = [Blob((), np.float32)]
    layer.setup([scores, label], top)
    with pytest.raises(minicaffe.layer.LayerError, match=message):
        layer.forward([scores, label], top)


def test_every_registered_layer_is_covered():
    from minicaffe.layer import LAYERS

    covered = {io.parse_text(c.text, caffe_pb2.LayerParameter(), "<case>").type for c in CASES.values()}
    ours = {name for name, cls in LAYERS.items() if cls.__module__.startswith("minicaffe.")}  # not tests'
    data_layers = {"Input", "Data", "DummyData", "MemoryData", "HDF5Data",  # tested below
                   "ImageData", "WindowData", "HDF5Output"}
    assert ours - data_layers <= covered, sorted(ours - data_layers - covered)


# -- Blob: host and device copies stay in sync -----------------------------------------------------------

def test_blob_host_writes_reach_the_device_and_back(fake_cupy):
    minicaffe.set_mode_gpu()
    blob = Blob((2, 3), np.float32)
    assert on_device(blob.get_data()) and np.all(blob.get_data().get() == 0)  # fresh: zeros on the device
    blob.data[...] = np.arange(6).reshape(2, 3)  # a Python write, as pycaffe users do
    np.testing.assert_array_equal(blob.get_data().get(), np.arange(6).reshape(2, 3))
    blob.mutable_data()[...] *= 2  # a device write (what layers do) ...
    np.testing.assert_array_equal(blob.data, np.arange(6).reshape(2, 3) * 2)  # ... seen from Python
    host = blob.data
    host[0, 0] = -1  # the host view is writable and marks the host copy newest
    assert float(blob.get_data()[0, 0]) == -1
    blob.mutable_diff()[...] = 5
    np.testing.assert_array_equal(blob.diff, 5)
    blob.diff[1] = 7
    np.testing.assert_array_equal(blob.get_diff().get(), [[5, 5, 5], [7, 7, 7]])
    # A read on the device does not make the host copy stale; a mode switch reads the device copy.
    blob.mutable_data()[...] = 3
    minicaffe.set_mode_cpu()
    assert isinstance(blob.get_data(), np.ndarray) and np.all(blob.get_data() == 3)
    blob.mutable_data()[...] = 4
    minicaffe.set_mode_gpu()
    assert np.all(blob.get_data().get() == 4)
    # shared memory and a reshape to a new count in GPU mode
    other = Blob((3, 2), np.float32)
    other.share_data(blob)
    other.mutable_data()[...] = 9
    np.testing.assert_array_equal(blob.data, 9)
    blob.reshape(4, 5)
    assert blob.get_data().shape == (4, 5) and np.all(blob.data == 0)
    assert blob.to_proto().shape.dim == [4, 5]


def test_blob_larger_than_the_gpu_memory_is_refused(fake_cupy):
    """In GPU mode a blob is checked against the device's free memory (cupy's memGetInfo) before
    anything is allocated; the error names the layer, the shape and the bytes (issue #9)."""
    minicaffe.set_mode_gpu()
    text = ('layer { name: "data" type: "Input" top: "data" '
            'input_param { shape { dim: 1000 dim: 1000 dim: 1000 dim: 1000 } } }')
    with pytest.raises(NetError, match=r"layer 'data' \(Input\): blob of shape \[1000, 1000, 1000, 1000\] "
                                       r"needs 4000000000000 bytes .* of GPU memory available"):
        Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TEST)
    if not REAL_CUPY:  # the fake's free memory can be lowered: 128 MiB no longer fits in 100 MiB
        fake_cupy._current["free_memory"] = 100 << 20
        try:
            with pytest.raises(ValueError, match=r"134217728 bytes \(128.0 MiB\), more than the 104857600 "
                                                 r"bytes \(100.0 MiB\) of GPU memory"):
                Blob((32 << 20,), np.float32)
        finally:
            fake_cupy._current["free_memory"] = 80 << 30


def test_layer_chain_sees_python_edits_between_gpu_layers(fake_cupy):
    minicaffe.set_mode_gpu()
    relu = layer_from_prototxt('name: "r" type: "ReLU"', dtype=np.float32)
    absval = layer_from_prototxt('name: "a" type: "AbsVal"', dtype=np.float32)
    x, mid, y = Blob((4,), np.float32), Blob((), np.float32), Blob((), np.float32)
    x.data[...] = [-1, 2, -3, 4]
    relu.setup([x], [mid])
    absval.setup([mid], [y])
    relu.run_forward([x], [mid])
    np.testing.assert_array_equal(mid.data, [0, 2, 0, 4])  # downloaded
    mid.data[0] = -5  # edited on the host: uploaded for the next layer
    absval.run_forward([mid], [y])
    np.testing.assert_array_equal(y.data, [5, 2, 0, 4])
    x.data[...] = [1, -1, 1, -1]
    relu.run_forward([x], [mid])
    absval.run_forward([mid], [y])
    np.testing.assert_array_equal(y.data, [1, 0, 1, 0])


# -- a real net: MTCNN's det1, forward and backward -----------------------------------------------------

def det1_run(mtcnn_dir, gpu: bool) -> dict[str, np.ndarray]:
    set_mode(gpu)
    param = io.read_net_param(mtcnn_dir / "det1.prototxt")
    param.force_backward = True
    net = Net(param, str(mtcnn_dir / "det1.caffemodel"), minicaffe.TEST)
    data = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 30))
    out = {f"top {k}": v.copy() for k, v in net.forward(data=data).items()}
    diffs = {name: np.random.default_rng(1).normal(size=net.blobs[name].shape) for name in net.outputs}
    out["data diff"] = net.backward(**diffs)["data"].copy()
    for name, blobs in net.params.items():
        for i, blob in enumerate(blobs):
            out[f"{name} {i} diff"] = np.array(blob.diff)
    return out


def test_mtcnn_det1_gpu_equals_cpu(fake_cupy, mtcnn_dir):
    cpu = det1_run(mtcnn_dir, gpu=False)
    gpu = det1_run(mtcnn_dir, gpu=True)
    assert_same(gpu, cpu)
    # det1's PReLUs run in place and nothing overwrites their tops: the lean keep (masked kernels).
    assert {"im2col", "prelu_forward_masked", "pool_max_forward"} <= {name for name, *_ in fake_cupy.launches}


# -- solvers --------------------------------------------------------------------------------------------

SOLVER_NET = """
name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "target"
        dummy_data_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } shape { dim: 4 dim: 3 }
                           data_filler { type: "gaussian" } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" }
                            bias_filler { type: "constant" value: 0.1 } } }
layer { name: "prelu" type: "PReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "pool" top: "pool" }
layer { name: "scale" type: "Scale" bottom: "pool" top: "pool" scale_param { bias_term: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" dropout_param { dropout_ratio: 0.2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""

SOLVERS = {
    "SGD": 'type: "SGD" base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 clip_gradients: 0.5 iter_size: 2',
    "Nesterov": 'type: "Nesterov" base_lr: 0.05 momentum: 0.9 regularization_type: "L1" weight_decay: 0.01',
    "AdaGrad": 'type: "AdaGrad" base_lr: 0.05 delta: 1e-6',
    "RMSProp": 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.9',
    "AdaDelta": 'type: "AdaDelta" base_lr: 1 momentum: 0.95 delta: 1e-6',
    "Adam": 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 lr_policy: "step" gamma: 0.5 '
            'stepsize: 2',
}


def solve(kind: str, gpu: bool, folder: Path) -> dict[str, np.ndarray]:
    set_mode(gpu)
    param = io.parse_text(SOLVERS[kind] + (' lr_policy: "fixed"' if "lr_policy" not in SOLVERS[kind] else "")
                          + f' max_iter: 4 display: 1 random_seed: 7 test_iter: 1 test_interval: 2 '
                          f'snapshot_prefix: "{folder / kind}"', caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(io.parse_text(SOLVER_NET, caffe_pb2.NetParameter()))
    solver = Solver(param)
    solver.step(3)
    out = {"smoothed loss": np.array(solver.smoothed_loss)}
    out.update({f"test {k}": np.array(v) for k, v in solver.test(0).items()})
    for name, blobs in solver.net.params.items():
        for i, blob in enumerate(blobs):
            out[f"{name} {i}"] = np.array(blob.data)
    for i, history in enumerate(solver.history):
        out[f"history {i}"] = np.array(history.data)
    model, state = solver.snapshot()
    out["caffemodel"] = np.frombuffer(Path(model).read_bytes(), np.uint8)
    return out


@pytest.mark.parametrize("kind", sorted(SOLVERS))
def test_solver_steps_gpu_equal_cpu(fake_cupy, kind, tmp_path):
    cpu = solve(kind, False, tmp_path / "cpu")
    gpu = solve(kind, True, tmp_path / "gpu")
    assert_same(gpu, cpu)


# -- data layers --------------------------------------------------------------------------------------------

def write_lmdb(path: Path, n: int = 5, shape=(2, 5, 6)) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (n, *shape)).astype(np.uint8)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(n):
            c, h, w = shape
            datum = caffe_pb2.Datum(channels=c, height=h, width=w, data=images[i].tobytes(), label=i % 3)
            txn.put(b"%08d" % i, datum.SerializeToString())
    env.close()
    return path


DATA_NET = """
layer {{ name: "data" type: "Data" top: "data" top: "label"
        transform_param {{ scale: 0.01 crop_size: 4 mirror: true mean_value: 100 mean_value: 120 }}
        data_param {{ source: "{source}" batch_size: 3 backend: LMDB }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }}
"""


def data_net_run(source: Path, gpu: bool) -> dict[str, np.ndarray]:
    set_mode(gpu)
    minicaffe.set_random_seed(3)
    net = Net(io.parse_text(DATA_NET.format(source=source), caffe_pb2.NetParameter()), minicaffe.TRAIN)
    out = {}
    for i in range(3):  # wraps around the 5 records; crops and mirrors drawn per forward index
        out[f"loss {i}"] = np.array(net.forward_backward())
        if gpu:
            assert on_device(net.blobs["data"].get_data()) and on_device(net.blobs["label"].get_data())
        for name in ("data", "label", "ip", "acc"):
            out[f"{name} {i}"] = np.array(net.blobs[name].data)
        out[f"ip diff {i}"] = np.array(net.params["ip"][0].diff)
    return out


def test_data_layer_net_gpu_equals_cpu(fake_cupy, tmp_path):
    # Two copies of one database: re-opening a database right after the previous net that read it was
    # dropped can race with that net's prefetch thread (minicaffe.db shares environments per file).
    gpu = data_net_run(write_lmdb(tmp_path / "db_gpu"), gpu=True)
    assert_same(gpu, data_net_run(write_lmdb(tmp_path / "db_cpu"), gpu=False))


OTHER_DATA = """
layer { name: "dummy" type: "DummyData" top: "d" top: "c"
        dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "uniform" min: -1 max: 1 }
                           data_filler { type: "constant" value: 4 } } }
layer { name: "mem" type: "MemoryData" top: "m" top: "mlabel"
        memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "sum" type: "Eltwise" bottom: "d" bottom: "c" bottom: "x" top: "sum" }
"""


def other_data_run(gpu: bool) -> dict[str, np.ndarray]:
    set_mode(gpu)
    minicaffe.set_random_seed(5)
    net = Net(io.parse_text(OTHER_DATA, caffe_pb2.NetParameter()), minicaffe.TEST)
    net.set_input_arrays(np.arange(24, dtype=np.float32).reshape(4, 1, 2, 3), np.arange(4))
    out = {}
    for i in range(3):
        for name, value in net.forward(x=np.full((2, 3), i), blobs=["m", "mlabel", "d", "c"]).items():
            out[f"{name} {i}"] = value.copy()
    return out


def test_dummy_memory_and_input_layers_gpu_equal_cpu(fake_cupy):
    gpu = other_data_run(gpu=True)
    assert_same(gpu, other_data_run(gpu=False))
    np.testing.assert_array_equal(gpu["m 1"], np.arange(12, 24).reshape(2, 1, 2, 3))
    np.testing.assert_array_equal(gpu["c 2"], 4)


def assert_data_layer_gpu_equals_cpu(text: str, seed: int, forwards: int) -> None:
    """A two-top data layer gives the same batches in GPU mode (on the device) as in CPU mode."""
    runs = []
    for gpu in (False, True):
        set_mode(gpu)
        minicaffe.set_random_seed(seed)
        layer = layer_from_prototxt(text, dtype=np.float32)
        top = [Blob((), np.float32), Blob((), np.float32)]
        layer.setup([], top)
        out = {}
        for i in range(forwards):
            layer.forward_index = i
            layer.reshape([], top)
            layer.forward([], top)
            assert on_device(top[0].get_data()) == gpu
            out.update({f"{i} {k}": np.array(t.data) for k, t in enumerate(top)})
        runs.append(out)
    assert_same(runs[1], runs[0])


def test_hdf5_data_gpu_equals_cpu(fake_cupy, tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"] = np.arange(30, dtype=np.float64).reshape(5, 2, 3)
        f["label"] = np.arange(5, dtype=np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n")
    text = (f'name: "h5" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ source: '
            f'"{tmp_path / "list.txt"}" batch_size: 2 shuffle: true }}')
    assert_data_layer_gpu_equals_cpu(text, seed=2, forwards=4)


IMAGE_NET = """
layer {{ name: "images" type: "ImageData" top: "data" top: "label"
        image_data_param {{ source: "{root}/list.txt" root_folder: "{root}/" batch_size: 2 shuffle: true }}
        transform_param {{ crop_size: 3 mirror: true scale: 0.01 mean_value: 100 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
layer {{ name: "out" type: "HDF5Output" bottom: "ip" bottom: "label"
        hdf5_output_param {{ file_name: "{out}" }} }}
"""


def test_image_data_and_hdf5_output_net_gpu_equals_cpu(fake_cupy, tmp_path):
    h5py = pytest.importorskip("h5py")
    image = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(4).integers(0, 256, (3, 4, 5, 3)).astype(np.uint8)
    for i, rgb in enumerate(pixels):
        image.fromarray(rgb).save(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("0.png 0\n1.png 1\n2.png 2\n")
    runs = []
    for gpu in (False, True):
        set_mode(gpu)
        minicaffe.set_random_seed(6)
        out_file = tmp_path / f"out_{gpu}.h5"
        text = IMAGE_NET.format(root=tmp_path, out=out_file)
        net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TRAIN)
        out = {}
        for i in range(4):  # past the end of the list: a reshuffled epoch
            out[f"loss {i}"] = np.array(net.forward_backward())
            assert on_device(net.blobs["data"].get_data()) == gpu
            for name in ("data", "label", "ip"):
                out[f"{name} {i}"] = np.array(net.blobs[name].data)
            out[f"ip diff {i}"] = np.array(net.params["ip"][0].diff)
            with h5py.File(out_file, "r") as f:
                out[f"h5 {i}"] = f["data"][()]
                np.testing.assert_array_equal(f["label"][()].ravel(), out[f"label {i}"])
        runs.append(out)
    assert_same(runs[1], runs[0])


def test_window_data_gpu_equals_cpu(fake_cupy, tmp_path):
    image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(5).integers(0, 256, (9, 11, 3)).astype(np.uint8)
    image.fromarray(rgb).save(tmp_path / "w.png")
    (tmp_path / "windows.txt").write_text(f"# 0\n{tmp_path}/w.png\n3\n9\n11\n3\n"
                                          "1 0.9 1 1 6 4\n2 0.7 3 2 10 8\n0 0.1 0 0 4 8\n")
    text = (f'name: "windows" type: "WindowData" top: "data" top: "label" window_data_param {{ source: '
            f'"{tmp_path}/windows.txt" batch_size: 4 fg_fraction: 0.5 context_pad: 1 }} '
            "transform_param { crop_size: 5 mirror: true mean_value: 50 }")
    assert_data_layer_gpu_equals_cpu(text, seed=8, forwards=3)


# -- the command line, in process ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quickstart_work(tmp_path_factory) -> Path:
    from minicaffe import example

    folder = tmp_path_factory.mktemp("quickstart_gpu")
    example.quickstart_solver(folder)
    return folder


def short_solver(folder: Path, work: Path, name: str) -> Path:
    """The quickstart solver cut to 20 iterations (test and snapshot every 10)."""
    from minicaffe import example

    param = io.read_solver_param(example.data_dir() / example.SOLVER_FILE)
    param.net = str(work / "digits_train_test.prototxt")
    param.max_iter, param.snapshot, param.display, param.test_interval = 20, 10, 10, 10
    param.test_iter[:] = [1]
    param.snapshot_prefix = str(folder / name)
    path = folder / f"{name}.prototxt"
    io.write_text(path, param)
    return path


def settle_prefetch() -> None:
    """Wait for the data layers' prefetch threads of finished runs: the next run opens the same LMDBs,
    which races with a thread dropping the last reference to the old environment (see above)."""
    for thread in threading.enumerate():
        if thread.daemon and thread.name.endswith("(_run)"):  # minicaffe.layers.data.Prefetch threads
            thread.join(timeout=30)


def run_cli(args: list[str], capsys) -> str:
    from minicaffe import cli

    settle_prefetch()
    code = cli.main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out + err


def test_train_resume_and_test_commands_on_gpu_match_cpu(fake_cupy, quickstart_work, tmp_path, capsys):
    """`minicaffe train --gpu 0` (with --watch), a resumed run and `minicaffe test --gpu 0`, in process."""
    text = run_cli(["train", "--solver", str(short_solver(tmp_path, quickstart_work, "cpu")),
                    "--watch", "prelu*"], capsys)
    assert "Using GPUs" not in text and "Optimization Done" in text
    text = run_cli(["train", "--solver", str(short_solver(tmp_path, quickstart_work, "gpu")), "--gpu", "0",
                    "--watch", "prelu*"], capsys)
    assert "Using GPUs 0" in text and "Optimization Done" in text and backend.on_gpu()
    gpu_model = (tmp_path / "gpu_iter_20.caffemodel").read_bytes()
    if not REAL_CUPY:  # a real GPU rounds differently: only the resumed run must match exactly
        assert gpu_model == (tmp_path / "cpu_iter_20.caffemodel").read_bytes()
        assert (tmp_path / "gpu_watch.csv").read_text() == (tmp_path / "cpu_watch.csv").read_text()
    # Resumed at iteration 10 on the GPU: bit for bit the uninterrupted run.
    run_cli(["train", "--solver", str(short_solver(tmp_path, quickstart_work, "resumed")), "--gpu", "0",
             "--snapshot", str(tmp_path / "gpu_iter_10.solverstate")], capsys)
    assert (tmp_path / "resumed_iter_20.caffemodel").read_bytes() == gpu_model

    scores = {}
    for device in ("cpu", "gpu"):
        text = run_cli(["test", "--model", str(quickstart_work / "digits_train_test.prototxt"), "--weights",
                        str(tmp_path / "gpu_iter_20.caffemodel"), "--iterations", "2"]
                       + (["--gpu", "0"] if device == "gpu" else []), capsys)
        scores[device] = [line.split("] ", 1)[1] for line in text.splitlines() if "accuracy = " in line]
    assert scores["cpu"] and len(scores["gpu"]) == len(scores["cpu"])
    if not REAL_CUPY:
        assert scores["gpu"] == scores["cpu"]


def test_train_on_a_missing_gpu_is_an_error(fake_cupy, quickstart_work, tmp_path, capsys):
    from minicaffe import cli

    count = fake_cupy.cuda.runtime.getDeviceCount()
    code = cli.main(["train", "--solver", str(short_solver(tmp_path, quickstart_work, "x")), "--gpu",
                     str(count)])
    assert code == 1 and f"device {count} asked for, {count} present" in capsys.readouterr().err
    assert backend.mode() == "cpu"


def test_device_query_and_time_commands_on_gpu(fake_cupy, quickstart_work, capsys):
    name = fake_cupy.cuda.runtime.getDeviceProperties(0)["name"]
    assert (name.decode() if isinstance(name, bytes) else name) in run_cli(["device_query", "--gpu", "0"],
                                                                         capsys)
    text = run_cli(["time", "--model", str(quickstart_work / "digits_train_test.prototxt"),
                    "--iterations", "1", "--gpu", "0"], capsys)
    assert "Average Forward-Backward" in text and "Copy bandwidth" in text


def test_kernel_benchmark_runs_on_gpu(fake_cupy, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    saved_path = list(sys.path)
    try:
        spec.loader.exec_module(bench)  # puts benchmarks/ on sys.path
        assert bench.main(["--device", "gpu", "--quick", "--no-write"]) == 0
    finally:
        sys.path[:] = saved_path
    out = capsys.readouterr().out
    assert "GPU" in out and "PReLU" in out and "copy bandwidth" in out
    assert {"prelu_forward", "im2col", "pool_ave_forward"} <= {name for name, *_ in fake_cupy.launches}
