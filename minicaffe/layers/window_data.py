"""WindowData: batches of object windows cut out of images and warped to crop_size (Caffe's
WindowDataLayer, R-CNN's fine-tuning input).

window_data_param.source is R-CNN's window file; whitespace separates its fields, and per image it holds

    # image_index
    image_path
    channels
    height
    width
    num_windows
    class_index overlap x1 y1 x2 y2      (num_windows such lines; pixel corners, inclusive)

Images are listed in order from index 0, paths are read as root_folder + path (plain concatenation, as
Caffe) with the bounded file reader and decoded with Pillow (``minicaffe[image]``) in colour, as Caffe's
OpenCV reads them: 3 channels, BGR. A window whose overlap is at least fg_threshold is foreground (its
class must be positive), one whose overlap is below bg_threshold is background (label 0); the others are
not used. Every batch holds batch_size - int(batch_size * fg_fraction) background windows and then the
foreground ones, each drawn at random (with replacement) from its set, then a mirror coin with mirror.

Each window is cut out and warped (bilinearly, rounded to 8 bits as OpenCV's INTER_LINEAR) to crop_size
x crop_size. With context_pad (or crop_mode "square", which first makes the window square around its
centre) the window is enlarged so that, once warped, context_pad pixels of context surround it; where the
enlarged window leaves the image the batch keeps zeros, as in Caffe. Then (pixel - mean) * scale, with
the mean from mean_file (its centre crop_size square) or mean_value (per channel).

crop_size and mirror come from transform_param (Caffe's legacy window_data_param fields are used where
transform_param does not set them); scale is window_data_param's (Caffe's WindowData ignores
transform_param.scale; here it is used when window_data_param.scale is not set). Random draws come from
rng.stream("data", layer name, forward index), so a resumed run reads the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from .. import rng
from ..data_transformer import legacy_transform_param, read_mean_file
from ..db import DBError, decode_image
from ..files import FormatError, excerpt, file_name, read_file
from ..layer import register
from .data import PrefetchingDataLayer
from .image_data import check_pillow, read_image, resize_uint8

CHANNELS = 3  # images are read in colour, as Caffe's cv::imread(..., CV_LOAD_IMAGE_COLOR)


@dataclass
class Window:
    image: int  # index into the listed images
    label: int
    x1: int
    y1: int
    x2: int
    y2: int
    line: int  # of the window file, for messages


@dataclass
class ListedImage:
    path: str
    height: int
    width: int
    line: int


def where(source: str, line: int) -> str:
    return f"{file_name(source)} line {line}"


def round_half_away(value) -> int:
    """C's round(): halves away from zero (Python's round() goes to even)."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


@register("WindowData")
class WindowDataLayer(PrefetchingDataLayer):
    exact_num_top = 2

    def layer_setup(self, bottom, top):
        param = self.param.window_data_param
        transform = legacy_transform_param(self.param, param)
        self.batch_size = int(param.batch_size)
        if self.batch_size <= 0:
            self.fail("window_data_param.batch_size must be positive")
        self.crop = int(transform.crop_size)
        if self.crop <= 0:
            self.fail("WindowData needs transform_param.crop_size, the size windows are warped to")
        self.context_pad = int(param.context_pad)
        if 2 * self.context_pad >= self.crop:
            self.fail(f"context_pad {self.context_pad} leaves nothing of crop_size {self.crop} "
                      "(2 * context_pad must be below crop_size)")
        if param.crop_mode not in ("warp", "square"):
            self.fail(f"crop_mode must be 'warp' or 'square', got '{excerpt(param.crop_mode)}'")
        self.square = param.crop_mode == "square"
        if not 0 <= param.fg_fraction <= 1:
            self.fail(f"fg_fraction must be between 0 and 1, got {param.fg_fraction}")
        self.num_fg = int(np.float32(self.batch_size) * np.float32(param.fg_fraction))
        self.mirror = bool(transform.mirror)
        self.scale = self.dtype.type(param.scale if param.HasField("scale") else transform.scale)
        self.root_folder = param.root_folder
        self.source = param.source
        check_pillow(self)
        self._read_window_file(param)
        self.mean = self._mean(transform)
        self.mean_is_image = transform.HasField("mean_file")
        self.cached = None
        if param.cache_images:  # Caffe keeps the encoded files in memory, decoding them per window
            self.cached = [self._read_bytes(image) for image in self.images]

    # -- the window file -------------------------------------------------------------------------
    def _read_window_file(self, param) -> None:
        if not param.source:
            self.fail("window_data_param.source is not set")
        try:
            text = read_file(param.source).decode()
        except FormatError as error:
            self.fail(f"cannot read the window file: {error}")
        except UnicodeDecodeError:
            self.fail(f"cannot read the window file {file_name(param.source)}: it is not UTF-8 text")
        tokens = [(token, number) for number, line in enumerate(text.splitlines(), 1)
                  for token in line.split()]
        if not tokens:
            self.fail(f"window file {file_name(param.source)} is empty")
        position = 0

        def bad(number: int, message: str) -> NoReturn:
            self.fail(f"{where(param.source, number)}: {message}")

        def take(what: str, kind=int):
            nonlocal position
            if position == len(tokens):
                self.fail(f"{file_name(param.source)} ends early: expected {what}")
            token, number = tokens[position]
            position += 1
            try:
                return kind(token) if kind is not str else token, number
            except ValueError:
                bad(number, f"expected {what}, got '{excerpt(token)}'")

        self.images: list[ListedImage] = []
        self.fg: list[Window] = []
        self.bg: list[Window] = []
        while position < len(tokens):
            hashtag, number = take("'# image_index'", str)
            if hashtag != "#":
                bad(number, f"expected '# image_index', got '{excerpt(hashtag)}'")
            index, number = take("the image index after '#'")
            if index != len(self.images):
                bad(number, f"image index {index}, expected {len(self.images)} (images are listed in order "
                            "from 0)")
            path, path_line = take("an image path", str)
            channels, number = take("the image's channels")
            if channels != CHANNELS:
                bad(number, f"{channels} channels; WindowData reads images in colour, {CHANNELS} "
                            "channels, as Caffe")
            height, number = take("the image's height")
            width, _ = take("the image's width")
            if height <= 0 or width <= 0:
                bad(number, f"image size {height}x{width} (height x width) must be positive")
            count, number = take("the number of windows")
            if count < 0:
                bad(number, f"negative number of windows {count}")
            self.images.append(ListedImage(path, height, width, path_line))
            for _ in range(count):
                label, number = take("a window's class index")
                overlap, _ = take("a window's overlap", np.float32)  # compared in float, as Caffe
                x1, _ = take("a window's x1")
                y1, _ = take("a window's y1")
                x2, _ = take("a window's x2")
                y2, _ = take("a window's y2")
                if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height):
                    bad(number, f"window ({x1}, {y1}, {x2}, {y2}) is not inside the {width}x{height} "
                        f"image (0 <= x1 <= x2 < width, 0 <= y1 <= y2 < height)")
                if overlap >= np.float32(param.fg_threshold):
                    if label <= 0:
                        bad(number, f"a foreground window (overlap {overlap} >= fg_threshold "
                            f"{param.fg_threshold}) needs a positive class index, got {label}")
                    self.fg.append(Window(index, label, x1, y1, x2, y2, number))
                elif overlap < np.float32(param.bg_threshold):  # background: label 0
                    self.bg.append(Window(index, 0, x1, y1, x2, y2, number))
        for kind, windows, count in (("foreground", self.fg, self.num_fg),
                                     ("background", self.bg, self.batch_size - self.num_fg)):
            if count and not windows:
                self.fail(f"{file_name(param.source)} has no {kind} windows (overlap "
                          f"{'>= fg_threshold' if kind == 'foreground' else '< bg_threshold'}), and a batch "
                          f"takes {count}")

    def _mean(self, transform) -> np.ndarray | None:
        """The mean subtracted at each place of the crop_size x crop_size output: (3, crop, crop) from
        mean_file (its centre square, as Caffe), (3, 1, 1) from mean_value, None without."""
        if transform.HasField("mean_file") and transform.mean_value:
            self.fail("transform_param: cannot specify mean_file and mean_value at the same time")
        if transform.HasField("mean_file"):
            try:
                mean = read_mean_file(transform.mean_file)
            except FormatError as error:
                self.fail(f"transform_param.mean_file: {error}")
            offset = (mean.shape[2] - self.crop) // 2  # Caffe centres by the width on both axes
            if mean.shape[0] != CHANNELS or offset < 0 or offset + self.crop > mean.shape[1]:
                self.fail(f"mean_file {file_name(transform.mean_file)} has shape {list(mean.shape)}; "
                          f"WindowData needs {CHANNELS} channels and at least {self.crop}x{self.crop}")
            return mean[:, offset:offset + self.crop, offset:offset + self.crop].astype(self.dtype)
        if transform.mean_value:
            if len(transform.mean_value) not in (1, CHANNELS):
                self.fail(f"give 1 mean_value or one per channel ({CHANNELS}), "
                          f"got {len(transform.mean_value)}")
            values = np.broadcast_to(np.asarray(transform.mean_value, dtype=np.float64), (CHANNELS,))
            return values.astype(self.dtype).reshape(CHANNELS, 1, 1)
        return None

    # -- a batch ---------------------------------------------------------------------------------
    def _where(self, image: ListedImage) -> str:
        return where(self.source, image.line)

    def _read_bytes(self, image: ListedImage) -> bytes:
        try:
            return read_file(self.root_folder + image.path)
        except FormatError as error:
            self.fail(f"{self._where(image)}: {error}")

    def _decode(self, index: int) -> np.ndarray:
        image = self.images[index]
        try:
            if self.cached is not None:
                named = f"{self._where(image)}: {file_name(self.root_folder + image.path)}"
                pixels = decode_image(self.cached[index], force_color=True, where=named)
            else:
                pixels = read_image(self.root_folder + image.path, True, self._where(image))
        except (FormatError, DBError) as error:
            self.fail(str(error))
        if pixels.shape[1:] != (image.height, image.width):
            self.fail(f"{self._where(image)}: image {file_name(self.root_folder + image.path)} is "
                      f"{pixels.shape[1]}x{pixels.shape[2]} (height x width), the window file says "
                      f"{image.height}x{image.width}")
        return pixels

    def _placement(self, window: Window, mirror: bool):
        """Caffe's geometry: the region (x1, y1, x2, y2) of the image to cut, the (height, width) to warp
        it to, and the (top, left) offset of the warped patch in the crop_size square."""
        x1, y1, x2, y2 = window.x1, window.y1, window.x2, window.y2
        image = self.images[window.image]
        size = (self.crop, self.crop)
        if not (self.context_pad > 0 or self.square):
            return (x1, y1, x2, y2), size, (0, 0)
        real = self.dtype.type  # Caffe computes the geometry in the net's Dtype
        context_scale = real(self.crop) / real(self.crop - 2 * self.context_pad)
        half_height, half_width = real(y2 - y1 + 1) / real(2), real(x2 - x1 + 1) / real(2)
        center_x, center_y = real(x1) + half_width, real(y1) + half_height
        if self.square:
            half_height = half_width = max(half_height, half_width)
        x1 = round_half_away(center_x - half_width * context_scale)
        x2 = round_half_away(center_x + half_width * context_scale)
        y1 = round_half_away(center_y - half_height * context_scale)
        y2 = round_half_away(center_y + half_height * context_scale)
        unclipped_height, unclipped_width = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - image.width + 1), max(0, y2 - image.height + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        scale_x = real(self.crop) / real(unclipped_width)
        scale_y = real(self.crop) / real(unclipped_height)
        height = round_half_away(real(y2 - y1 + 1) * scale_y)
        width = round_half_away(real(x2 - x1 + 1) * scale_x)
        pad_h = round_half_away(real(pad_y1) * scale_y)
        pad_w = round_half_away(real(pad_x2 if mirror else pad_x1) * scale_x)  # mirrored padding too
        # Rounding may make patch + padding exceed the square; a degenerate 0-pixel warp (where Caffe's
        # OpenCV call fails) keeps one pixel.
        height = max(1, min(height, self.crop - pad_h))
        width = max(1, min(width, self.crop - pad_w))
        return (x1, y1, x2, y2), (height, width), (pad_h, pad_w)

    def load_batch(self, index: int) -> list[np.ndarray]:
        draws = rng.stream("data", self.name, index)
        data = np.zeros((self.batch_size, CHANNELS, self.crop, self.crop), dtype=self.dtype)
        labels = np.empty(self.batch_size, dtype=self.dtype)
        decoded: dict[int, np.ndarray] = {}  # the images this batch uses, decoded once
        item = 0
        for windows, count in ((self.bg, self.batch_size - self.num_fg), (self.fg, self.num_fg)):
            for _ in range(count):
                window = windows[int(draws.integers(len(windows)))]
                mirror = self.mirror and bool(draws.integers(2))
                if window.image not in decoded:
                    decoded[window.image] = self._decode(window.image)
                (x1, y1, x2, y2), (height, width), (top, left) = self._placement(window, mirror)
                patch = resize_uint8(decoded[window.image][:, y1:y2 + 1, x1:x2 + 1], height, width)
                if mirror:
                    patch = patch[:, :, ::-1]
                out = data[item, :, top:top + height, left:left + width]
                out[...] = patch
                if self.mean is not None:  # (3, 1, 1) mean values, or the mean image at the patch's place
                    out -= self.mean[:, top:top + height, left:left + width] if self.mean_is_image \
                        else self.mean
                out *= self.scale
                labels[item] = window.label
                item += 1
        return [data, labels]
