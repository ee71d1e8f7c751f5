"""No training step allocates a parameter-sized array (issue #8, item 6).

A parameter gradient added as ``diff += dy.T @ x`` first makes a temporary as large as the parameter
(150 MB for AlexNet's fc6) on every step; minicaffe's layers add it in place with BLAS (beta = 1) and
keep their scratch arrays between steps. numpy reports its allocations to tracemalloc, so the peak of
traced memory during a step, above what was live before it, bounds the largest single allocation of the
step from above: it must stay below the smallest large parameter.

The net: a 3x3 Convolution (1.2 MB of weights), a depthwise and a 1x1 one (the direct kernels and the
im2col-free path), an InnerProduct of 4 MB. Activations are small (tens of kB), so the bound is tight.
(The solver's update rule is not part of this check: it runs after the layers, on the diffs.)
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import minicaffe
from minicaffe import backend
from minicaffe.blas import gemm_accumulate
from minicaffe.io import parse_text
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2

NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 128 dim: 6 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 256 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "depthwise" type: "Convolution" bottom: "conv" top: "depthwise"
        convolution_param { num_output: 256 group: 256 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "pointwise" type: "Convolution" bottom: "depthwise" top: "pointwise"
        convolution_param { num_output: 256 kernel_size: 1 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "ip" type: "InnerProduct" bottom: "pointwise" top: "ip"
        inner_product_param { num_output: 256 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
LARGE_PARAMETERS = ("conv", "pointwise", "ip")


def training_step(net: Net) -> None:
    net.clear_param_diffs()
    net.forward_backward()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_steps_allocate_nothing_parameter_sized(dtype):
    backend.set_mode_cpu()
    net = Net(parse_text(NET, caffe_pb2.NetParameter()), phase=minicaffe.TRAIN, dtype=dtype)
    net.blobs["data"].data[...] = np.random.default_rng(0).standard_normal(net.blobs["data"].shape)
    net.blobs["label"].data[...] = [1, 3]
    layers = {layer.name: layer for layer in net.layers}
    smallest = min(layers[name].blobs[0].data.nbytes for name in LARGE_PARAMETERS)
    assert smallest >= 256 * 1024  # large-ish parameters, far above the activations
    for _ in range(2):  # warm-up: scratch buffers and diffs take their memory here
        training_step(net)
    tracemalloc.start()
    try:
        rises = []
        for _ in range(3):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            training_step(net)
            rises.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    assert max(rises) < smallest, (
        f"a training step allocated up to {max(rises)} bytes at once (per step: {rises}); the smallest "
        f"large parameter is {smallest} bytes: some layer makes a parameter-sized temporary")



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gemm_accumulate_adds_in_place_without_copies(dtype, transpose_a, transpose_b):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5) if transpose_a else (5, 7)).astype(dtype)
    b = rng.standard_normal((6, 7) if transpose_b else (7, 6)).astype(dtype)
    a, b = (a.T if transpose_a else a), (b.T if transpose_b else b)
    c = rng.standard_normal((5, 6)).astype(dtype)
    expected = c.astype(np.float64) + a.astype(np.float64) @ b.astype(np.float64)
    address = c.ctypes.data
    gemm_accumulate(a, b, c)
    assert c.ctypes.data == address
    np.testing.assert_allclose(c, expected, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_gemm_accumulate_refuses_a_non_contiguous_output_and_wrong_shapes():
    a, b = np.ones((3, 4)), np.ones((4, 2))
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm_accumulate(a, b, np.ones((2, 3)).T)
    with pytest.raises(ValueError, match="shapes"):
        gemm_accumulate(a, b, np.ones((3, 3)))
