"""ImageData, WindowData and HDF5Output layers.

Images are written here with Pillow into tmp_path; expected batches are hand-checked values or plain numpy
(a loop-written bilinear resize for the warps), so the tests do not lean on the code they check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import data_batch, one_line_error

import minicaffe
from minicaffe import io
from minicaffe.blob import Blob
from minicaffe.cli import main
from minicaffe.layer import LayerError
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2
from minicaffe.testing import layer_from_prototxt

Image = pytest.importorskip("PIL.Image")

DTYPES = [np.float32, np.float64]


# -- helpers ---------------------------------------------------------------------------------------

def save(path: Path, pixels: np.ndarray) -> Path:
    """Write an H x W (grey) or H x W x 3 (RGB) uint8 array as an image file (format from the suffix)."""
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def bgr(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 RGB -> (3, H, W) BGR, Caffe's (OpenCV's) layout."""
    return rgb[:, :, ::-1].transpose(2, 0, 1)


def random_rgb(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) resized with pixel centres aligned and edges clamped (OpenCV's INTER_LINEAR), rounded
    half up to integers: plain loops, independent of minicaffe."""
    channels, h, w = image.shape

    def source(i, new, old):
        x = min(max((i + 0.5) * old / new - 0.5, 0.0), old - 1.0)
        low = int(np.floor(x))
        return low, min(low + 1, old - 1), x - low

    out = np.zeros((channels, height, width))
    for c in range(channels):
        for i in range(height):
            r0, r1, rw = source(i, height, h)
            for j in range(width):
                c0, c1, cw = source(j, width, w)
                top = image[c, r0, c0] * (1 - cw) + image[c, r0, c1] * cw
                bottom = image[c, r1, c0] * (1 - cw) + image[c, r1, c1] * cw
                out[c, i, j] = np.floor(top * (1 - rw) + bottom * rw + 0.5)
    return out


def make_layer(text: str, num_top: int = 2, phase=minicaffe.TEST, dtype=np.float32):
    layer = layer_from_prototxt(text, phase=phase, dtype=dtype)
    top = [Blob((), dtype) for _ in range(num_top)]
    layer.setup([], top)
    return layer, top


def image_layer(source, params="", body="", **kwargs):
    return make_layer(f'name: "images" type: "ImageData" image_data_param {{ source: "{source}" {params} }} '
                      f"{body}", **kwargs)


def image_set(tmp_path, n=3, height=2, width=3):
    """n random RGB PNGs under tmp_path/img, listed with labels 10*i + 1 (the second name holds a space);
    returns (list path, images as (3, H, W) BGR, labels)."""
    (tmp_path / "img").mkdir()
    names = [f"im {i}.png" if i == 1 else f"im{i}.png" for i in range(n)]
    rgbs = [random_rgb(i, height, width) for i in range(n)]
    for name, rgb in zip(names, rgbs):
        save(tmp_path / "img" / name, rgb)
    labels = [10 * i + 1 for i in range(n)]
    source = tmp_path / "list.txt"
    source.write_text("".join(f"{name} {label}\n" for name, label in zip(names, labels)) + "\n")
    return source, np.stack([bgr(rgb) for rgb in rgbs]), np.array(labels)


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


# -- ImageData: reading ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_image_data_pixels_labels_and_wrap(tmp_path, dtype):
    source, images, labels = image_set(tmp_path)
    layer, top = image_layer(source, f'batch_size: 2 root_folder: "{tmp_path}/img/"', dtype=dtype)
    for f, rows in enumerate([[0, 1], [2, 0], [1, 2]]):  # the list as written, wrapping around
        data, label = data_batch(layer, top, f)
        assert data.dtype == dtype and data.shape == (2, 3, 2, 3) and label.shape == (2,)
        np.testing.assert_array_equal(data, images[rows])
        np.testing.assert_array_equal(label, labels[rows])


def test_image_data_hand_checked_pixels(tmp_path):
    rgb = np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8)  # 1 x 2, RGB
    save(tmp_path / "a.png", rgb)
    (tmp_path / "list.txt").write_text(f"{tmp_path}/a.png 7\n")
    data, label = data_batch(*image_layer(tmp_path / "list.txt"), 0)
    np.testing.assert_array_equal(data, [[[[3, 6]], [[2, 5]], [[1, 4]]]])  # B, G, R planes
    assert label.tolist() == [7]


def test_image_data_grey_and_colour(tmp_path):
    grey = np.array([[0, 50, 100], [150, 200, 250]], dtype=np.uint8)
    save(tmp_path / "grey.png", grey)
    save(tmp_path / "equal.jpg", np.stack([grey] * 3, axis=2))  # R = G = B: grey is that value
    save(tmp_path / "equal.png", np.stack([grey] * 3, axis=2))
    (tmp_path / "list.txt").write_text("grey.png 0\nequal.png 1\n")
    body = f'batch_size: 2 root_folder: "{tmp_path}/"'
    data, _ = data_batch(*image_layer(tmp_path / "list.txt", body + " is_color: false"), 0)
    assert data.shape == (2, 1, 2, 3)
    np.testing.assert_array_equal(data[:, 0], [grey, grey])
    data, _ = data_batch(*image_layer(tmp_path / "list.txt", body), 0)  # is_color (default): 3 channels
    assert data.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(data, np.broadcast_to(grey, (2, 3, 2, 3)))
    # A JPEG decodes too (lossy: close to the values written).
    (tmp_path / "jpeg.txt").write_text("equal.jpg 0\n")
    data, _ = data_batch(*image_layer(tmp_path / "jpeg.txt", body + " is_color: false"), 0)
    np.testing.assert_allclose(data[0, 0], grey, atol=8)


def test_image_data_resize(tmp_path):
    save(tmp_path / "small.png", np.array([[0, 64], [128, 192]], dtype=np.uint8))
    save(tmp_path / "big.png", np.arange(16, dtype=np.uint8).reshape(4, 4) * 8)
    (tmp_path / "list.txt").write_text("small.png 0\n")
    params = f'root_folder: "{tmp_path}/" new_height: 4 new_width: 4 is_color: false'
    data, _ = data_batch(*image_layer(tmp_path / "list.txt", params), 0)
    # Pixel centres aligned: a 2-pixel axis is sampled at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    np.testing.assert_array_equal(data[0, 0], [[0, 16, 48, 64], [32, 48, 80, 96],
                                               [96, 112, 144, 160], [128, 144, 176, 192]])
    (tmp_path / "down.txt").write_text("big.png 0\n")
    params = f'root_folder: "{tmp_path}/" new_height: 2 new_width: 2 is_color: false'
    data, _ = data_batch(*image_layer(tmp_path / "down.txt", params), 0)
    # Halving samples at 0.5 and 2.5: the mean of each 2 x 2 block.
    np.testing.assert_array_equal(data[0, 0], [[20, 36], [84, 100]])
    # A colour image resized to another aspect: the same bilinear per channel.
    rgb = random_rgb(3, 5, 3)
    save(tmp_path / "c.png", rgb)
    (tmp_path / "c.txt").write_text("c.png 0\n")
    params = f'root_folder: "{tmp_path}/" new_height: 3 new_width: 7'
    data, _ = data_batch(*image_layer(tmp_path / "c.txt", params), 0)
    np.testing.assert_allclose(data[0], bilinear(bgr(rgb).astype(float), 3, 7), atol=1)


def test_image_data_resize_makes_mixed_sizes_batchable(tmp_path):
    save(tmp_path / "a.png", random_rgb(0, 3, 5))
    save(tmp_path / "b.png", random_rgb(1, 6, 2))
    (tmp_path / "list.txt").write_text("a.png 0\nb.png 1\n")
    body = f'batch_size: 2 root_folder: "{tmp_path}/"'
    with pytest.raises(LayerError, match=r"list.txt line 2: image .*b.png is 2x6 \(width x height\), the "
                                         r"batch's first image \(.*list.txt line 1\) 5x3; set new_height"):
        image_layer(tmp_path / "list.txt", body)
    data, _ = data_batch(*image_layer(tmp_path / "list.txt", body + " new_height: 4 new_width: 4"), 0)
    assert data.shape == (2, 3, 4, 4)
    # batch_size 1: each batch has the size of its image, as in Caffe.
    layer, top = image_layer(tmp_path / "list.txt", f'root_folder: "{tmp_path}/"')
    assert data_batch(layer, top, 0)[0].shape == (1, 3, 3, 5)
    assert data_batch(layer, top, 1)[0].shape == (1, 3, 6, 2)


def test_image_data_shuffle_is_reproducible_and_per_epoch(tmp_path):
    source, images, labels = image_set(tmp_path, n=5, height=1, width=1)
    params = f'batch_size: 5 shuffle: true root_folder: "{tmp_path}/img/"'

    def epochs(seed, count=6):
        minicaffe.set_random_seed(seed)
        layer, top = image_layer(source, params)
        out = []
        for f in range(count):
            data, label = data_batch(layer, top, f)
            np.testing.assert_array_equal(data, images[[list(labels).index(v) for v in label]])
            out.append(label.tolist())
        return out

    first = epochs(4)
    for epoch in first:
        assert sorted(epoch) == sorted(labels)  # each epoch visits every line once
    assert len({tuple(e) for e in first}) > 1  # reshuffled each epoch
    assert any(e != labels.tolist() for e in first)
    assert epochs(4) == first  # the same seed: the same orders
    assert epochs(5) != first
    minicaffe.set_random_seed(4)
    layer, top = image_layer(source, params)
    assert data_batch(layer, top, 3)[1].tolist() == first[3]  # a resumed run: straight to forward 3


def test_image_data_batch_across_epochs_with_shuffle(tmp_path):
    source, _, labels = image_set(tmp_path, n=3, height=1, width=1)
    layer, top = image_layer(source, f'batch_size: 2 shuffle: true root_folder: "{tmp_path}/img/"')
    seen = [v for f in range(6) for v in data_batch(layer, top, f)[1].tolist()]
    for epoch in range(4):  # 12 items, 4 epochs of 3
        assert sorted(seen[3 * epoch:3 * epoch + 3]) == sorted(labels)


def test_image_data_rand_skip(tmp_path):
    source, _, labels = image_set(tmp_path, n=3, height=1, width=1)
    starts = set()
    for seed in range(12):
        minicaffe.set_random_seed(seed)
        layer, top = image_layer(source, f'batch_size: 2 rand_skip: 3 root_folder: "{tmp_path}/img/"')
        got = data_batch(layer, top, 0)[1].tolist() + data_batch(layer, top, 1)[1].tolist()
        skip = labels.tolist().index(got[0])
        assert got == [labels[(skip + i) % 3] for i in range(4)]
        starts.add(skip)
    assert starts == {0, 1, 2}


def test_image_data_crop_mirror_mean_scale(tmp_path):
    source, images, labels = image_set(tmp_path, n=3, height=4, width=5)
    body = ("transform_param { crop_size: 3 mirror: true mean_value: 10 mean_value: 20 mean_value: 30 "
            "scale: 0.5 }")
    layer, top = image_layer(source, f'batch_size: 3 root_folder: "{tmp_path}/img/"', body,
                             phase=minicaffe.TRAIN, dtype=np.float64)
    mean = np.array([10, 20, 30], dtype=float).reshape(3, 1, 1)
    offsets, flips = set(), set()
    for f in range(6):
        data, label = data_batch(layer, top, f)
        assert data.shape == (3, 3, 3, 3)
        np.testing.assert_array_equal(label, labels)
        for item, image in zip(data, images):
            matches = [(h, w, flip) for h in range(2) for w in range(3) for flip in (False, True)
                       if np.array_equal(item, ((image[:, h:h + 3, w:w + 3][:, :, ::-1] if flip
                                                 else image[:, h:h + 3, w:w + 3]) - mean) * 0.5)]
            assert matches
            offsets.add(matches[0][:2])
            flips.add(matches[0][2])
    assert len(offsets) > 2 and flips == {False, True}
    # TEST: the centre crop.
    layer, top = image_layer(source, f'batch_size: 3 root_folder: "{tmp_path}/img/"',
                             "transform_param { crop_size: 2 }", dtype=np.float64)
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0], images[:, :, 1:3, 1:3])


def test_image_data_in_a_net(tmp_path):
    source, images, labels = image_set(tmp_path, n=3, height=2, width=2)
    text = f"""
layer {{ name: "images" type: "ImageData" top: "data" top: "label"
        image_data_param {{ source: "{source}" batch_size: 2 root_folder: "{tmp_path}/img/" }}
        transform_param {{ scale: 0.00390625 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 2 weight_filler {{ type: "constant" value: 1 }} }} }}
"""
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TEST)
    assert net.blobs["data"].shape == (2, 3, 2, 2)
    for rows in ([0, 1], [2, 0]):
        out = net.forward()
        np.testing.assert_array_equal(net.blobs["label"].data, labels[rows])
        sums = images[rows].reshape(2, -1).sum(1) / 256
        np.testing.assert_allclose(out["ip"], np.stack([sums, sums], axis=1), rtol=1e-5)


# -- ImageData: errors -----------------------------------------------------------------------------

def test_image_data_errors(tmp_path, monkeypatch):
    source, _, _ = image_set(tmp_path)
    root = f'root_folder: "{tmp_path}/img/"'
    with pytest.raises(LayerError, match=r"layer 'images' \(ImageData\): cannot read the image list: "
                                         r".*missing.txt: cannot read"):
        image_layer(tmp_path / "missing.txt")
    with pytest.raises(LayerError, match="source is not set"):
        make_layer('name: "images" type: "ImageData"')
    cases = {
        "nolabel.png\n": r"nolabel.txt line 1: expected 'path label', got 'nolabel.png'",
        "im0.png 1\n\nim2.png two\n": r"nolabel.txt line 3: the label 'two' is not an integer",
        "im0.png 1\nim9.png 2\n": r"nolabel.txt line 2: .*im9.png: cannot read \(No such file",
        "\n\n": r"nolabel.txt names no images",
    }
    for text, message in cases.items():
        (tmp_path / "nolabel.txt").write_text(text)
        with pytest.raises(LayerError, match=message):
            image_layer(tmp_path / "nolabel.txt", root + " batch_size: 2")
    (tmp_path / "img" / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk.txt").write_text("im0.png 1\njunk.png 3\n")
    with pytest.raises(LayerError, match=r"junk.txt line 2: .*junk.png: cannot decode"):
        image_layer(tmp_path / "junk.txt", root + " batch_size: 2")
    # A bad image later in the list: an error naming it when its batch is read.
    layer, top = image_layer(tmp_path / "junk.txt", root)
    with pytest.raises(LayerError, match=r"junk.txt line 2"):
        data_batch(layer, top, 1)
    with pytest.raises(LayerError, match="set new_height and new_width together"):
        image_layer(source, root + " new_height: 4")
    with pytest.raises(LayerError, match="batch_size must be positive"):
        image_layer(source, root + " batch_size: 0")
    with pytest.raises(LayerError, match="crop_size 3 is larger than the 2x3 image"):
        image_layer(source, root, "transform_param { crop_size: 3 }")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(LayerError, match=r"decodes images with Pillow: `pip install minicaffe\[image\]"):
        image_layer(source, root)


def test_image_data_errors_from_the_cli_are_one_line(tmp_path, capsys):
    source, _, _ = image_set(tmp_path)
    net = tmp_path / "net.prototxt"
    for text, message in [("im0.png 1\nim0.png\n", "list.txt line 2: expected 'path label'"),
                          ("im0.png 1\nim7.png 2\n", "list.txt line 2: "),
                          ("im0.png x\n", "list.txt line 1: the label 'x' is not an integer")]:
        source.write_text(text)
        net.write_text(f'layer {{ name: "images" type: "ImageData" top: "data" top: "label" image_data_param '
                       f'{{ source: "{source}" batch_size: 2 root_folder: "{tmp_path}/img/" }} }}')
        code, err = cli(capsys, "time", "--model", net, "--iterations", "1")
        assert one_line_error(code, err, log_lines=True), err
        assert message in err and "layer 'images'" in err


# -- WindowData ------------------------------------------------------------------------------------

def window_file(path: Path, images: list[tuple[str, int, int, list[tuple]]]) -> Path:
    """R-CNN's window file: per image (path, height, width, windows), a window (label, overlap, x1, y1,
    x2, y2)."""
    lines = []
    for index, (name, height, width, windows) in enumerate(images):
        lines += [f"# {index}", name, "3", str(height), str(width), str(len(windows))]
        lines += [" ".join(str(v) for v in window) for window in windows]
    path.write_text("\n".join(lines) + "\n")
    return path


def window_layer(source, params="", transform="crop_size: 4", **kwargs):
    return make_layer(f'name: "windows" type: "WindowData" window_data_param {{ source: "{source}" '
                      f"{params} }} transform_param {{ {transform} }}", **kwargs)


@pytest.fixture
def two_images(tmp_path):
    """Two random 8 x 10 RGB images; returns them as (3, H, W) BGR."""
    rgbs = [random_rgb(10, 8, 10), random_rgb(11, 8, 10)]
    for i, rgb in enumerate(rgbs):
        save(tmp_path / f"w{i}.png", rgb)
    return [bgr(rgb).astype(float) for rgb in rgbs]


FG = [(2, 0.8, 1, 1, 4, 4), (5, 0.6, 5, 3, 8, 6)]  # on image 0, image 1: labels 2 and 5
BG = [(3, 0.1, 0, 0, 3, 3), (0, 0.0, 6, 4, 9, 7)]  # background: label forced to 0
IGNORED = (4, 0.4, 2, 2, 5, 5)  # between bg_threshold 0.3 and fg_threshold 0.5: unused


def four_square_windows(tmp_path):
    return window_file(tmp_path / "windows.txt", [
        (f"{tmp_path}/w0.png", 8, 10, [FG[0], BG[0], IGNORED]),
        (f"{tmp_path}/w1.png", 8, 10, [BG[1], FG[1]]),
    ])


def crop(image, window):
    _, _, x1, y1, x2, y2 = window
    return image[:, y1:y2 + 1, x1:x2 + 1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_data_samples_bg_then_fg(tmp_path, two_images, dtype):
    source = four_square_windows(tmp_path)
    # 4x4 windows and crop_size 4: no warp, the pixels as they are.
    layer, top = window_layer(source, "batch_size: 8 fg_fraction: 0.25 fg_threshold: 0.5 bg_threshold: 0.3",
                              dtype=dtype)
    windows = {0: [(BG[0], 0), (BG[1], 1)], 1: [(FG[0], 0), (FG[1], 1)]}
    seen = set()
    for f in range(4):
        data, label = data_batch(layer, top, f)
        assert data.shape == (8, 3, 4, 4) and data.dtype == dtype
        # int(8 * 0.25) = 2 foreground windows, after the 6 background ones.
        assert label[:6].tolist() == [0] * 6 and set(label[6:].tolist()) <= {2, 5}
        for item, (pixels, value) in enumerate(zip(data, label)):
            candidates = windows[int(item >= 6)]
            match = [w for w, i in candidates if np.array_equal(pixels, crop(two_images[i], w))]
            assert len(match) == 1 and (item < 6 or match[0][0] == value)
            seen.add(match[0])
    assert seen == {*FG, *BG}  # both windows of each set get drawn; the ignored one never
    minicaffe.set_random_seed(1701)
    again, _ = window_layer(source, "batch_size: 8 fg_fraction: 0.25 fg_threshold: 0.5 bg_threshold: 0.3",
                            dtype=dtype)
    # seeded, by forward index
    np.testing.assert_array_equal(data_batch(again, top, 2)[0], data_batch(layer, top, 2)[0])


def test_window_data_counts_and_thresholds(tmp_path, two_images):
    source = four_square_windows(tmp_path)
    _, label = data_batch(*window_layer(source, "batch_size: 5"), 0)  # fg_fraction 0.25: int(1.25) = 1
    assert (label == 0).sum() == 4 and label[4] in (2, 5)
    # fg_threshold 0.7: FG[1] (overlap 0.6) is neither foreground nor background (bg_threshold 0.5).
    _, label = data_batch(*window_layer(source, "batch_size: 6 fg_fraction: 0.5 fg_threshold: 0.7"), 0)
    assert label.tolist() == [0, 0, 0, 2, 2, 2]


def test_window_data_warp_mirror_mean_and_scale(tmp_path):
    region = np.array([[0, 64], [128, 192]])
    rgb = np.zeros((6, 6, 3), dtype=np.uint8)
    rgb[2:4, 1:3] = np.stack([region, region + 4, region + 8], axis=2)
    save(tmp_path / "a.png", rgb)
    source = window_file(tmp_path / "w.txt", [(f"{tmp_path}/a.png", 6, 6, [(1, 1.0, 1, 2, 2, 3)])])
    data, label = data_batch(*window_layer(source, "batch_size: 1 fg_fraction: 1"), 0)
    up = np.array([[0, 16, 48, 64], [32, 48, 80, 96], [96, 112, 144, 160], [128, 144, 176, 192]])
    np.testing.assert_array_equal(data[0], [up + 8, up + 4, up])  # warped 2x2 -> 4x4, BGR
    assert label.tolist() == [1]
    params = "batch_size: 6 fg_fraction: 1 scale: 0.5"
    data, _ = data_batch(*window_layer(source, params, "crop_size: 4 mirror: true mean_value: 1 "
                                       "mean_value: 2 mean_value: 3", dtype=np.float64), 0)
    expected = (np.stack([up + 8, up + 4, up]) - np.array([1, 2, 3]).reshape(3, 1, 1)) * 0.5
    flipped = [np.array_equal(d, expected[:, :, ::-1]) for d in data]
    assert all(f or np.array_equal(d, expected) for f, d in zip(flipped, data))
    assert any(flipped) and not all(flipped)
    # mean_file: its centre crop_size square (offset (6 - 4) // 2 = 1) is subtracted.
    mean = np.arange(3 * 6 * 6, dtype=float).reshape(3, 6, 6)
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[1, 3, 6, 6]), data=mean.ravel().tolist())
    io.write_binary(tmp_path / "mean.binaryproto", blob)
    transform = f'crop_size: 4 mean_file: "{tmp_path}/mean.binaryproto"'
    data, _ = data_batch(*window_layer(source, "batch_size: 1 fg_fraction: 1", transform, dtype=np.float64),
                         0)
    np.testing.assert_array_equal(data[0], np.stack([up + 8, up + 4, up]) - mean[:, 1:5, 1:5])


def test_window_data_context_pad_geometry(tmp_path):
    save(tmp_path / "c.png", np.full((10, 10, 3), 100, dtype=np.uint8))
    source = window_file(tmp_path / "w.txt", [(f"{tmp_path}/c.png", 10, 10, [(1, 1.0, 0, 0, 3, 3)])])
    # crop 6, context_pad 1: the 4x4 window at the corner grows by 6/4 about its centre (2, 2) to
    # x, y in -1..5 (7 pixels); the part inside (0..5, 6 pixels) warps to round(6 * 6/7) = 5 pixels,
    # after round(1 * 6/7) = 1 pixel of padding on the top and the left, which stay 0.
    layer, top = window_layer(source, "batch_size: 1 fg_fraction: 1 context_pad: 1", "crop_size: 6")
    data, _ = data_batch(layer, top, 0)
    expected = np.zeros((3, 6, 6))
    expected[:, 1:, 1:] = 100
    np.testing.assert_array_equal(data[0], expected)
    # Mirrored, the padding is mirrored too: on the right (pad_x2 = 0 on the left).
    data, _ = data_batch(*window_layer(source, "batch_size: 8 fg_fraction: 1 context_pad: 1",
                                "crop_size: 6 mirror: true"), 0)
    mirrored = np.zeros((3, 6, 6))
    mirrored[:, 1:, :5] = 100
    kinds = [np.array_equal(d, expected) * 1 + np.array_equal(d, mirrored) * 2 for d in data]
    assert set(kinds) == {1, 2}


def test_window_data_square_mode(tmp_path):
    rgb = random_rgb(7, 10, 10)
    save(tmp_path / "s.png", rgb)
    source = window_file(tmp_path / "w.txt", [(f"{tmp_path}/s.png", 10, 10, [(1, 1.0, 4, 2, 5, 8)])])
    image = bgr(rgb).astype(float)
    # A 2 wide, 7 high window centred at (5, 5.5): squared to half 3.5 about its centre, x 1.5..8.5 and
    # y 2..9, rounded half away from zero to x 2..9 (C's round(1.5) = 2, round(8.5) = 9) and y 2..9.
    data, _ = data_batch(*window_layer(source, 'batch_size: 1 fg_fraction: 1 crop_mode: "square"'), 0)
    np.testing.assert_array_equal(data[0], bilinear(image[:, 2:10, 2:10], 4, 4))
    data, _ = data_batch(*window_layer(source, "batch_size: 1 fg_fraction: 1"), 0)  # warp: the window itself
    np.testing.assert_array_equal(data[0], bilinear(image[:, 2:9, 4:6], 4, 4))


def test_window_data_cache_images_and_root_folder(tmp_path, two_images):
    window_file(tmp_path / "rel.txt", [("w0.png", 8, 10, [FG[0], BG[0]]), ("w1.png", 8, 10, [BG[1], FG[1]])])
    params = f'batch_size: 4 fg_fraction: 0.5 root_folder: "{tmp_path}/"'
    plain = data_batch(*window_layer(tmp_path / "rel.txt", params), 0)
    cached = data_batch(*window_layer(tmp_path / "rel.txt", params + " cache_images: true"), 0)
    np.testing.assert_array_equal(plain[0], cached[0])
    np.testing.assert_array_equal(plain[1], cached[1])


def test_window_data_errors(tmp_path, two_images):
    good = ["# 0", f"{tmp_path}/w0.png", "3", "8", "10", "2", "2 0.8 1 1 4 4", "0 0.1 0 0 3 3"]
    cases = [(0, "0", "line 1: expected '# image_index', got '0'"),
             (0, "# 1", "line 1: image index 1, expected 0"),
             (2, "1", "line 3: 1 channels; WindowData reads images in colour"),
             (3, "x", "line 4: expected the image's height, got 'x'"),
             (6, "2 0.8 1 1 4 9", r"line 7: window \(1, 1, 4, 9\) is not inside the 10x8 image")]
    for index, replacement, message in cases:
        lines = list(good)
        lines[index] = replacement
        (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
        with pytest.raises(LayerError, match=r"layer 'windows' \(WindowData\): .*bad.txt " + message):
            window_layer(tmp_path / "bad.txt", "batch_size: 2")
    (tmp_path / "bad.txt").write_text("\n".join(good[:6] + ["2 0.8 1 1"]) + "\n")
    with pytest.raises(LayerError, match="bad.txt ends early: expected a window's x2"):
        window_layer(tmp_path / "bad.txt", "batch_size: 2")
    (tmp_path / "bad.txt").write_text("\n".join(good[:6] + ["0 0.8 1 1 4 4", good[7]]) + "\n")
    with pytest.raises(LayerError, match="bad.txt line 7: a foreground window .* needs a positive class"):
        window_layer(tmp_path / "bad.txt", "batch_size: 2")
    (tmp_path / "bad.txt").write_text("\n".join(good[:5] + ["1", good[7]]) + "\n")
    with pytest.raises(LayerError, match="has no foreground windows .* a batch takes 1"):
        window_layer(tmp_path / "bad.txt", "batch_size: 4")
    lines = list(good)
    lines[1] = f"{tmp_path}/gone.png"
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(LayerError, match=r"bad.txt line 2: .*gone.png: cannot read"):
        window_layer(tmp_path / "bad.txt", "batch_size: 2")
    lines[1], lines[3] = f"{tmp_path}/w0.png", "9"
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(LayerError, match=r"bad.txt line 2: image .*w0.png is 8x10 \(height x width\), the "
                                         "window file says 9x10"):
        window_layer(tmp_path / "bad.txt", "batch_size: 2")
    (tmp_path / "good.txt").write_text("\n".join(good) + "\n")
    for params, transform, message in [
            ("batch_size: 2", "", "needs transform_param.crop_size"),
            ("batch_size: 0", "crop_size: 4", "batch_size must be positive"),
            ("batch_size: 2 context_pad: 2", "crop_size: 4", "context_pad 2 leaves nothing of crop_size 4"),
            ('batch_size: 2 crop_mode: "round"', "crop_size: 4", "crop_mode must be 'warp' or 'square'"),
            ("batch_size: 2 fg_fraction: 1.5", "crop_size: 4", "fg_fraction must be between 0 and 1"),
            ("batch_size: 2", "crop_size: 4 mean_value: 1 mean_value: 2", "give 1 mean_value or one per")]:
        with pytest.raises(LayerError, match=message):
            window_layer(tmp_path / "good.txt", params, transform)
    # Caffe's legacy window_data_param.crop_size (mirror, mean_file) serve where transform_param is silent.
    data, _ = data_batch(*window_layer(tmp_path / "good.txt", "batch_size: 2 crop_size: 3", ""), 0)
    assert data.shape == (2, 3, 3, 3)
    with pytest.raises(LayerError, match="cannot read the window file: .*missing.txt: cannot read"):
        window_layer(tmp_path / "missing.txt", "batch_size: 2")


def test_window_data_error_from_the_cli_is_one_line(tmp_path, two_images, capsys):
    (tmp_path / "w.txt").write_text(f"# 0\n{tmp_path}/w0.png\n3\n8\n10\n1\n2 0.8 1 1 4\n")
    net = tmp_path / "net.prototxt"
    net.write_text(f'layer {{ name: "windows" type: "WindowData" top: "data" top: "label" window_data_param '
                   f'{{ source: "{tmp_path}/w.txt" batch_size: 2 }} transform_param {{ crop_size: 4 }} }}')
    code, err = cli(capsys, "time", "--model", net, "--iterations", "1")
    assert one_line_error(code, err, log_lines=True), err
    assert "w.txt ends early: expected a window's y2" in err


# -- HDF5Output ------------------------------------------------------------------------------------

OUTPUT_NET = """
layer {{ name: "in" type: "Input" top: "x" top: "y"
        input_param {{ shape {{ dim: 2 dim: 3 }} shape {{ dim: 2 }} }} }}
layer {{ name: "out" type: "HDF5Output" bottom: "x" bottom: "y" hdf5_output_param {{ file_name: "{path}" }} }}
"""


@pytest.mark.parametrize("dtype", DTYPES)
def test_hdf5_output_writes_data_and_label(tmp_path, dtype):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "out" / "features.h5"
    net = Net(io.parse_text(OUTPUT_NET.format(path=path), caffe_pb2.NetParameter()), minicaffe.TEST,
              dtype=dtype)
    with h5py.File(path, "r") as f:  # created at setup, as Caffe's H5Fcreate
        assert list(f.keys()) == []
    x = np.arange(6).reshape(2, 3) / 4
    net.forward(x=x, y=np.array([3, 5]))
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == ["data", "label"]
        assert f["data"].dtype == dtype and f["label"].dtype == dtype
        np.testing.assert_array_equal(f["data"][()], x.reshape(2, 3, 1, 1))  # Caffe's 4-D datasets
        np.testing.assert_array_equal(f["label"][()], [[[[3]]], [[[5]]]])
    net.forward(x=-x, y=np.array([7, 9]))  # every forward: that forward's batch, the file whole
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][()], -x.reshape(2, 3, 1, 1))
        np.testing.assert_array_equal(f["label"][()].ravel(), [7, 9])
    assert io.temp_files(path) == []
    # Round trip: HDF5Data reads the file back.
    (tmp_path / "list.txt").write_text(f"{path}\n")
    layer, top = make_layer(f'name: "h5" type: "HDF5Data" top: "data" top: "label" hdf5_data_param '
                            f'{{ source: "{tmp_path / "list.txt"}" batch_size: 2 }}', dtype=dtype)
    data, label = data_batch(layer, top, 0)
    np.testing.assert_array_equal(data, -x.reshape(2, 3, 1, 1))
    np.testing.assert_array_equal(label.ravel(), [7, 9])


def test_hdf5_output_backward_gives_zero_gradients(tmp_path):
    pytest.importorskip("h5py")
    layer = layer_from_prototxt(f'name: "out" type: "HDF5Output" hdf5_output_param {{ file_name: '
                                f'"{tmp_path / "o.h5"}" }}')
    bottom = [Blob((2, 2, 2)), Blob((2,))]
    layer.setup(bottom, [])
    layer.run_forward(bottom, [])
    for blob in bottom:
        blob.diff[...] = np.nan
    layer.run_backward([], [True, False], bottom)
    assert np.all(bottom[0].diff == 0) and np.all(np.isnan(bottom[1].diff))


def test_hdf5_output_errors(tmp_path, monkeypatch):
    pytest.importorskip("h5py")

    def output(file_name, shapes=((2, 3), (2,))):
        layer = layer_from_prototxt(f'name: "out" type: "HDF5Output" hdf5_output_param {{ file_name: '
                                    f'"{file_name}" }}')
        layer.setup([Blob(s) for s in shapes], [])

    with pytest.raises(LayerError, match=r"layer 'out' \(HDF5Output\): hdf5_output_param.file_name is not"):
        layer_from_prototxt('name: "out" type: "HDF5Output"').setup([Blob((2,)), Blob((2,))], [])
    (tmp_path / "file").write_text("")
    with pytest.raises(LayerError, match=r"file/o.h5: cannot write"):
        output(tmp_path / "file" / "o.h5")
    with pytest.raises(LayerError, match=r"the same batch size \(num\), got \[2, 3\] and \[3\]"):
        output(tmp_path / "o.h5", ((2, 3), (3,)))
    with pytest.raises(LayerError, match="writes \\(num, channels, height, width\\) datasets"):
        output(tmp_path / "o.h5", ((2, 1, 1, 1, 1), (2,)))
    with pytest.raises(LayerError, match="takes 2 bottom"):
        layer_from_prototxt(f'name: "out" type: "HDF5Output" hdf5_output_param {{ file_name: '
                            f'"{tmp_path / "o.h5"}" }}').setup([Blob((2,))], [])
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(LayerError, match=r"the HDF5Output layer needs h5py"):
        output(tmp_path / "o.h5")
