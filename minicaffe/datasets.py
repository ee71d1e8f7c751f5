"""Datasets: MNIST's IDX files, and the small digits set that the quickstart uses when MNIST is absent.

``digits_lmdb(root)`` needs no download: scikit-learn ships its 8x8 handwritten digits (1797 images)
inside the package. They are scaled from 0..16 to 0..255 uint8 and written, on first use, as two
LMDBs of 1x8x8 Datum records: the first 1500 images for training, the other 297 for testing.
"""

from __future__ import annotations

import gzip
import math
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np

from .db import DBError, LMDBReader, write_datum_lmdb
from .io import PROTOBUF_LIMIT, FormatError, read_file

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
DIGITS_TRAIN = 1500
DIGITS_TOTAL = 1797


def read_idx(path, expected_magic: int | None = None) -> np.ndarray:
    """An unsigned-byte IDX array (MNIST's format), from a raw or gzipped file. The header is checked
    against the file's length, with Python ints so that no product of dimensions wraps around."""
    path = Path(path)
    raw = read_file(path)
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(path, raw)
    if len(raw) < 4:
        raise FormatError(f"{path}: too short for an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        kind = {IMAGES_MAGIC: "an MNIST images", LABELS_MAGIC: "an MNIST labels"}.get(expected_magic,
                                                                                      "an IDX")
        raise FormatError(f"{path}: not {kind} file (magic number {magic}, expected {expected_magic})")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FormatError(f"{path}: not an unsigned-byte IDX file (magic number {magic})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise FormatError(f"{path}: IDX header gives no dimensions")
    if len(raw) < header:
        raise FormatError(f"{path}: IDX header cut short ({ndim} dimensions need {header} bytes, the file "
                          f"has {len(raw)})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if 0 in shape:
        raise FormatError(f"{path}: IDX header says {list(shape)}: a dimension of 0, no data")
    size = math.prod(shape)
    if len(raw) - header != size:
        raise FormatError(f"{path}: IDX header says {list(shape)} ({size} bytes) but the file holds "
                          f"{len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _gunzip(path: Path, raw: bytes) -> bytes:
    """The decompressed content, refused beyond protobuf's limit as the files themselves are (a small
    gzip file can expand to any size)."""
    try:
        with gzip.GzipFile(fileobj=BytesIO(raw)) as f:
            data = f.read(PROTOBUF_LIMIT + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise FormatError(f"{path}: broken gzip file ({error})") from None
    if len(data) > PROTOBUF_LIMIT:
        raise FormatError(f"{path}: more than {PROTOBUF_LIMIT} bytes once decompressed")
    return data


def read_mnist_images(path) -> np.ndarray:
    """MNIST images (n, rows, cols) uint8."""
    return read_idx(path, IMAGES_MAGIC)


def read_mnist_labels(path) -> np.ndarray:
    """MNIST labels (n,) uint8."""
    return read_idx(path, LABELS_MAGIC)


def read_mnist(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_mnist_images(images_path), read_mnist_labels(labels_path)
    if len(images) != len(labels):
        raise FormatError(f"{images_path} has {len(images)} images but {labels_path} has "
                          f"{len(labels)} labels")
    return images, labels


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as (1797, 1, 8, 8) uint8 in 0..255, and (1797,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, digits.target.astype(np.int64)


def _complete(path: Path, count: int) -> bool:
    try:
        reader = LMDBReader(path)
    except DBError:
        return False
    try:
        return len(reader) == count
    finally:
        reader.close()


def digits_lmdb(root) -> tuple[Path, Path]:
    """(train, test) LMDB paths of the digits set under `root`, writing them if absent or incomplete."""
    root = Path(root)
    images, labels = None, None
    paths = (root / "digits_train_lmdb", root / "digits_test_lmdb")
    splits = (slice(0, DIGITS_TRAIN), slice(DIGITS_TRAIN, DIGITS_TOTAL))
    for path, split in zip(paths, splits):
        count = split.stop - split.start
        if _complete(path, count):
            continue
        if images is None:
            images, labels = load_digits_uint8()
        try:
            write_datum_lmdb(path, images[split], labels[split], overwrite=path.exists())
        except OSError:
            if not _complete(path, count):  # another process may have written it at the same time
                raise
    return paths
