"""ImageData: batches of image files named in a text list, transformed by transform_param (Caffe's
ImageDataLayer).

image_data_param.source lists one image per line as ``path label``: the label is the text after the
last space (so a path may hold spaces) and must be an integer; blank lines are skipped. Each path is
read as root_folder + path (plain concatenation, as Caffe: give root_folder its trailing slash), with
the bounded file reader, and decoded with Pillow (the optional dependency ``minicaffe[image]``) in
Caffe's (OpenCV's) channel order: BGR with is_color (grey images too get 3 channels), one grey channel
without. With new_height and new_width every image is first resized to that size, bilinearly as
OpenCV's default (pixel centres aligned, rounded back to 8 bits). Without them (and without crop_size)
the images of one batch must have one size; each batch takes the size of its images.

Order: the list as written, wrapping around at the end; with shuffle, as Caffe, each epoch (each pass
over the list) visits it in a new random order, drawn from rng.stream("data", layer name, "epoch", e).
rand_skip starts at a random line below rand_skip, as Caffe. The lines of forward pass f are a pure
function of f (positions skip + f * batch_size onwards), so a resumed run reads the same batches, and
as the Data layer the next batch is prefetched in a background thread. In a data-parallel run rank r of K
reads positions r, r+K, ... in TRAIN (minicaffe.parallel.record), the same order shared out.
"""

from __future__ import annotations

import numpy as np

from .. import parallel, rng
from ..caffe_io import resize_image
from ..data_transformer import DataTransformer, TransformError, legacy_transform_param
from ..db import DBError, decode_image
from ..files import FormatError, excerpt, file_name, read_file
from ..layer import register
from .data import PrefetchingDataLayer


def check_pillow(layer) -> None:
    """Fail naming `layer` when Pillow, which decodes the images, is missing."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        layer.fail(f"{layer.type} decodes images with Pillow: `pip install minicaffe[image]` "
                   "(or `pip install pillow`)")


def read_image(path: str, is_color: bool, where: str) -> np.ndarray:
    """The image file `path` as (C, H, W) uint8 in Caffe's channel order (3 BGR channels with is_color,
    1 grey channel without). Errors (FormatError, DBError) start with `where`."""
    try:
        data = read_file(path)
    except FormatError as error:
        raise FormatError(f"{where}: {error}") from None
    return decode_image(data, force_color=is_color, force_gray=not is_color,
                        where=f"{where}: {file_name(path)}")


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (C, H, W) uint8 image resized to (C, height, width), bilinearly (caffe_io.resize_image, which
    aligns pixel centres as OpenCV's INTER_LINEAR), rounded half up back to uint8 as OpenCV's 8-bit
    result."""
    if image.shape[1:] == (height, width):
        return image
    resized = resize_image(image.transpose(1, 2, 0), (height, width))
    return np.ascontiguousarray(np.clip(np.floor(resized + 0.5), 0, 255).astype(np.uint8).transpose(2, 0, 1))


@register("ImageData")
class ImageDataLayer(PrefetchingDataLayer):
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        param = self.param.image_data_param
        self.batch_size = int(param.batch_size)
        if self.batch_size <= 0:
            self.fail("image_data_param.batch_size must be positive")
        self.new_size = (int(param.new_height), int(param.new_width))
        if (self.new_size[0] > 0) != (self.new_size[1] > 0):
            self.fail(f"image_data_param: set new_height and new_width together (got new_height "
                      f"{self.new_size[0]}, new_width {self.new_size[1]})")
        self.is_color = bool(param.is_color)
        self.root_folder = param.root_folder
        self.shuffle = bool(param.shuffle)
        check_pillow(self)
        self.source = param.source
        self.lines = self._read_list(param.source)
        try:
            self.transformer = DataTransformer(legacy_transform_param(self.param, param), self.phase,
                                               self.dtype)
        except (TransformError, FormatError) as error:
            self.fail(f"transform_param: {error}")
        # Caffe starts at a random line below rand_skip; the draw is keyed, so a resumed run skips the same.
        self.skip = int(rng.shared_stream("data", self.name, "rand_skip").integers(param.rand_skip)) \
            if param.rand_skip else 0
        if self.skip >= len(self.lines):
            self.fail(f"rand_skip skips {self.skip} lines, {param.source} has only {len(self.lines)}")
        self._orders: dict[tuple[int, int], np.ndarray] = {}  # setup's reshape then reads the first batch

    def _read_list(self, source: str) -> list[tuple[str, int, int]]:
        """(image path, label, line number) of each line of the list file."""
        if not source:
            self.fail("image_data_param.source is not set")
        try:
            text = read_file(source).decode()
        except FormatError as error:
            self.fail(f"cannot read the image list: {error}")
        except UnicodeDecodeError:
            self.fail(f"cannot read the image list {file_name(source)}: it is not UTF-8 text")
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            path, space, label = line.rstrip().rpartition(" ")
            where = f"{file_name(source)} line {number}"
            if not space or not path:
                self.fail(f"{where}: expected 'path label', got '{excerpt(line)}'")
            try:
                lines.append((path, int(label), number))
            except ValueError:
                self.fail(f"{where}: the label '{excerpt(label)}' is not an integer")
        if not lines:
            self.fail(f"image list {file_name(source)} names no images")
        return lines

    def _order(self, epoch: int) -> np.ndarray | None:
        """The order of the list in `epoch`: a cached random permutation with shuffle, None without."""
        if not self.shuffle:
            return None
        key = (rng.random_seed(), epoch)
        order = self._orders.get(key)
        if order is None:
            if len(self._orders) > 8:
                self._orders.clear()
            order = rng.shared_stream("data", self.name, "epoch", epoch).permutation(len(self.lines))
            self._orders[key] = order
        return order

    def load_batch(self, index: int) -> list[np.ndarray]:
        images, labels, wheres = [], np.empty(self.batch_size, dtype=self.dtype), []
        for i in range(self.batch_size):
            epoch, position = divmod(self.skip + parallel.record(index * self.batch_size + i, self.phase),
                                     len(self.lines))
            order = self._order(epoch)
            path, labels[i], number = self.lines[int(order[position]) if order is not None else position]
            where = f"{file_name(self.source)} line {number}"
            try:
                image = read_image(self.root_folder + path, self.is_color, where)
            except (FormatError, DBError) as error:
                self.fail(str(error))
            if self.new_size[0]:
                image = resize_uint8(image, *self.new_size)
            if not self.transformer.crop and images and image.shape != images[0].shape:
                self.fail(f"{where}: image {file_name(self.root_folder + path)} is {image.shape[2]}x"
                          f"{image.shape[1]} (width x height), the batch's first image ({wheres[0]}) "
                          f"{images[0].shape[2]}x{images[0].shape[1]}; set new_height and new_width "
                          "(or crop_size) to batch images of different sizes")
            images.append(image)
            wheres.append(where)
        try:
            data = self.transformer.transform(images, rng.stream("data", self.name, index))
        except TransformError as error:
            lines = ", ".join(where.rpartition(" ")[2] for where in wheres)
            self.fail(f"{file_name(self.source)}, the batch of lines {lines}: {error}")
        return [data, labels]
