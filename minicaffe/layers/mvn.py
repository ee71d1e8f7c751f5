"""MVN: mean-variance normalization of each item's values (across_channels) or of each channel's.

Caffe's MVNLayer: y = x - mean, and with normalize_variance (default) y = (x - mean) / (std + eps), the
mean and (biased) std over each normalized row: the axes from 1 on (across_channels) or from 2 on (one
row per (n, c)). eps is added to the std, not the variance, as Caffe does. Backward is Caffe's:
dx = (dy - mean(dy) - y * mean(dy * y)) / (std + eps), the exact gradient when eps is 0 (it differs by a
relative O(eps / std) otherwise; Caffe's default eps is 1e-9); without normalize_variance dx = dy -
mean(dy). In place works (backward reads y, kept when later layers may change it).

The row statistics are reduce.py's deterministic sums; normalizing and the backward are BatchNorm's
kernels with one "channel" per row (the same arithmetic).
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import NeuronLayer, register
from .batch_norm import KERNELS as BATCH_NORM
from .reduce import KERNELS as REDUCE
from .reduce import channel_sums, channel_sums_of

KERNELS = KernelFile("mvn.cu")


@register("MVN")
class MVNLayer(NeuronLayer):
    def layer_setup(self, bottom, top):
        param = self.param.mvn_param
        self.normalize_variance = param.normalize_variance
        self.across_channels = param.across_channels
        self.eps = float(param.eps)
        if not self.eps >= 0:
            self.fail(f"eps must be >= 0, got {self.eps}")
        self.keeps = "output" if self.normalize_variance else None  # backward reads y

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) == 0:
            self.fail("needs a bottom with at least one axis, got a scalar")
        self.rows = shape[0] if self.across_channels else bottom[0].count_range(0, min(2, len(shape)))
        self.dim = bottom[0].count // max(self.rows, 1)
        super().reshape(bottom, top)

    def planned_kept_bytes(self, bottom, top):
        inv_std = self.rows * self.dtype.itemsize if self.normalize_variance else 0
        return super().planned_kept_bytes(bottom, top) + inv_std

    def _row_mean(self, name: str, values=None, stage1=None, args: tuple = ()):
        """The buffer `name` set to each row's mean of `values`, or of stage1's terms (reduce.h)."""
        dims, mean = (1, self.rows, self.dim), self.buffer(name, (self.rows,))
        if values is not None:
            channel_sums_of(self, dims, values, mean, accumulate=False, divisor=self.dim)
        else:
            channel_sums(self, dims, stage1, args, mean, accumulate=False, divisor=self.dim)
        return mean

    def _ones(self):
        ones = self.buffer("ones", (self.rows,))
        ones.fill(1)
        return ones

    def forward(self, bottom, top):
        if bottom[0].count == 0:
            return
        x, rows, dim = bottom[0].get_data(), self.rows, self.dim
        mean = self._row_mean("mean", values=x)
        if self.normalize_variance:
            var = self._row_mean("var", stage1=BATCH_NORM.bn_variance_partials, args=(rows, x, mean))
            inv_std = self.buffer("inv_std", (rows,), kept=True)
            KERNELS.mvn_inv_std(rows, var, self.eps, inv_std, extents=rows)
        else:
            inv_std = self._ones()
        # y may be x (in place): element-wise, after both statistics were taken.
        BATCH_NORM.bn_normalize(rows, dim, rows, 0, rows, x, mean, inv_std, top[0].mutable_data(),
                                extents=(rows, dim))

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or bottom[0].count == 0:
            return
        dy, rows, dim = top[0].get_diff(), self.rows, self.dim
        dx = bottom[0].mutable_diff()  # may be dy (in place): the kernels are element-wise
        mean_dy = self._row_mean("mean_dy", values=dy)
        if self.normalize_variance:
            y = self.kept_output(top)
            mean_dy_y = self._row_mean("mean_dy_y", stage1=REDUCE.product_sum_partials, args=(dy, y))
            BATCH_NORM.bn_backward(rows, dim, rows, dy, y, mean_dy, mean_dy_y, self.buffers["inv_std"], dx,
                                   extents=(rows, dim))
        else:
            BATCH_NORM.bn_normalize(rows, dim, rows, 0, rows, dy, mean_dy, self._ones(), dx,
                                    extents=(rows, dim))
