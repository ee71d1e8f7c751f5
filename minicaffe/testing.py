"""Finite-difference gradient checking of layers, with Caffe's GradientChecker semantics.

    checker = GradientChecker(stepsize=1e-2, threshold=1e-3)
    checker.check_gradient_exhaustive(layer, bottom, top)

Each bottom (and each parameter blob) element is moved by +-stepsize, the objective recomputed, and
the centred difference compared with the layer's backward, within threshold * max(|a|, |b|, 1).
Bottom elements within kink_range of kink (e.g. 0 for ReLU) are skipped, where the layer's function is
not smooth; parameters are always checked. The layer runs through run_forward / run_backward, as in a
Net. Beyond Caffe's checker, a backward must overwrite the bottom diffs and add into the parameter
diffs (see GradientChecker). Works on any Layer, including a user's own. Use float64 blobs (and a
float64 layer, the default of layer_from_prototxt) for tight thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .blob import Blob
from .layer import TEST, Layer, create_layer
from .proto import caffe_pb2


class GradientCheckError(AssertionError):
    pass


def layer_from_prototxt(text: str, phase: int = TEST, dtype=np.float64) -> Layer:
    """A layer from the body of a prototxt `layer { ... }` block, e.g. 'type: "ReLU"'."""
    from . import io

    param = io.parse_text(text, caffe_pb2.LayerParameter(), "<layer>")
    if not param.name:
        param.name = param.type.lower() or "layer"
    return create_layer(param, phase, dtype)


def blobs_from_arrays(*arrays, dtype=np.float64) -> list[Blob]:
    blobs = []
    for array in arrays:
        array = np.asarray(array, dtype=dtype)
        blob = Blob(array.shape, dtype)
        blob.data[...] = array
        blobs.append(blob)
    return blobs


class GradientChecker:
    """Caffe's GradientChecker, stricter about what a backward writes: a bottom diff must be
    overwritten (the checker fills it with NaN first, so a backward that adds into the old gradient or
    skips elements fails), and a parameter diff must be accumulated into (the checker seeds it with
    PARAM_DIFF_SEED and takes the gradient as the increase). A Net relies on both: it never clears
    bottom diffs, and a parameter shared by layers or trained with iter_size > 1 sums its gradients."""

    PARAM_DIFF_SEED = 0.5

    def __init__(self, stepsize: float = 1e-2, threshold: float = 1e-3, kink: float = 0.0,
                 kink_range: float = -1.0):
        self.stepsize, self.threshold = stepsize, threshold
        self.kink, self.kink_range = kink, kink_range

    # -- public modes ------------------------------------------------------------------------
    def check_gradient(self, layer: Layer, bottom: list[Blob], top: list[Blob],
                       check_bottom: int | None = None) -> None:
        """Objective 0.5 * sum of squares of all tops; checks bottoms and every parameter."""
        self._setup(layer, bottom, top)
        self._check(layer, bottom, top, check_bottom, top_id=None, top_index=None)

    def check_gradient_exhaustive(self, layer: Layer, bottom: list[Blob], top: list[Blob],
                                  check_bottom: int | None = None) -> None:
        """One objective per top element (top[k].data.flat[i]); checks bottoms and parameters."""
        self._setup(layer, bottom, top)
        for k, blob in enumerate(top):
            for i in range(blob.count):
                self._check(layer, bottom, top, check_bottom, top_id=k, top_index=i)

    def check_gradient_eltwise(self, layer: Layer, bottom: list[Blob], top: list[Blob]) -> None:
        """For element-wise layers: top element i depends only on bottom element i."""
        self._setup(layer, bottom, top)
        for k, blob in enumerate(top):
            for i in range(blob.count):
                self._check(layer, bottom, top, None, top_id=k, top_index=i, element_wise=True)

    # -- machinery ---------------------------------------------------------------------------
    @staticmethod
    def _setup(layer: Layer, bottom: list[Blob], top: list[Blob]) -> None:
        # Checked here: a mixed-precision kernel call fails deep inside kernel.py instead.
        for what, blobs in (("bottom", bottom), ("top", top)):
            for i, blob in enumerate(blobs):
                if blob.dtype != layer.dtype:
                    raise TypeError(
                        f"GradientChecker: {what} {i} is {blob.dtype} but {layer!r} computes in "
                        f"{layer.dtype}; make every blob with the layer's dtype, "
                        f"e.g. Blob((), layer.dtype) for a top")
        layer.setup(bottom, top)

    def _objective(self, layer, bottom, top, top_id, top_index) -> float:
        """Forward, then the objective; sets the top diffs to its gradient (after run_forward, which
        seeds a loss top's diff with its loss weight)."""
        layer.run_forward(bottom, top)
        if top_id is None:
            loss = 0.0
            for blob in top:
                data = np.array(blob.data)
                blob.diff[...] = data
                loss += 0.5 * float((data * data).sum())
            return loss
        for blob in top:
            blob.diff[...] = 0
        weight = 2.0  # a non-unit weight catches layers that ignore the incoming top diff
        top[top_id].diff.flat[top_index] = weight
        return weight * float(top[top_id].data.flat[top_index])

    def _analytic(self, layer, bottom, top, propagate, top_id, top_index) -> tuple[list, list]:
        """Backward's gradients: (per parameter blob, per bottom; None for a bottom not propagated)."""
        # A bottom whose diff is a top's diff (in place, Flatten, Reshape) receives the top gradient
        # from the objective; every other propagated bottom must have its diff overwritten.
        aliased = [any(np.shares_memory(b.diff, t.diff) for t in top) for b in bottom]
        for blob in layer.blobs:
            blob.diff[...] = self.PARAM_DIFF_SEED
        for i, blob in enumerate(bottom):
            if propagate[i] and not aliased[i]:
                blob.diff[...] = np.nan
        self._objective(layer, bottom, top, top_id, top_index)
        layer.run_backward(top, propagate, bottom)
        params = [np.array(blob.diff) - self.PARAM_DIFF_SEED for blob in layer.blobs]
        bottoms = [np.array(blob.diff) if propagate[i] else None for i, blob in enumerate(bottom)]
        for i, diff in enumerate(bottoms):
            if diff is not None and np.isnan(diff).any():
                j = int(np.flatnonzero(np.isnan(diff))[0])
                raise GradientCheckError(
                    f"{layer!r}: bottom {i} diff element {j} is still the NaN the checker put there: "
                    f"backward must overwrite a bottom's diff, not add into it or skip elements")
        return params, bottoms

    def _check(self, layer, bottom, top, check_bottom, top_id, top_index, element_wise=False):
        propagate = [check_bottom is None or check_bottom == i for i in range(len(bottom))]
        params, bottoms = self._analytic(layer, bottom, top, propagate, top_id, top_index)
        # (name, blob, analytic gradient, whether it is a bottom)
        checked: list[tuple[str, Blob, np.ndarray, bool]] = []
        if not element_wise:
            checked += [(f"param blob {i}", blob, params[i], False) for i, blob in enumerate(layer.blobs)]
        checked += [(f"bottom {i}", blob, bottoms[i], True) for i, blob in enumerate(bottom) if propagate[i]]

        for what, blob, analytic, is_bottom in checked:
            # The kink is a point of the layer's input where its function is not smooth; a
            # parameter (a PReLU slope, a Scale factor) near that value is checked all the same.
            skip_kinks = is_bottom and self.kink_range >= 0
            indices = [top_index] if element_wise else range(blob.count)
            for j in indices:
                x = float(blob.data.flat[j])
                if skip_kinks and abs(x - self.kink) <= self.kink_range:
                    continue
                blob.data.flat[j] = x + self.stepsize
                positive = self._objective(layer, bottom, top, top_id, top_index)
                blob.data.flat[j] = x - self.stepsize
                negative = self._objective(layer, bottom, top, top_id, top_index)
                blob.data.flat[j] = x
                estimated = (positive - negative) / (2 * self.stepsize)
                got = float(analytic.flat[j])
                scale = max(abs(got), abs(estimated), 1.0)
                if not abs(got - estimated) <= self.threshold * scale:  # `not <=` also fails on NaN
                    objective = "sum of squares" if top_id is None else f"top {top_id}[{top_index}]"
                    raise GradientCheckError(
                        f"{layer!r}: {what} element {j} (value {x:.6g}), objective {objective}: "
                        f"backward gives {got:.8g}, finite difference {estimated:.8g}")
        self._objective(layer, bottom, top, top_id, top_index)


def check_layer(layer: Layer, arrays: Sequence[np.ndarray], *, num_top: int = 1, exhaustive: bool = False,
                **checker_args) -> None:
    """Shorthand: check `layer` on float64 bottoms made from `arrays`."""
    bottom = blobs_from_arrays(*arrays, dtype=layer.dtype)
    top = [Blob((), layer.dtype) for _ in range(num_top)]
    checker = GradientChecker(**checker_args)
    if exhaustive:
        checker.check_gradient_exhaustive(layer, bottom, top)
    else:
        checker.check_gradient(layer, bottom, top)
