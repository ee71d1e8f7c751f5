"""InnerProduct layer: forward vs numpy, axis and transpose, gradients, parameters, errors."""

from __future__ import annotations

import numpy as np
import pytest

from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import check_layer, layer_from_prototxt

DTYPES = [np.float32, np.float64]
FILLERS = 'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'


def ip_text(num_output, extra="", fillers=True):
    filler = FILLERS if fillers else ""
    return f'type: "InnerProduct" inner_product_param {{ num_output: {num_output} {extra} {filler} }}'


def setup_layer(text, x, dtype=np.float64, weights=None, bias=None):
    layer = layer_from_prototxt(text, dtype=dtype)
    bottom = [Blob(np.shape(x), dtype)]
    bottom[0].data[...] = x
    top = [Blob((), dtype)]
    layer.setup(bottom, top)
    if weights is not None:
        layer.blobs[0].data[...] = weights
    if bias is not None:
        layer.blobs[1].data[...] = bias
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return layer, bottom, top


def reference(x, w, b, axis=1, transpose=False):
    """Loop over items and outputs: y[i, o] = sum_k x[i, k] * W[o, k] + b[o]."""
    batch = int(np.prod(x.shape[:axis]))
    flat = x.reshape(batch, -1).astype(np.float64)
    w = np.asarray(w, np.float64)
    w = w.T if transpose else w
    out = np.zeros((batch, w.shape[0]))
    for i in range(batch):
        for o in range(w.shape[0]):
            out[i, o] = np.dot(flat[i], w[o]) + (b[o] if b is not None else 0.0)
    return out.reshape(*x.shape[:axis], w.shape[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_checked_values(dtype):
    x = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]
    w = [[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]]
    _, _, top = setup_layer(ip_text(2, fillers=False), x, dtype, weights=w, bias=[10.0, -1.0])
    np.testing.assert_allclose(top[0].data, [[1 - 3 + 10, 2 + 2 + 1.5 - 1], [-1 + 10, -2 + 0.5 - 1]])
    assert top[0].data.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_hand_checked_transpose_without_bias(dtype):
    x = [[1.0, 2.0, 3.0]]
    w_kn = [[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5]]  # (K, N)
    layer, _, top = setup_layer(ip_text(2, "transpose: true bias_term: false", fillers=False), x, dtype,
                                weights=w_kn)
    assert layer.blobs[0].shape == (3, 2) and len(layer.blobs) == 1
    np.testing.assert_allclose(top[0].data, [[1 - 3, 2 + 2 + 1.5]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, extra, axis, transpose", [
    ((4, 3, 2, 2), "", 1, False),
    ((2, 3, 4, 5), "axis: 2", 2, False),
    ((2, 3, 4), "axis: -1", 2, False),
    ((3, 2, 5), "transpose: true", 1, True),
    ((2, 2, 3, 2), "axis: 2 transpose: true", 2, True),
])
def test_forward_matches_reference(shape, extra, axis, transpose, dtype):
    x = np.random.default_rng(1).normal(size=shape)
    layer, _, top = setup_layer(ip_text(4, extra), x, dtype)
    expected = reference(x.astype(dtype), layer.blobs[0].data, layer.blobs[1].data, axis, transpose)
    assert top[0].shape == shape[:axis] + (4,)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(top[0].data, expected, rtol=tolerance, atol=tolerance)


def test_shapes_and_default_fillers():
    layer, _, top = setup_layer(ip_text(5, fillers=False), np.ones((2, 3, 2, 2)))
    assert layer.blobs[0].shape == (5, 12) and layer.blobs[1].shape == (5,)
    assert not layer.blobs[0].data.any() and not layer.blobs[1].data.any()  # Caffe's constant 0
    assert top[0].shape == (2, 5)
    layer, _, top = setup_layer(ip_text(5, "axis: 2 transpose: true", fillers=False), np.ones((2, 3, 2, 2)))
    assert layer.blobs[0].shape == (4, 5) and top[0].shape == (2, 3, 5)


def test_new_batch_size_keeps_working():
    layer, bottom, top = setup_layer(ip_text(3), np.ones((2, 4)))
    x = np.random.default_rng(2).normal(size=(5, 2, 2))
    bottom[0].reshape(x.shape)
    bottom[0].data[...] = x
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, reference(x, layer.blobs[0].data, layer.blobs[1].data),
                               rtol=1e-12)


@pytest.mark.parametrize("extra, shape", [
    ("", (3, 2, 2)),
    ("axis: 2", (2, 2, 3)),
    ("transpose: true", (2, 5)),
    ("axis: 2 transpose: true", (2, 2, 2, 2)),
    ("bias_term: false", (3, 4)),
])
def test_gradients_of_bottom_weights_and_bias(extra, shape):
    x = np.random.default_rng(3).normal(size=shape)
    check_layer(layer_from_prototxt(ip_text(3, extra)), [x], stepsize=1e-3, threshold=1e-6)


def test_gradient_exhaustive():
    x = np.random.default_rng(4).normal(size=(2, 3))
    check_layer(layer_from_prototxt(ip_text(2, "transpose: true")), [x], exhaustive=True,
                stepsize=1e-3, threshold=1e-6)


def test_backward_values_accumulate_params_and_write_bottom():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4))
    layer, bottom, top = setup_layer(ip_text(2), x)
    dy = rng.normal(size=(3, 2))
    bottom[0].diff[...] = 50.0
    for repeat in (1, 2):
        top[0].diff[...] = dy
        layer.backward(top, [True], bottom)
        np.testing.assert_allclose(layer.blobs[0].diff, repeat * dy.T @ x, rtol=1e-12)
        np.testing.assert_allclose(layer.blobs[1].diff, repeat * dy.sum(axis=0), rtol=1e-12)
        np.testing.assert_allclose(bottom[0].diff, dy @ layer.blobs[0].data, rtol=1e-12)


def test_propagate_down_flags():
    rng = np.random.default_rng(6)
    layer, bottom, top = setup_layer(ip_text(2), rng.normal(size=(3, 4)))
    bottom[0].diff[...] = 7.0
    top[0].diff[...] = rng.normal(size=(3, 2))
    layer.param_propagate_down = [False, True]
    layer.backward(top, [False], bottom)
    assert np.all(bottom[0].diff == 7.0) and not layer.blobs[0].diff.any() and layer.blobs[1].diff.any()
    layer.blobs[1].diff[...] = 0
    layer.param_propagate_down = [True, False]
    layer.backward(top, [True], bottom)
    assert layer.blobs[0].diff.any() and not layer.blobs[1].diff.any() and not np.all(bottom[0].diff == 7.0)


def test_reshaped_input_that_changes_k_is_refused():
    layer, bottom, top = setup_layer(ip_text(2), np.ones((2, 3, 2)))
    bottom[0].reshape(4, 6)  # K stays 6: fine
    layer.reshape(bottom, top)
    assert top[0].shape == (4, 2)
    bottom[0].reshape(2, 3, 3)
    with pytest.raises(LayerError, match=r"'innerproduct'.*bottom shape \[2, 3, 3\].*9 values.*expect 6"):
        layer.reshape(bottom, top)


def test_bad_parameters():
    with pytest.raises(LayerError, match="num_output must be given"):
        setup_layer('type: "InnerProduct" inner_product_param { }', np.ones((2, 3)))
    with pytest.raises(LayerError, match="axis 3 out of range"):
        setup_layer(ip_text(2, "axis: 3"), np.ones((2, 3)))
    layer = layer_from_prototxt(ip_text(2))
    layer.blobs = [Blob((2, 4), np.float64), Blob((2,), np.float64)]
    with pytest.raises(LayerError, match=r"parameter blob 0 has shape \[2, 4\], expected \[2, 3\]"):
        layer.setup([Blob((5, 3), np.float64)], [Blob((), np.float64)])


def test_in_place_is_refused():
    layer = layer_from_prototxt(ip_text(2))
    blob = Blob((2, 2), np.float64)
    with pytest.raises(LayerError, match="in place"):
        layer.setup([blob], [blob])
