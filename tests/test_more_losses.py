"""SigmoidCrossEntropyLoss, HingeLoss, InfogainLoss, MultinomialLogisticLoss and ContrastiveLoss: forward
against plain numpy references and hand-computed values (PyTorch as an optional oracle where it has the
op), fp64 gradient checks of every input that has a gradient, loss_weight scaling, normalization and
ignore_label, label gradients refused, and errors for bad shapes, parameters and infogain files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backward_layer, run_layer

from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.testing import GradientChecker, blobs_from_arrays, layer_from_prototxt

DTYPES = [np.float32, np.float64]
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD


def tolerance(dtype) -> float:
    return 1e-5 if dtype == np.float32 else 1e-12


def gradient_check(text: str, arrays, check_bottom=None, stepsize=1e-4, threshold=1e-6, kink_range=-1.0):
    """fp64 check of the bottoms (all, or only `check_bottom`) of the layer given as prototxt text."""
    layer = layer_from_prototxt(text)
    checker = GradientChecker(stepsize=stepsize, threshold=threshold, kink=0.0, kink_range=kink_range)
    checker.check_gradient_exhaustive(layer, blobs_from_arrays(*arrays), [Blob((), np.float64)],
                                      check_bottom=check_bottom)
    return layer


# -- references (plain loops over targets, independent of the kernels) -------------------------------------

def normalizer(mode: str, outer: int, inner: int, valid: int) -> float:
    return max({"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode], 1)


def sigmoid_cross_entropy_reference(x, t, ignore=None, mode="BATCH_SIZE"):
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64).reshape(np.shape(x))
    loss, valid, grad = 0.0, 0, np.zeros_like(x)
    for index in np.ndindex(x.shape):
        if ignore is not None and int(t[index]) == ignore:
            continue
        p = 1 / (1 + np.exp(-x[index]))
        loss -= t[index] * np.log(p) + (1 - t[index]) * np.log(1 - p)
        grad[index] = p - t[index]
        valid += 1
    n = normalizer(mode, x.shape[0], x.size // x.shape[0], valid)
    return loss / n, grad / n


def hinge_reference(x, labels, norm=1):
    x = np.asarray(x, np.float64).reshape(len(labels), -1)
    loss, grad = 0.0, np.zeros_like(x)
    for i, label in enumerate(labels):
        for c in range(x.shape[1]):
            sign = -1.0 if c == int(label) else 1.0
            margin = max(0.0, 1 + sign * x[i, c])
            loss += margin ** norm
            grad[i, c] = sign * (float(margin > 0) if norm == 1 else 2 * margin)
    return loss / len(labels), grad / len(labels)


def infogain_reference(scores, labels, infogain, axis=1, ignore=None, mode="VALID"):
    x = np.moveaxis(np.asarray(scores, np.float64), axis, -1)
    labels = np.asarray(labels).reshape(x.shape[:-1])
    infogain = np.asarray(infogain, np.float64).reshape(x.shape[-1], x.shape[-1])
    loss, valid, grad = 0.0, 0, np.zeros_like(x)
    for index in np.ndindex(x.shape[:-1]):
        label = int(labels[index])
        if label == ignore:
            continue
        p = np.exp(x[index] - x[index].max())
        p /= p.sum()
        for c in range(len(p)):
            loss -= infogain[label, c] * np.log(max(p[c], LOG_THRESHOLD))
        grad[index] = p * infogain[label].sum() - infogain[label]
        valid += 1
    outer = int(np.prod(np.shape(scores)[:axis]))
    n = normalizer(mode, outer, labels.size // outer, valid if ignore is not None else labels.size)
    return loss / n, np.moveaxis(grad / n, -1, axis)


def multinomial_reference(prob, labels):
    prob = np.asarray(prob, np.float64).reshape(len(labels), -1)
    loss, grad = 0.0, np.zeros_like(prob)
    for i, label in enumerate(labels):
        p = max(prob[i, int(label)], LOG_THRESHOLD)
        loss -= np.log(p)
        grad[i, int(label)] = -1 / p
    return loss / len(labels), grad / len(labels)


def contrastive_reference(a, b, similar, margin=1.0, legacy=False):
    a = np.asarray(a, np.float64).reshape(len(similar), -1)
    b = np.asarray(b, np.float64).reshape(len(similar), -1)
    n = len(similar)
    loss, grad = 0.0, np.zeros_like(a)
    for i in range(n):
        diff = a[i] - b[i]
        d2 = float(diff @ diff)
        d = np.sqrt(d2)
        if int(similar[i]):
            loss += d2
            grad[i] = diff / n
        elif legacy:
            loss += max(margin - d2, 0.0)
            grad[i] = -diff / n if margin - d2 > 0 else 0
        else:
            loss += max(margin - d, 0.0) ** 2
            grad[i] = -(margin - d) / (d + 1e-4) * diff / n if margin - d > 0 else 0  # Caffe's d + 1e-4
    return loss / n / 2, grad  # grad: for a; b's is its negative


# -- SigmoidCrossEntropyLoss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_cross_entropy_hand_values(dtype):
    # x = 0: p = 1/2, each target loses ln 2 whatever t is; x = ln 3: p = 3/4, t = 1 loses ln 4/3.
    x, t = [[0.0, np.log(3.0)], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.5]]
    layer, bottom, top = run_layer('type: "SigmoidCrossEntropyLoss"', x, t, dtype=dtype)
    assert top[0].shape == () and layer.loss_weights == [1.0]
    # Default normalization BATCH_SIZE (Caffe's, for this layer): the sum / 2 items.
    np.testing.assert_allclose(top[0].data, (3 * np.log(2) + np.log(4 / 3)) / 2, rtol=1e-6)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, [[-0.25, -0.125], [0.25, 0.0]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5, 7), (3, 70)])  # 35, 70: sums over rows of 32 lanes
def test_sigmoid_cross_entropy_matches_reference(dtype, shape):
    rng = np.random.default_rng(0)
    x, t = rng.normal(scale=3, size=shape), rng.uniform(size=shape)
    layer, bottom, top = run_layer('type: "SigmoidCrossEntropyLoss"', x, t, dtype=dtype)
    loss, grad = sigmoid_cross_entropy_reference(x.astype(dtype), t.astype(dtype))
    np.testing.assert_allclose(top[0].data, loss, rtol=tolerance(dtype))
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, grad, rtol=tolerance(dtype), atol=tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_cross_entropy_is_stable_for_large_inputs(dtype):
    # log(sigmoid(-100)) underflows in the naive form; Caffe's form gives 100 exactly.
    x, t = [[100.0, -100.0, 100.0, -100.0]], [[0.0, 1.0, 1.0, 0.0]]
    layer, bottom, top = run_layer('type: "SigmoidCrossEntropyLoss"', x, t, dtype=dtype)
    np.testing.assert_allclose(top[0].data, 200.0, rtol=1e-6)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, [[1.0, -1.0, 0.0, 0.0]], atol=1e-7)
    assert np.all(np.isfinite(dx))


def test_sigmoid_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x, t = rng.normal(scale=2, size=(4, 3, 2)), rng.uniform(size=(4, 3, 2))
    _, _, top = run_layer('type: "SigmoidCrossEntropyLoss"', x, t)
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(t),
                                                                 reduction="sum") / 4
    np.testing.assert_allclose(top[0].data, want.item(), rtol=1e-12)


# Targets 1 and 0 at x = 0: every counted target loses ln 2. Of the 2 x 3 targets, two are ignored (255).
SIGMOID_NORMALIZED = [
    ("", 2),  # Caffe's default here is BATCH_SIZE
    ("normalization: VALID", 4),
    ("normalization: FULL", 6),
    ("normalization: BATCH_SIZE", 2),
    ("normalization: NONE", 1),
    ("normalize: true", 4),
    ("normalize: false", 2),
    ("normalize: true normalization: FULL", 6),  # normalization wins over normalize
]


@pytest.mark.parametrize("setting, divisor", SIGMOID_NORMALIZED)
def test_sigmoid_cross_entropy_normalization_and_ignore_label(setting, divisor):
    x, t = np.zeros((2, 3)), np.array([[1, 0, 255], [255, 1, 1]], float)
    text = f'type: "SigmoidCrossEntropyLoss" loss_param {{ ignore_label: 255 {setting} }}'
    layer, bottom, top = run_layer(text, x, t)
    np.testing.assert_allclose(top[0].data, 4 * np.log(2) / divisor, rtol=1e-12)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, np.array([[-0.5, 0.5, 0], [0, -0.5, -0.5]]) / divisor, rtol=1e-12)
    mode = (setting.split()[-1] if "normalization" in setting
            else {"": "BATCH_SIZE", "normalize: true": "VALID", "normalize: false": "BATCH_SIZE"}[setting])
    loss, grad = sigmoid_cross_entropy_reference(x, t, ignore=255, mode=mode)
    np.testing.assert_allclose(top[0].data, loss, rtol=1e-12)
    np.testing.assert_allclose(dx, grad, rtol=1e-12)


def test_sigmoid_cross_entropy_ignore_truncates_the_target():
    # Caffe compares int(target) with ignore_label: a target of 0.7 is ignored by ignore_label 0.
    _, _, top = run_layer('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: 0 }',
                          [[0.0, 0.0]], [[0.7, 1.0]])
    np.testing.assert_allclose(top[0].data, np.log(2), rtol=1e-12)


def test_sigmoid_cross_entropy_all_ignored_gives_zero():
    text = 'type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 normalization: VALID }'
    layer, bottom, top = run_layer(text, np.ones((2, 2)), -np.ones((2, 2)))
    assert float(top[0].data) == 0.0
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    assert np.all(dx == 0)


@pytest.mark.parametrize("loss_param", ["", "loss_param { ignore_label: 1 normalization: VALID }",
                                        "loss_param { normalization: FULL }"])
def test_sigmoid_cross_entropy_gradient(loss_param):
    rng = np.random.default_rng(2)
    x = rng.normal(scale=2, size=(2, 3, 2))
    t = rng.integers(0, 2, size=(2, 3, 2)).astype(float)
    gradient_check(f'type: "SigmoidCrossEntropyLoss" {loss_param}', [x, t], check_bottom=0)
    gradient_check(f'type: "SigmoidCrossEntropyLoss" {loss_param}', [x, rng.uniform(size=x.shape)],
                   check_bottom=0)


# -- HingeLoss -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_hinge_hand_values(dtype):
    # Item 0, class 2: margins 1 + 0.5, max(0, 1 - 1) = 0, and for the true class max(0, 1 - 2) = 0.
    # Item 1, class 0: 1 - 0.25 = 0.75 (true), 1 + 0.5, max(0, 1 - 3) = 0.
    x, labels = [[0.5, -1.0, 2.0], [0.25, 0.5, -3.0]], [2, 0]
    layer, bottom, top = run_layer('type: "HingeLoss"', x, labels, dtype=dtype)
    assert layer.loss_weights == [1.0]
    np.testing.assert_allclose(top[0].data, (1.5 + 0.75 + 1.5) / 2, rtol=1e-6)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, [[0.5, 0.0, 0.0], [-0.5, 0.5, 0.0]], rtol=1e-6)
    layer, bottom, top = run_layer('type: "HingeLoss" hinge_loss_param { norm: L2 }', x, labels, dtype=dtype)
    np.testing.assert_allclose(top[0].data, (2.25 + 0.5625 + 2.25) / 2, rtol=1e-6)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, [[1.5, 0.0, 0.0], [-0.75, 1.5, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 4, 5)])  # 40 classes: sums over rows of 32 lanes
def test_hinge_matches_reference(dtype, norm, shape):
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape)
    labels = rng.integers(0, np.prod(shape[1:]), size=shape[0]).astype(float)
    text = f'type: "HingeLoss" hinge_loss_param {{ norm: {"L1" if norm == 1 else "L2"} }}'
    layer, bottom, top = run_layer(text, x, labels.reshape(-1, 1), dtype=dtype)
    loss, grad = hinge_reference(x.astype(dtype), labels, norm)
    np.testing.assert_allclose(top[0].data, loss, rtol=tolerance(dtype))
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, grad.reshape(shape), rtol=tolerance(dtype), atol=tolerance(dtype))


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_gradient(norm):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 5))
    x[np.abs(np.abs(x) - 1) < 0.05] += 0.2  # away from the kinks at |x| = 1
    gradient_check(f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}', [x, [0, 4, 2]], check_bottom=0)


# -- MultinomialLogisticLoss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_multinomial_logistic_hand_values(dtype):
    prob, labels = [[0.25, 0.75], [0.5, 0.5]], [1, 0]
    layer, bottom, top = run_layer('type: "MultinomialLogisticLoss"', prob, labels, dtype=dtype)
    np.testing.assert_allclose(top[0].data, -(np.log(0.75) + np.log(0.5)) / 2, rtol=1e-6)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, [[0.0, -1 / 1.5], [-1.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multinomial_logistic_matches_reference(dtype):
    rng = np.random.default_rng(5)
    prob = rng.uniform(0.05, 1, size=(40, 3, 2, 1))  # 40 items: the sum over rows of 32 lanes
    prob /= prob.sum(axis=(1, 2), keepdims=True)
    labels = rng.integers(0, 6, size=(40, 1, 1, 1)).astype(float)
    layer, bottom, top = run_layer('type: "MultinomialLogisticLoss"', prob, labels, dtype=dtype)
    loss, grad = multinomial_reference(prob.astype(dtype), labels.ravel())
    np.testing.assert_allclose(top[0].data, loss, rtol=tolerance(dtype))
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, grad.reshape(prob.shape), rtol=tolerance(dtype))


def test_multinomial_logistic_clamps_at_log_threshold():
    # p = 0 is clamped to Caffe's kLOG_THRESHOLD (1e-20): a finite loss, and the gradient of the clamp.
    layer, bottom, top = run_layer('type: "MultinomialLogisticLoss"', [[0.0, 1.0]], [0], dtype=np.float32)
    np.testing.assert_allclose(top[0].data, -np.log(1e-20), rtol=1e-6)
    dx, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, [[-1e20, 0.0]], rtol=1e-6)


def test_multinomial_logistic_matches_torch_nll():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    prob = rng.dirichlet(np.ones(5), size=6)
    labels = rng.integers(0, 5, size=6)
    _, _, top = run_layer('type: "MultinomialLogisticLoss"', prob, labels)
    want = torch.nn.functional.nll_loss(torch.log(torch.tensor(prob)), torch.tensor(labels))
    np.testing.assert_allclose(top[0].data, want.item(), rtol=1e-12)


def test_multinomial_logistic_gradient():
    rng = np.random.default_rng(7)
    prob = rng.uniform(0.2, 1, size=(4, 3, 1, 1))
    gradient_check('type: "MultinomialLogisticLoss"', [prob, [2, 0, 1, 1]], check_bottom=0)


# -- InfogainLoss --------------------------------------------------------------------------------------------

H3 = [[1.0, 0.5, 0.0], [0.25, 2.0, 0.0], [0.0, 0.0, 1.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_infogain_hand_values(dtype):
    # Scores 0: p = 1/3 for each class, so each target loses ln 3 times its H row's sum.
    scores, labels = np.zeros((2, 3)), [0, 1]
    layer, bottom, top = run_layer('type: "InfogainLoss"', scores, labels, H3, dtype=dtype)
    np.testing.assert_allclose(top[0].data, (1.5 + 2.25) * np.log(3) / 2, rtol=1e-6)
    dx, _, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False, False])
    # (p * rowsum(H)[label] - H[label]) / 2
    np.testing.assert_allclose(dx, [[-0.25, 0.0, 0.25], [0.25, -0.625, 0.375]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((4, 3), 1), ((2, 3, 5, 7), 1), ((2, 5, 3), -1)])
def test_infogain_matches_reference(dtype, shape, axis):
    rng = np.random.default_rng(8)
    scores = rng.normal(scale=2, size=shape)
    classes = shape[axis]
    label_shape = shape[:axis % len(shape)] + shape[axis % len(shape) + 1:]
    labels = rng.integers(0, classes, size=label_shape).astype(float)
    infogain = rng.uniform(size=(classes, classes))
    text = f'type: "InfogainLoss" infogain_loss_param {{ axis: {axis} }}'
    layer, bottom, top = run_layer(text, scores, labels, infogain, num_top=2, dtype=dtype)
    loss, grad = infogain_reference(scores.astype(dtype), labels, infogain.astype(dtype),
                                    axis=axis % len(shape))
    np.testing.assert_allclose(top[0].data, loss, rtol=tolerance(dtype))
    x = np.moveaxis(scores.astype(dtype).astype(np.float64), axis, -1)
    p = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(top[1].data, np.moveaxis(p / p.sum(-1, keepdims=True), -1, axis),
                               rtol=tolerance(dtype), atol=tolerance(dtype))
    dx, _, _ = backward_layer(layer, bottom, top, [1.0, 0.0], propagate_down=[True, False, False])
    np.testing.assert_allclose(dx, grad, rtol=tolerance(dtype), atol=tolerance(dtype))


def test_infogain_with_identity_is_softmax_with_loss():
    rng = np.random.default_rng(9)
    scores, labels = rng.normal(size=(3, 4, 2)), rng.integers(0, 4, size=(3, 2)).astype(float)
    layer, bottom, top = run_layer('type: "InfogainLoss"', scores, labels, np.eye(4))
    softmax, softmax_bottom, softmax_top = run_layer('type: "SoftmaxWithLoss"', scores, labels)
    np.testing.assert_allclose(top[0].data, softmax_top[0].data, rtol=1e-14)
    dx, _, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False, False])
    want, _ = backward_layer(softmax, softmax_bottom, softmax_top, [1.0], propagate_down=[True, False])
    np.testing.assert_allclose(dx, want, rtol=1e-12, atol=1e-15)


def test_infogain_matches_torch_soft_target_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    scores, labels = rng.normal(size=(5, 4)), rng.integers(0, 4, size=5)
    infogain = rng.uniform(size=(4, 4))
    _, _, top = run_layer('type: "InfogainLoss"', scores, labels, infogain)
    # Per target -sum_c H[label, c] log p_c: cross entropy with the row H[label] as the soft target.
    want = torch.nn.functional.cross_entropy(torch.tensor(scores), torch.tensor(infogain[labels]),
                                             reduction="sum") / 5
    np.testing.assert_allclose(top[0].data, want.item(), rtol=1e-12)


@pytest.mark.parametrize("setting, mode", [("", "VALID"), ("normalization: FULL", "FULL"),
                                           ("normalization: BATCH_SIZE", "BATCH_SIZE"),
                                           ("normalization: NONE", "NONE")])
def test_infogain_normalization_and_ignore_label(setting, mode):
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(2, 3, 2))
    labels = np.array([[0, 255], [2, 255]], float)  # 255 ignored, and outside 0..2
    text = f'type: "InfogainLoss" loss_param {{ ignore_label: 255 {setting} }}'
    layer, bottom, top = run_layer(text, scores, labels, H3)
    loss, grad = infogain_reference(scores, labels, H3, ignore=255, mode=mode)
    np.testing.assert_allclose(top[0].data, loss, rtol=1e-12)
    dx, _, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False, False])
    np.testing.assert_allclose(dx, grad, rtol=1e-12, atol=1e-15)
    assert np.all(dx[:, :, 1] == 0)


def write_infogain(path, matrix, dtype=np.float32):
    blob = Blob(np.shape(matrix), dtype)
    blob.data[...] = matrix
    io.write_binary(path, blob.to_proto())
    return path


def test_infogain_source_file_equals_third_bottom(tmp_path):
    rng = np.random.default_rng(12)
    scores, labels = rng.normal(size=(3, 3, 2)), rng.integers(0, 3, size=(3, 2)).astype(float)
    source = write_infogain(tmp_path / "h.binaryproto", np.array(H3).reshape(1, 1, 3, 3), np.float64)
    text = f'type: "InfogainLoss" infogain_loss_param {{ source: "{source}" }}'
    layer, bottom, top = run_layer(text, scores, labels)
    _, _, top3 = run_layer('type: "InfogainLoss"', scores, labels, H3)
    assert float(top[0].data) == float(top3[0].data)
    np.testing.assert_allclose(top[0].data, infogain_reference(scores, labels, H3)[0], rtol=1e-12)
    assert layer.blobs == []  # H from the file is no learned parameter (not written to a .caffemodel)
    gradient_check(text, [scores, labels], check_bottom=0)


@pytest.mark.parametrize("axis", [1, -1])
def test_infogain_gradient(axis):
    rng = np.random.default_rng(13)
    scores = rng.normal(size=(2, 3, 3))
    labels = rng.integers(0, 3, size=(2, 3)).astype(float)
    labels[0, 0] = 1
    text = f'type: "InfogainLoss" infogain_loss_param {{ axis: {axis} }} loss_param {{ ignore_label: 1 }}'
    gradient_check(text, [scores, labels, rng.uniform(size=(3, 3))], check_bottom=0)


# -- ContrastiveLoss -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_contrastive_hand_values(dtype):
    # Pair 0 similar, d^2 = 1. Pair 1 dissimilar, d = 0.5 < margin 1: (1 - 0.5)^2 = 0.25. Pair 2
    # dissimilar, d = 2 beyond the margin: 0. Sum / (2 * 3 pairs).
    a = [[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]
    b = [[0.0, 0.0], [0.3, 0.4], [0.0, 0.0]]
    layer, bottom, top = run_layer('type: "ContrastiveLoss"', a, b, [1, 0, 0], dtype=dtype)
    np.testing.assert_allclose(top[0].data, 1.25 / 6, rtol=1e-6)
    da, db, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, True, False])
    pair1 = -(1 - 0.5) / (0.5 + 1e-4) * np.array([-0.3, -0.4]) / 3
    np.testing.assert_allclose(da, [[1 / 3, 0.0], pair1, [0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(db, -da, rtol=1e-6)
    # legacy_version: max(margin - d^2, 0) = 0.75 for pair 1; margin 5 brings pair 2 in: 5 - 4 = 1.
    text = 'type: "ContrastiveLoss" contrastive_loss_param { legacy_version: true margin: 5 }'
    layer, bottom, top = run_layer(text, a, b, [1, 0, 0], dtype=dtype)
    np.testing.assert_allclose(top[0].data, (1 + 4.75 + 1) / 6, rtol=1e-6)
    da, _, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, False, False])
    np.testing.assert_allclose(da, [[1 / 3, 0.0], [0.1, 0.4 / 3], [-2 / 3, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("dim", [3, 40])  # 40: the distance sums over rows of 32 lanes
def test_contrastive_matches_reference(dtype, legacy, dim):
    rng = np.random.default_rng(14)
    a, b = rng.normal(scale=0.3, size=(6, dim, 1, 1)), rng.normal(scale=0.3, size=(6, dim, 1, 1))
    similar = np.array([1, 0, 0, 1, 0, 0], float).reshape(6, 1, 1, 1)
    margin = 2.0 * np.sqrt(dim) * 0.3
    text = (f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: {margin} '
            f'legacy_version: {str(legacy).lower()} }}')
    layer, bottom, top = run_layer(text, a, b, similar, dtype=dtype)
    loss, grad = contrastive_reference(a.astype(dtype), b.astype(dtype), similar.ravel(),
                                       float(np.float32(margin)), legacy)
    np.testing.assert_allclose(top[0].data, loss, rtol=tolerance(dtype) * 10)
    da, db, _ = backward_layer(layer, bottom, top, [1.0], propagate_down=[True, True, False])
    np.testing.assert_allclose(da, grad.reshape(a.shape), rtol=tolerance(dtype) * 10, atol=tolerance(dtype))
    np.testing.assert_allclose(db, -grad.reshape(a.shape), rtol=tolerance(dtype) * 10, atol=tolerance(dtype))


@pytest.mark.parametrize("legacy", ["false", "true"])
def test_contrastive_gradient(legacy):
    rng = np.random.default_rng(15)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    text = f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: 2.5 legacy_version: {legacy} }}'
    # The non-legacy gradient divides by d + 1e-4 (Caffe's), not d: off by about 1e-4 / d relative.
    threshold = 1e-6 if legacy == "true" else 2e-4
    for bottom in (0, 1):
        layer = gradient_check(text, [a, b, [1, 0, 0, 0]], check_bottom=bottom, stepsize=1e-4,
                               threshold=threshold)
    assert layer.allow_force_backward(0) and layer.allow_force_backward(1)
    assert not layer.allow_force_backward(2)


# -- common: loss_weight, label gradients, in place, bad shapes --------------------------------------------

RNG = np.random.default_rng(16)
INPUTS = {
    "SigmoidCrossEntropyLoss": [RNG.normal(size=(3, 4)), RNG.uniform(size=(3, 4))],
    "HingeLoss": [RNG.normal(size=(3, 4)), [1, 0, 3]],
    "MultinomialLogisticLoss": [RNG.uniform(0.1, 1, size=(3, 4)), [1, 0, 3]],
    "InfogainLoss": [RNG.normal(size=(3, 4)), [1, 0, 3], RNG.uniform(size=(4, 4))],
    "ContrastiveLoss": [RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4)), [1, 0, 0]],
}
LABELS = {"SigmoidCrossEntropyLoss": [1], "HingeLoss": [1], "MultinomialLogisticLoss": [1],
          "InfogainLoss": [1, 2], "ContrastiveLoss": [2]}


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_loss_weight_scales_loss_and_gradients(kind):
    arrays = INPUTS[kind]
    propagate = [i not in LABELS[kind] for i in range(len(arrays))]
    layer, bottom, top = run_layer(f'type: "{kind}"', *arrays)
    assert layer.loss_weights == [1.0]
    base = float(top[0].data)
    base_diffs = backward_layer(layer, bottom, top, [1.0], propagate_down=propagate)
    weighted = layer_from_prototxt(f'type: "{kind}" loss_weight: 2.5')
    bottom = blobs_from_arrays(*arrays)
    top = [Blob((), np.float64)]
    weighted.setup(bottom, top)
    assert weighted.run_forward(bottom, top) == pytest.approx(2.5 * base, rel=1e-12)
    assert float(top[0].data) == base and float(top[0].diff) == 2.5  # run_forward seeds the weight
    for blob, down in zip(bottom, propagate):
        if down:
            blob.diff[...] = np.nan
    weighted.run_backward(top, propagate, bottom)
    for blob, down, want in zip(bottom, propagate, base_diffs):
        if down:
            np.testing.assert_allclose(blob.diff, 2.5 * want, rtol=1e-12)


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_labels_get_no_gradient(kind):
    layer, bottom, top = run_layer(f'type: "{kind}"', *INPUTS[kind])
    for label in LABELS[kind]:
        propagate = [i not in LABELS[kind] or i == label for i in range(len(bottom))]
        with pytest.raises(LayerError, match=rf"cannot backpropagate to .*bottom {label}"):
            backward_layer(layer, bottom, top, [1.0], propagate_down=propagate)
        assert not layer.allow_force_backward(label)
    assert layer.allow_force_backward(0)


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_loss_refuses_in_place(kind):
    with pytest.raises(LayerError, match="in place"):
        run_layer(f'type: "{kind}"', *INPUTS[kind], in_place=True)


@pytest.mark.parametrize("text, arrays, message", [
    ('type: "SigmoidCrossEntropyLoss"', [np.zeros((2, 3)), np.zeros((2, 4))], r"same count \(6 != 8\)"),
    ('type: "SigmoidCrossEntropyLoss"', [np.zeros((2, 3)), np.zeros((3, 2))], "same first dimension"),
    ('type: "HingeLoss"', [np.zeros((2, 3)), np.zeros((2, 2))],
     r"labels \[2, 2\] have 4 values.*one per item"),
    ('type: "HingeLoss"', [np.zeros((2, 3)), np.zeros(3)], "same first dimension"),
    ('type: "MultinomialLogisticLoss"', [np.ones((2, 3)), np.zeros((2, 3))], "one per item"),
    ('type: "InfogainLoss"', [np.zeros((2, 3)), np.zeros(2), np.eye(2)],
     r"infogain matrix H \[2, 2\] has 4 values, but 3 classes .* need 3 x 3"),
    ('type: "InfogainLoss"', [np.zeros((2, 3, 4)), np.zeros((2, 3)), np.eye(3)],
     r"labels \[2, 3\] have 6 values.*need 8"),
    ('type: "InfogainLoss" infogain_loss_param { axis: 3 }', [np.zeros((2, 3)), np.zeros(2), np.eye(3)],
     "axis 3 out of range"),
    ('type: "ContrastiveLoss"', [np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(2)], "same number of values"),
    ('type: "ContrastiveLoss"', [np.zeros((2, 3)), np.zeros((3, 2)), np.zeros(2)], "same first dimension"),
    ('type: "ContrastiveLoss"', [np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 2))],
     r"similarity labels \[2, 2\] need one value per pair \(2"),
])
def test_bad_shapes_are_clear_errors(text, arrays, message):
    with pytest.raises(LayerError, match=message) as error:
        run_layer(text, *arrays)
    assert f"({text.split(chr(34))[1]})" in str(error.value)  # names the layer's type


@pytest.mark.parametrize("text, arrays, bad", [
    ('type: "HingeLoss"', [np.zeros((2, 3)), [0, 3]], "label 3 is outside 0..2"),
    ('type: "HingeLoss"', [np.zeros((2, 3)), [-1, 0]], "label -1 is outside 0..2"),
    ('type: "MultinomialLogisticLoss"', [np.ones((2, 3)), [5, 0]], "label 5 is outside 0..2"),
    ('type: "InfogainLoss"', [np.zeros((2, 3)), [0, 7], np.eye(3)], "label 7 is outside 0..2"),
    ('type: "InfogainLoss" loss_param { ignore_label: 4 }', [np.zeros((2, 3)), [4, -2], np.eye(3)],
     "label -2 is outside 0..2"),
])
def test_labels_out_of_range(text, arrays, bad):
    with pytest.raises(LayerError, match=bad):
        run_layer(text, *arrays)


def test_bad_parameters_are_clear_errors(tmp_path):
    with pytest.raises(LayerError, match=r"\(InfogainLoss\).*normalize is deprecated.*normalization"):
        run_layer('type: "InfogainLoss" loss_param { normalize: true }', np.zeros((2, 3)), [0, 1], np.eye(3))
    with pytest.raises(LayerError, match=r"\(InfogainLoss\).*infogain_loss_param.source .* a third bottom"):
        run_layer('type: "InfogainLoss"', np.zeros((2, 3)), [0, 1])
    with pytest.raises(LayerError, match="takes at most 3 bottom"):
        run_layer('type: "InfogainLoss"', np.zeros((2, 3)), [0, 1], np.eye(3), np.eye(3))
    with pytest.raises(LayerError, match="takes 3 bottom"):
        run_layer('type: "ContrastiveLoss"', np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(LayerError, match="takes 1 top"):
        run_layer('type: "HingeLoss"', np.zeros((2, 3)), [0, 1], num_top=2)


@pytest.mark.parametrize("content, reason", [(None, "cannot read"),
                                             (b"\xff\xff\xff", "not a binary BlobProto")])
def test_unreadable_infogain_source_names_the_file(tmp_path, content, reason):
    source = tmp_path / "missing_h.binaryproto"
    if content is not None:
        source.write_bytes(content)
    text = f'type: "InfogainLoss" infogain_loss_param {{ source: "{source}" }}'
    with pytest.raises(LayerError, match=reason) as error:
        run_layer(text, np.zeros((2, 3)), [0, 1])
    assert str(source) in str(error.value) and "infogain_loss_param.source" in str(error.value)


def test_infogain_source_of_the_wrong_size(tmp_path):
    source = write_infogain(tmp_path / "h.binaryproto", np.eye(2))
    with pytest.raises(LayerError, match=r"H \[2, 2\] has 4 values, but 3 classes"):
        run_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{source}" }}', np.zeros((2, 3)),
                  [0, 1])


def test_losses_train_in_a_net():
    """Each loss in a Net: the solver's view (loss weights, backward into an InnerProduct)."""
    import minicaffe
    from minicaffe.net import Net
    from minicaffe.proto import caffe_pb2

    text = """
    layer { name: "data" type: "DummyData" top: "x" top: "t" top: "label" top: "h" top: "y"
            dummy_data_param { shape { dim: 4 dim: 5 } shape { dim: 4 dim: 3 } shape { dim: 4 }
                               shape { dim: 3 dim: 3 } shape { dim: 4 }
                               data_filler { type: "gaussian" } data_filler { type: "uniform" }
                               data_filler { type: "constant" value: 2 } data_filler { type: "uniform" }
                               data_filler { type: "constant" value: 1 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
            inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "ip2" type: "InnerProduct" bottom: "x" top: "ip2"
            inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
    layer { name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "ip" bottom: "t" top: "sce" }
    layer { name: "hinge" type: "HingeLoss" bottom: "ip" bottom: "label" top: "hinge" loss_weight: 0.5 }
    layer { name: "info" type: "InfogainLoss" bottom: "ip" bottom: "label" bottom: "h" top: "info" }
    layer { name: "mlr" type: "MultinomialLogisticLoss" bottom: "prob" bottom: "label" top: "mlr" }
    layer { name: "con" type: "ContrastiveLoss" bottom: "ip" bottom: "ip2" bottom: "y" top: "con" }
    """
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TRAIN)
    loss = net.forward_backward()
    outputs = {name: float(net.blobs[name].data) for name in ("sce", "hinge", "info", "mlr", "con")}
    assert np.isfinite(loss) and loss == pytest.approx(sum(outputs.values()) - 0.5 * outputs["hinge"])
    for name in ("ip", "ip2"):
        assert np.all(np.isfinite(net.params[name][0].diff)) and np.any(net.params[name][0].diff != 0)
