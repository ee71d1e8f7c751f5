"""HingeLoss: Caffe's one-vs-all hinge loss of scores (N, classes...) and labels (one per item):
sum over items and classes of max(0, 1 + s x)^p / N, with s = -1 for the item's class and +1 for the
others, p = 1 (hinge_loss_param.norm L1, the default) or 2 (L2)."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register
from .reduce import channel_sums
from .softmax_loss import check_labels

KERNELS = KernelFile("loss.cu")


@register("HingeLoss")
class HingeLossLayer(Layer):
    exact_num_bottom = 2
    exact_num_top = 1
    default_loss_weight = 1.0

    def layer_setup(self, bottom, top):
        self.norm = self.param.hinge_loss_param.norm  # L1 = 1 or L2 = 2 (protobuf refuses others)

    def reshape(self, bottom, top):
        x, label = bottom
        if top[0] is x or top[0] is label:
            self.fail("the loss top cannot be one of its bottoms (in place)")
        if x.num_axes == 0 or label.num_axes == 0 or x.shape[0] != label.shape[0]:
            self.fail(f"scores {list(x.shape)} and labels {list(label.shape)} need the same first dimension")
        self.num = x.shape[0]
        if label.count != self.num:
            self.fail(f"labels {list(label.shape)} have {label.count} values, but scores {list(x.shape)} "
                      f"need one per item ({self.num})")
        self.dim = x.count_range(1)
        top[0].reshape(())

    def forward(self, bottom, top):
        valid = self.buffer("valid", (self.num,))
        label = bottom[1].get_data()
        args = (bottom[0].get_data(), label, int(self.norm), valid)
        channel_sums(self, (self.num, 1, self.dim), KERNELS.hinge_loss_forward, args, top[0].mutable_data(),
                     accumulate=False, divisor=self.num)
        check_labels(self, valid, label, self.dim,
                     f"scores {list(bottom[0].shape)}, {self.dim} classes per item")

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            self.fail("cannot backpropagate to label inputs (bottom 1)")
        if not propagate_down[0]:
            return
        KERNELS.hinge_loss_backward(self.num, self.dim, bottom[0].get_data(), bottom[1].get_data(),
                                    int(self.norm), top[0].get_diff(), bottom[0].mutable_diff(),
                                    extents=(self.num, self.dim))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1
