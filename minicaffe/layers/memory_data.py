"""MemoryData: batches from arrays held in memory (Caffe's MemoryDataLayer, pycaffe's set_input_arrays).

    net.set_input_arrays(data, labels)   # data (n, channels, height, width), labels (n,)
    net.forward()                        # the first batch_size rows, then the next, wrapping around

As Caffe's Reset(), the arrays are used as given: no transform_param is applied. n must be a multiple
of batch_size. The batch of a forward pass is counted from the first forward after set_input_arrays.
"""

from __future__ import annotations

import numpy as np

from ..layer import Layer, register


@register("MemoryData")
class MemoryDataLayer(Layer):
    exact_num_bottom = 0
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        param = self.param.memory_data_param
        self.batch_size = int(param.batch_size)
        self.item_shape = (int(param.channels), int(param.height), int(param.width))
        if self.batch_size <= 0 or min(self.item_shape) <= 0:
            self.fail("memory_data_param batch_size, channels, height and width must be given and "
                      f"positive, got batch_size {self.batch_size}, shape {list(self.item_shape)}")
        self.data: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.first_index: int | None = None

    def set_input_arrays(self, data, labels) -> None:
        """Use `data` (n, C, H, W) and `labels` (n,) (or (n, 1, 1, 1), as pycaffe passes them)."""
        data = np.ascontiguousarray(data, dtype=self.dtype)
        labels = np.asarray(labels)
        if labels.ndim == 4 and labels.shape[1:] == (1, 1, 1):
            labels = labels.reshape(-1)
        labels = np.ascontiguousarray(labels, dtype=self.dtype)
        if data.ndim != 4 or data.shape[1:] != self.item_shape:
            self.fail(f"set_input_arrays: data must have shape (n, {', '.join(map(str, self.item_shape))}) "
                      f"from memory_data_param, got {list(data.shape)}")
        if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
            self.fail(f"set_input_arrays: labels must have shape ({data.shape[0]},) to match the data, "
                      f"got {list(labels.shape)}")
        if data.shape[0] == 0 or data.shape[0] % self.batch_size:
            self.fail(f"set_input_arrays: the number of items ({data.shape[0]}) must be a positive "
                      f"multiple of batch_size ({self.batch_size})")
        self.data, self.labels, self.first_index = data, labels, None

    def reshape(self, bottom, top):
        top[0].reshape((self.batch_size, *self.item_shape))
        top[1].reshape((self.batch_size,))

    def forward(self, bottom, top):
        if self.data is None:
            self.fail("no data: call net.set_input_arrays(data, labels) (or the layer's) before forward")
        if self.first_index is None:
            self.first_index = self.forward_index
        batches = self.data.shape[0] // self.batch_size
        start = ((self.forward_index - self.first_index) % batches) * self.batch_size
        top[0].set_data(self.data[start:start + self.batch_size])
        top[1].set_data(self.labels[start:start + self.batch_size])
