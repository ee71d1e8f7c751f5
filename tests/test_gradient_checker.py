"""The GradientChecker catches the backward bugs a finite difference alone cannot see: a bottom diff
added into instead of overwritten, elements left unwritten, a parameter diff overwritten instead of
accumulated. Parameters are checked even at the bottoms' kink; blobs of another dtype than the layer's
are refused with a message that says what to do."""

from __future__ import annotations

import numpy as np
import pytest

from minicaffe.blob import Blob
from minicaffe.layer import Layer, register
from minicaffe.testing import GradientChecker, GradientCheckError, blobs_from_arrays, layer_from_prototxt


@register("TestWeightedCopy")
class WeightedCopyLayer(Layer):
    """y = w * x with one learnable scalar w; `mode` plants one backward bug at a time."""

    exact_num_bottom = exact_num_top = 1
    mode = "right"

    def layer_setup(self, bottom, top):
        if not self.blobs:
            self.add_param_blob(()).data[...] = 1.5

    def reshape(self, bottom, top):
        top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        top[0].mutable_data()[...] = self.blobs[0].get_data() * bottom[0].get_data()

    def backward(self, top, propagate_down, bottom):
        dy, x, w = top[0].get_diff(), bottom[0].get_data(), self.blobs[0].get_data()
        weight_gradient = (dy * x).sum()
        if self.mode == "param_overwrites":
            self.blobs[0].mutable_diff()[...] = weight_gradient
        else:
            self.blobs[0].mutable_diff()[...] += weight_gradient
        if self.mode == "param_wrong_at_zero" and w == 0:
            self.blobs[0].mutable_diff()[...] += 1.0
        if not propagate_down[0]:
            return
        dx = bottom[0].mutable_diff()
        if self.mode == "bottom_accumulates":
            dx += w * dy
        elif self.mode == "bottom_skips_first":
            dx.flat[1:] = (w * dy).flat[1:]
        else:
            dx[...] = w * dy


def weighted_copy(mode: str, weight: float = 1.5) -> Layer:
    layer = layer_from_prototxt('type: "TestWeightedCopy"')
    layer.mode = mode
    layer.setup(blobs_from_arrays(np.ones((2, 3))), [Blob((), np.float64)])
    layer.blobs[0].data[...] = weight
    return layer


def check(layer: Layer, x: np.ndarray, **checker_args) -> None:
    GradientChecker(**checker_args).check_gradient(layer, blobs_from_arrays(x), [Blob((), np.float64)])


X = np.random.default_rng(7).normal(size=(2, 3))


def test_right_backward_passes_in_every_mode():
    layer = weighted_copy("right")
    check(layer, X)
    bottom, top = blobs_from_arrays(X), [Blob((), np.float64)]
    GradientChecker().check_gradient_exhaustive(layer, bottom, top)
    GradientChecker().check_gradient_eltwise(layer, bottom, top)


@pytest.mark.parametrize("mode", ["bottom_accumulates", "bottom_skips_first"])
def test_bottom_diff_must_be_overwritten(mode):
    with pytest.raises(GradientCheckError, match="bottom 0 diff element .* NaN"):
        check(weighted_copy(mode), X)


def test_parameter_diff_must_be_accumulated():
    with pytest.raises(GradientCheckError, match="param blob 0 element 0"):
        check(weighted_copy("param_overwrites"), X)


def test_parameter_at_the_kink_is_still_checked():
    # The bottoms keep away from the kink; the parameter sits on it and its gradient is wrong there.
    x = np.where(np.abs(X) < 0.1, 0.5, X)
    check(weighted_copy("right", weight=0.0), x, kink=0.0, kink_range=0.05)
    with pytest.raises(GradientCheckError, match="param blob 0 element 0 \\(value 0\\)"):
        check(weighted_copy("param_wrong_at_zero", weight=0.0), x, kink=0.0, kink_range=0.05)


def test_bottoms_at_the_kink_are_skipped():
    # ReLU's derivative jumps at 0: a bottom there fails the finite difference; within range it is skipped.
    layer = layer_from_prototxt('type: "ReLU"')
    x = np.array([[-1.0, 0.0, 2.0]])
    with pytest.raises(GradientCheckError, match="bottom 0 element 1"):
        check(layer, x)
    check(layer, x, kink=0.0, kink_range=1e-3)


def test_aliased_bottom_diff_is_not_filled():
    # Flatten's top shares the bottom's diff: backward has nothing to write and must still pass.
    check(layer_from_prototxt('type: "Flatten"'), X.reshape(2, 3, 1))


def test_runs_the_layer_through_run_forward_and_run_backward(monkeypatch):
    layer = weighted_copy("right")
    calls = {"run_forward": 0, "run_backward": 0}
    for name in calls:
        original = getattr(layer, name)

        def counted(*args, name=name, original=original):
            calls[name] += 1
            return original(*args)

        monkeypatch.setattr(layer, name, counted)
    check(layer, X)
    assert calls["run_backward"] == 1
    assert calls["run_forward"] == 1 + 2 * (X.size + 1) + 1  # analytic, two per element, final


@pytest.mark.parametrize("wrong", ["bottom", "top"])
def test_blobs_of_another_dtype_are_refused_clearly(wrong):
    layer = layer_from_prototxt('type: "Sigmoid"')  # float64, as GradientChecker wants
    bottom = blobs_from_arrays(X, dtype=np.float32 if wrong == "bottom" else np.float64)
    top = [Blob((), np.float32 if wrong == "top" else np.float64)]
    message = f"{wrong} 0 is float32 .* computes in float64.*Blob\\(\\(\\), layer.dtype\\)"
    with pytest.raises(TypeError, match=message):
        GradientChecker().check_gradient(layer, bottom, top)


def test_loss_layer_checked_on_its_weighted_loss_top():
    # run_forward seeds a loss top's diff with its loss weight; the checker's own top diffs replace it.
    layer = layer_from_prototxt('type: "EuclideanLoss" loss_weight: 3')
    rng = np.random.default_rng(3)
    bottom = blobs_from_arrays(rng.normal(size=(2, 3)), rng.normal(size=(2, 3)))
    top = [Blob((), np.float64)]
    GradientChecker(stepsize=1e-3, threshold=1e-6).check_gradient_exhaustive(layer, bottom, top)
