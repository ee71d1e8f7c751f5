"""Data, HDF5Data, DummyData and MemoryData layers, and the DataTransformer they use.

Databases are written here with lmdb and caffe_pb2 directly (not through minicaffe.db), and expected
batches are computed with plain numpy, so the tests do not lean on the code they check.
"""

from __future__ import annotations

import io as pyio
import sys

import lmdb
import numpy as np
import pytest
from conftest import data_batch

import minicaffe
from minicaffe import io, rng
from minicaffe.blob import Blob
from minicaffe.layer import LayerError
from minicaffe.net import Net, NetError
from minicaffe.proto import caffe_pb2
from minicaffe.testing import layer_from_prototxt

DTYPES = [np.float32, np.float64]


# -- helpers ---------------------------------------------------------------------------------------

def write_lmdb(path, records):
    """records: list of (key bytes, Datum)."""
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, datum in records:
            txn.put(key, datum.SerializeToString())
    env.close()
    return path


def raw_datum(image: np.ndarray, label: int) -> caffe_pb2.Datum:
    c, h, w = image.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=image.astype(np.uint8).tobytes(), label=label)


def images_db(tmp_path, n=5, shape=(2, 4, 5), name="db", seed=0):
    """n random uint8 images under keys %08d; returns (path, images, labels)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype(np.uint8)
    labels = np.arange(n) * 10 + 3
    path = write_lmdb(tmp_path / name, [(b"%08d" % i, raw_datum(images[i], labels[i])) for i in range(n)])
    return path, images, labels


def data_layer(source, body="", batch_size=2, phase=minicaffe.TEST, dtype=np.float32, extra=""):
    text = (f'name: "data" type: "Data" data_param {{ source: "{source}" batch_size: {batch_size} '
            f"backend: LMDB {extra} }} {body}")
    layer = layer_from_prototxt(text, phase=phase, dtype=dtype)
    top = [Blob((), dtype), Blob((), dtype)]
    layer.setup([], top)
    return layer, top


# -- Data: reading order ---------------------------------------------------------------------------

def test_data_reads_in_key_order_and_wraps(tmp_path):
    images = np.arange(5 * 3, dtype=np.uint8).reshape(5, 1, 1, 3)
    # Inserted out of order: the layer must follow the key order, as Caffe's cursor does.
    order = [3, 0, 4, 1, 2]
    write_lmdb(tmp_path / "db", [(b"%08d" % i, raw_datum(images[i], i)) for i in order])
    layer, top = data_layer(tmp_path / "db", batch_size=2)
    expected_labels = [[0, 1], [2, 3], [4, 0], [1, 2], [3, 4]]
    for f, labels in enumerate(expected_labels):
        data, label = data_batch(layer, top, f)
        assert data.shape == (2, 1, 1, 3) and label.shape == (2,)
        np.testing.assert_array_equal(label, labels)
        np.testing.assert_array_equal(data, images[labels].astype(np.float32))


def test_data_single_top_and_batch_larger_than_db(tmp_path):
    path, images, labels = images_db(tmp_path, n=3, shape=(1, 2, 2))
    layer = layer_from_prototxt(f'name: "d" type: "Data" data_param {{ source: "{path}" batch_size: 7 '
                                "backend: LMDB }")
    top = [Blob()]
    layer.setup([], top)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, images[[0, 1, 2, 0, 1, 2, 0]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_data_scale_and_mean_values(tmp_path, dtype):
    path, images, _ = images_db(tmp_path, n=4, shape=(3, 2, 3))
    layer, top = data_layer(path, "transform_param { scale: 0.5 mean_value: 10 mean_value: 20 "
                            "mean_value: 30 }", batch_size=4, dtype=dtype)
    data, _ = data_batch(layer, top, 0)
    assert data.dtype == dtype
    mean = np.array([10, 20, 30], dtype=dtype).reshape(1, 3, 1, 1)
    expected = (images.astype(dtype) - mean) * dtype(0.5)
    np.testing.assert_array_equal(data, expected)
    # A hand-checked value: pixel (0, 1, 0, 2).
    assert data[0, 1, 0, 2] == (float(images[0, 1, 0, 2]) - 20) * 0.5

    layer, top = data_layer(path, "transform_param { mean_value: 100 }", batch_size=4, dtype=dtype)
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0], images.astype(dtype) - 100)


@pytest.mark.parametrize("dtype", DTYPES)
def test_data_mean_file_and_test_center_crop(tmp_path, dtype):
    image = np.arange(20, dtype=np.uint8).reshape(1, 4, 5)
    write_lmdb(tmp_path / "db", [(b"0", raw_datum(image, 7))])
    mean = np.linspace(0.5, 2.0, 20).reshape(1, 1, 4, 5).astype(np.float32)  # BlobProto data is float
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend(mean.shape)
    proto.data.extend(mean.ravel().tolist())
    (tmp_path / "mean.binaryproto").write_bytes(proto.SerializeToString())

    layer, top = data_layer(tmp_path / "db", f'transform_param {{ crop_size: 2 scale: 2 mean_file: '
                            f'"{tmp_path / "mean.binaryproto"}" }}', batch_size=1, dtype=dtype)
    data, label = data_batch(layer, top, 0)
    # TEST: the centre crop, rows (4-2)//2 = 1.., cols (5-2)//2 = 1..; the mean at the same pixels.
    assert data.shape == (1, 1, 2, 2) and label.tolist() == [7]
    rows, cols = slice(1, 3), slice(1, 3)
    expected = (image[:, rows, cols].astype(dtype) - mean[0][:, rows, cols].astype(dtype)) * dtype(2)
    np.testing.assert_array_equal(data[0], expected)
    np.testing.assert_allclose(data[0, 0] / 2 + mean[0, 0, 1:3, 1:3], [[6, 7], [11, 12]], rtol=1e-6)


def test_data_test_crop_without_mean_literal(tmp_path):
    image = np.arange(20, dtype=np.uint8).reshape(1, 4, 5)
    write_lmdb(tmp_path / "db", [(b"0", raw_datum(image, 0))])
    layer, top = data_layer(tmp_path / "db", "transform_param { crop_size: 2 }", batch_size=1)
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0][0, 0], [[6, 7], [11, 12]])
    layer, top = data_layer(tmp_path / "db", "transform_param { crop_size: 3 }", batch_size=1)
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0][0, 0], [[1, 2, 3], [6, 7, 8], [11, 12, 13]])


def reference_train_batch(images, name, index, crop, mirror):
    """Caffe's per-image draws, in order: mirror coin (if mirror), then h_off, w_off (if crop)."""
    generator = rng.stream("data", name, index)
    out = []
    for image in images:
        flip = mirror and bool(generator.integers(2))
        h = int(generator.integers(image.shape[1] - crop + 1))
        w = int(generator.integers(image.shape[2] - crop + 1))
        patch = image[:, h:h + crop, w:w + crop].astype(np.float64)
        out.append(patch[:, :, ::-1] if flip else patch)
    return np.stack(out)


def test_data_train_random_crop_and_mirror(tmp_path):
    path, images, _ = images_db(tmp_path, n=4, shape=(2, 5, 6))
    layer, top = data_layer(path, "transform_param { crop_size: 3 mirror: true }", batch_size=4,
                            phase=minicaffe.TRAIN, dtype=np.float64)
    seen_offsets, seen_flips = set(), set()
    for f in range(6):
        data, _ = data_batch(layer, top, f)
        assert data.shape == (4, 2, 3, 3)
        np.testing.assert_array_equal(data, reference_train_batch(images, "data", f, 3, True))
        # Independently of the draw order: each item is some crop of its image, maybe mirrored.
        for item, image in zip(data, images):
            matches = [(h, w, flip) for h in range(3) for w in range(4) for flip in (False, True)
                       if np.array_equal(item, (image[:, h:h + 3, w:w + 3][:, :, ::-1] if flip
                                                else image[:, h:h + 3, w:w + 3]))]
            assert matches
            seen_offsets.add(matches[0][:2])
            seen_flips.add(matches[0][2])
    assert len(seen_offsets) > 3 and seen_flips == {False, True}


def test_data_mirror_applies_in_test_phase_too_as_caffe(tmp_path):
    # Caffe: do_mirror = mirror && Rand(2), whatever the phase (only the crop is phase-dependent).
    path, images, _ = images_db(tmp_path, n=8, shape=(1, 2, 3))
    layer, top = data_layer(path, "transform_param { mirror: true }", batch_size=8)
    data, _ = data_batch(layer, top, 0)
    flipped = [np.array_equal(d, i[:, :, ::-1]) and not np.array_equal(d, i) for d, i in zip(data, images)]
    assert any(flipped) and not all(flipped)


def test_data_without_mirror_is_deterministic_in_train(tmp_path):
    path, images, _ = images_db(tmp_path, n=2, shape=(1, 3, 3))
    layer, top = data_layer(path, batch_size=2, phase=minicaffe.TRAIN)
    np.testing.assert_array_equal(data_batch(layer, top, 5)[0], images[[0, 1]])


def test_data_legacy_data_param_transform_fields(tmp_path):
    # Old nets put scale/crop_size in data_param; transform_param wins where it sets a field.
    path, images, _ = images_db(tmp_path, n=2, shape=(1, 4, 4))
    layer, top = data_layer(path, batch_size=2, extra="scale: 0.5 crop_size: 2")
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0], images[:, :, 1:3, 1:3] * np.float32(0.5))
    layer, top = data_layer(path, "transform_param { scale: 2 }", batch_size=2, extra="scale: 0.5")
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0], images * np.float32(2))


def test_datum_helpers_round_trip():
    from minicaffe.db import array_to_datum, datum_to_array

    pixels = np.arange(12, dtype=np.uint8).reshape(3, 2, 2)
    datum = array_to_datum(pixels, 5)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 2, 2, 5)
    assert datum.data == pixels.tobytes() and not datum.float_data
    np.testing.assert_array_equal(datum_to_array(datum), pixels)
    values = np.linspace(-1, 1, 6).reshape(1, 2, 3)
    datum = array_to_datum(values)
    assert not datum.data and len(datum.float_data) == 6
    np.testing.assert_allclose(datum_to_array(datum), values, rtol=1e-7)
    with pytest.raises(ValueError, match="channels, height, width"):
        array_to_datum(np.zeros((2, 2)))


# -- Data: replayable batches and prefetch ---------------------------------------------------------

@pytest.mark.parametrize("prefetch", [0, 4])
def test_data_batch_depends_only_on_forward_index(tmp_path, prefetch):
    path, _, _ = images_db(tmp_path, n=7, shape=(1, 6, 6))
    body = "transform_param { crop_size: 4 mirror: true }"
    sequential, top = data_layer(path, body, batch_size=3, phase=minicaffe.TRAIN,
                                 extra=f"prefetch: {prefetch}")
    batches = [data_batch(sequential, top, f) for f in range(6)]
    fresh, top2 = data_layer(path, body, batch_size=3, phase=minicaffe.TRAIN, extra=f"prefetch: {prefetch}")
    for f in (4, 1, 5, 5, 0):  # any order, repeats: each index gives its own batch
        data, label = data_batch(fresh, top2, f)
        np.testing.assert_array_equal(data, batches[f][0])
        np.testing.assert_array_equal(label, batches[f][1])
    # Position (f * batch_size) mod N: batch 2 starts at record 6.
    np.testing.assert_array_equal(batches[2][1], [63, 3, 13])


def test_data_prefetches_the_next_index(tmp_path):
    path, images, _ = images_db(tmp_path, n=6, shape=(1, 2, 2))
    layer, top = data_layer(path, batch_size=2)
    data_batch(layer, top, 0)
    assert layer._pending is not None and layer._pending.key[0] == 1
    prefetched = layer._pending.get()
    data, _ = data_batch(layer, top, 1)
    assert data is not prefetched[0]
    np.testing.assert_array_equal(data, prefetched[0])
    np.testing.assert_array_equal(data, images[[2, 3]])
    # Jumping elsewhere loads synchronously and is still right.
    np.testing.assert_array_equal(data_batch(layer, top, 7)[0], images[[2, 3]])

    layer, top = data_layer(path, batch_size=2, extra="prefetch: 0")
    data_batch(layer, top, 0)
    assert layer._pending is None


def test_data_new_seed_gives_new_random_batch(tmp_path):
    path, _, _ = images_db(tmp_path, n=4, shape=(1, 8, 8))
    layer, top = data_layer(path, "transform_param { crop_size: 3 }", batch_size=4, phase=minicaffe.TRAIN)
    first = data_batch(layer, top, 0)[0]
    minicaffe.set_random_seed(99)
    assert not np.array_equal(data_batch(layer, top, 0)[0], first)
    minicaffe.set_random_seed(1701)
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0], first)


def test_data_rand_skip(tmp_path):
    path, _, labels = images_db(tmp_path, n=20, shape=(1, 1, 1))
    layer, top = data_layer(path, batch_size=2, extra="rand_skip: 10")
    skip = int(data_batch(layer, top, 0)[1][0] - 3) // 10
    assert 0 <= skip < 10
    # Batch f starts at (skip + 2 f) mod 20, the same in a fresh layer (the draw is keyed).
    np.testing.assert_array_equal(data_batch(layer, top, 12)[1], labels[[(skip + 24) % 20, (skip + 25) % 20]])
    other, top2 = data_layer(path, batch_size=2, extra="rand_skip: 10")
    np.testing.assert_array_equal(data_batch(other, top2, 12)[1], data_batch(layer, top, 12)[1])
    skips = set()
    for seed in range(12):
        minicaffe.set_random_seed(seed)
        layer, top = data_layer(path, batch_size=1, extra="rand_skip: 10")
        skips.add(int(data_batch(layer, top, 0)[1][0]))
    assert len(skips) > 1


# -- Data: other Datum payloads --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_data_float_datum(tmp_path, dtype):
    values = np.random.default_rng(3).normal(size=(3, 2, 2, 3)).astype(np.float32)
    records = []
    for i, v in enumerate(values):
        datum = caffe_pb2.Datum(channels=2, height=2, width=3, label=i)
        datum.float_data.extend(v.ravel().tolist())
        records.append((b"%08d" % i, datum))
    write_lmdb(tmp_path / "db", records)
    layer, top = data_layer(tmp_path / "db", "transform_param { scale: 3 mean_value: 0.25 }", batch_size=3,
                            dtype=dtype)
    data, label = data_batch(layer, top, 0)
    np.testing.assert_allclose(data, (values.astype(dtype) - dtype(0.25)) * dtype(3), rtol=1e-6)
    np.testing.assert_array_equal(label, [0, 1, 2])


def test_data_encoded_png(tmp_path):
    from PIL import Image as image_module  # Pillow: matplotlib's dependency, so in the [test] extra
    rgb = np.random.default_rng(5).integers(0, 256, (4, 3, 3)).astype(np.uint8)  # H, W, RGB
    buffer = pyio.BytesIO()
    image_module.fromarray(rgb).save(buffer, format="PNG")
    gray = np.random.default_rng(6).integers(0, 256, (4, 3)).astype(np.uint8)
    gray_buffer = pyio.BytesIO()
    image_module.fromarray(gray).save(gray_buffer, format="PNG")
    write_lmdb(tmp_path / "rgb", [(b"0", caffe_pb2.Datum(data=buffer.getvalue(), encoded=True, label=4))])
    write_lmdb(tmp_path / "gray", [(b"0", caffe_pb2.Datum(data=gray_buffer.getvalue(), encoded=True))])

    layer, top = data_layer(tmp_path / "rgb", batch_size=1)
    data, label = data_batch(layer, top, 0)
    # Caffe decodes with OpenCV: channels in BGR order.
    np.testing.assert_array_equal(data[0], rgb[:, :, ::-1].transpose(2, 0, 1))
    assert label.tolist() == [4]
    layer, top = data_layer(tmp_path / "gray", batch_size=1)
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0][0, 0], gray)
    layer, top = data_layer(tmp_path / "gray", "transform_param { force_color: true }", batch_size=1)
    np.testing.assert_array_equal(data_batch(layer, top, 0)[0][0], np.stack([gray] * 3))


def test_data_encoded_without_pillow_is_a_clear_error(tmp_path, monkeypatch):
    write_lmdb(tmp_path / "db", [(b"0", caffe_pb2.Datum(data=b"\x89PNG....", encoded=True))])
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(LayerError, match="encoded.*Pillow"):
        data_layer(tmp_path / "db", batch_size=1)


# -- Data: errors ----------------------------------------------------------------------------------

def test_data_errors(tmp_path):
    path, _, _ = images_db(tmp_path, n=2, shape=(1, 4, 4))
    with pytest.raises(LayerError, match=r"layer 'data'.*missing: no such database"):
        data_layer(tmp_path / "missing")
    (tmp_path / "notdb").mkdir()
    with pytest.raises(LayerError, match="not an LMDB"):
        data_layer(tmp_path / "notdb")
    write_lmdb(tmp_path / "empty", [])
    with pytest.raises(LayerError, match=r"layer 'data'.*empty.*empty"):
        data_layer(tmp_path / "empty")
    with pytest.raises(LayerError, match="LEVELDB not supported, convert to LMDB"):
        layer_from_prototxt(f'name: "d" type: "Data" data_param {{ source: "{path}" batch_size: 1 '
                            "backend: LEVELDB }").setup([], [Blob()])
    (tmp_path / "level").mkdir()
    (tmp_path / "level" / "CURRENT").write_text("MANIFEST-000001\n")
    with pytest.raises(LayerError, match="LEVELDB not supported"):
        layer_from_prototxt(f'name: "d" type: "Data" data_param {{ source: "{tmp_path / "level"}" '
                            "batch_size: 1 }").setup([], [Blob()])
    with pytest.raises(LayerError, match="batch_size must be positive"):
        data_layer(path, batch_size=0)
    with pytest.raises(LayerError, match="crop_size 5 is larger than the 4x4 image"):
        data_layer(path, "transform_param { crop_size: 5 }")
    with pytest.raises(LayerError, match="mean_file and mean_value"):
        data_layer(path, 'transform_param { mean_file: "m" mean_value: 1 }')
    with pytest.raises(LayerError, match="give 1 mean_value or one per channel"):
        data_layer(path, "transform_param { mean_value: 1 mean_value: 2 }")
    with pytest.raises(LayerError, match="force_color and force_gray"):
        data_layer(path, "transform_param { force_color: true force_gray: true }")
    with pytest.raises(LayerError, match=r"transform_param: .*nope\.binaryproto"):
        data_layer(path, f'transform_param {{ mean_file: "{tmp_path / "nope.binaryproto"}" }}')
    with pytest.raises(LayerError, match="takes at most 2 top"):
        layer_from_prototxt(f'name: "d" type: "Data" data_param {{ source: "{path}" batch_size: 1 '
                            "backend: LMDB }").setup([], [Blob(), Blob(), Blob()])


def test_data_bad_records(tmp_path):
    write_lmdb(tmp_path / "short", [(b"0", caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc"))])
    with pytest.raises(LayerError, match="3 data bytes, 1x2x2 needs 4"):
        data_layer(tmp_path / "short", batch_size=1)
    env = lmdb.open(str(tmp_path / "junk"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"\xff\xff\xff")
    env.close()
    with pytest.raises(LayerError, match="is not a Datum"):
        data_layer(tmp_path / "junk", batch_size=1)
    write_lmdb(tmp_path / "mixed", [(b"0", raw_datum(np.zeros((1, 2, 2)), 0)),
                                    (b"1", raw_datum(np.zeros((1, 3, 2)), 0))])
    with pytest.raises(LayerError, match="set crop_size or make them equal"):
        data_layer(tmp_path / "mixed", batch_size=2)


def test_data_bad_record_later_in_the_db_names_the_db_and_key(tmp_path):
    """A value that is not a Datum (or an encoded Datum that is not an image) fails the batch that reads
    it, naming the database and the record, from the prefetch thread as from a direct read."""
    good = raw_datum(np.zeros((1, 2, 2)), 0).SerializeToString()
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for key in (b"00000000", b"00000001", b"00000002"):
            txn.put(key, good)
        txn.put(b"00000003\n", b"\x0a\xff\xff\xff\xff junk")
        txn.put(b"00000004", caffe_pb2.Datum(data=b"not a PNG", encoded=True).SerializeToString())
    env.close()
    layer, top = data_layer(tmp_path / "db", batch_size=2)
    data_batch(layer, top, 0)  # records 0 and 1 are fine; the forward starts reading batch 1 in the
    # background
    assert layer._pending is not None and layer._pending.key[0] == 1
    with pytest.raises(LayerError, match=rf"layer 'data' \(Data\): {tmp_path / 'db'} record 00000003\\n "
                                         r"is not a Datum \("):
        data_batch(layer, top, 1)
    layer, top = data_layer(tmp_path / "db", batch_size=1)
    with pytest.raises(LayerError, match=rf"{tmp_path / 'db'} record 00000004: cannot decode the encoded "):
        data_batch(layer, top, 4)


def test_data_mean_file_shape_mismatch(tmp_path):
    path, _, _ = images_db(tmp_path, n=1, shape=(1, 4, 4))
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([1, 1, 3, 3])
    proto.data.extend([0.0] * 9)
    (tmp_path / "mean.binaryproto").write_bytes(proto.SerializeToString())
    with pytest.raises(LayerError, match=r"has shape \[1, 3, 3\], the data has \[1, 4, 4\]"):
        data_layer(path, f'transform_param {{ mean_file: "{tmp_path / "mean.binaryproto"}" }}', batch_size=1)


# -- Data in a Net ---------------------------------------------------------------------------------

NET = """
name: "datanet"
layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  data_param {{ source: "{train}" batch_size: 3 backend: LMDB }}
  transform_param {{ scale: 0.00390625 crop_size: 3 mirror: true }} }}
layer {{ name: "mnist" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  data_param {{ source: "{test}" batch_size: 2 backend: LMDB }}
  transform_param {{ scale: 0.00390625 crop_size: 3 }} }}
layer {{ name: "relu" type: "ReLU" bottom: "data" top: "relu" }}
"""


def make_net(tmp_path, phase):
    if not (tmp_path / "train").exists():
        images_db(tmp_path, n=5, shape=(1, 4, 4), name="train")
        images_db(tmp_path, n=3, shape=(1, 4, 4), name="test", seed=1)
    text = NET.format(train=tmp_path / "train", test=tmp_path / "test")
    return Net(io.parse_text(text, caffe_pb2.NetParameter()), phase)


def test_net_with_data_layer(tmp_path):
    net = make_net(tmp_path, minicaffe.TEST)
    test_images = images_db(tmp_path, n=3, shape=(1, 4, 4), name="unused", seed=1)[1]
    out = net.forward()
    assert net.blobs["data"].shape == (2, 1, 3, 3) and net.blobs["label"].shape == (2,)
    np.testing.assert_array_equal(out["label"], [3, 13])
    np.testing.assert_allclose(out["relu"], test_images[:2, :, 0:3, 0:3] / np.float32(256), rtol=1e-6)
    out = net.forward()
    np.testing.assert_array_equal(out["label"], [23, 3])


def test_net_resumed_reads_the_same_batches(tmp_path):
    net = make_net(tmp_path, minicaffe.TRAIN)
    seen = [(net.forward()["relu"].copy(), net.blobs["label"].data.copy()) for _ in range(4)]
    resumed = make_net(tmp_path, minicaffe.TRAIN)
    resumed.forward_count = 2  # as the solver does when restoring a snapshot at iteration 2
    for f in (2, 3):
        out = resumed.forward()
        np.testing.assert_array_equal(out["relu"], seen[f][0])
        np.testing.assert_array_equal(out["label"], seen[f][1])


# -- HDF5Data --------------------------------------------------------------------------------------

def hdf5_files(tmp_path, rows=(3, 5)):
    import h5py
    names, data, label = [], [], []
    start = 0
    for k, n in enumerate(rows):
        d = (np.arange(n * 2 * 3, dtype=np.float64).reshape(n, 2, 3) + 100 * start)
        lab = np.arange(start, start + n, dtype=np.float32)
        path = tmp_path / f"part{k}.h5"
        with h5py.File(path, "w") as f:
            f["data"] = d
            f["label"] = lab
        names.append(str(path))
        data.append(d)
        label.append(lab)
        start += n
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n\n")
    return tmp_path / "list.txt", np.concatenate(data), np.concatenate(label)


def hdf5_layer(source, batch_size, shuffle=False, tops=("data", "label"), dtype=np.float32):
    tops_text = " ".join(f'top: "{t}"' for t in tops)
    text = (f'name: "h5" type: "HDF5Data" {tops_text} hdf5_data_param {{ source: "{source}" '
            f"batch_size: {batch_size} shuffle: {str(shuffle).lower()} }}")
    layer = layer_from_prototxt(text, dtype=dtype)
    top = [Blob((), dtype) for _ in tops]
    layer.setup([], top)
    return layer, top


def hdf5_run(layer, top, index):
    layer.forward_index = index
    layer.reshape([], top)
    layer.forward([], top)
    return [np.array(t.data) for t in top]


@pytest.mark.parametrize("dtype", DTYPES)
def test_hdf5_rows_across_files_in_order(tmp_path, dtype):
    source, data, label = hdf5_files(tmp_path)
    layer, top = hdf5_layer(source, 3, dtype=dtype)
    assert top[0].shape == (3, 2, 3) and top[1].shape == (3,)
    for f in range(6):
        rows = [(3 * f + i) % 8 for i in range(3)]
        d, lab = hdf5_run(layer, top, f)
        assert d.dtype == dtype
        np.testing.assert_array_equal(d, data[rows].astype(dtype))
        np.testing.assert_array_equal(lab, rows)
    # A literal: batch 1 holds rows 3, 4, 5, i.e. the first rows of the second file.
    assert hdf5_run(layer, top, 1)[0][0, 1, 2] == 100 * 3 + 5


def test_hdf5_shuffle_is_replayable_and_per_epoch(tmp_path):
    source, data, label = hdf5_files(tmp_path)
    layer, top = hdf5_layer(source, 4, shuffle=True)
    epochs = [np.concatenate([hdf5_run(layer, top, 2 * e + b)[1] for b in range(2)]) for e in range(4)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(8))  # each row once per epoch
        # Caffe shuffles file order and rows within a file: a file's rows stay together.
        first_file = order[:3] if order[0] < 3 else order[:5]
        assert all(r < 3 for r in first_file) or all(r >= 3 for r in first_file)
    assert len({tuple(o) for o in epochs}) > 1
    assert any(not np.array_equal(o, np.arange(8)) for o in epochs)
    fresh, top2 = hdf5_layer(source, 4, shuffle=True)
    for f in (5, 2, 7):
        d, lab = hdf5_run(fresh, top2, f)
        np.testing.assert_array_equal(lab, epochs[f // 2][4 * (f % 2):4 * (f % 2) + 4])
        np.testing.assert_array_equal(d, data[lab.astype(int)])


def test_hdf5_errors(tmp_path, monkeypatch):
    source, _, _ = hdf5_files(tmp_path)
    with pytest.raises(LayerError, match="no dataset 'nope'"):
        hdf5_layer(source, 2, tops=("data", "nope"))
    with pytest.raises(LayerError, match="cannot read source list"):
        hdf5_layer(tmp_path / "missing.txt", 2)
    (tmp_path / "bad.txt").write_text("gone.h5\n")
    with pytest.raises(LayerError, match="gone.h5 listed in .*bad.txt does not exist"):
        hdf5_layer(tmp_path / "bad.txt", 2)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(LayerError, match="names no HDF5 files"):
        hdf5_layer(tmp_path / "empty.txt", 2)
    with pytest.raises(LayerError, match="batch_size must be positive"):
        hdf5_layer(source, 0)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(LayerError, match="needs h5py"):
        hdf5_layer(source, 2)


# -- DummyData -------------------------------------------------------------------------------------

def dummy(body, num_top, dtype=np.float32):
    layer = layer_from_prototxt(f'name: "dummy" type: "DummyData" dummy_data_param {{ {body} }}', dtype=dtype)
    top = [Blob((), dtype) for _ in range(num_top)]
    layer.setup([], top)
    return layer, top


@pytest.mark.parametrize("dtype", DTYPES)
def test_dummy_data_shapes_and_constants(tmp_path, dtype):
    layer, top = dummy("shape { dim: 2 dim: 3 } shape { dim: 4 } "
                       'data_filler { type: "constant" value: 1.5 } data_filler { value: -2 }', 2, dtype)
    assert top[0].shape == (2, 3) and top[1].shape == (4,)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, np.full((2, 3), 1.5, dtype))
    np.testing.assert_array_equal(top[1].data, np.full(4, -2, dtype))
    layer, top = dummy("num: 2 channels: 3 height: 1 width: 5", 3)
    assert all(t.shape == (2, 3, 1, 5) for t in top)
    layer.forward([], top)
    assert all(not t.data.any() for t in top)
    layer, top = dummy("num: 2 num: 1 channels: 3 height: 4 width: 5", 2)
    assert top[0].shape == (2, 3, 4, 5) and top[1].shape == (1, 3, 4, 5)


def test_dummy_data_random_fillers_refill_each_forward(tmp_path):
    layer, top = dummy('shape { dim: 500 } data_filler { type: "uniform" min: 2 max: 3 }', 1)
    values = []
    for f in (0, 1, 0):
        layer.forward_index = f
        layer.forward([], top)
        values.append(np.array(top[0].data))
    assert values[0].min() >= 2 and values[0].max() <= 3 and values[0].std() > 0.2
    assert not np.array_equal(values[0], values[1])
    np.testing.assert_array_equal(values[0], values[2])
    layer, top = dummy('shape { dim: 4000 } data_filler { type: "gaussian" mean: 5 std: 2 }', 1)
    layer.forward([], top)
    assert abs(top[0].data.mean() - 5) < 0.2 and abs(top[0].data.std() - 2) < 0.2


def test_dummy_data_errors():
    with pytest.raises(LayerError, match="2 data_filler for 3 tops"):
        dummy("shape { dim: 1 } data_filler { } data_filler { }", 3)
    with pytest.raises(LayerError, match="not both"):
        dummy("shape { dim: 1 } num: 1", 1)
    with pytest.raises(LayerError, match="2 shape for 3 tops"):
        dummy("shape { dim: 1 } shape { dim: 2 }", 3)
    with pytest.raises(LayerError, match="legacy field channels has 2 values for 3 tops"):
        dummy("num: 1 channels: 1 channels: 2 height: 1 width: 1", 3)
    with pytest.raises(LayerError, match="unknown filler type 'zebra'"):
        dummy('shape { dim: 1 } data_filler { type: "zebra" }', 1)


# -- MemoryData ------------------------------------------------------------------------------------

MEMORY_NET = """
name: "mem"
layer { name: "input" type: "MemoryData" top: "data" top: "label"
  memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
layer { name: "relu" type: "ReLU" bottom: "data" top: "relu" }
"""


@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_data_set_input_arrays(dtype):
    net = Net(io.parse_text(MEMORY_NET, caffe_pb2.NetParameter()), minicaffe.TEST, dtype=dtype)
    data = np.random.default_rng(0).normal(size=(6, 1, 2, 3))
    labels = np.arange(6) + 0.5
    net.set_input_arrays(np.zeros((2, 1, 2, 3)), np.zeros(2))
    net.forward()
    net.forward()  # the net counts passes; new arrays are used from the first pass after they are set
    net.set_input_arrays(data, labels)
    for batch in (0, 1, 2, 0):
        out = net.forward()
        rows = slice(2 * batch, 2 * batch + 2)
        np.testing.assert_allclose(net.blobs["data"].data, data[rows].astype(dtype))
        np.testing.assert_allclose(out["relu"], np.maximum(data[rows], 0).astype(dtype))
        np.testing.assert_array_equal(out["label"], labels[rows].astype(dtype))
    # pycaffe passes labels as (n, 1, 1, 1); a new set starts again at the first batch.
    net.set_input_arrays(data[:2] + 1, labels[:2, None, None, None])
    out = net.forward()
    np.testing.assert_allclose(net.blobs["data"].data, (data[:2] + 1).astype(dtype))
    np.testing.assert_array_equal(out["label"], labels[:2].astype(dtype))


def test_memory_data_errors():
    net = Net(io.parse_text(MEMORY_NET, caffe_pb2.NetParameter()), minicaffe.TEST)
    layer = net.layer_dict["input"]
    with pytest.raises(LayerError, match=r"call net.set_input_arrays"):
        layer.forward([], net.top_vecs[0])
    with pytest.raises(LayerError, match=r"number of items \(3\) must be a positive multiple of batch_size"):
        net.set_input_arrays(np.zeros((3, 1, 2, 3)), np.zeros(3))
    with pytest.raises(LayerError, match=r"data must have shape \(n, 1, 2, 3\)"):
        net.set_input_arrays(np.zeros((2, 1, 3, 2)), np.zeros(2))
    with pytest.raises(LayerError, match=r"labels must have shape \(2,\)"):
        net.set_input_arrays(np.zeros((2, 1, 2, 3)), np.zeros(4))
    with pytest.raises(LayerError, match="must be given and positive"):
        layer_from_prototxt('name: "m" type: "MemoryData" memory_data_param { batch_size: 2 }').setup(
            [], [Blob(), Blob()])
    other = Net(io.parse_text('layer { name: "d" type: "DummyData" top: "x" '
                              "dummy_data_param { shape { dim: 1 } } }", caffe_pb2.NetParameter()),
                minicaffe.TEST)
    with pytest.raises(NetError, match="needs a MemoryData layer"):
        other.set_input_arrays(np.zeros((2, 1, 2, 3)), np.zeros(2))


# -- GPU mode: batches are read on the host and uploaded once --------------------------------------

def test_data_layers_in_gpu_mode(tmp_path):
    pytest.importorskip("cupy")
    from minicaffe.backend import BackendError

    try:
        minicaffe.set_mode_gpu()
    except BackendError as error:
        pytest.skip(str(error))
    path, images, labels = images_db(tmp_path, n=4, shape=(1, 3, 3))
    layer, top = data_layer(path, "transform_param { scale: 2 }", batch_size=2)
    layer.forward_index = 1
    layer.reshape([], top)
    layer.forward([], top)
    assert not isinstance(top[0].get_data(), np.ndarray)
    np.testing.assert_array_equal(top[0].get_data().get(), images[2:4] * 2.0)
    np.testing.assert_array_equal(top[1].data, labels[2:4])
    net = Net(io.parse_text(MEMORY_NET, caffe_pb2.NetParameter()), minicaffe.TEST)
    data = np.random.default_rng(0).normal(size=(2, 1, 2, 3))
    net.set_input_arrays(data, np.arange(2))
    out = net.forward()
    np.testing.assert_allclose(out["relu"], np.maximum(data, 0).astype(np.float32))
    layer, top = dummy('shape { dim: 3 } data_filler { value: 4 }', 1)
    np.testing.assert_array_equal(top[0].get_data().get(), [4, 4, 4])
