"""Eltwise: element-wise PROD, SUM (optionally weighted by coeff) or MAX of >= 2 bottoms of one shape.

MAX follows Caffe's CPU tie rule (the GPU Caffe kernel differs): between bottoms 0 and 1 a tie goes to
bottom 1, and a later bottom takes over only when strictly greater, so its ties stay with the earlier
winner. The gradient goes to the winner only.
"""

from __future__ import annotations

import numpy as np

from ..kernel import KernelFile
from ..layer import Layer, register
from ..proto import caffe_pb2

KERNELS = KernelFile("eltwise.cu")
PROD, SUM, MAX = (caffe_pb2.EltwiseParameter.PROD, caffe_pb2.EltwiseParameter.SUM,
                  caffe_pb2.EltwiseParameter.MAX)


def weighted_sum(arrays, coeffs, out) -> None:
    """out = sum of coeffs[i] * arrays[i] (at least two arrays of out's size), added in order: the
    first two in one pass (eltwise_sum2), then one axpy each. Also Split's backward (coefficients 1)."""
    n = out.size
    KERNELS.eltwise_sum2(n, arrays[0], arrays[1], out, coeffs[0], coeffs[1], extents=n)
    for array, coeff in zip(arrays[2:], coeffs[2:]):
        KERNELS.eltwise_axpy(n, array, out, coeff, extents=n)


@register("Eltwise")
class EltwiseLayer(Layer):
    min_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.eltwise_param
        self.operation = param.operation
        coeffs = list(param.coeff)
        if coeffs and self.operation != SUM:
            name = caffe_pb2.EltwiseParameter.EltwiseOp.Name(self.operation)
            self.fail(f"coeff is only for operation SUM, got {len(coeffs)} coeff values with {name}")
        if coeffs and len(coeffs) != len(bottom):
            self.fail(f"takes one coeff per bottom: {len(coeffs)} coeff values for {len(bottom)} bottoms")
        self.coeffs = [float(c) for c in coeffs] or [1.0] * len(bottom)
        self.stable_prod_grad = param.stable_prod_grad

    def reshape(self, bottom, top):
        shapes = [list(b.shape) for b in bottom]
        if any(b.shape != bottom[0].shape for b in bottom[1:]):
            self.fail(f"needs bottoms of identical shape, got {shapes}")
        if any(top[0] is b for b in bottom):
            # Backward of PROD and MAX needs every bottom and SUM would clear its own input first.
            self.fail("cannot run in place (its top must not be one of its bottoms)")
        top[0].reshape_like(bottom[0])

    def max_index(self, shape):
        """MAX: which bottom gave each output element (forward writes it, backward reads it)."""
        return self.buffer("max_index", shape, np.int32)

    def forward(self, bottom, top):
        xs = [b.get_data() for b in bottom]
        y = top[0].mutable_data()
        n = y.size
        if self.operation == PROD:
            KERNELS.eltwise_prod(n, xs[0], xs[1], y, extents=n)
            for x in xs[2:]:
                KERNELS.eltwise_prod_into(n, x, y, extents=n)
        elif self.operation == SUM:
            weighted_sum(xs, self.coeffs, y)
        elif self.operation == MAX:
            mask = self.max_index(y.shape)
            KERNELS.eltwise_max_first(n, xs[0], xs[1], y, mask, extents=n)
            for i, x in enumerate(xs[2:], start=2):
                KERNELS.eltwise_max_next(n, x, y, mask, i, extents=n)
        else:
            self.fail(f"unknown operation {self.operation}")

    def backward(self, top, propagate_down, bottom):
        dy = top[0].get_diff()
        n = dy.size
        for i, blob in enumerate(bottom):
            if not propagate_down[i]:
                continue
            dx = blob.mutable_diff()
            if self.operation == PROD:
                if self.stable_prod_grad:
                    # The product of the other bottoms, never dividing by this one (which may be 0).
                    others = [b.get_data() for j, b in enumerate(bottom) if j != i]
                    KERNELS.eltwise_prod(n, dy, others[0], dx, extents=n)
                    for x in others[1:]:
                        KERNELS.eltwise_prod_into(n, x, dx, extents=n)
                else:
                    KERNELS.eltwise_prod_backward_div(n, top[0].get_data(), blob.get_data(), dy, dx,
                                                      extents=n)
            elif self.operation == SUM:
                KERNELS.eltwise_scale(n, dy, dx, self.coeffs[i], extents=n)
            else:
                KERNELS.eltwise_max_backward(n, dy, self.max_index(dy.shape), dx, i, extents=n)
