"""Caffe's DataTransformer: mean subtraction, crop, mirror and scale of data-layer inputs.

Runs on the host (numpy), in the data layer's prefetch thread as in Caffe, because the records come
from host memory anyway; the finished batch is copied to the device once. Per element it computes
Caffe's ``(x - mean) * scale`` in the layer's dtype, with the mean taken at the pixel's position in the
uncropped image (mean_file) or per channel (mean_value).

Random choices, Caffe's: a random crop only in TRAIN (TEST takes the centre), and with ``mirror: true``
a coin flip per image in either phase (Caffe's ``do_mirror = mirror && Rand(2)`` has no phase test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import io
from .blob import proto_shape
from .layer import TRAIN
from .proto import caffe_pb2


class TransformError(ValueError):
    """Bad transform_param or data that does not fit it."""


def read_mean_file(path) -> np.ndarray:
    """A mean image from a .binaryproto BlobProto, as (C, H, W) float64."""
    proto = io.read_binary(path, caffe_pb2.BlobProto())
    shape = proto_shape(proto)
    values = np.asarray(proto.double_data or proto.data, dtype=np.float64)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 0 or values.size != math.prod(shape):
        raise io.FormatError(f"{path}: a mean file holds one (1, C, H, W) image, got shape {list(shape)} "
                             f"with {values.size} values")
    return values.reshape(shape)


def legacy_transform_param(layer_param: caffe_pb2.LayerParameter,
                           old=None) -> caffe_pb2.TransformationParameter:
    """transform_param, with the old scale/mean_file/crop_size/mirror of the layer's own parameter `old`
    (data_param by default; image_data_param, window_data_param) moved in where transform_param does not
    set them (what Caffe's upgrade of old nets does)."""
    param = caffe_pb2.TransformationParameter()
    param.CopyFrom(layer_param.transform_param)
    old = layer_param.data_param if old is None else old
    for field in ("scale", "mean_file", "crop_size", "mirror"):
        if old.HasField(field) and not param.HasField(field):
            setattr(param, field, getattr(old, field))
    return param


class DataTransformer:
    def __init__(self, param: caffe_pb2.TransformationParameter, phase: int, dtype=np.float32):
        self.param = param
        self.phase = phase
        self.dtype = np.dtype(dtype)
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.scale = self.dtype.type(param.scale)
        if param.force_color and param.force_gray:
            raise TransformError("cannot set both force_color and force_gray")
        if param.HasField("mean_file") and param.mean_value:
            raise TransformError("cannot specify mean_file and mean_value at the same time")
        self.mean_image = read_mean_file(param.mean_file) if param.HasField("mean_file") else None
        self.mean_values = np.asarray(param.mean_value, dtype=np.float64)
        self._mean_cache: dict[tuple[int, ...], np.ndarray | None] = {}

    def output_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        if self.crop:
            if self.crop > height or self.crop > width:
                raise TransformError(f"crop_size {self.crop} is larger than the {height}x{width} image")
            return channels, self.crop, self.crop
        return channels, height, width

    def _mean(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """The mean to subtract from an image of (C, H, W) `shape` in the output dtype: (C, H, W) for
        mean_file, (C, 1, 1) for mean_value, None for no mean."""
        if shape not in self._mean_cache:
            c = shape[0]
            mean = None
            if self.mean_image is not None:
                if self.mean_image.shape != shape:
                    raise TransformError(f"mean_file {self.param.mean_file} has shape "
                                         f"{list(self.mean_image.shape)}, the data has {list(shape)}")
                mean = self.mean_image.astype(self.dtype)
            elif self.mean_values.size:
                if self.mean_values.size not in (1, c):
                    raise TransformError(f"give 1 mean_value or one per channel ({c}), "
                                         f"got {self.mean_values.size}")
                mean = np.broadcast_to(self.mean_values, (c,)).astype(self.dtype).reshape(c, 1, 1)
            self._mean_cache[shape] = mean
        return self._mean_cache[shape]

    def transform(self, images: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """(N, C, h, w) batch in the output dtype from N (C, H, W) images (uint8 or float).

        Without crop_size all images must have one shape; with it each is cropped from its own size.
        Draws, per image in order: the mirror coin (if mirror), then the crop offsets (TRAIN + crop)."""
        first = images[0].shape
        out = np.empty((len(images), *self.output_shape(*first)), dtype=self.dtype)
        _, height, width = out.shape[1:]
        for i, image in enumerate(images):
            if not self.crop and image.shape != first:
                raise TransformError(f"image {i} of the batch has shape {list(image.shape)}, image 0 "
                                     f"{list(first)}; set crop_size or make them equal")
            if image.shape[0] != first[0]:
                raise TransformError(f"image {i} has {image.shape[0]} channels, image 0 {first[0]}")
            mirror = self.mirror and bool(rng.integers(2))
            h_off = w_off = 0
            if self.crop:
                self.output_shape(*image.shape)  # checks the crop fits this image
                if self.phase == TRAIN:
                    h_off = int(rng.integers(image.shape[1] - self.crop + 1))
                    w_off = int(rng.integers(image.shape[2] - self.crop + 1))
                else:
                    h_off = (image.shape[1] - self.crop) // 2
                    w_off = (image.shape[2] - self.crop) // 2
            rows, cols = slice(h_off, h_off + height), slice(w_off, w_off + width)
            patch = image[:, rows, cols].astype(self.dtype)
            mean = self._mean(image.shape)
            if mean is not None:
                # A mean image is indexed at the pixel's place in the uncropped image, as in Caffe.
                patch -= mean[:, rows, cols] if self.mean_image is not None else mean
            out[i] = patch[:, :, ::-1] if mirror else patch
        if self.scale != 1:
            out *= self.scale
        return out
