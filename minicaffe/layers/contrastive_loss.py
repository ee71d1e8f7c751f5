"""ContrastiveLoss (Hadsell, Chopra, LeCun 2006), Caffe's form: pairs of features a, b (N, ...) and
similarity labels y (one per pair, nonzero = similar once truncated), d = ||a - b||;
loss = sum over pairs of (y ? d^2 : max(margin - d, 0)^2) / (2 N), or with legacy_version
max(margin - d^2, 0) for the dissimilar pairs. Gradients to a and b, none to y. As Caffe's, the gradient
of a dissimilar pair divides by d + 1e-4 (not d), so that d = 0 stays finite."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register
from .reduce import channel_sums

KERNELS = KernelFile("loss.cu")


@register("ContrastiveLoss")
class ContrastiveLossLayer(Layer):
    exact_num_bottom = 3
    exact_num_top = 1
    default_loss_weight = 1.0

    def layer_setup(self, bottom, top):
        param = self.param.contrastive_loss_param
        self.margin = param.margin
        self.legacy = param.legacy_version

    def reshape(self, bottom, top):
        a, b, similar = bottom
        if any(top[0] is blob for blob in bottom):
            self.fail("the loss top cannot be one of its bottoms (in place)")
        if a.num_axes == 0 or b.num_axes == 0 or a.shape[0] != b.shape[0]:
            self.fail(f"features {list(a.shape)} and {list(b.shape)} need the same first dimension (pairs)")
        if a.count != b.count:
            self.fail(f"features {list(a.shape)} and {list(b.shape)} need the same number of values per pair")
        self.num, self.dim = a.shape[0], a.count_range(1)
        if similar.num_axes == 0 or similar.shape[0] != self.num or similar.count != self.num:
            self.fail(f"similarity labels {list(similar.shape)} need one value per pair ({self.num}, as "
                      f"features {list(a.shape)})")
        top[0].reshape(())

    def forward(self, bottom, top):
        a, b = bottom[0].get_data(), bottom[1].get_data()
        difference = self.buffer("difference", (self.num, self.dim))  # a - b, also for backward
        distance_sq = self.buffer("distance_sq", (self.num,))  # d^2 per pair, also for backward
        channel_sums(self, (1, self.num, self.dim), KERNELS.contrastive_loss_distance, (a, b, difference),
                     distance_sq, accumulate=False)
        args = (distance_sq, bottom[2].get_data(), self.margin, int(self.legacy))
        channel_sums(self, (1, 1, self.num), KERNELS.contrastive_loss_forward, args, top[0].mutable_data(),
                     accumulate=False, divisor=2 * self.num)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            self.fail("cannot backpropagate to the similarity labels (bottom 2)")
        difference = self.buffer("difference", (self.num, self.dim))  # as forward left them
        distance_sq = self.buffer("distance_sq", (self.num,))
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                KERNELS.contrastive_loss_backward(self.num, self.dim, difference, distance_sq,
                                                  bottom[2].get_data(), self.margin, int(self.legacy), sign,
                                                  top[0].get_diff(), bottom[i].mutable_diff(),
                                                  extents=(self.num, self.dim))

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2
