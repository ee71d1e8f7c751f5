"""HDF5Output: writes its two bottoms to an HDF5 file as the datasets "data" and "label" (Caffe's
HDF5OutputLayer).

As Caffe, setup creates (or truncates) hdf5_output_param.file_name, and every forward writes the two
bottoms as 4-D datasets (num, channels, height, width: a (N, K) bottom becomes (N, K, 1, 1)) in the net's
dtype (float32, or float64 for a double net). Caffe adds the datasets to the file it keeps open, so its
second forward fails (the datasets exist already); here every forward replaces the file whole with that
forward's batch, written through io.write_atomic: the file is always closed and complete, a crash leaves
the previous batch's file. It has no tops and nothing to differentiate: backward writes zero gradients.
"""

from __future__ import annotations

import numpy as np

from .. import backend, hdf5
from ..io import file_name
from ..layer import Layer, register


@register("HDF5Output")
class HDF5OutputLayer(Layer):
    exact_num_bottom = 2
    exact_num_top = 0

    def layer_setup(self, bottom, top):
        self.file_name = self.param.hdf5_output_param.file_name
        if not self.file_name:
            self.fail("hdf5_output_param.file_name is not set")
        try:
            hdf5.h5py("the HDF5Output layer")
        except ImportError as error:
            self.fail(str(error))
        self._write({})  # as Caffe's H5Fcreate: an unwritable place is an error at setup

    def reshape(self, bottom, top):
        for blob, name in zip(bottom, ("data", "label")):
            if blob.num_axes > 4 or blob.num_axes == 0:
                self.fail(f"bottom '{name}' has shape {list(blob.shape)}; Caffe's HDF5Output writes "
                          "(num, channels, height, width) datasets, of 1 to 4 axes")
        if bottom[0].num != bottom[1].num:
            self.fail(f"data and label must have the same batch size (num), got {list(bottom[0].shape)} "
                      f"and {list(bottom[1].shape)}")

    def forward(self, bottom, top):
        self._write({name: backend.to_host(blob.get_data()).reshape(blob.num, blob.channels, blob.height,
                                                                   blob.width)
                     for blob, name in zip(bottom, ("data", "label"))})

    def _write(self, datasets: dict[str, np.ndarray]) -> None:
        def fill(handle) -> None:
            for name, array in datasets.items():
                handle.create_dataset(name, data=np.asarray(array, dtype=self.dtype))

        try:
            hdf5.write(self.file_name, fill)
        except OSError as error:
            self.fail(f"{file_name(self.file_name)}: {error.strerror}")

    def backward(self, top, propagate_down, bottom):
        for blob, down in zip(bottom, propagate_down):
            if down:
                blob.mutable_diff()[...] = 0
