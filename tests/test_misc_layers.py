"""ArgMax, MVN, Reduction, Tile, Embed, Parameter, Filter, BatchReindex: hand-checked values, numpy
references written here, fp64 gradient checks of every input and parameter, in place where Caffe
allows it (MVN), and clear errors for bad parameters and bad indices."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import backward_layer, run_layer

import minicaffe
from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.testing import GradientChecker, blobs_from_arrays, check_layer, layer_from_prototxt

DTYPES = [np.float32, np.float64]


def normal(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def check_bottom(text: str, arrays, index: int, num_top: int = 1, **checker_args) -> None:
    """Gradient check of bottom `index` (and every parameter) only: the other bottoms are indices."""
    layer = layer_from_prototxt(text)
    bottom = blobs_from_arrays(*arrays)
    top = [Blob((), np.float64) for _ in range(num_top)]
    GradientChecker(**checker_args).check_gradient(layer, bottom, top, check_bottom=index)


# -- ArgMax ----------------------------------------------------------------------------------------

def test_argmax_hand_values_and_caffe_tie_rule():
    # Ties rank the larger index first (Caffe sorts (value, index) pairs with std::greater).
    x = np.array([[1.0, 3.0, 2.0, 3.0], [5.0, -1.0, 5.0, 0.0]])
    _, _, top = run_layer('type: "ArgMax" argmax_param { top_k: 3 }', x)
    assert top[0].shape == (2, 1, 3)
    np.testing.assert_array_equal(top[0].data[:, 0], [[3, 1, 2], [2, 0, 3]])
    _, _, top = run_layer('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', x)
    assert top[0].shape == (2, 2, 2)
    np.testing.assert_array_equal(top[0].data, [[[3, 1], [3, 3]], [[2, 0], [5, 5]]])


def reference_topk(x, axis, k):
    """(indices, values) of the k largest along axis, largest first (no ties in random data)."""
    order = np.argsort(-x, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    return indices, np.take_along_axis(x, indices, axis=axis)


@pytest.mark.parametrize("k", [1, 3])  # top_k 1 has its own kernel (a scan that vectorizes)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 4), (2, 3, 2, 5), (2, 1, 3, 2, 2)])
def test_argmax_without_axis_ranks_each_item(dtype, shape, k):
    x = normal(*shape).astype(dtype)
    indices, values = reference_topk(x.reshape(shape[0], -1), 1, k)
    _, _, top = run_layer(f'type: "ArgMax" argmax_param {{ top_k: {k} }}', x, dtype=dtype)
    assert top[0].shape == (shape[0], 1, k) + (1,) * (len(shape) - 3)
    np.testing.assert_array_equal(top[0].data.reshape(shape[0], k), indices)
    _, _, top = run_layer(f'type: "ArgMax" argmax_param {{ top_k: {k} out_max_val: true }}', x, dtype=dtype)
    assert top[0].shape == (shape[0], 2, k) + (1,) * (len(shape) - 3)
    out = top[0].data.reshape(shape[0], 2, k)
    np.testing.assert_array_equal(out[:, 0], indices)
    np.testing.assert_array_equal(out[:, 1], values)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_argmax_along_an_axis(axis, k):
    x = normal(3, 4, 5, 2)
    indices, values = reference_topk(x, axis, k)
    _, _, top = run_layer(f'type: "ArgMax" argmax_param {{ top_k: {k} axis: {axis} }}', x)
    np.testing.assert_array_equal(top[0].data, indices)
    _, _, top = run_layer(f'type: "ArgMax" argmax_param {{ top_k: {k} axis: {axis} out_max_val: true }}', x)
    np.testing.assert_array_equal(top[0].data, values)  # with an axis: the values only, as Caffe


def test_argmax_ranks_nan_first():
    _, _, top = run_layer('type: "ArgMax" argmax_param { top_k: 2 }', [[1.0, np.nan, 3.0]])
    np.testing.assert_array_equal(top[0].data.ravel(), [1, 2])


def test_argmax_top1_ties_and_nan_match_the_top_k_ranking():
    rows = [[1.0, 3.0, 2.0, 3.0], [5.0, -1.0, 5.0, 0.0], [np.nan, 2.0, np.nan, 1.0], [2.0, np.nan, 9.0, 9.0]]
    _, _, top = run_layer('type: "ArgMax"', rows)
    np.testing.assert_array_equal(top[0].data.ravel(), [3, 2, 2, 1])  # later index on ties; NaN first
    _, _, top = run_layer('type: "ArgMax" argmax_param { axis: 0 out_max_val: true }', np.array(rows).T)
    np.testing.assert_array_equal(top[0].data.ravel(), [3, 5, np.nan, np.nan])


def test_argmax_has_no_gradient():
    layer, bottom, top = run_layer('type: "ArgMax"', normal(2, 3))
    assert not layer.allow_force_backward(0)
    backward_layer(layer, bottom, top, [np.ones(top[0].shape)], [False])  # nothing asked: fine
    with pytest.raises(LayerError, match=r"'argmax' \(ArgMax\): has no gradient"):
        backward_layer(layer, bottom, top, [np.ones(top[0].shape)], [True])


@pytest.mark.parametrize("param, shape, message", [
    ("top_k: 0", (2, 3), "top_k must be at least 1, got 0"),
    ("top_k: 7", (2, 3, 2), r"top_k 7 is more than the 6 values per item"),
    ("top_k: 4 axis: 1", (2, 3, 5), r"top_k 4 is more than the size 3 of axis 1"),
    ("axis: 3", (2, 3, 5), "axis"),
])
def test_argmax_bad_parameters(param, shape, message):
    with pytest.raises(LayerError, match=r"'argmax' \(ArgMax\): " + message):
        run_layer(f'type: "ArgMax" argmax_param {{ {param} }}', np.zeros(shape))


# -- MVN -------------------------------------------------------------------------------------------

def reference_mvn(x, normalize_variance=True, across_channels=False, eps=1e-9):
    rows = x.reshape(x.shape[0] if across_channels else x.shape[0] * x.shape[1], -1)
    centred = rows - rows.mean(axis=1, keepdims=True)
    if normalize_variance:  # Caffe: eps added to the (biased) standard deviation
        centred = centred / (np.sqrt((centred ** 2).mean(axis=1, keepdims=True)) + eps)
    return centred.reshape(x.shape)


def test_mvn_hand_values_eps_on_the_std():
    x = np.array([[[0.0, 2.0]], [[1.0, 1.0]]])  # row stds 1 and 0
    _, _, top = run_layer('type: "MVN" mvn_param { eps: 1 }', x)
    np.testing.assert_allclose(top[0].data, [[[-0.5, 0.5]], [[0.0, 0.0]]], rtol=1e-15)  # (x - m) / (1 + 1)
    _, _, top = run_layer('type: "MVN"', [[[1.0, 2.0, 3.0, 4.0]]])
    np.testing.assert_allclose(top[0].data.ravel(), np.array([-1.5, -0.5, 0.5, 1.5]) / (np.sqrt(1.25) + 1e-9),
                               rtol=1e-6)  # the float eps field: 1e-9 as a float
    _, _, top = run_layer('type: "MVN" mvn_param { normalize_variance: false }', [[[1.0, 2.0, 6.0]]])
    np.testing.assert_array_equal(top[0].data.ravel(), [-2.0, -1.0, 3.0])


MVN_PARAMS = {"default": {}, "across": {"across_channels": True},
              "mean_only": {"normalize_variance": False},
              "across_mean_only": {"across_channels": True, "normalize_variance": False}}


def mvn_text(params: dict) -> str:
    fields = " ".join(f"{k}: {str(v).lower()}" for k, v in params.items())
    return f'type: "MVN" mvn_param {{ {fields} }}'


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("name", sorted(MVN_PARAMS))
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 7, 9), (3, 4), (2, 3, 5)])
def test_mvn_matches_numpy(dtype, tol, name, shape):
    x = normal(*shape) * 3 + 1
    _, _, top = run_layer(mvn_text(MVN_PARAMS[name]), x, dtype=dtype)
    np.testing.assert_allclose(top[0].data, reference_mvn(x.astype(dtype), **MVN_PARAMS[name]),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(MVN_PARAMS))
@pytest.mark.parametrize("shape", [(2, 3, 2, 3), (2, 2, 6, 7)])
def test_mvn_gradient(name, shape):
    check_layer(layer_from_prototxt(mvn_text(MVN_PARAMS[name])), [normal(*shape)])


def test_mvn_backward_is_caffes_formula_for_a_large_eps():
    """Caffe's backward, dx = (dy - mean(dy) - y * mean(dy * y)) / (std + eps), also when eps is large."""
    x, dy = normal(2, 3, 8), normal(2, 3, 8, seed=1)
    layer, bottom, top = run_layer('type: "MVN" mvn_param { eps: 0.5 }', x)
    dx = backward_layer(layer, bottom, top, [dy])[0]
    y, std = top[0].data, x.std(axis=2, keepdims=True)
    expected = (dy - dy.mean(axis=2, keepdims=True) - y * (dy * y).mean(axis=2, keepdims=True)) / (std + 0.5)
    np.testing.assert_allclose(dx, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(MVN_PARAMS))
def test_mvn_in_place_equals_not_in_place(name):
    x, dy = normal(2, 3, 4, 5), normal(2, 3, 4, 5, seed=1)
    results = []
    for in_place in (False, True):
        layer, bottom, top = run_layer(mvn_text(MVN_PARAMS[name]), x, in_place=in_place)
        y = np.array(top[0].data)
        top[0].diff[...] = dy
        layer.run_backward(top, [True], bottom)
        results.append((y, np.array(bottom[0].diff)))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_mvn_in_place_backward_survives_a_later_in_place_layer():
    net_text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
    layer { name: "mvn" type: "MVN" bottom: "x" top: "x" }
    layer { name: "scale" type: "Power" bottom: "x" top: "x" power_param { scale: 3 } }
    layer { name: "target" type: "Input" top: "t" input_param { shape { dim: 2 dim: 3 dim: 4 } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "t" top: "loss" }
    """
    param = io.parse_text(net_text, caffe_pb2.NetParameter())
    param.force_backward = True
    net = Net(param, minicaffe.TEST)
    x, t = normal(2, 3, 4), normal(2, 3, 4, seed=1)
    net.forward(x=x, t=t)
    dx = net.backward()["x"]
    y = reference_mvn(x)
    dy = 3 * (3 * y - t) / 2  # EuclideanLoss over 2 items, then Power's scale
    expected = dy - dy.mean(axis=2, keepdims=True) - y * (dy * y).mean(axis=2, keepdims=True)
    expected /= x.std(axis=2, keepdims=True) + np.float32(1e-9)
    np.testing.assert_allclose(dx, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("param, message", [("eps: -1", "eps must be >= 0, got -1"),
                                            ("eps: nan", "eps must be >= 0, got nan")])
def test_mvn_bad_parameters(param, message):
    with pytest.raises(LayerError, match=r"'mvn' \(MVN\): " + message):
        run_layer(f'type: "MVN" mvn_param {{ {param} }}', normal(2, 3))


def test_mvn_scalar_bottom_is_refused():
    with pytest.raises(LayerError, match=r"'mvn' \(MVN\): needs a bottom with at least one axis"):
        run_layer('type: "MVN"', np.array(1.0))


# -- Reduction -------------------------------------------------------------------------------------

REDUCE_X = np.array([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]])


@pytest.mark.parametrize("operation, expected", [
    ("SUM", [2.0, 3.0]), ("ASUM", [6.0, 5.0]), ("SUMSQ", [14.0, 17.0]), ("MEAN", [2.0 / 3.0, 1.0])])
def test_reduction_hand_values(operation, expected):
    _, _, top = run_layer(f'type: "Reduction" reduction_param {{ operation: {operation} axis: 1 }}', REDUCE_X)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-15)
    _, _, top = run_layer(f'type: "Reduction" reduction_param {{ operation: {operation} axis: 1 coeff: -2 }}',
                          REDUCE_X)
    np.testing.assert_allclose(top[0].data, -2 * np.array(expected), rtol=1e-15)


def test_reduction_defaults_sum_everything_to_a_scalar():
    _, _, top = run_layer('type: "Reduction"', REDUCE_X)
    assert top[0].shape == () and float(top[0].data) == 5.0


NUMPY_REDUCTIONS = {"SUM": lambda v: v.sum(axis=1), "ASUM": lambda v: np.abs(v).sum(axis=1),
                    "SUMSQ": lambda v: (v * v).sum(axis=1), "MEAN": lambda v: v.mean(axis=1)}


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-13)])
@pytest.mark.parametrize("operation", sorted(NUMPY_REDUCTIONS))
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_reduction_matches_numpy(dtype, tol, operation, axis):
    x = normal(2, 3, 7, 9)
    _, _, top = run_layer(f'type: "Reduction" reduction_param {{ operation: {operation} axis: {axis} '
                          f'coeff: 0.5 }}', x, dtype=dtype)
    lead = x.shape[:axis % 4]
    assert top[0].shape == lead
    expected = 0.5 * NUMPY_REDUCTIONS[operation](x.astype(dtype).reshape(int(np.prod(lead)), -1))
    np.testing.assert_allclose(top[0].data.reshape(-1), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("operation", sorted(NUMPY_REDUCTIONS))
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reduction_gradient(operation, axis):
    x = normal(2, 3, 5)
    x[np.abs(x) < 0.05] = 0.3  # ASUM's kink at 0
    check_layer(layer_from_prototxt(f'type: "Reduction" reduction_param {{ operation: {operation} '
                                    f'axis: {axis} coeff: -1.5 }}'), [x], kink_range=0.02)


def test_reduction_asum_gradient_at_zero_is_zero():
    layer, bottom, top = run_layer('type: "Reduction" reduction_param { operation: ASUM axis: 1 }',
                                   [[0.0, -3.0, 2.0]])
    dx = backward_layer(layer, bottom, top, [[2.0]])[0]
    np.testing.assert_array_equal(dx, [[0.0, -2.0, 2.0]])


def test_reduction_bad_parameters():
    with pytest.raises(LayerError, match=r"'reduction' \(Reduction\): .*axis"):
        run_layer('type: "Reduction" reduction_param { axis: 2 }', REDUCE_X)
    with pytest.raises(LayerError, match=r"'reduction' \(Reduction\): cannot run in place"):
        run_layer('type: "Reduction" reduction_param { axis: 1 }', REDUCE_X, in_place=True)


# -- Tile ------------------------------------------------------------------------------------------

def test_tile_hand_values():
    _, _, top = run_layer('type: "Tile" tile_param { tiles: 2 }', [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(top[0].data, [[1, 2, 1, 2], [3, 4, 3, 4]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis, tiles", [(0, 3), (1, 2), (2, 4), (-1, 1), (3, 2)])
def test_tile_matches_numpy(dtype, axis, tiles):
    x = normal(2, 3, 4, 5).astype(dtype)
    _, _, top = run_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}', x, dtype=dtype)
    reps = [1] * 4
    reps[axis] = tiles
    np.testing.assert_array_equal(top[0].data, np.tile(x, reps))


@pytest.mark.parametrize("axis, tiles", [(0, 2), (1, 3), (2, 2)])
def test_tile_gradient(axis, tiles):
    check_layer(layer_from_prototxt(f'type: "Tile" tile_param {{ axis: {axis} tiles: {tiles} }}'),
                [normal(2, 3, 4)])


@pytest.mark.parametrize("param, message", [
    ("tiles: 0", "tiles must be given and at least 1, got 0"),
    ("axis: 1", "tiles must be given and at least 1, got none"),
    ("tiles: 2 axis: 3", "axis")])
def test_tile_bad_parameters(param, message):
    with pytest.raises(LayerError, match=r"'tile' \(Tile\): .*" + message):
        run_layer(f'type: "Tile" tile_param {{ {param} }}', normal(2, 3, 4))


# -- Embed -----------------------------------------------------------------------------------------

EMBED = ('type: "Embed" embed_param { num_output: 3 input_dim: 5 weight_filler { type: "gaussian" } '
         'bias_filler { type: "gaussian" } }')
WORDS = np.array([[1.0, 4.0, 1.0], [0.0, 1.0, 4.0]])  # word 1 three times, 4 twice, 2 and 3 never


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_looks_up_rows_and_adds_the_bias(dtype):
    layer, bottom, top = run_layer(EMBED, WORDS, dtype=dtype)
    assert [b.shape for b in layer.blobs] == [(5, 3), (3,)] and top[0].shape == (2, 3, 3)
    layer.blobs[0].data[...] = np.arange(15).reshape(5, 3)
    layer.blobs[1].data[...] = [0.5, 0, -1]
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data[0, 1], [12.5, 13, 13])  # word 4: row [12 13 14] + bias
    np.testing.assert_array_equal(top[0].data, np.arange(15).reshape(5, 3)[WORDS.astype(int)]
                                  + np.array([0.5, 0, -1]))


def test_embed_without_bias():
    layer, bottom, top = run_layer(EMBED.replace("num_output: 3", "num_output: 3 bias_term: false"), WORDS)
    assert len(layer.blobs) == 1
    np.testing.assert_array_equal(top[0].data, layer.blobs[0].data[WORDS.astype(int)])


def test_embed_parameter_gradients_sum_repeated_words():
    layer, bottom, top = run_layer(EMBED, WORDS)
    dy = normal(2, 3, 3, seed=2)
    backward_layer(layer, bottom, top, [dy], [False])
    expected = np.zeros((5, 3))
    np.add.at(expected, WORDS.astype(int).ravel(), dy.reshape(-1, 3))
    np.testing.assert_allclose(layer.blobs[0].diff, expected, rtol=1e-15)
    assert not layer.blobs[0].diff[2:4].any()  # words never seen: no gradient
    np.testing.assert_allclose(layer.blobs[1].diff, dy.reshape(-1, 3).sum(axis=0), rtol=1e-15)


@pytest.mark.parametrize("bias", ["", "bias_term: false"])
def test_embed_gradient_of_every_parameter(bias):
    text = EMBED.replace("input_dim: 5", f"input_dim: 5 {bias}")
    check_bottom(text, [WORDS], index=-1)  # -1: no bottom (the indices have no gradient)


def test_embed_refuses_to_backpropagate_to_the_indices():
    layer, bottom, top = run_layer(EMBED, WORDS)
    assert not layer.allow_force_backward(0)
    with pytest.raises(LayerError, match=r"'embed' \(Embed\): cannot backpropagate to its input"):
        backward_layer(layer, bottom, top, [np.ones(top[0].shape)], [True])


@pytest.mark.parametrize("word, shown", [(5.0, "5"), (-1.0, "-1"), (1.5, "1.5"), (np.nan, "nan"),
                                         (1e10, "1e+10")])
def test_embed_bad_index_is_a_clear_error(word, shown):
    words = WORDS.copy()
    words[1, 2] = word
    message = rf"'embed' \(Embed\): index {re.escape(shown)} at position 5 is not an integer in 0\.\.4"
    with pytest.raises(LayerError, match=message):
        run_layer(EMBED, words)


@pytest.mark.parametrize("param, message", [
    ("input_dim: 5", "num_output must be given and positive"),
    ("num_output: 3", "input_dim must be given and positive")])
def test_embed_bad_parameters(param, message):
    with pytest.raises(LayerError, match=r"'embed' \(Embed\): embed_param\." + message):
        run_layer(f'type: "Embed" embed_param {{ {param} }}', WORDS)


def test_embed_in_a_net_gets_gradients_for_the_words_it_saw():
    """Embed's default weight filler is Caffe's constant 0; only the looked-up rows get a gradient."""
    text = """
    layer { name: "words" type: "Input" top: "w" input_param { shape { dim: 4 } } }
    layer { name: "target" type: "Input" top: "t" input_param { shape { dim: 4 dim: 2 } } }
    layer { name: "embed" type: "Embed" bottom: "w" top: "e" embed_param { num_output: 2 input_dim: 3 } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "e" bottom: "t" top: "loss" }
    """
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TRAIN)
    target = np.array([[1.0, 2], [3, 4], [1, 2], [3, 4]])
    net.forward(w=[0, 2, 0, 2], t=target)
    net.backward()
    weight_diff = net.params["embed"][0].diff
    # EuclideanLoss: (e - t) / 4 per looked-up row, e = 0; words 0 and 2 twice each, word 1 never
    np.testing.assert_allclose(weight_diff, [[-0.5, -1], [0, 0], [-1.5, -2]], rtol=1e-6)


# -- Parameter -------------------------------------------------------------------------------------

PARAMETER = 'type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }'


def test_parameter_top_is_the_blob_and_backward_accumulates():
    layer, _, top = run_layer(PARAMETER)
    assert len(layer.blobs) == 1 and layer.blobs[0].shape == (2, 3) and top[0].shape == (2, 3)
    np.testing.assert_array_equal(top[0].data, 0)  # Caffe: zeros
    layer.blobs[0].data[...] = np.arange(6).reshape(2, 3)
    layer.run_forward([], top)
    np.testing.assert_array_equal(top[0].data, np.arange(6).reshape(2, 3))
    layer.blobs[0].diff[...] = 1
    top[0].diff[...] = np.arange(6).reshape(2, 3)
    layer.run_backward(top, [], [])
    np.testing.assert_array_equal(layer.blobs[0].diff, np.arange(6).reshape(2, 3) + 1)


def test_parameter_gradient():
    layer = layer_from_prototxt(PARAMETER)
    layer.blobs.append(Blob((2, 3), np.float64))
    layer.blobs[0].data[...] = normal(2, 3)
    GradientChecker().check_gradient(layer, [], [Blob((), np.float64)])


def test_parameter_learns_in_a_net():
    text = """
    layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 3 } } }
    layer { name: "target" type: "DummyData" top: "t" dummy_data_param { shape { dim: 3 }
            data_filler { type: "constant" value: 2 } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "t" top: "loss" }
    """
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TRAIN)
    for _ in range(20):  # plain gradient descent on 0.5 * |p - 2|^2 / 3
        net.forward()
        for blob in net.params["p"]:
            blob.diff[...] = 0
        net.backward()
        net.params["p"][0].data[...] -= 1.5 * net.params["p"][0].diff
    np.testing.assert_allclose(net.params["p"][0].data, 2, rtol=1e-5)


def test_parameter_bad_parameters():
    with pytest.raises(LayerError, match=r"'parameter' \(Parameter\): parameter_param\.shape must be given"):
        run_layer('type: "Parameter"')
    with pytest.raises(LayerError, match=r"'parameter' \(Parameter\): parameter_param\.shape has a negative"):
        run_layer('type: "Parameter" parameter_param { shape { dim: -2 } }')
    layer = layer_from_prototxt(PARAMETER)
    layer.blobs.append(Blob((3, 2), np.float64))
    with pytest.raises(LayerError, match=r"parameter blob 0 has shape \[3, 2\], expected \[2, 3\]"):
        layer.setup([], [Blob((), np.float64)])
    with pytest.raises(LayerError, match="takes 0 bottom"):
        run_layer(PARAMETER, np.zeros(3))


# -- Filter ----------------------------------------------------------------------------------------

def run_filter(arrays, selector, num_top=None):
    layer = layer_from_prototxt('type: "Filter"')
    bottom = blobs_from_arrays(*arrays, selector)
    top = [Blob((), np.float64) for _ in range(len(arrays) if num_top is None else num_top)]
    layer.setup(bottom, top)
    assert all(t.shape[0] == bottom[0].shape[0] for t in top)  # Caffe's first reshape: every item
    layer.run_forward(bottom, top)
    return layer, bottom, top


def test_filter_keeps_selected_items_and_zeroes_the_rest_in_backward():
    data, other = np.arange(8.0).reshape(4, 2), np.arange(12.0).reshape(4, 3, 1) + 100
    layer, bottom, top = run_filter([data, other], [0.0, 1.0, 0.0, -2.0])
    np.testing.assert_array_equal(top[0].data, [[2, 3], [6, 7]])
    np.testing.assert_array_equal(top[1].data, other[[1, 3]])
    dx = backward_layer(layer, bottom, top, [[[1, 2], [3, 4]], np.ones((2, 3, 1))], [True, True, False])
    np.testing.assert_array_equal(dx[0], [[0, 0], [1, 2], [0, 0], [3, 4]])
    np.testing.assert_array_equal(dx[1][:, :, 0], [[0, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]])


def test_filter_follows_the_selector_on_every_forward_even_to_no_items():
    data = normal(3, 2)
    layer, bottom, top = run_filter([data], np.ones((3, 1, 1)))
    np.testing.assert_array_equal(top[0].data, data)
    bottom[1].data[...] = 0
    layer.run_forward(bottom, top)
    assert top[0].shape == (0, 2)
    dx = backward_layer(layer, bottom, top, [np.zeros((0, 2))], [True, False])
    np.testing.assert_array_equal(dx[0], 0)
    bottom[1].data[...] = np.array([np.nan, 0, 3]).reshape(3, 1, 1)  # NaN is nonzero, as in Caffe's test
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, data[[0, 2]])


def test_filter_in_a_net_changes_the_batch_size_per_forward():
    text = """
    layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
    layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 4 dim: 3 } } }
    layer { name: "s" type: "Input" top: "s" input_param { shape { dim: 4 } } }
    layer { name: "filter" type: "Filter" bottom: "x" bottom: "t" bottom: "s" top: "fx" top: "ft" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "fx" bottom: "ft" top: "loss" }
    """
    param = io.parse_text(text, caffe_pb2.NetParameter())
    param.force_backward = True
    net = Net(param, minicaffe.TRAIN)
    x, t = normal(4, 3), normal(4, 3, seed=1)
    for selector in ([1.0, 0, 1, 1], [0.0, 1, 0, 0]):
        kept = np.flatnonzero(selector)
        loss = net.forward(x=x, t=t, s=selector)["loss"]
        np.testing.assert_allclose(loss, ((x[kept] - t[kept]) ** 2).sum() / (2 * len(kept)), rtol=1e-5)
        assert net.blobs["fx"].shape == (len(kept), 3)
        dx = net.backward()["x"]
        expected = np.zeros((4, 3))
        expected[kept] = (x[kept] - t[kept]) / len(kept)
        np.testing.assert_allclose(dx, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("index", [0, 1])
def test_filter_gradient(index):
    check_bottom('type: "Filter"', [normal(5, 2, 3), normal(5, 4, seed=1), [1.0, 0, 1, 1, 0]], index,
                 num_top=2)


def test_filter_errors():
    with pytest.raises(LayerError, match=r"\(Filter\): needs one top per filtered bottom .*1, got 2"):
        run_filter([np.zeros((2, 3))], [1.0, 0.0], num_top=2)
    with pytest.raises(LayerError, match=r"the selector \(last bottom\) must have shape \(N,\) or "
                                         r"\(N, 1, \.\.\.\), got \[2, 2\]"):
        run_filter([np.zeros((2, 3))], np.ones((2, 2)))
    with pytest.raises(LayerError, match=r"bottom 0 of shape \[3, 3\] does not have the selector's 2 items"):
        run_filter([np.zeros((3, 3))], [1.0, 0.0])
    layer, bottom, top = run_filter([np.zeros((2, 3))], [1.0, 0.0])
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match=r"cannot backpropagate to the selector"):
        backward_layer(layer, bottom, top, [np.ones((1, 3))], [True, True])


# -- BatchReindex ----------------------------------------------------------------------------------

def test_batch_reindex_hand_values():
    data = np.array([[10.0, 1], [20, 2], [30, 3]])
    layer, bottom, top = run_layer('type: "BatchReindex"', data, [2.0, 0, 2])
    np.testing.assert_array_equal(top[0].data, [[30, 3], [10, 1], [30, 3]])
    dx = backward_layer(layer, bottom, top, [[[1, 1], [2, 2], [4, 4]]], [True, False])[0]
    np.testing.assert_array_equal(dx, [[2, 2], [0, 0], [5, 5]])  # row 1 picked by none: 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_reindex_matches_numpy(dtype):
    data, index = normal(5, 3, 4).astype(dtype), np.array([4, 0, 4, 4, 2, 0, 1])
    dy = normal(7, 3, 4, seed=1).astype(dtype)
    layer, bottom, top = run_layer('type: "BatchReindex"', data, index, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, data[index])
    dx = backward_layer(layer, bottom, top, [dy], [True, False])[0]
    expected = np.zeros_like(data)
    for m, n in enumerate(index):  # Caffe's CPU order: m ascending
        expected[n] += dy[m]
    np.testing.assert_array_equal(dx, expected)


def test_batch_reindex_gradient():
    check_bottom('type: "BatchReindex"', [normal(4, 3), [3.0, 3, 0, 1, 3]], 0)


def test_batch_reindex_empty_index():
    layer, bottom, top = run_layer('type: "BatchReindex"', normal(3, 2), np.zeros(0))
    assert top[0].shape == (0, 2)
    dx = backward_layer(layer, bottom, top, [np.zeros((0, 2))], [True, False])[0]
    np.testing.assert_array_equal(dx, 0)


@pytest.mark.parametrize("index, message", [
    ([0.0, 3.0], r"index 3 at position 1 is not an integer in 0\.\.2"),
    ([-1.0], r"index -1 at position 0 is not an integer in 0\.\.2"),
    ([0.5], r"index 0.5 at position 0 is not an integer in 0\.\.2"),
    ([[0.0]], r"the index bottom must have one axis, got shape \[1, 1\]")])
def test_batch_reindex_bad_indices(index, message):
    with pytest.raises(LayerError, match=r"'batchreindex' \(BatchReindex\): " + message):
        run_layer('type: "BatchReindex"', normal(3, 2), index)


def test_batch_reindex_refuses_to_backpropagate_to_the_indices():
    layer, bottom, top = run_layer('type: "BatchReindex"', normal(3, 2), [1.0])
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="cannot backpropagate to the indices"):
        backward_layer(layer, bottom, top, [np.ones((1, 2))], [True, True])


# -- all eight -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, arrays, in_place", [
    ('type: "MVN"', [normal(2, 3, 4)], False), ('type: "MVN"', [normal(2, 3, 4)], True),
    ('type: "MVN" mvn_param { normalize_variance: false }', [normal(2, 3, 4)], True),
    (EMBED, [WORDS], False), ('type: "BatchReindex"', [normal(3, 2), [2.0, 2.0]], False),
    ('type: "Filter"', [normal(3, 2), [1.0, 0.0, 1.0]], False), ('type: "Tile" tile_param { tiles: 2 }',
                                                              [normal(2, 3)], False)])
def test_planned_kept_bytes_are_what_a_forward_keeps(text, arrays, in_place):
    layer, bottom, top = run_layer(text, *arrays, in_place=in_place)
    assert layer.planned_kept_bytes(bottom, top) == layer.kept_bytes()


@pytest.mark.parametrize("text, arrays", [
    ('type: "ArgMax"', [normal(2, 3)]), ('type: "Tile" tile_param { tiles: 2 }', [normal(2, 3)]),
    (EMBED, [WORDS]), ('type: "BatchReindex"', [normal(3, 2), [0.0]]),
    ('type: "Filter"', [normal(2, 3), [1.0, 0.0]])])
def test_layers_with_a_new_top_shape_refuse_in_place(text, arrays):
    with pytest.raises(LayerError, match="cannot run in place"):
        run_layer(text, *arrays, in_place=True)
