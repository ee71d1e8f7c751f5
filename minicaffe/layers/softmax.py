"""Softmax over one axis (softmax_param.axis, default 1), numerically stable (max subtracted)."""

from __future__ import annotations

from ..kernel import KernelFile
from ..layer import Layer, register

KERNELS = KernelFile("softmax.cu")


@register("Softmax")
class SoftmaxLayer(Layer):
    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        try:
            self.axis = bottom[0].canonical_axis(self.param.softmax_param.axis)
        except ValueError as error:
            self.fail(str(error))
        self.outer = bottom[0].count_range(0, self.axis)
        self.channels = bottom[0].shape[self.axis]
        self.inner = bottom[0].count_range(self.axis + 1)
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        # Correct in place: the kernel reads each element before it writes it.
        KERNELS.softmax_forward(self.outer, self.channels, self.inner, bottom[0].get_data(),
                                top[0].mutable_data(), self._scratch(), extents=(self.outer, self.inner),
                                work=top[0].count)  # a row's channels are its plane's loops

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # Uses only the top data and diff, so in place (top diff is bottom diff) is fine too.
        KERNELS.softmax_backward(self.outer, self.channels, self.inner, top[0].get_data(),
                                 top[0].get_diff(), bottom[0].mutable_diff(), self._scratch(),
                                 extents=(self.outer, self.inner), work=top[0].count)

    def _scratch(self):
        """Room for two running values (max and sum, or dot) per softmax vector, reused between calls."""
        return self.buffer("scratch", (max(2 * self.outer * self.inner, 1),))
