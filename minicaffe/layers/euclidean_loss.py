"""EuclideanLoss: sum((a - b)^2) / (2 N), N the first dimension; gradients to both bottoms."""

from __future__ import annotations

from .. import backend
from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("loss.cu")


@register("EuclideanLoss")
class EuclideanLossLayer(Layer):
    exact_num_bottom = 2
    exact_num_top = 1
    default_loss_weight = 1.0

    def reshape(self, bottom, top):
        a, b = bottom
        if top[0] is a or top[0] is b:
            self.fail("the loss top cannot be one of its bottoms (in place)")
        if a.num_axes == 0 or b.num_axes == 0 or a.shape[0] != b.shape[0]:
            self.fail(f"bottoms {list(a.shape)} and {list(b.shape)} need the same first dimension")
        if a.count != b.count:
            self.fail(f"bottoms {list(a.shape)} and {list(b.shape)} need the same number of values "
                      "per item")
        top[0].reshape(())

    def forward(self, bottom, top):
        xp = backend.xp()
        a, b = bottom[0].get_data(), bottom[1].get_data()
        difference = self.buffer("difference", a.shape)  # a - b, also for backward (Caffe's diff_)
        KERNELS.euclidean_diff(a.size, a, b, difference, extents=a.size)
        flat = difference.ravel()
        top[0].mutable_data()[...] = xp.dot(flat, flat) / bottom[0].shape[0] / 2

    def backward(self, top, propagate_down, bottom):
        num = bottom[0].shape[0]
        d = self.buffer("difference", bottom[0].shape)  # as forward left it
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                KERNELS.euclidean_backward(d.size, d, top[0].get_diff(), sign / num,
                                           bottom[i].mutable_diff(), extents=d.size)
