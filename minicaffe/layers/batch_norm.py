"""BatchNorm: y = (x - mean[c]) / sqrt(var[c] + eps) per channel (axis 1), as Caffe's BatchNormLayer.

Three blobs, Caffe's layout: running mean sum (C,), running variance sum (C,) and their weight (1,).
Training with batch statistics also updates them: weight = weight * f + 1, mean = mean * f + batch
mean, var = var * f + m / (m - 1) * batch var (m values per channel, f = moving_average_fraction).
With use_global_stats (default in TEST) the statistics are mean / weight and var / weight.
The blobs are never learned: as Caffe, the layer gives them lr_mult 0 and computes no gradient.
No scale or shift: Caffe nets follow BatchNorm with a Scale layer (bias_term: true).
"""

from __future__ import annotations

from .. import backend
from ..kernel import KernelFile
from ..layer import TEST, NeuronLayer, register
from .reduce import KERNELS as REDUCE
from .reduce import channel_sums, channel_sums_of, paired_channel_sums

KERNELS = KernelFile("batch_norm.cu")
# The batch-statistics forward reads x twice: its channel statistics, then the normalization. On the CPU a
# blob bigger than this many bytes goes through in groups of channels of at most this size, statistics
# then normalization for each group, so that the second read finds the group still in the caches.
STATS_CACHE_LIMIT = 1 << 23


@register("BatchNorm")
class BatchNormLayer(NeuronLayer):
    # Set by the Net when the in-place Scale after this layer normalizes in its own pass or gives this
    # layer's input gradient with its own (ScaleLayer.normalizing / propagating_for): then forward only
    # computes the statistics, and backward does nothing.
    scale_normalizes = False
    scale_propagates = False

    def layer_setup(self, bottom, top):
        p = self.param.batch_norm_param
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") else self.phase == TEST
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        if bottom[0].num_axes == 0:
            self.fail("needs a bottom with at least one axis, got a scalar")
        self.channels = bottom[0].shape[1] if bottom[0].num_axes > 1 else 1
        for index, shape in enumerate([(self.channels,), (self.channels,), (1,)]):
            if not self.check_param_blob(index, shape):
                self.add_param_blob(shape)  # zeros
        # Caffe masks the statistics from the solver with lr_mult 0 (the Net reads these specs).
        for index in range(len(self.blobs)):
            if index == len(self.param.param):
                self.param.param.add(lr_mult=0.0)
            elif self.param.param[index].lr_mult != 0:
                self.fail("cannot configure batch normalization statistics as layer parameters "
                          f"(param {index} has lr_mult {self.param.param[index].lr_mult}; use 0)")
        self.param_propagate_down = [False] * len(self.blobs)
        # The batch-statistics backward needs y (x normalized): kept, since a later in-place layer
        # (typically Scale) may overwrite the top.
        self.keeps = None if self.use_global_stats else "output"

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        channels = shape[1] if len(shape) > 1 else 1
        if len(shape) == 0 or channels != self.channels:
            self.fail(f"bottom shape {list(shape)} does not have the {self.channels} channels (axis 1) "
                      "the layer was set up with")
        super().reshape(bottom, top)

    def planned_kept_bytes(self, bottom, top):
        return super().planned_kept_bytes(bottom, top) + self.channels * self.dtype.itemsize  # inv_std

    def _dims(self, blob) -> tuple[int, int, int]:
        num, channels = blob.shape[0], self.channels
        return num, channels, blob.count // max(num * channels, 1)

    def _channel_mean(self, bottom, name: str, values=None, stage1=None, args: tuple = ()):
        """The buffer `name` set to the mean over num and spatial per channel of `values` or of stage1's
        terms (a reduce.h stage-1 kernel over the (n, c) planes): Caffe's gemv sums, here deterministic
        kernels (layers/reduce.py)."""
        num, channels, spatial = self._dims(bottom)
        mean = self.buffer(name, (channels,))
        if values is not None:
            channel_sums_of(self, (num, channels, spatial), values, mean, accumulate=False,
                            divisor=num * spatial)
        else:
            channel_sums(self, (num, channels, spatial), stage1, args, mean, accumulate=False,
                         divisor=num * spatial)
        return mean

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        num, channels, spatial = self._dims(bottom[0])
        planes = num * channels
        inv_std = self.buffer("inv_std", (channels,), kept=True)  # also for backward
        y = top[0].mutable_data()  # may be x (in place): normalizing is element-wise
        if self.use_global_stats:
            mean = self.buffer("mean", (channels,))
            weight = float(backend.to_host(self.blobs[2].get_data()).reshape(-1)[0])
            factor = 0.0 if weight == 0 else 1.0 / weight
            KERNELS.bn_channel_stats(channels, self.blobs[0].get_data(), self.blobs[1].get_data(), factor,
                                     self.eps, mean, inv_std, extents=channels)
            if not self.scale_normalizes:
                KERNELS.bn_normalize(planes, spatial, channels, 0, channels, x, mean, inv_std, y,
                                     extents=(planes, spatial))
            return
        dims = (num, channels, spatial)
        batch_mean, batch_var = self.buffer("batch_mean", (channels,)), self.buffer("batch_var", (channels,))
        shift = self.buffer("shift", (channels,))
        if x.size:
            shift[...] = x.reshape(dims)[0, :, 0]
        group = self._group_channels(dims)
        for first in range(0, channels, group):  # y may be x: a group writes only its own channels
            self._batch_statistics(x, dims, first, group, shift, batch_mean, batch_var, inv_std)
            KERNELS.bn_normalize(num * group, spatial, channels, first, group, x, batch_mean, inv_std, y,
                                 extents=(num * group, spatial))
        self._update_running_stats(batch_mean, batch_var, num * spatial)

    def _group_channels(self, dims: tuple[int, int, int]) -> int:
        """Channels per group for the batch-statistics forward: all of them on the GPU and for a blob of
        at most STATS_CACHE_LIMIT bytes, else the most that fit in it and divide the channels (equal
        groups, so the scratch buffers keep their size)."""
        num, channels, spatial = dims
        channel_bytes = num * spatial * self.dtype.itemsize
        if backend.on_gpu() or channel_bytes * channels <= STATS_CACHE_LIMIT:
            return channels
        group = max(1, STATS_CACHE_LIMIT // channel_bytes)  # < channels: the blob is over the limit
        while channels % group:
            group -= 1
        return group

    def _batch_statistics(self, x, dims: tuple[int, int, int], first: int, group: int, shift, batch_mean,
                          batch_var, inv_std) -> None:
        """For the channels first .. first + group - 1: batch_mean and batch_var (the mean and the biased
        variance over num and spatial) and inv_std = 1 / sqrt(var + eps), from one read of x
        (bn_moment_partials: sums of x - shift and of its square, shift a value of the channel, then both
        totalled in one deterministic stage 2: layers/reduce.py). A channel's sums have the same bits
        in any group."""
        num, channels, spatial = dims
        means = paired_channel_sums(self, (num, group, spatial), KERNELS.bn_moment_partials,
                                    (channels, first, group, x, shift), "moment_means",
                                    divisor=num * spatial)  # of x - shift, then its square
        part = slice(first, first + group)
        KERNELS.bn_batch_stats(group, shift[part], means[:group], means[group:], self.eps, batch_mean[part],
                               batch_var[part], inv_std[part], extents=group)

    def _update_running_stats(self, batch_mean, batch_var, m: int) -> None:
        correction = m / (m - 1) if m > 1 else 1.0  # the stored variance is the unbiased estimate
        KERNELS.bn_update_running(self.channels, batch_mean, batch_var, self.blobs[0].mutable_data(),
                                  self.blobs[1].mutable_data(), self.blobs[2].mutable_data(),
                                  self.moving_average_fraction, correction, extents=self.channels)

    def statistics(self):
        """The per-channel mean and 1 / sqrt(var + eps) that the last global-statistics forward used."""
        return self.buffers["mean"], self.buffers["inv_std"]

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or self.scale_propagates:
            return
        dy = top[0].get_diff()
        dx = bottom[0].mutable_diff()  # may be dy (in place): both kernels are element-wise
        num, channels, spatial = self._dims(bottom[0])
        planes = num * channels
        inv_std = self.buffer("inv_std", (channels,))  # as forward left it
        if self.use_global_stats:
            # The statistics are constants here: dx = dy / sqrt(var + eps).
            zero = self.buffer("zero", (channels,))
            zero.fill(0)
            KERNELS.bn_normalize(planes, spatial, channels, 0, channels, dy, zero, inv_std, dx,
                                 extents=(planes, spatial))
            return
        y = self.kept_output(top)
        mean_dy = self._channel_mean(bottom[0], "mean_dy", values=dy)
        mean_dy_y = self._channel_mean(bottom[0], "mean_dy_y", stage1=REDUCE.product_sum_partials,
                                       args=(dy, y))
        KERNELS.bn_backward(planes, spatial, channels, dy, y, mean_dy, mean_dy_y, inv_std, dx,
                            extents=(planes, spatial))

