"""caffe.Classifier and caffe.Detector (pycaffe's classify / detect wrappers).

The net is a global average pooling, so each prediction is the per-channel mean of the preprocessed
crop: the expected values are computed by hand from the images."""

from __future__ import annotations

import numpy as np
import pytest

import minicaffe as caffe

PIL = pytest.importorskip("PIL.Image")

NET = """name: "means" input: "data" input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "pool" top: "means" }
"""


@pytest.fixture
def deploy(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text(NET)
    return str(path)


def ramp_image(height=6, width=6):
    """H x W x 3: channel k holds k + 10 * row + column."""
    rows, cols = np.mgrid[:height, :width]
    return np.stack([k + 10.0 * rows + cols for k in range(3)], axis=2).astype(np.float32)


def test_classifier_centre_crop_and_preprocessing(deploy):
    mean = np.float32([1, 2, 3])
    net = caffe.Classifier(deploy, image_dims=(6, 6), mean=mean, raw_scale=2.0, input_scale=0.5,
                           channel_swap=(2, 1, 0))
    image = ramp_image()
    out = net.predict([image, image + 1], oversample=False)
    # centre 4x4 crop of the 6x6 image: rows 1..4, columns 1..4: mean row 2.5, column 2.5
    centre = np.array([k + 25 + 2.5 for k in range(3)])
    swapped = centre[[2, 1, 0]]
    expected = (2.0 * swapped - mean) * 0.5
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    np.testing.assert_allclose(out[1], expected + 1.0, rtol=1e-6)  # raw 2x, input 0.5x
    assert out.shape == (2, 3)


def test_classifier_oversample_averages_ten_views(deploy):
    net = caffe.Classifier(deploy, image_dims=(6, 6))
    image = ramp_image()
    out = net.predict([image])
    # corners (row, column offsets 0 or 2) and the centre (1, 1); mirrors have the same means
    offsets = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    per_view = [[k + 10 * (r + 1.5) + (c + 1.5) for k in range(3)] for r, c in offsets]
    np.testing.assert_allclose(out[0], np.mean(per_view, axis=0), rtol=1e-6)


def test_classifier_resizes_to_image_dims(deploy):
    net = caffe.Classifier(deploy)  # image_dims: the input's 4x4
    constant = np.full((9, 7, 3), 5.0, np.float32)
    np.testing.assert_allclose(net.predict([constant], oversample=False)[0], [5, 5, 5], rtol=1e-6)
    with pytest.raises(ValueError, match="smaller than the net's input"):
        caffe.Classifier(deploy, image_dims=(3, 3))


def write_png(path, pixels):
    PIL.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


def test_detector_windows(deploy, tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:4, :4] = (255, 0, 51)  # a block in the top left
    write_png(tmp_path / "a.png", pixels)
    detector = caffe.Detector(deploy, raw_scale=255)
    found = detector.detect_windows([(str(tmp_path / "a.png"), [(0, 0, 4, 4), (4, 4, 8, 8), (0, 0, 8, 8)])])
    assert [d["window"] for d in found] == [(0, 0, 4, 4), (4, 4, 8, 8), (0, 0, 8, 8)]
    assert all(d["filename"] == str(tmp_path / "a.png") for d in found)
    np.testing.assert_allclose(found[0]["prediction"], [255, 0, 51], atol=1e-3)
    np.testing.assert_allclose(found[1]["prediction"], [0, 0, 0], atol=1e-3)
    np.testing.assert_allclose(found[2]["prediction"], np.float32([255, 0, 51]) / 4, atol=1e-3)


def test_detector_context_pad_fills_outside_with_the_mean(deploy, tmp_path):
    write_png(tmp_path / "grey.png", np.full((8, 8, 3), 200, np.uint8))
    detector = caffe.Detector(deploy, raw_scale=255, mean=np.float32([40, 40, 40]),
                              context_pad=1)
    # Crop size 4, context_pad 1: the window (0, 0, 7, 7) grows by 4/2 = 2x around its centre to
    # (-4, -4, 12, 12), 17 pixels on a side; the image part (0..8, 9 pixels) lands at offset
    # round(4 * 4/17) = 1 with size round(9 * 4/17) = 2. So 4 of the 16 pixels are image (200),
    # the other 12 the mean in image space (40 / 255 before the raw scale).
    out = detector.detect_windows([(str(tmp_path / "grey.png"), [(0, 0, 7, 7)])])[0]["prediction"]
    expected = (4 * 200 + 12 * 40) / 16 - 40
    np.testing.assert_allclose(out, [expected] * 3, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="detect_windows"):
        detector.detect_selective_search(["a.png"])
