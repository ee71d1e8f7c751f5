"""pycaffe's caffe.Classifier and caffe.Detector: a TEST-phase Net with a caffe.io.Transformer set up for
its first input, taking H x W x K images (as caffe.io.load_image gives them) instead of blobs.

    net = caffe.Classifier(deploy, weights, image_dims=(256, 256), mean=mean, raw_scale=255,
                           channel_swap=(2, 1, 0))
    probabilities = net.predict([caffe.io.load_image("cat.jpg")])          # 10-view average by default

    detector = caffe.Detector(deploy, weights, context_pad=16)
    detections = detector.detect_windows([("cat.jpg", [(ymin, xmin, ymax, xmax), ...])])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import caffe_io
from .layer import TEST
from .net import Net


class PreprocessingNet(Net):
    """A TEST net whose first input gets images through a Transformer: transposed to K x H x W, then
    channel swap, raw scale, mean and input scale when given (pycaffe's constructor arguments)."""

    def __init__(self, model_file, pretrained_file=None, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None):
        super().__init__(model_file, weights=pretrained_file or None, phase=TEST)
        if not self.inputs:
            raise ValueError(f"{model_file}: the net has no input blob to feed images to")
        name = self.inputs[0]
        self.transformer = caffe_io.Transformer({name: self.blobs[name].data.shape})
        self.transformer.set_transpose(name, (2, 0, 1))
        if mean is not None:
            self.transformer.set_mean(name, mean)
        if input_scale is not None:
            self.transformer.set_input_scale(name, input_scale)
        if raw_scale is not None:
            self.transformer.set_raw_scale(name, raw_scale)
        if channel_swap is not None:
            self.transformer.set_channel_swap(name, channel_swap)

    def _predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The first output for H x W x K images already at the input's height and width."""
        name = self.inputs[0]
        batch = np.stack([self.transformer.preprocess(name, image) for image in images])
        return self.forward_all(**{name: batch})[self.outputs[0]]


class Classifier(PreprocessingNet):
    """Images are resized to image_dims (default: the input's size), then cropped to the input's size:
    the centre, or with oversample the 4 corners and the centre and their mirrors, averaged."""

    def __init__(self, model_file, pretrained_file=None, image_dims=None, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None):
        super().__init__(model_file, pretrained_file, mean, input_scale, raw_scale, channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = np.array(self.crop_dims if image_dims is None else image_dims, dtype=int)
        if np.any(self.image_dims < self.crop_dims):
            raise ValueError(f"image_dims {list(self.image_dims)} are smaller than the net's input "
                             f"{list(self.crop_dims)}")

    def predict(self, inputs: Sequence[np.ndarray], oversample: bool = True) -> np.ndarray:
        """(N, outputs) predictions for N H x W x K images."""
        resized = np.stack([caffe_io.resize_image(image, self.image_dims) for image in inputs])
        if oversample:
            views = caffe_io.oversample(resized, self.crop_dims)
            return self._predict(views).reshape(len(inputs), 10, -1).mean(axis=1)
        top, left = ((self.image_dims - self.crop_dims) / 2.0).astype(int)
        height, width = self.crop_dims
        return self._predict(resized[:, top:top + height, left:left + width])


class Detector(PreprocessingNet):
    """Classifies windows (ymin, xmin, ymax, xmax) of images, each warped to the input's size; with
    context_pad, R-CNN's context: the window is enlarged so that after warping it has context_pad
    pixels of surroundings on each side, and what falls outside the image is filled with the mean."""

    def __init__(self, model_file, pretrained_file=None, mean=None, input_scale=None, raw_scale=None,
                 channel_swap=None, context_pad=None):
        super().__init__(model_file, pretrained_file, mean, input_scale, raw_scale, channel_swap)
        self.configure_crop(context_pad)

    def configure_crop(self, context_pad) -> None:
        """Set the context padding, and the fill of padding: the mean in image space (H x W x K, before
        channel swap and raw scale), or zeros without a mean."""
        name = self.inputs[0]
        channels, height, width = self.blobs[name].data.shape[1:]
        self.crop_dims = np.array((height, width, channels))
        self.context_pad = context_pad
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = np.broadcast_to(mean, (channels, height, width)).transpose(1, 2, 0)
        swap = self.transformer.channel_swap.get(name)
        if swap is not None:
            crop_mean = crop_mean[:, :, np.argsort(swap)]
        self.crop_mean = crop_mean / self.transformer.raw_scale.get(name, 1.0)

    def crop(self, image: np.ndarray, window) -> np.ndarray:
        """The part of `image` the window selects (with context, warped to the input's size)."""
        ymin, xmin, ymax, xmax = (int(v) for v in window)
        if not self.context_pad:
            return image[ymin:ymax, xmin:xmax]
        size = int(self.crop_dims[0])
        scale = size / (size - 2.0 * self.context_pad)
        half = np.array(((ymax - ymin + 1) / 2.0, (xmax - xmin + 1) / 2.0))
        centre = np.array((ymin, xmin)) + half
        box = np.round(np.concatenate((centre - scale * half, centre + scale * half)))
        full = box[2:] - box[:2] + 1
        pad = np.round(np.maximum(0, -box[:2]) * size / full).astype(int)
        limits = np.array(image.shape[:2] * 2)
        box = np.clip(box, 0, limits).astype(int)
        clipped = box[2:] - box[:2] + 1
        if np.any(clipped <= 0):
            raise ValueError(f"window {list(window)} lies outside the image of size {list(image.shape[:2])}")
        crop_size = np.minimum(np.round(clipped * size / full).astype(int), size - pad)
        context = caffe_io.resize_image(image[box[0]:box[2], box[1]:box[3]], crop_size)
        out = np.array(self.crop_mean, dtype=np.float32)
        out[pad[0]:pad[0] + crop_size[0], pad[1]:pad[1] + crop_size[1]] = context
        return out

    def detect_windows(self, images_windows) -> list[dict]:
        """[(image file, [window, ...]), ...] -> one {"window", "prediction", "filename"} per window."""
        names, windows, crops = [], [], []
        for filename, image_windows in images_windows:
            image = caffe_io.load_image(filename).astype(np.float32)
            for window in image_windows:
                names.append(filename)
                windows.append(window)
                crops.append(self.crop(image, window))
        predictions = self._predict(crops)
        return [{"window": window, "prediction": prediction, "filename": name}
                for name, window, prediction in zip(names, windows, predictions)]

    def detect_selective_search(self, image_fnames):
        raise NotImplementedError("detect_selective_search needs the selective_search_ijcv_with_python "
                                  "MATLAB package, which minicaffe does not ship; compute the windows "
                                  "elsewhere and call detect_windows")
