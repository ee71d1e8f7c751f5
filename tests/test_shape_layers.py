"""Silence, Flatten, Reshape, Concat, Slice; and a small Net built of this area's layers whose
net.forward / net.backward gradients are checked by finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer
from hypothesis import given, settings
from hypothesis import strategies as st

import minicaffe
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import check_layer, layer_from_prototxt

DTYPES = [np.float32, np.float64]


def arange(*shape) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)


def run_multi(text: str, arrays, num_top: int, dtype=np.float64):
    """Like run_layer, but for any number of tops (and no bottoms copied in place)."""
    layer = layer_from_prototxt(text, dtype=dtype)
    bottom = []
    for array in arrays:
        blob = Blob(np.shape(array), dtype)
        blob.data[...] = array
        bottom.append(blob)
    top = [Blob((), dtype) for _ in range(num_top)]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return layer, bottom, top


# -- Silence --------------------------------------------------------------------------------------

def test_silence_zeroes_only_the_diffs_asked_for():
    layer, bottom, top = run_multi('type: "Silence"', [np.ones((2, 3)), np.ones(4)], num_top=0)
    assert top == []
    for blob in bottom:
        blob.diff[...] = 5.0
    layer.backward(top, [True, False], bottom)
    assert np.all(bottom[0].diff == 0) and np.all(bottom[1].diff == 5.0)
    np.testing.assert_array_equal(bottom[0].data, np.ones((2, 3)))  # data untouched


def test_silence_blob_counts():
    with pytest.raises(LayerError, match="takes 0 top"):
        run_layer('type: "Silence"', np.ones(2))
    with pytest.raises(LayerError, match="at least 1 bottom"):
        run_multi('type: "Silence"', [], num_top=0)


# -- Flatten --------------------------------------------------------------------------------------

@pytest.mark.parametrize("param, shape", [
    ("", (2, 60)), ("axis: 2", (2, 3, 20)), ("end_axis: -2", (2, 12, 5)), ("axis: 0", (120,)),
    ("axis: -1", (2, 3, 4, 5)), ("axis: 1 end_axis: 2", (2, 12, 5)),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_flatten_shapes_and_values(param, shape, dtype):
    x = arange(2, 3, 4, 5)
    _, _, top = run_layer(f'type: "Flatten" flatten_param {{ {param} }}', x, dtype=dtype)
    assert top[0].shape == shape
    np.testing.assert_array_equal(top[0].data, x.reshape(shape))
    assert top[0].data[-1].ravel()[-1] == 119.0


def test_flatten_shares_data_and_diff():
    layer, bottom, top = run_layer('type: "Flatten"', arange(2, 3, 2))
    bottom[0].data[1, 2, 1] = -7.0
    assert top[0].data[1, 5] == -7.0
    top[0].diff[...] = arange(2, 6)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, arange(2, 3, 2))


def test_flatten_gradient():
    check_layer(layer_from_prototxt('type: "Flatten"'), [np.random.default_rng(0).normal(size=(2, 3, 2))],
                exhaustive=True, stepsize=1e-3, threshold=1e-8)


def test_flatten_errors():
    with pytest.raises(LayerError, match=r"end_axis 1 comes before axis 2.*\[2, 3, 4\]"):
        run_layer('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', np.ones((2, 3, 4)))
    with pytest.raises(LayerError, match="axis 3 out of range"):
        run_layer('type: "Flatten" flatten_param { axis: 3 }', np.ones((2, 3, 4)))
    with pytest.raises(LayerError, match="in place"):
        run_layer('type: "Flatten"', np.ones((2, 3)), in_place=True)


# -- Reshape --------------------------------------------------------------------------------------

RESHAPES = [  # bottom (2, 3, 6, 5): 180 values
    ("shape { dim: 6 dim: 2 dim: 3 dim: 5 }", (6, 2, 3, 5)),
    ("shape { dim: 0 dim: -1 }", (2, 90)),
    ("shape { dim: -1 }", (180,)),
    ("shape { dim: 0 dim: 0 dim: -1 }", (2, 3, 30)),
    ("shape { dim: -1 dim: 0 dim: 0 dim: 0 }", (2, 3, 6, 5)),
    ("shape { dim: 18 } axis: 1 num_axes: 2", (2, 18, 5)),
    ("shape { dim: 3 dim: 2 dim: -1 } axis: 2", (2, 3, 3, 2, 5)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (1, 2, 3, 6, 5)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 6, 5, 1)),
]


@pytest.mark.parametrize("param, shape", RESHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_shapes_and_values(param, shape, dtype):
    x = arange(2, 3, 6, 5)
    _, _, top = run_layer(f'type: "Reshape" reshape_param {{ {param} }}', x, dtype=dtype)
    assert top[0].shape == shape
    np.testing.assert_array_equal(top[0].data, x.reshape(shape))


def test_reshape_zero_copies_the_dim_at_its_own_place():
    # axis -3 of a 4-d blob starts at axis 2 and replaces (6, 5). A 0 at shape index i copies the
    # bottom dim at axis + i: index 0 copies the 6; index 2 would need bottom axis 4, which is absent.
    _, _, top = run_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: 1 dim: -1 } axis: -3 }',
                          arange(2, 3, 6, 5))
    assert top[0].shape == (2, 3, 6, 1, 5)
    with pytest.raises(LayerError, match=r"dim 2 is 0 \(copy\).*no axis 4"):
        run_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: 1 dim: 0 } axis: -3 }',
                  arange(2, 3, 6, 5))


def test_reshape_shares_data_and_diff_and_follows_bottom_reshapes():
    layer, bottom, top = run_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }',
                                   arange(2, 3, 2))
    bottom[0].data[0, 0, 1] = 42.0
    assert top[0].data[0, 1] == 42.0
    top[0].diff[...] = 3.0
    assert np.all(bottom[0].diff == 3.0)
    bottom[0].reshape(4, 3, 1)
    layer.reshape(bottom, top)
    assert top[0].shape == (4, 3)
    bottom[0].data[...] = arange(4, 3, 1)
    np.testing.assert_array_equal(top[0].data, arange(4, 3))


def test_reshape_gradient():
    layer = layer_from_prototxt('type: "Reshape" reshape_param { shape { dim: -1 dim: 2 } }')
    check_layer(layer, [np.random.default_rng(1).normal(size=(2, 3, 2))], exhaustive=True,
                stepsize=1e-3, threshold=1e-8)


@pytest.mark.parametrize("param, message", [
    ("shape { dim: 7 dim: -1 }", r"cannot infer the -1 in shape \[7, -1\]: bottom \[2, 3, 6, 5\] has 180"),
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: 2 dim: 3 }", r"bottom \[2, 3, 6, 5\] has 180 values, the new shape \[2, 3\] has 6"),
    ("shape { dim: 4 dim: -2 }", "below -1"),
    ("shape { dim: 2 } axis: 5", r"axis 5 out of range for bottom \[2, 3, 6, 5\]"),
    ("shape { dim: 2 } axis: 3 num_axes: 2", "go past the 4 axes"),
])
def test_reshape_errors(param, message):
    with pytest.raises(LayerError, match=message):
        run_layer(f'type: "Reshape" reshape_param {{ {param} }}', arange(2, 3, 6, 5))


def test_reshape_in_place_is_an_error():
    with pytest.raises(LayerError, match="in place"):
        run_layer('type: "Reshape" reshape_param { shape { dim: -1 } }', np.ones((2, 3)), in_place=True)


# -- Concat ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_hand_values(dtype):
    a, b = [[1.0, 2.0], [3.0, 4.0]], [[5.0], [6.0]]
    _, _, top = run_multi('type: "Concat"', [a, b], num_top=1, dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [[1, 2, 5], [3, 4, 6]])
    _, _, top = run_multi('type: "Concat" concat_param { axis: 0 }', [a, [[7.0, 8.0]]], num_top=1,
                          dtype=dtype)
    np.testing.assert_array_equal(top[0].data, [[1, 2], [3, 4], [7, 8]])


@pytest.mark.parametrize("param, axis", [("", 1), ("axis: 0", 0), ("axis: 2", 2), ("axis: -1", 3),
                                         ("concat_dim: 2", 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_matches_numpy(param, axis, dtype):
    rng = np.random.default_rng(2)
    shapes = [[2, 3, 4, 2] for _ in range(3)]
    for i, size in enumerate((1, 3, 2)):
        shapes[i][axis] = size
    arrays = [rng.normal(size=s).astype(dtype) for s in shapes]
    layer, bottom, top = run_multi(f'type: "Concat" concat_param {{ {param} }}', arrays, num_top=1,
                                   dtype=dtype)
    np.testing.assert_array_equal(top[0].data, np.concatenate(arrays, axis=axis))
    dy = rng.normal(size=top[0].shape)
    diffs = backward_layer(layer, bottom, top, [dy], propagate_down=[True, False, True])
    parts = np.split(dy.astype(dtype), [1, 4], axis=axis)
    np.testing.assert_array_equal(diffs[0], parts[0])
    assert np.all(diffs[1] == 0)  # not asked for
    np.testing.assert_array_equal(diffs[2], parts[2])


def test_concat_gradient():
    rng = np.random.default_rng(3)
    layer = layer_from_prototxt('type: "Concat" concat_param { axis: 1 }')
    check_layer(layer, [rng.normal(size=(2, 1, 3)), rng.normal(size=(2, 2, 3))], exhaustive=True,
                stepsize=1e-3, threshold=1e-8)


def test_concat_errors():
    with pytest.raises(LayerError, match=r"bottom 1 has shape \[2, 3, 5\], bottom 0 \[2, 3, 4\].*axis 1"):
        run_multi('type: "Concat"', [np.ones((2, 3, 4)), np.ones((2, 3, 5))], num_top=1)
    with pytest.raises(LayerError, match=r"bottom 1 has shape \[2, 3\]"):
        run_multi('type: "Concat"', [np.ones((2, 3, 4)), np.ones((2, 3))], num_top=1)
    with pytest.raises(LayerError, match="either axis or concat_dim"):
        run_multi('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [np.ones((2, 3))], num_top=1)
    with pytest.raises(LayerError, match="concat_dim 2 out of range"):
        run_multi('type: "Concat" concat_param { concat_dim: 2 }', [np.ones((2, 3))], num_top=1)
    with pytest.raises(LayerError, match="axis -3 out of range"):
        run_multi('type: "Concat" concat_param { axis: -3 }', [np.ones((2, 3))], num_top=1)


# -- Slice ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_slice_hand_values(dtype):
    x = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    _, _, top = run_multi('type: "Slice" slice_param { slice_point: 1 slice_point: 3 }', [x], num_top=3,
                          dtype=dtype)
    assert [t.data.tolist() for t in top] == [[[1], [5]], [[2, 3], [6, 7]], [[4], [8]]]
    _, _, top = run_multi('type: "Slice" slice_param { axis: 0 }', [x], num_top=2, dtype=dtype)
    assert [t.data.tolist() for t in top] == [[[1, 2, 3, 4]], [[5, 6, 7, 8]]]


@pytest.mark.parametrize("param, axis, points", [
    ("slice_point: 1 slice_point: 4", 1, [1, 4]), ("", 1, [2, 4]), ("axis: 2 slice_point: 2", 2, [2]),
    ("axis: -1", 3, [1]), ("slice_dim: 0", 0, [2, 4]),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_slice_matches_numpy(param, axis, points, dtype):
    rng = np.random.default_rng(4)
    shape = [6, 6, 3, 2]
    x = rng.normal(size=shape).astype(dtype)
    num_top = len(points) + 1
    layer, bottom, top = run_multi(f'type: "Slice" slice_param {{ {param} }}', [x], num_top=num_top,
                                   dtype=dtype)
    expected = np.split(x, points, axis=axis)
    for blob, want in zip(top, expected):
        np.testing.assert_array_equal(blob.data, want)
    dys = [rng.normal(size=t.shape) for t in top]
    (dx,) = backward_layer(layer, bottom, top, dys)
    np.testing.assert_array_equal(dx, np.concatenate(dys, axis=axis).astype(dtype))


def test_slice_gradient():
    layer = layer_from_prototxt('type: "Slice" slice_param { slice_point: 1 }')
    check_layer(layer, [np.random.default_rng(5).normal(size=(2, 3, 2))], num_top=2, exhaustive=True,
                stepsize=1e-3, threshold=1e-8)


@pytest.mark.parametrize("param, num_top, message", [
    ("slice_point: 1", 3, "1 slice_point values for 3 tops"),
    ("slice_point: 3 slice_point: 2", 3, r"slice_point \[3, 2\] must increase strictly inside \(0, 4\)"),
    ("slice_point: 4", 2, r"slice_point \[4\] must increase"),
    ("", 3, r"3 tops do not evenly divide axis 1 of size 4 \(bottom \[2, 4\]\)"),
    ("slice_dim: 2", 2, "slice_dim 2 out of range"),
])
def test_slice_errors(param, num_top, message):
    with pytest.raises(LayerError, match=message):
        run_multi(f'type: "Slice" slice_param {{ {param} }}', [np.ones((2, 4))], num_top=num_top)


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_property_slice_then_concat_round_trips(shape, data):
    axis = data.draw(st.integers(0, len(shape) - 1))
    size = shape[axis] + data.draw(st.integers(1, 3))
    shape[axis] = size
    points = sorted(data.draw(st.sets(st.integers(1, size - 1), max_size=size - 1)))
    x = np.random.default_rng(size).normal(size=shape)
    text = f'type: "Slice" slice_param {{ axis: {axis} {" ".join(f"slice_point: {p}" for p in points)} }}'
    _, _, parts = run_multi(text, [x], num_top=len(points) + 1)
    _, _, joined = run_multi(f'type: "Concat" concat_param {{ axis: {axis} }}', [p.data for p in parts],
                             num_top=1)
    np.testing.assert_array_equal(joined[0].data, x)
    for part, want in zip(parts, np.split(x, points, axis=axis)):
        np.testing.assert_array_equal(part.data, want)


# -- a small Net of these layers, checked end to end ----------------------------------------------

NET = """
name: "shapes"
force_backward: true
layer { name: "in" type: "Input" top: "a" top: "b" top: "label" top: "target"
  input_param { shape { dim: 2 dim: 3 dim: 2 } shape { dim: 2 dim: 2 dim: 2 }
                shape { dim: 2 dim: 2 } shape { dim: 2 dim: 2 dim: 2 } } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "ab" }
layer { name: "cut" type: "Slice" bottom: "ab" top: "s1" top: "s2" slice_param { slice_point: 2 } }
layer { name: "sm" type: "Softmax" bottom: "s2" top: "p" }
layer { name: "sig" type: "Sigmoid" bottom: "s1" top: "s1" }
layer { name: "cat2" type: "Concat" bottom: "p" bottom: "s1" top: "q" concat_param { axis: 1 } }
layer { name: "r" type: "Reshape" bottom: "q" top: "q4"
        reshape_param { shape { dim: 0 dim: 0 dim: -1 dim: 1 } } }
layer { name: "th" type: "TanH" bottom: "q4" top: "t" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "t" bottom: "label" top: "loss" loss_weight: 0.7 }
layer { name: "acc" type: "Accuracy" bottom: "q4" bottom: "label" top: "acc" }
layer { name: "flat" type: "Flatten" bottom: "s1" top: "s1f" }
layer { name: "tf" type: "Flatten" bottom: "target" top: "tf" }
layer { name: "l2" type: "EuclideanLoss" bottom: "s1f" bottom: "tf" top: "l2" loss_weight: 0.3 }
layer { name: "quiet" type: "Silence" bottom: "b" }
"""


def test_net_gradients_by_finite_differences(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    net = minicaffe.Net(str(path), minicaffe.TEST, dtype=np.float64)
    rng = np.random.default_rng(6)
    for name in ("a", "b", "target"):
        net.blobs[name].data[...] = rng.normal(size=net.blobs[name].shape)
    net.blobs["label"].data[...] = [[0, 4], [3, 1]]

    def objective() -> float:
        out = net.forward()
        assert set(out) == {"loss", "acc", "l2"}  # Silence consumed "b"
        # loss_weight is a float in caffe.proto: the net weighs by float32(0.7), not 0.7.
        return float(np.float32(0.7)) * float(out["loss"]) + float(np.float32(0.3)) * float(out["l2"])

    loss = objective()
    assert net.forward_backward() == pytest.approx(loss, rel=1e-12)
    diffs = {k: np.array(v) for k, v in net.backward().items()}
    assert set(diffs) == {"a", "b", "label", "target"}
    assert np.all(diffs["label"] == 0)
    step = 1e-5
    for name in ("a", "b", "target"):
        blob = net.blobs[name]
        assert np.any(diffs[name] != 0), name
        for j in range(blob.count):
            x = blob.data.flat[j]
            blob.data.flat[j] = x + step
            plus = objective()
            blob.data.flat[j] = x - step
            minus = objective()
            blob.data.flat[j] = x
            estimate = (plus - minus) / (2 * step)
            assert diffs[name].flat[j] == pytest.approx(estimate, rel=1e-6, abs=1e-9), (name, j)
