"""`minicaffe convert-mnist`, the IDX reader and the embedded digits dataset.

Databases are read back here with lmdb and caffe_pb2 directly, and IDX files are parsed by hand, so
the checks do not depend on minicaffe's own readers.
"""

from __future__ import annotations

import gzip
import struct

import lmdb
import numpy as np
import pytest

import minicaffe
from minicaffe import io
from minicaffe.cli import main
from minicaffe.datasets import DIGITS_TOTAL, DIGITS_TRAIN, digits_lmdb, read_idx, read_mnist
from minicaffe.net import Net
from minicaffe.proto import caffe_pb2

IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"


def read_db(path) -> list[tuple[bytes, caffe_pb2.Datum]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        records = [(key, caffe_pb2.Datum.FromString(value)) for key, value in txn.cursor()]
    env.close()
    return records


def idx_by_hand(path) -> np.ndarray:
    raw = gzip.open(path).read() if str(path).endswith(".gz") else open(path, "rb").read()
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(shape)


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


# -- convert-mnist on the real MNIST test set ------------------------------------------------------

def test_convert_mnist_train_and_test_split(mnist_dir, tmp_path, capsys):
    images, labels = idx_by_hand(mnist_dir / IMAGES), idx_by_hand(mnist_dir / LABELS)
    assert images.shape == (10000, 28, 28)
    args = [str(mnist_dir / IMAGES), str(mnist_dir / LABELS)]
    assert main(["convert-mnist", *args, str(tmp_path / "train_lmdb"), "--count", "8000"]) == 0
    assert "Processed 8000 files." in capsys.readouterr().out
    assert main(["convert-mnist", *args, str(tmp_path / "test_lmdb"), "--start", "8000"]) == 0
    assert "Processed 2000 files." in capsys.readouterr().out

    train = read_db(tmp_path / "train_lmdb")
    assert len(train) == 8000
    assert [key for key, _ in train[:3]] == [b"00000000", b"00000001", b"00000002"]
    assert train[-1][0] == b"00007999"
    for i in (0, 1, 4567, 7999):
        key, datum = train[i]
        assert key == b"%08d" % i
        assert (datum.channels, datum.height, datum.width, datum.encoded) == (1, 28, 28, False)
        np.testing.assert_array_equal(np.frombuffer(datum.data, np.uint8).reshape(28, 28), images[i])
        assert datum.label == labels[i]
    np.testing.assert_array_equal([d.label for _, d in train], labels[:8000])
    assert train[0][1].label == 7 and train[1][1].label == 2  # the well-known first t10k labels

    test = read_db(tmp_path / "test_lmdb")
    assert len(test) == 2000
    assert test[0][0] == b"00008000" and test[-1][0] == b"00009999"
    np.testing.assert_array_equal(np.frombuffer(test[5][1].data, np.uint8).reshape(28, 28), images[8005])
    np.testing.assert_array_equal([d.label for _, d in test], labels[8000:])

    # The Data layer reads it back in key order, scaled as in Caffe's LeNet example.
    text = (f'layer {{ name: "mnist" type: "Data" top: "data" top: "label" data_param {{ source: '
            f'"{tmp_path / "test_lmdb"}" batch_size: 4 backend: LMDB }} '
            "transform_param { scale: 0.00390625 } }")
    net = Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TEST)
    out = net.forward()
    np.testing.assert_allclose(out["data"][:, 0], images[8000:8004] / np.float32(256), rtol=1e-6)
    np.testing.assert_array_equal(out["label"], labels[8000:8004])


def test_convert_refuses_to_overwrite(mnist_dir, tmp_path, capsys):
    args = ["convert-mnist", str(mnist_dir / IMAGES), str(mnist_dir / LABELS), str(tmp_path / "db")]
    assert main([*args, "--count", "3"]) == 0
    assert main([*args, "--count", "5"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert len(read_db(tmp_path / "db")) == 3  # untouched
    assert main([*args, "--count", "5", "--overwrite"]) == 0
    assert len(read_db(tmp_path / "db")) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no temporary folders left behind


# -- convert-mnist on small hand-made IDX files ----------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_convert_small_raw_and_gzip_idx(tmp_path, capsys, gz):
    images = np.arange(3 * 2 * 3).reshape(3, 2, 3) * 10
    labels = np.array([4, 0, 9])
    write_idx(tmp_path / "img", images, gz)
    write_idx(tmp_path / "lab", labels, gz)
    assert main(["convert-mnist", str(tmp_path / "img"), str(tmp_path / "lab"), str(tmp_path / "db"),
                 "-start", "1", "-count", "2"]) == 0  # Caffe-style single-dash flags work too
    assert capsys.readouterr().out.strip() == "Processed 2 files."
    records = read_db(tmp_path / "db")
    assert [k for k, _ in records] == [b"00000001", b"00000002"]
    datum = records[1][1]
    assert (datum.channels, datum.height, datum.width, datum.label) == (1, 2, 3, 9)
    assert list(datum.data) == [120, 130, 140, 150, 160, 170]


def cli_error(capsys, *args) -> str:
    assert main(["convert-mnist", *map(str, args)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    return captured.err


def test_convert_errors(tmp_path, capsys):
    write_idx(tmp_path / "img", np.zeros((3, 2, 2)))
    write_idx(tmp_path / "lab", np.zeros(3))
    write_idx(tmp_path / "lab4", np.zeros(4))
    out = tmp_path / "db"
    assert "img: not an MNIST labels file (magic number 2051, expected 2049)" in cli_error(
        capsys, tmp_path / "img", tmp_path / "img", out)
    assert "lab: not an MNIST images file (magic number 2049, expected 2051)" in cli_error(
        capsys, tmp_path / "lab", tmp_path / "lab", out)
    assert "has 3 images but" in cli_error(capsys, tmp_path / "img", tmp_path / "lab4", out)
    assert "nothere: cannot read" in cli_error(capsys, tmp_path / "nothere", tmp_path / "lab", out)
    assert "--start 2 --count 5" in cli_error(capsys, tmp_path / "img", tmp_path / "lab", out,
                                              "--start", "2", "--count", "5")
    assert "--start 3" in cli_error(capsys, tmp_path / "img", tmp_path / "lab", out, "--start", "3")
    assert "leveldb backend is not supported" in cli_error(capsys, tmp_path / "img", tmp_path / "lab", out,
                                                           "--backend", "leveldb")
    raw = (tmp_path / "img").read_bytes()
    (tmp_path / "cut").write_bytes(raw[:-1])
    assert "cut: IDX header says [3, 2, 2] (12 bytes) but the file holds 11" in cli_error(
        capsys, tmp_path / "cut", tmp_path / "lab", out)
    (tmp_path / "text").write_text("hello")
    assert "text: not an MNIST images file" in cli_error(capsys, tmp_path / "text", tmp_path / "lab", out)
    assert not out.exists()


def test_read_idx_matches_hand_parse(mnist_dir):
    np.testing.assert_array_equal(read_idx(mnist_dir / LABELS), idx_by_hand(mnist_dir / LABELS))
    images, labels = read_mnist(mnist_dir / IMAGES, mnist_dir / LABELS)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,) and labels.max() == 9


# -- the embedded digits dataset -------------------------------------------------------------------

def test_digits_lmdb(tmp_path):
    from sklearn.datasets import load_digits

    train_path, test_path = digits_lmdb(tmp_path / "data")
    train, test = read_db(train_path), read_db(test_path)
    assert (len(train), len(test)) == (DIGITS_TRAIN, DIGITS_TOTAL - DIGITS_TRAIN) == (1500, 297)
    digits = load_digits()
    pixels = np.stack([np.frombuffer(d.data, np.uint8) for _, d in train + test]).reshape(-1, 8, 8)
    assert all((d.channels, d.height, d.width) == (1, 8, 8) for _, d in train[:5] + test[:5])
    assert pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_array_equal(pixels, np.round(digits.images * 255 / 16))
    np.testing.assert_array_equal([d.label for _, d in train + test], digits.target)
    assert train[0][0] == b"00000000" and test[0][0] == b"00000000"

    # A second call finds them complete and leaves them alone.
    stamp = (train_path / "data.mdb").stat().st_mtime_ns
    assert digits_lmdb(tmp_path / "data") == (train_path, test_path)
    assert (train_path / "data.mdb").stat().st_mtime_ns == stamp


# -- --overwrite replaces only an existing LMDB (issue #9) -----------------------------------------

def small_idx(tmp_path, count=3):
    write_idx(tmp_path / "img", np.arange(count * 4).reshape(count, 2, 2))
    write_idx(tmp_path / "lab", np.arange(count) % 10)
    return [str(tmp_path / "img"), str(tmp_path / "lab")]


def test_overwrite_refuses_a_folder_of_user_files(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    (out / "data.mdb").write_bytes(b"")  # an LMDB's name among other files does not make it one
    err = cli_error(capsys, *small_idx(tmp_path), out, "--overwrite")
    assert f"{out} is a folder holding files other than an LMDB's data.mdb and lock.mdb" in err
    assert "photos, thesis.tex" in err and "nothing was deleted" in err
    assert (out / "thesis.tex").read_text() == "years of work"
    assert (out / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "lab", "out"]  # no temporary folder left


def test_overwrite_refuses_other_things(tmp_path, capsys):
    args = small_idx(tmp_path)
    (tmp_path / "empty").mkdir()
    assert "is a folder without an LMDB's data.mdb" in cli_error(capsys, *args, tmp_path / "empty",
                                                                 "--overwrite")
    assert (tmp_path / "empty").is_dir()
    (tmp_path / "notes.txt").write_text("keep me")
    assert "is a file that is not an LMDB" in cli_error(capsys, *args, tmp_path / "notes.txt", "--overwrite")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "lmdb_dir").mkdir()
    (tmp_path / "lmdb_dir" / "data.mdb").mkdir()
    assert "not a regular file" in cli_error(capsys, *args, tmp_path / "lmdb_dir", "--overwrite")
    assert (tmp_path / "lmdb_dir" / "data.mdb").is_dir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    assert "is a symbolic link" in cli_error(capsys, *args, tmp_path / "link", "--overwrite")
    assert (tmp_path / "link").is_symlink()


def test_overwrite_replaces_an_existing_lmdb(tmp_path, capsys):
    args = small_idx(tmp_path, count=5)
    out = tmp_path / "out"
    assert main(["convert-mnist", *args, str(out), "--count", "2"]) == 0
    read_db(out)  # opening it with the lock file leaves lock.mdb beside data.mdb, as any LMDB user would
    assert sorted(p.name for p in out.iterdir()) == ["data.mdb", "lock.mdb"]
    assert main(["convert-mnist", *args, str(out), "--overwrite"]) == 0
    assert len(read_db(out)) == 5

    # An LMDB written as a single file (subdir=False) is an LMDB too.
    single = tmp_path / "single.mdb"
    env = lmdb.open(str(single), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"old", b"record")
    env.close()
    assert main(["convert-mnist", *args, str(single), "--overwrite"]) == 0
    assert [key for key, _ in read_db(single)] == [b"%08d" % i for i in range(5)]
    capsys.readouterr()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no backup left behind
