"""PReLU: y = max(x, 0) + a_c * min(x, 0) with learned slopes a_c, one per channel (axis 1) or one shared.

The slope blob has shape (C,), or no axes at all (shape ()) when channel_shared, as Caffe stores it,
so .caffemodel files interchange.

In place, the layer keeps one byte per element for backward (the sign mask x > 0; x <= 0 is read back
from the output as y / a) when the output survives in the top until backward and no slope is 0, and a
full copy of x otherwise; kernels/prelu.cu says why both give the same bits as not in place. The slope
gradient is summed inside the backward kernel (kernels/reduce.h), deterministically.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..blob import Blob
from ..kernel import KernelFile
from ..layer import NeuronLayer, register
from ..proto import caffe_pb2
from .reduce import channel_sums, channel_sums_of

KERNELS = KernelFile("prelu.cu")


@register("PReLU")
class PReLULayer(NeuronLayer):
    keeps = "input"  # backward needs x (or, lean in place, the mask and y: see lean_keep)

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

    def lean_keep(self, bottom, top):
        # y / a gives x back only where a != 0, and y must still be in the top at backward time.
        if not self.top_data_survives:
            return False
        return bool((backend.to_host(self.blobs[0].get_data()) != 0).all())

    def forward(self, bottom, top):
        x = bottom[0].get_data()
        planes, slope_channels, inner = self._extents(bottom[0])
        y, slope = top[0].mutable_data(), self.blobs[0].get_data()
        positive = self.buffer("positive", x.shape, np.uint8, kept=True) if self.kept_lean else None
        if inner == 1:  # one element per plane: rows of channels instead (the *_rows kernels)
            rows, channels = bottom[0].shape[0], bottom[0].shape[1]
            if positive is None:
                KERNELS.prelu_forward_rows(rows, channels, slope_channels, x, y, slope,
                                           extents=(rows, channels))
            else:
                KERNELS.prelu_forward_masked_rows(rows, channels, slope_channels, x, y, slope, positive,
                                                  extents=(rows, channels))
        elif positive is None:
            KERNELS.prelu_forward(planes, slope_channels, inner, x, y, slope, extents=(planes, inner))
        else:
            KERNELS.prelu_forward_masked(planes, slope_channels, inner, x, y, slope, positive,
                                         extents=(planes, inner))

    def backward(self, top, propagate_down, bottom):
        slope_gradient = self.param_propagate_down[0]
        if not (propagate_down[0] or slope_gradient):
            return
        planes, slope_channels, inner = self._extents(bottom[0])
        if self.kept_lean:
            kept, positive = top[0].get_data(), self.buffers["positive"]
        else:
            kept, positive = self.kept_input(bottom), self.buffer("no_mask", (1,), np.uint8)
        dy = top[0].get_diff()
        dx = bottom[0].mutable_diff() if propagate_down[0] else dy  # dy: not written (write_dx 0)
        # One pass: dx and the slope gradient's partial sums (dx may be dy: the kernel reads first).
        args = (slope_channels, kept, positive, int(self.kept_lean), dy, dx, int(propagate_down[0]),
                self.blobs[0].get_data())
        dims = (planes // slope_channels, slope_channels, inner)  # plane p = n * slope_channels + c
        out = self.blobs[0].mutable_diff() if slope_gradient else None
        if inner == 1:  # rows of channels; each element's term is its own partial (see prelu.cu)
            rows, channels = bottom[0].shape[0], bottom[0].shape[1]
            partial = self.buffer("partial", (planes, 1))  # as channel_sums's, with one lane
            KERNELS.prelu_backward_rows(rows, channels, *args, partial, extents=(rows, channels))
            if out is not None:
                channel_sums_of(self, dims, partial, out)
            return
        channel_sums(self, dims, KERNELS.prelu_backward, args, out)
