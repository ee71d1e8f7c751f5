"""pycaffe's caffe.io: images to net inputs and back (Transformer, load_image, resize_image,
oversample) and arrays to and from BlobProto / Datum.

Scripts reach these as ``caffe.io.<name>`` after ``import minicaffe as caffe``: minicaffe.io, the module
that reads and writes Caffe's files, imports them from here, so both kinds of name live under one
``caffe.io`` as they do in pycaffe.
"""

from __future__ import annotations

import numpy as np

from . import db
from .blob import proto_shape, proto_values
from .files import read_file
from .proto import caffe_pb2

__all__ = ["Transformer", "load_image", "resize_image", "oversample", "blobproto_to_array",
           "array_to_blobproto", "arraylist_to_blobprotovector_str", "blobprotovector_str_to_arraylist",
           "array_to_datum", "datum_to_array"]


def load_image(filename: str, color: bool = True) -> np.ndarray:
    """An image as float32 H x W x 3 (RGB) in [0, 1], or H x W x 1 with color=False (pycaffe's
    caffe.io.load_image; reads with Pillow, refusing images over Pillow's pixel limit)."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImportError("caffe.io.load_image needs Pillow: pip install pillow") from None
    chw = db.decode_image(read_file(filename), force_color=color, force_gray=not color,
                          where=str(filename))
    hwc = chw[::-1].transpose(1, 2, 0) if color else chw.transpose(1, 2, 0)  # BGR -> RGB
    return hwc.astype(np.float32) / 255.0


def _linear_axis(size: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre aligned sample positions: lower index, upper index and weight of the upper."""
    position = (np.arange(new) + 0.5) * size / new - 0.5
    position = np.clip(position, 0, size - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, size - 1)
    return low, high, (position - low).astype(np.float32)


def resize_image(im: np.ndarray, new_dims, interp_order: int = 1) -> np.ndarray:
    """Resize an H x W x K image to new_dims (height, width): interp_order 1 bilinear (pixel centres
    aligned, edges clamped), 0 nearest. float32 out, as pycaffe's caffe.io.resize_image."""
    im = np.asarray(im, dtype=np.float32)
    if im.ndim != 3:
        raise ValueError(f"resize_image takes an H x W x K image, got shape {list(im.shape)}")
    new_h, new_w = (int(d) for d in new_dims)
    h, w = im.shape[:2]
    if (new_h, new_w) == (h, w):
        return im.copy()
    if interp_order == 0:
        rows = np.minimum(((np.arange(new_h) + 0.5) * h / new_h).astype(int), h - 1)
        cols = np.minimum(((np.arange(new_w) + 0.5) * w / new_w).astype(int), w - 1)
        return im[rows][:, cols]
    if interp_order != 1:
        raise ValueError(f"resize_image supports interp_order 0 or 1, got {interp_order}")
    r0, r1, rw = _linear_axis(h, new_h)
    c0, c1, cw = _linear_axis(w, new_w)
    rows = im[r0] * (1 - rw)[:, None, None] + im[r1] * rw[:, None, None]
    return rows[:, c0] * (1 - cw)[None, :, None] + rows[:, c1] * cw[None, :, None]


def oversample(images, crop_dims) -> np.ndarray:
    """pycaffe's 10-view crops: the four corners and the centre of each H x W x K image, and their
    mirrors; returns (10 * N) x crop_h x crop_w x K float32."""
    images = [np.asarray(im, dtype=np.float32) for im in images]
    h, w, k = images[0].shape
    ch, cw = (int(d) for d in crop_dims)
    if ch > h or cw > w:
        raise ValueError(f"crop {ch}x{cw} is larger than the image {h}x{w}")
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw),
               (int(h / 2.0 - ch / 2.0), int(w / 2.0 - cw / 2.0))]
    crops = np.empty((10 * len(images), ch, cw, k), dtype=np.float32)
    for n, im in enumerate(images):
        views = [im[y:y + ch, x:x + cw] for y, x in corners]
        crops[10 * n:10 * n + 5] = views
        crops[10 * n + 5:10 * n + 10] = [view[:, ::-1] for view in views]
    return crops


def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) as an array of its shape (legacy num/channels/height/width too)."""
    return proto_values(blob, diff=return_diff).reshape(proto_shape(blob))


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    """An N-d array (and optional diff of the same shape) as a BlobProto."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(np.float32).ravel().tolist())
    if diff is not None:
        diff = np.asarray(diff)
        if diff.shape != arr.shape:
            raise ValueError(f"diff shape {list(diff.shape)} differs from data shape {list(arr.shape)}")
        blob.diff.extend(diff.astype(np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    vector = caffe_pb2.BlobProtoVector()
    vector.blobs.extend(array_to_blobproto(arr) for arr in arraylist)
    return vector.SerializeToString()


def blobprotovector_str_to_arraylist(text: bytes) -> list[np.ndarray]:
    vector = caffe_pb2.BlobProtoVector()
    vector.ParseFromString(text)
    return [blobproto_to_array(blob) for blob in vector.blobs]


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """A (C, H, W) array as a Datum (pycaffe's signature: label None means 0)."""
    return db.array_to_datum(arr, 0 if label is None else label)


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    return db.datum_to_array(datum)


class Transformer:
    """pycaffe's caffe.io.Transformer: H x W x K images -> the net's K x H x W input and back.

    preprocess: resize to the input's H x W, transpose, channel swap, raw scale, subtract mean,
    input scale (in that order); deprocess undoes them (except the resize)."""

    def __init__(self, inputs: dict[str, tuple[int, ...]]):
        self.inputs = {name: tuple(int(d) for d in shape) for name, shape in inputs.items()}
        self.transpose: dict[str, tuple[int, ...]] = {}
        self.channel_swap: dict[str, tuple[int, ...]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check_input(self, name: str) -> None:
        if name not in self.inputs:
            raise ValueError(f"{name} is not one of the net inputs: {list(self.inputs)}")

    def preprocess(self, name: str, data: np.ndarray) -> np.ndarray:
        self._check_input(name)
        x = np.asarray(data, dtype=np.float32)
        size = self.inputs[name][2:]
        if x.shape[:2] != size:
            x = resize_image(x, size)
        if name in self.transpose:
            x = x.transpose(self.transpose[name])
        if name in self.channel_swap:
            x = x[list(self.channel_swap[name]), :, :]
        x = np.array(x, dtype=np.float32)  # own copy: the steps below work in place
        if name in self.raw_scale:
            x *= self.raw_scale[name]
        if name in self.mean:
            x -= self.mean[name]
        if name in self.input_scale:
            x *= self.input_scale[name]
        return x

    def deprocess(self, name: str, data: np.ndarray) -> np.ndarray:
        self._check_input(name)
        x = np.array(data, dtype=np.float32).squeeze()
        if name in self.input_scale:
            x /= self.input_scale[name]
        if name in self.mean:
            x += self.mean[name]
        if name in self.raw_scale:
            x /= self.raw_scale[name]
        if name in self.channel_swap:
            x = x[np.argsort(self.channel_swap[name]), :, :]
        if name in self.transpose:
            x = x.transpose(np.argsort(self.transpose[name]))
        return x

    def set_transpose(self, name: str, order) -> None:
        self._check_input(name)
        if len(order) != len(self.inputs[name]) - 1:
            raise ValueError("Transpose order needs to have the same number of dimensions as the input.")
        self.transpose[name] = tuple(order)

    def set_channel_swap(self, name: str, order) -> None:
        self._check_input(name)
        if len(order) != self.inputs[name][1]:
            raise ValueError("Channel swap needs to have the same number of dimensions as the input "
                             "channels.")
        self.channel_swap[name] = tuple(order)

    def set_raw_scale(self, name: str, scale: float) -> None:
        self._check_input(name)
        self.raw_scale[name] = scale

    def set_input_scale(self, name: str, scale: float) -> None:
        self._check_input(name)
        self.input_scale[name] = scale

    def set_mean(self, name: str, mean: np.ndarray) -> None:
        """A per-channel mean (shape (K,)) or an elementwise mean (K x H x W, resized if needed)."""
        self._check_input(name)
        mean = np.asarray(mean, dtype=np.float32)
        channels, size = self.inputs[name][1], self.inputs[name][2:]
        if mean.ndim == 1:
            if mean.shape[0] != channels:
                raise ValueError("Mean channels incompatible with input.")
            mean = mean[:, None, None]
        else:
            if mean.ndim == 2:
                mean = mean[None]
            if mean.ndim != 3:
                raise ValueError("Mean shape invalid")
            if mean.shape[0] != channels:
                raise ValueError("Mean channels incompatible with input.")
            if mean.shape[1:] != size:
                mean = resize_image(mean.transpose(1, 2, 0), size).transpose(2, 0, 1)
        self.mean[name] = mean

