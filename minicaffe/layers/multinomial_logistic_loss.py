"""MultinomialLogisticLoss: -sum log(max(p[label], 1e-20)) / N for probabilities p (N, classes...) that
are already normalized (e.g. a Softmax's output) and labels, one per item. 1e-20 is Caffe's
kLOG_THRESHOLD; the gradient, -1 / (N max(p[label], 1e-20)) at the label, uses the same clamp."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register
from .reduce import channel_sums
from .softmax_loss import check_labels

KERNELS = KernelFile("loss.cu")


@register("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(Layer):
    exact_num_bottom = 2
    exact_num_top = 1
    default_loss_weight = 1.0

    def reshape(self, bottom, top):
        prob, label = bottom
        if top[0] is prob or top[0] is label:
            self.fail("the loss top cannot be one of its bottoms (in place)")
        if prob.num_axes == 0 or label.num_axes == 0 or prob.shape[0] != label.shape[0]:
            self.fail(f"probabilities {list(prob.shape)} and labels {list(label.shape)} need the same first "
                      "dimension")
        self.num = prob.shape[0]
        if label.count != self.num:
            self.fail(f"labels {list(label.shape)} have {label.count} values, but probabilities "
                      f"{list(prob.shape)} need one per item ({self.num})")
        self.dim = prob.count_range(1)
        top[0].reshape(())

    def forward(self, bottom, top):
        valid = self.buffer("valid", (self.num,))
        label = bottom[1].get_data()
        args = (bottom[0].get_data(), label, self.dim, valid)
        channel_sums(self, (1, 1, self.num), KERNELS.multinomial_logistic_loss_forward, args,
                     top[0].mutable_data(), accumulate=False, divisor=self.num)
        check_labels(self, valid, label, self.dim,
                     f"probabilities {list(bottom[0].shape)}, {self.dim} classes per item")

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            self.fail("cannot backpropagate to label inputs (bottom 1)")
        if not propagate_down[0]:
            return
        KERNELS.multinomial_logistic_loss_backward(self.num, self.dim, bottom[0].get_data(),
                                                   bottom[1].get_data(), top[0].get_diff(),
                                                   bottom[0].mutable_diff(), extents=(self.num, self.dim))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1
