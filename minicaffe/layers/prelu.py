"""PReLU: y = max(x, 0) + a_c * min(x, 0) with learned slopes a_c, one per channel (axis 1) or one shared.

The slope blob has shape (C,), or no axes at all (shape ()) when channel_shared, as Caffe stores it,
so .caffemodel files interchange.
"""

from __future__ import annotations

from ..blob import Blob
from ..kernel import KernelFile
from ..layer import NeuronLayer, register
from ..proto import caffe_pb2

KERNELS = KernelFile("prelu.cu")


@register("PReLU")
class PReLULayer(NeuronLayer):
    keeps = "input"  # backward needs x

    def layer_setup(self, bottom, top):
        param = self.param.prelu_param
        self.channel_shared = param.channel_shared
        self._check_bottom(bottom[0])
        default = caffe_pb2.FillerParameter(type="constant", value=0.25)  # Caffe's initial slope
        filler = param.filler if param.HasField("filler") else default
        self.setup_params([self._slope_shape(bottom[0])], [filler])

    def _check_bottom(self, blob: Blob) -> None:
        if blob.num_axes < 2:
            self.fail(f"needs a bottom with at least 2 axes (axis 1 = channels), "
                      f"got shape {list(blob.shape)}")

    def _slope_shape(self, blob: Blob) -> tuple[int, ...]:
        return () if self.channel_shared else (blob.shape[1],)

    def reshape(self, bottom, top):
        # Checked on every reshape, not only in setup: the bottom may change its channel count later,
        # and the slope blob may have been replaced or reshaped after setup.
        self._check_bottom(bottom[0])
        expected = self._slope_shape(bottom[0])
        if self.blobs[0].shape != expected:
            wanted = "one channel-shared slope" if self.channel_shared else f"{expected[0]} slopes"
            self.fail(f"slope blob has shape {list(self.blobs[0].shape)}, but the bottom of shape "
                      f"{list(bottom[0].shape)} needs {wanted}: shape {list(expected)}")
        super().reshape(bottom, top)

    def _extents(self, blob: Blob) -> tuple[int, int, int]:
        """(planes, slope_channels, inner) for the kernels; a plane is one (n, c)."""
        planes = blob.shape[0] * blob.shape[1]
        return planes, 1 if self.channel_shared else blob.shape[1], blob.count_range(2)

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        planes, slope_channels, inner = self._extents(bottom[0])
        KERNELS.prelu_forward(planes, slope_channels, inner, x, top[0].mutable_data(),
                              self.blobs[0].get_data(), extents=(planes, inner))

    def backward(self, top, propagate_down, bottom):
        x = self.kept_input(bottom)
        dy = top[0].get_diff()
        planes, slope_channels, inner = self._extents(bottom[0])
        # The slope gradient first: in place, dx (below) overwrites dy, which is the same memory.
        if self.param_propagate_down[0]:
            # Per-element terms of the slope gradient, summed per channel by the array module.
            terms = self.buffer("slope_terms", x.shape)
            KERNELS.prelu_slope_terms(x.size, x, dy, terms, extents=x.size)
            if self.channel_shared:
                gradient = terms.sum()
            else:
                gradient = terms.reshape(bottom[0].shape[0], slope_channels, inner).sum(axis=(0, 2))
            self.blobs[0].mutable_diff()[...] += gradient
        if propagate_down[0]:
            KERNELS.prelu_backward(planes, slope_channels, inner, x, dy, bottom[0].mutable_diff(),
                                   self.blobs[0].get_data(), extents=(planes, inner))
