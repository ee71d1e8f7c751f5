"""Finite-difference gradient checking of layers, with Caffe's GradientChecker semantics.

    checker = GradientChecker(stepsize=1e-2, threshold=1e-3)
    checker.check_gradient_exhaustive(layer, bottom, top)

Each bottom (and each parameter blob) element is moved by +-stepsize, the objective recomputed, and
the centred difference compared with the layer's backward, within threshold * max(|a|, |b|, 1).
Points within kink_range of kink (e.g. 0 for ReLU) are skipped where the function is not smooth.
Works on any Layer, including a user's own. Use float64 blobs for tight thresholds.
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
    def __init__(self, stepsize: float = 1e-2, threshold: float = 1e-3, seed: int = 1701,
                 kink: float = 0.0, kink_range: float = -1.0):
        self.stepsize, self.threshold, self.seed = stepsize, threshold, seed
        self.kink, self.kink_range = kink, kink_range

    # -- public modes ------------------------------------------------------------------------
    def check_gradient(self, layer: Layer, bottom: list[Blob], top: list[Blob],
                       check_bottom: int | None = None) -> None:
        """Objective 0.5 * sum of squares of all tops; checks bottoms and every parameter."""
        layer.setup(bottom, top)
        self._check(layer, bottom, top, check_bottom, top_id=None, top_index=None)

    def check_gradient_exhaustive(self, layer: Layer, bottom: list[Blob], top: list[Blob],
                                  check_bottom: int | None = None) -> None:
        """One objective per top element (top[k].data.flat[i]); checks bottoms and parameters."""
        layer.setup(bottom, top)
        for k, blob in enumerate(top):
            for i in range(blob.count):
                self._check(layer, bottom, top, check_bottom, top_id=k, top_index=i)

    def check_gradient_eltwise(self, layer: Layer, bottom: list[Blob], top: list[Blob]) -> None:
        """For element-wise layers: top element i depends only on bottom element i."""
        layer.setup(bottom, top)
        for k, blob in enumerate(top):
            for i in range(blob.count):
                self._check(layer, bottom, top, None, top_id=k, top_index=i, element_wise=True)

    # -- machinery ---------------------------------------------------------------------------
    def _objective(self, layer, bottom, top, top_id, top_index) -> float:
        """Forward, then the objective; sets the top diffs to its gradient."""
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
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

    def _check(self, layer, bottom, top, check_bottom, top_id, top_index, element_wise=False):
        checked: list[tuple[str, Blob]] = []
        if not element_wise:
            checked += [(f"param blob {i}", b) for i, b in enumerate(layer.blobs)]
        propagate = [check_bottom is None or check_bottom == i for i in range(len(bottom))]
        checked += [(f"bottom {i}", b) for i, b in enumerate(bottom) if propagate[i]]

        # Analytic gradient.
        # Clear the diffs before the objective sets the top diffs: a top may share its diff with a
        # bottom (Flatten, Reshape, in place), and clearing after would wipe the top gradient.
        for blob in layer.blobs:
            blob.diff[...] = 0
        for blob in bottom:
            blob.diff[...] = 0
        self._objective(layer, bottom, top, top_id, top_index)
        layer.backward(top, propagate, bottom)
        computed = [np.array(blob.diff) for _, blob in checked]

        for (what, blob), analytic in zip(checked, computed):
            indices = [top_index] if element_wise else range(blob.count)
            for j in indices:
                x = blob.data.flat[j]
                blob.data.flat[j] = x + self.stepsize
                positive = self._objective(layer, bottom, top, top_id, top_index)
                blob.data.flat[j] = x - self.stepsize
                negative = self._objective(layer, bottom, top, top_id, top_index)
                blob.data.flat[j] = x
                estimated = (positive - negative) / (2 * self.stepsize)
                got = float(analytic.flat[j])
                feature = float(x)
                if self.kink_range >= 0 and abs(feature - self.kink) <= self.kink_range:
                    continue
                scale = max(abs(got), abs(estimated), 1.0)
                if abs(got - estimated) > self.threshold * scale:
                    objective = "sum of squares" if top_id is None else f"top {top_id}[{top_index}]"
                    raise GradientCheckError(
                        f"{layer!r}: {what} element {j} (value {feature:.6g}), objective {objective}: "
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
