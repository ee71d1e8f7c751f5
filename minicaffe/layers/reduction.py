"""Reduction: each item of the axes before reduction_param.axis reduced over the axes from it on.

Caffe's ReductionLayer: top = coeff * (SUM: sum x, ASUM: sum |x|, SUMSQ: sum x^2, MEAN: sum x / n),
of shape bottom.shape[:axis] (a scalar for axis 0, the default). Backward: dx = coeff * dy * (1, sign x
(0 at 0), 2 x, 1 / n). The sums are reduce.py's deterministic two-stage sums.
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register
from ..proto import caffe_pb2
from .reduce import channel_sums

KERNELS = KernelFile("reduction.cu")
OPERATIONS = caffe_pb2.ReductionParameter.ReductionOp


@register("Reduction")
class ReductionLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        param = self.param.reduction_param
        self.operation = int(param.operation)
        if self.operation not in OPERATIONS.values():
            self.fail(f"unknown operation {self.operation} (known: {', '.join(OPERATIONS.keys())})")
        self.coeff = float(param.coeff)

    def reshape(self, bottom, top):
        if top[0] is bottom[0]:
            self.fail("cannot run in place (the top has another shape)")
        try:
            axis = bottom[0].canonical_axis(self.param.reduction_param.axis)
        except ValueError as error:
            self.fail(str(error))
        self.num, self.dim = bottom[0].count_range(0, axis), bottom[0].count_range(axis)
        top[0].reshape(bottom[0].shape[:axis])

    def forward(self, bottom, top):
        mean = self.operation == caffe_pb2.ReductionParameter.MEAN
        if self.num == 0:
            return
        if self.dim == 0:  # empty rows: a sum is 0, a mean 0 / 0 (as Caffe)
            top[0].mutable_data().fill(float("nan") if mean else 0.0)
            return
        channel_sums(self, (1, self.num, self.dim), KERNELS.reduction_partials,
                     (self.operation, self.coeff, bottom[0].get_data()), top[0].mutable_data(),
                     accumulate=False, divisor=self.dim if mean else 1)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or bottom[0].count == 0:
            return
        scale = self.coeff / (self.dim if self.operation == caffe_pb2.ReductionParameter.MEAN else 1)
        KERNELS.reduction_backward(self.num, self.dim, self.operation, scale, bottom[0].get_data(),
                                   top[0].get_diff(), bottom[0].mutable_diff(), extents=(self.num, self.dim))
