"""SoftmaxWithLoss, EuclideanLoss and Accuracy: forward against numpy references and hand-computed
values, fp64 gradient checks, normalization modes, ignore_label, label shapes, and errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import GradientChecker, blobs_from_arrays, check_layer, layer_from_prototxt

DTYPES = [np.float32, np.float64]
LN2, LN3 = np.log(2.0), np.log(3.0)


# -- references (plain loops, independent of the kernels) ------------------------------------------

def softmax_loss_reference(scores, labels, axis=1, ignore=None, mode="VALID"):
    """Loss value and gradient (for top diff 1) of Caffe's SoftmaxWithLoss."""
    x = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    labels = np.asarray(labels).reshape(x.shape[:-1])
    loss, valid = 0.0, 0
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape[:-1]):
        label = int(labels[index])
        if label == ignore:
            continue
        p = np.exp(x[index] - x[index].max())
        p /= p.sum()
        loss -= np.log(max(p[label], np.finfo(np.float32).tiny))
        grad[index] = p
        grad[index][label] -= 1
        valid += 1
    total, outer = int(np.prod(x.shape[:-1])), int(np.prod(np.asarray(scores).shape[:axis]))
    normalizer = {"VALID": valid if ignore is not None else total, "FULL": total, "BATCH_SIZE": outer,
                  "NONE": 1}[mode]
    normalizer = max(normalizer, 1)
    return loss / normalizer, np.moveaxis(grad / normalizer, -1, axis)


def accuracy_reference(scores, labels, top_k=1, axis=1, ignore=None):
    x = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    labels = np.asarray(labels).reshape(x.shape[:-1])
    classes = x.shape[-1]
    hits, counts = np.zeros(classes), np.zeros(classes)
    for index in np.ndindex(x.shape[:-1]):
        label = int(labels[index])
        if label == ignore:
            continue
        counts[label] += 1
        # Caffe's rule: correct when fewer than top_k scores are strictly greater.
        if sum(1 for s in x[index] if s > x[index][label]) < top_k:
            hits[label] += 1
    total = hits.sum() / counts.sum() if counts.sum() else 0.0
    per_class = np.divide(hits, counts, out=np.zeros(classes), where=counts > 0)
    return total, per_class


def loss_layer(text: str, dtype=np.float64):
    return layer_from_prototxt(text, dtype=dtype)


# -- SoftmaxWithLoss ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_loss_hand_values(dtype):
    # p = [1/4, 3/4] and [1/2, 1/2]; labels 1, 0: loss = -(ln 3/4 + ln 1/2) / 2.
    scores, labels = [[0.0, LN3], [0.0, 0.0]], [1, 0]
    layer, bottom, top = run_layer('type: "SoftmaxWithLoss"', scores, labels, dtype=dtype)
    assert top[0].shape == ()
    np.testing.assert_allclose(top[0].data, -(np.log(0.75) + np.log(0.5)) / 2, rtol=1e-6)
    dx, dlabel = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, [[0.125, -0.125], [-0.25, 0.25]], rtol=1e-6)
    # The loss weight arrives as the top diff and scales the gradient.
    dx, _ = backward_layer(layer, bottom, top, [3.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, [[0.375, -0.375], [-0.75, 0.75]], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, label_shape", [((4, 5), (4,)), ((2, 3, 2, 3), (2, 1, 2, 3)),
                                                ((2, 3, 2, 3), (2, 2, 3)), ((3, 4, 5), (3, 5))])
def test_softmax_loss_matches_reference(dtype, shape, label_shape):
    rng = np.random.default_rng(0)
    scores = rng.normal(scale=2, size=shape)
    labels = rng.integers(0, shape[1], size=label_shape).astype(float)
    layer, bottom, top = run_layer('type: "SoftmaxWithLoss"', scores, labels, dtype=dtype)
    loss, grad = softmax_loss_reference(scores.astype(dtype), labels)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(top[0].data, loss, rtol=tol)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, grad, rtol=tol, atol=tol)


def test_softmax_loss_label_shapes_agree():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 4, 3, 2))
    labels = rng.integers(0, 4, size=(2, 3, 2)).astype(float)
    _, _, top_a = run_layer('type: "SoftmaxWithLoss"', scores, labels)
    _, _, top_b = run_layer('type: "SoftmaxWithLoss"', scores, labels.reshape(2, 1, 3, 2))
    assert float(top_a[0].data) == float(top_b[0].data)


def test_softmax_loss_on_another_axis():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(2, 3, 4))  # classes last
    labels = rng.integers(0, 4, size=(2, 3)).astype(float)
    layer, bottom, top = run_layer('type: "SoftmaxWithLoss" softmax_param { axis: -1 }', scores, labels)
    loss, grad = softmax_loss_reference(scores, labels, axis=2)
    np.testing.assert_allclose(top[0].data, loss, rtol=1e-12)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, grad, rtol=1e-12, atol=1e-15)


# Scores all 0 over 2 classes: every p = 1/2, every counted target loses ln 2. Of the 4 targets
# (outer 2 x inner 2) one is ignored, so the summed loss is 3 ln 2.
NORMALIZED = [
    ("normalization: VALID", 3 * LN2 / 3, 3),
    ("normalization: BATCH_SIZE", 3 * LN2 / 2, 2),
    ("normalization: FULL", 3 * LN2 / 4, 4),
    ("normalization: NONE", 3 * LN2, 1),
    ("normalize: true", 3 * LN2 / 3, 3),
    ("normalize: false", 3 * LN2 / 2, 2),
    ("normalize: false normalization: FULL", 3 * LN2 / 4, 4),  # normalization wins over normalize
    ("", 3 * LN2 / 3, 3),  # the default is VALID
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("setting, expected, normalizer", NORMALIZED)
def test_softmax_loss_normalization_with_ignore_label(dtype, setting, expected, normalizer):
    scores = np.zeros((2, 2, 1, 2))
    labels = np.array([[[[0, 1]]], [[[255, 1]]]], float)
    text = f'type: "SoftmaxWithLoss" loss_param {{ ignore_label: 255 {setting} }}'
    layer, bottom, top = run_layer(text, scores, labels, dtype=dtype)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-6)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    # (p - onehot) / normalizer, and nothing for the ignored target (item 1, position 0).
    want = np.array([[[[-0.5, 0.5]], [[0.5, -0.5]]], [[[0.0, 0.5]], [[0.0, -0.5]]]]) / normalizer
    np.testing.assert_allclose(dx, want, rtol=1e-6)


def test_softmax_loss_without_ignore_label_valid_counts_everything():
    scores, labels = np.zeros((2, 2, 2)), np.array([[0, 1], [1, 1]], float)
    _, _, top = run_layer('type: "SoftmaxWithLoss"', scores, labels)
    np.testing.assert_allclose(top[0].data, LN2, rtol=1e-12)  # 4 ln 2 / 4


def test_softmax_loss_all_ignored_gives_zero():
    text = 'type: "SoftmaxWithLoss" loss_param { ignore_label: -1 }'
    layer, bottom, top = run_layer(text, np.ones((3, 4)), [-1, -1, -1])
    assert float(top[0].data) == 0.0
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    assert np.all(dx == 0)


def test_softmax_loss_clamps_tiny_probabilities():
    # p[label] underflows to 0: Caffe clamps it to FLT_MIN, so the loss is -ln(FLT_MIN), not inf.
    _, _, top = run_layer('type: "SoftmaxWithLoss"', [[0.0, 1e5]], [0])
    np.testing.assert_allclose(top[0].data, -np.log(np.finfo(np.float32).tiny), rtol=1e-6)


def test_softmax_loss_probability_top_and_loss_weights():
    scores = np.random.default_rng(3).normal(size=(3, 4))
    layer, _, top = run_layer('type: "SoftmaxWithLoss"', scores, [0, 1, 3], num_top=2)
    e = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(top[1].data, e / e.sum(1, keepdims=True), rtol=1e-12)
    assert layer.loss_weights == [1.0, 0.0]
    layer, _, _ = run_layer('type: "SoftmaxWithLoss" loss_weight: 0.5', scores, [0, 1, 3])
    assert layer.loss_weights == [0.5]


@pytest.mark.parametrize("loss_param", ["", "loss_param { ignore_label: 1 }",
                                        "loss_param { ignore_label: 1 normalization: BATCH_SIZE }",
                                        "loss_param { normalization: FULL }",
                                        "loss_param { normalization: NONE }"])
def test_softmax_loss_gradient(loss_param):
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(2, 3, 2, 2))
    labels = rng.integers(0, 3, size=(2, 1, 2, 2)).astype(float)
    labels[0, 0, 0, 0] = 1  # makes sure at least one target is ignored when ignore_label is 1
    layer = loss_layer(f'type: "SoftmaxWithLoss" {loss_param}')
    bottom = blobs_from_arrays(scores, labels)
    checker = GradientChecker(stepsize=1e-3, threshold=1e-5)
    checker.check_gradient_exhaustive(layer, bottom, [Blob((), np.float64)], check_bottom=0)


def test_softmax_loss_refuses_label_gradient():
    layer, bottom, top = run_layer('type: "SoftmaxWithLoss"', np.zeros((2, 3)), [0, 2])
    with pytest.raises(LayerError, match="cannot backpropagate to label"):
        backward_layer(layer, bottom, top, [1.0], propagate_down=[True, True])
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


@pytest.mark.parametrize("labels, bad", [([0, 3], "3"), ([-1, 0], "-1")])
def test_softmax_loss_label_out_of_range(labels, bad):
    with pytest.raises(LayerError, match=rf"label {bad} is outside 0\.\.2"):
        run_layer('type: "SoftmaxWithLoss"', np.zeros((2, 3)), labels)


def test_softmax_loss_label_count_mismatch():
    with pytest.raises(LayerError, match=r"labels \[2, 3\] have 6 values.*\[2, 3, 4\].*need 8"):
        run_layer('type: "SoftmaxWithLoss"', np.zeros((2, 3, 4)), np.zeros((2, 3)))
    with pytest.raises(LayerError, match="same first dimension"):
        run_layer('type: "SoftmaxWithLoss"', np.zeros((2, 3)), np.zeros((1, 2)))


# -- EuclideanLoss --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_euclidean_hand_values(dtype):
    a, b = [[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0]]
    layer, bottom, top = run_layer('type: "EuclideanLoss"', a, b, dtype=dtype)
    assert top[0].shape == () and layer.loss_weights == [1.0]
    np.testing.assert_allclose(top[0].data, 18.0 / 4, rtol=1e-7)  # (1 + 4 + 4 + 9) / (2 * 2)
    da, db = backward_layer(layer, bottom, top, [2.0])
    np.testing.assert_allclose(da, [[1.0, 2.0], [2.0, 3.0]], rtol=1e-7)  # 2 * (a - b) / 2
    np.testing.assert_allclose(db, -da, rtol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_euclidean_matches_reference(dtype):
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(3, 2, 2)), rng.normal(size=(3, 4))  # same count per item is enough
    layer, bottom, top = run_layer('type: "EuclideanLoss"', a, b, dtype=dtype)
    a32, b32 = a.astype(dtype).astype(np.float64), b.astype(dtype).astype(np.float64)
    d = a32.reshape(3, 4) - b32
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(top[0].data, (d**2).sum() / 3 / 2, rtol=tol)
    da, db = backward_layer(layer, bottom, top, [1.0], propagate_down=[False, True])
    np.testing.assert_allclose(db, -d / 3, rtol=tol)
    assert np.all(da == 0)  # not asked for: left alone (cleared by the helper)


def test_euclidean_gradient_both_bottoms():
    rng = np.random.default_rng(6)
    layer = loss_layer('type: "EuclideanLoss"')
    check_layer(layer, [rng.normal(size=(3, 2, 2)), rng.normal(size=(3, 2, 2))], exhaustive=True,
                stepsize=1e-3, threshold=1e-6)
    assert layer.allow_force_backward(1)


def test_euclidean_shape_errors():
    with pytest.raises(LayerError, match=r"\[2, 3\] and \[2, 4\].*same number of values"):
        run_layer('type: "EuclideanLoss"', np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(LayerError, match=r"\[2, 3\] and \[3, 2\].*same first dimension"):
        run_layer('type: "EuclideanLoss"', np.zeros((2, 3)), np.zeros((3, 2)))


# -- Accuracy -------------------------------------------------------------------------------------

SCORES = [[0.1, 0.5, 0.4], [0.3, 0.3, 0.2], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]]
LABELS = [2, 0, 0, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("param, total, per_class", [
    # item 0: 0.5 beats the true 0.4; item 1 ties (counts as correct); item 2 right; item 3 two better.
    ("", 2 / 4, [2 / 3, 0, 0]),
    ("top_k: 2", 3 / 4, [2 / 3, 0, 1]),
    ("top_k: 3", 1.0, [1, 0, 1]),
    ("ignore_label: 2", 2 / 3, [2 / 3, 0, 0]),
    ("ignore_label: 0 top_k: 2", 1.0, [0, 0, 1]),
])
def test_accuracy_hand_values(dtype, param, total, per_class):
    layer, _, top = run_layer(f'type: "Accuracy" accuracy_param {{ {param} }}', SCORES, LABELS,
                              num_top=2, dtype=dtype)
    assert top[0].shape == () and top[1].shape == (3,)
    np.testing.assert_allclose(top[0].data, total, rtol=1e-6)
    np.testing.assert_allclose(top[1].data, per_class, rtol=1e-6)
    assert top[0].data.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_accuracy_spatial_matches_reference(dtype, top_k):
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 3, size=(3, 4, 2, 3)).astype(float)  # small integers: many ties
    labels = rng.integers(0, 4, size=(3, 1, 2, 3)).astype(float)
    labels[0, 0, 0, :] = 9
    text = f'type: "Accuracy" accuracy_param {{ top_k: {top_k} ignore_label: 9 }}'
    _, _, top = run_layer(text, scores, labels, num_top=2, dtype=dtype)
    total, per_class = accuracy_reference(scores, labels, top_k, ignore=9)
    np.testing.assert_allclose(top[0].data, total, rtol=1e-6)
    np.testing.assert_allclose(top[1].data, per_class, rtol=1e-6)


def test_accuracy_on_last_axis():
    rng = np.random.default_rng(8)
    scores, labels = rng.normal(size=(2, 5, 3)), rng.integers(0, 3, size=(2, 5)).astype(float)
    _, _, top = run_layer('type: "Accuracy" accuracy_param { axis: -1 }', scores, labels)
    np.testing.assert_allclose(top[0].data, accuracy_reference(scores, labels, axis=2)[0], rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 3])
def test_accuracy_nan_scores_are_never_correct(dtype, top_k):
    # A diverged net: NaN compares false with everything, so "fewer than top_k scores beat the label"
    # would hold for a NaN row (Caffe counts it as correct); here it never does.
    nan = float("nan")
    scores = [[nan, nan, nan], [0.1, nan, 0.2], [nan, 0.9, 0.1], [0.2, 0.7, 0.1]]
    labels = [0, 2, 1, 1]  # all NaN; NaN elsewhere; NaN elsewhere; finite and right
    _, _, top = run_layer(f'type: "Accuracy" accuracy_param {{ top_k: {top_k} }}', scores, labels,
                          num_top=2, dtype=dtype)
    assert float(top[0].data) == 1 / 4
    np.testing.assert_array_equal(top[1].data, [0, 1 / 2, 0])


def test_accuracy_everything_ignored_is_zero():
    _, _, top = run_layer('type: "Accuracy" accuracy_param { ignore_label: 1 }', SCORES, [1, 1, 1, 1],
                          num_top=2)
    assert float(top[0].data) == 0.0 and np.all(top[1].data == 0)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 5), c=st.integers(1, 5), seed=st.integers(0, 1000), data=st.data())
def test_accuracy_property(n, c, seed, data):
    top_k = data.draw(st.integers(1, c))
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=(n, c)).astype(float)
    labels = rng.integers(0, c, size=n).astype(float)
    _, _, top = run_layer(f'type: "Accuracy" accuracy_param {{ top_k: {top_k} }}', scores, labels,
                          num_top=2)
    total, per_class = accuracy_reference(scores, labels, top_k)
    np.testing.assert_allclose(top[0].data, total, rtol=1e-12)
    np.testing.assert_allclose(top[1].data, per_class, rtol=1e-12)


def test_accuracy_errors():
    with pytest.raises(LayerError, match="top_k 4 must be between 1 and the number of classes 3"):
        run_layer('type: "Accuracy" accuracy_param { top_k: 4 }', SCORES, LABELS)
    with pytest.raises(LayerError, match=r"labels \[3\] have 3 values.*need 4"):
        run_layer('type: "Accuracy"', SCORES, LABELS[:3])
    with pytest.raises(LayerError, match=r"label 3 is outside 0\.\.2"):
        run_layer('type: "Accuracy"', SCORES, [0, 1, 3, 0])


def test_accuracy_has_no_backward():
    layer, bottom, top = run_layer('type: "Accuracy"', SCORES, LABELS)
    assert not layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="no gradient"):
        layer.run_backward(top, [True, False], bottom)
    layer.run_backward(top, [False, False], bottom)  # nothing asked: fine
