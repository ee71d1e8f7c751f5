"""The base of the Scale and Bias layers: y = x (op) v, v broadcast along axes [axis, axis + v's num_axes)
of x, v a learned blob (one bottom) or the second bottom, as Caffe's ScaleLayer and BiasLayer.

A learned v has shape bottom[0].shape[axis : axis + num_axes] (num_axes -1: to the end, 0: a scalar).
x is seen as (outer, dim, inner): dim = v's count, outer = the axes before, inner = the axes after;
the kernels are kernels/broadcast.cu.
"""

from __future__ import annotations

from ..blob import Blob
from ..kernel import KernelFile
from ..layer import Layer
from .reduce import channel_sums

KERNELS = KernelFile("broadcast.cu")


class BroadcastLayer(Layer):
    min_num_bottom = 1
    max_num_bottom = 2
    exact_num_top = 1
    operand = ""  # what v is called in messages: "scale" or "bias"

    def axes_param(self):
        """The layer's message with the axis and num_axes fields (scale_param or bias_param)."""
        raise NotImplementedError

    def operand_blob(self, bottom: list[Blob]) -> Blob:
        """v: the second bottom, or the learned blob 0."""
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def _axis(self, bottom: Blob) -> int:
        axis = self.axes_param().axis
        try:
            return bottom.canonical_axis(axis)
        except ValueError:
            self.fail(f"axis {axis} is out of range for bottom[0] of shape {list(bottom.shape)}")

    def learned_shape(self, bottom: Blob) -> tuple[int, ...]:
        """Shape of a learned v: bottom.shape[axis : axis + num_axes] (num_axes -1: to the end)."""
        axis, num_axes = self._axis(bottom), self.axes_param().num_axes
        if num_axes < -1:
            self.fail("num_axes must be non-negative, or -1 to extend to the end of bottom[0], "
                      f"got {num_axes}")
        if num_axes >= 0 and bottom.num_axes < axis + num_axes:
            self.fail(f"{self.operand} blob's shape extends past bottom[0]'s shape {list(bottom.shape)} when "
                      f"applied starting with bottom[0] axis {axis} (num_axes {num_axes})")
        return bottom.shape[axis:] if num_axes == -1 else bottom.shape[axis:axis + num_axes]

    def reshape(self, bottom, top):
        """Checks v's shape against bottom[0] and sets self.dims = (outer, dim, inner).

        A scalar v applies from axis 0 whatever `axis` says (the same result, one plane), as in Caffe."""
        x, shape = bottom[0], self.operand_blob(bottom).shape
        axis = 0 if not shape else self._axis(x)
        if x.shape[axis:axis + len(shape)] != shape:
            self.fail(f"dimension mismatch between bottom[0] {list(x.shape)} from axis {axis} and "
                      f"the {self.operand} {list(shape)}")
        end = axis + len(shape)
        self.dims = x.count_range(0, axis), x.count_range(axis, end), x.count_range(end)
        if top[0] is not x:
            top[0].reshape_like(x)

    def broadcast(self, op: str, x, v, y, bias=None, kept=None) -> None:
        """y = x (op) v[d], op "mul" or "add"; "mul" with a `bias`: y = x * v[d] + bias[d] in one pass
        (the same bits as the two), which also copies x to `kept` if given. y may be x."""
        outer, dim, inner = self.dims
        keep = ()
        if bias is not None:
            op, operands = f"{op}_add", (v, bias)
            keep = (y if kept is None else kept, int(kept is not None))  # kept unused without keep
        else:
            assert kept is None, "only mul with a bias copies x"
            operands = (v,)
        if inner == 1:
            KERNELS.launch(f"broadcast_{op}_rows", (outer, dim), outer, dim, x, *operands, y, *keep)
        else:
            planes = outer * dim
            KERNELS.launch(f"broadcast_{op}_planes", (planes, inner), planes, inner, dim, x, *operands, y,
                           *keep)

    def reduce_to_operand(self, stage1, args: tuple, out, accumulate: bool) -> None:
        """out (v's gradient) (+)= the terms of stage1 (a reduce.h stage-1 kernel over x's planes, e.g.
        reduce.cu's sum_partials of dy) summed over outer and inner: deterministically, in kernels
        (layers/reduce.py). Caffe does it with gemv."""
        channel_sums(self, self.dims, stage1, args, out, accumulate)
