"""SigmoidCrossEntropyLoss: the cross entropy of sigmoid(x) and targets t in [0, 1], computed from x in
Caffe's stable form (kernels/loss.cu), sum over the counted targets / normalizer.

Targets whose value truncates to loss_param.ignore_label count nothing. The normalizer follows
loss_param.normalization; when neither it nor the legacy `normalize` is set, Caffe uses BATCH_SIZE here
(not VALID as SoftmaxWithLoss): the first dimension. Gradient: (sigmoid(x) - t) / normalizer.
"""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register
from .reduce import channel_sums
from .softmax_loss import Mode, loss_normalizer, normalization_mode

KERNELS = KernelFile("loss.cu")


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(Layer):
    exact_num_bottom = 2
    exact_num_top = 1
    default_loss_weight = 1.0

    def layer_setup(self, bottom, top):
        loss_param = self.param.loss_param
        self.has_ignore = loss_param.HasField("ignore_label")
        self.ignore_label = loss_param.ignore_label
        explicit = loss_param.HasField("normalization") or loss_param.HasField("normalize")
        self.normalization = normalization_mode(loss_param) if explicit else Mode.BATCH_SIZE

    def reshape(self, bottom, top):
        x, target = bottom
        if top[0] is x or top[0] is target:
            self.fail("the loss top cannot be one of its bottoms (in place)")
        if x.num_axes == 0 or target.num_axes == 0 or x.shape[0] != target.shape[0]:
            self.fail(f"scores {list(x.shape)} and targets {list(target.shape)} need the same first "
                      "dimension")
        if x.count != target.count:
            self.fail(f"scores {list(x.shape)} and targets {list(target.shape)} need the same count "
                      f"({x.count} != {target.count})")
        self.outer = x.shape[0]
        self.inner = x.count_range(1)
        top[0].reshape(())

    def forward(self, bottom, top):
        valid = self.buffer("valid", (self.outer, self.inner))
        total = self.buffer("total", (1,))
        args = (bottom[0].get_data(), bottom[1].get_data(), valid, int(self.has_ignore), self.ignore_label)
        channel_sums(self, (self.outer, 1, self.inner), KERNELS.sigmoid_cross_entropy_loss_forward, args,
                     total, accumulate=False)
        self.normalizer = loss_normalizer(self, self.normalization, self.outer, self.inner,
                                          valid if self.has_ignore else None)
        top[0].mutable_data()[...] = total[0] / self.normalizer[0]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            self.fail("cannot backpropagate to label inputs (bottom 1, the targets)")
        if not propagate_down[0]:
            return
        KERNELS.sigmoid_cross_entropy_loss_backward(
            self.outer, self.inner, bottom[0].get_data(), bottom[1].get_data(), top[0].get_diff(),
            self.normalizer, bottom[0].mutable_diff(), int(self.has_ignore), self.ignore_label,
            extents=(self.outer, self.inner))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1
