"""LMDB databases of Caffe ``Datum`` records: reading by position, writing atomically, Datum helpers.

Caffe's Data layer walks an LMDB with a cursor in key order; here a record is found by its position in
that order (the key list is read once when the database is opened), so a data layer can read the batch
for any iteration directly, which is what makes a resumed run read the same batches.

Reading is thread-safe: the environment is opened read-only without the lock file, and every read
opens its own short read transaction, so a prefetch thread and the main thread never share one.
"""

from __future__ import annotations

import io as _io
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .proto import caffe_pb2


class DBError(ValueError):
    """A database that cannot be opened, read or written; the message names its path."""


# -- Datum <-> arrays ------------------------------------------------------------------------------

def array_to_datum(array: np.ndarray, label: int = 0) -> caffe_pb2.Datum:
    """A (C, H, W) array as a Datum (as pycaffe's caffe.io.array_to_datum): uint8 arrays go to the raw
    `data` bytes, anything else to `float_data`."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"a Datum holds a (channels, height, width) array, got shape {list(array.shape)}")
    datum = caffe_pb2.Datum(channels=array.shape[0], height=array.shape[1], width=array.shape[2],
                            label=int(label))
    if array.dtype == np.uint8:
        datum.data = array.tobytes()
    else:
        datum.float_data.extend(array.astype(np.float32).ravel().tolist())
    return datum


def datum_to_array(datum: caffe_pb2.Datum, force_color: bool = False, force_gray: bool = False,
                   where: str = "datum") -> np.ndarray:
    """The (C, H, W) array of a Datum: uint8 for raw bytes and decoded images, float32 for float_data."""
    if datum.encoded:
        return decode_image(datum.data, force_color, force_gray, where)
    c, h, w = datum.channels, datum.height, datum.width
    if c <= 0 or h <= 0 or w <= 0:
        raise DBError(f"{where}: Datum has shape channels={c} height={h} width={w}")
    if datum.data:
        if len(datum.data) != c * h * w:
            raise DBError(f"{where}: Datum has {len(datum.data)} data bytes, {c}x{h}x{w} needs {c * h * w}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
    if len(datum.float_data) != c * h * w:
        raise DBError(f"{where}: Datum has {len(datum.float_data)} float_data values and "
                      f"{len(datum.data)} data bytes, {c}x{h}x{w} needs {c * h * w}")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)


def decode_image(data: bytes, force_color: bool = False, force_gray: bool = False,
                 where: str = "datum") -> np.ndarray:
    """Decode a PNG/JPEG/... Datum payload to (C, H, W) uint8, channels in Caffe's (OpenCV's) BGR order.

    Like Caffe: grey images keep 1 channel and colour ones 3 unless force_color / force_gray say so."""
    if force_color and force_gray:
        raise DBError(f"{where}: cannot set both force_color and force_gray")
    try:
        from PIL import Image
    except ImportError:
        raise DBError(f"{where}: the Datum holds an encoded image (encoded: true); decoding it needs "
                      "Pillow (`pip install pillow`), or convert the database to raw pixels") from None
    # The pixel cap below is an error; Pillow's warning at the same limit would only add a line to it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        image = Image.open(_io.BytesIO(data))  # reads the header only
        limit = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit (None: switched off)
        if limit and image.width * image.height > limit:
            raise DBError(f"{where}: the encoded image is {image.width}x{image.height} pixels, more than "
                          f"Pillow's limit of {limit} (Image.MAX_IMAGE_PIXELS)")
        image.load()
    except DBError:
        raise
    except Exception as error:  # Pillow raises several types for corrupt data
        raise DBError(f"{where}: cannot decode the encoded image ({error})") from None
    if force_gray or (not force_color and image.mode in ("1", "L", "I;16", "I", "F")):
        return np.asarray(image.convert("L"), dtype=np.uint8)[None]
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))  # HWC RGB -> CHW BGR


# -- reading ---------------------------------------------------------------------------------------

def is_lmdb(path) -> bool:
    path = Path(path)
    return (path / "data.mdb").is_file() or (path.is_file() and path.suffix == ".mdb")


def looks_like_leveldb(path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "CURRENT").is_file() and not is_lmdb(path)


class _Env:
    """An open read-only LMDB environment and its keys in order, shared by every reader of it."""

    def __init__(self, identity, env, keys: list[bytes]):
        self.identity, self.env, self.keys = identity, env, keys
        self.readers = 0


# LMDB allows one open environment per file in a process (a TRAIN and a TEST net, or two nets, may
# read the same database), so readers share them. The count of readers is explicit and the last one
# closes the environment under the lock: a registry that forgot an environment (e.g. through weak
# references) before it was really closed made the next open fail with "already open".
_OPEN: dict[tuple[int, int], _Env] = {}
_OPEN_LOCK = threading.Lock()


def _acquire_env(path: Path) -> _Env:
    import lmdb

    data_file = path / "data.mdb" if path.is_dir() else path
    stat = data_file.stat()
    identity = (stat.st_dev, stat.st_ino)
    with _OPEN_LOCK:
        shared = _OPEN.get(identity)
        if shared is None:
            try:
                env = lmdb.open(str(path), readonly=True, lock=False, readahead=False,
                                subdir=path.is_dir(), max_readers=126)
            except lmdb.Error as error:
                raise DBError(f"{path}: cannot open the LMDB ({error})") from None
            with env.begin() as txn:
                keys = list(txn.cursor().iternext(keys=True, values=False))
            shared = _OPEN[identity] = _Env(identity, env, keys)
        shared.readers += 1
        return shared


def _release_env(shared: _Env) -> None:
    with _OPEN_LOCK:
        shared.readers -= 1
        if shared.readers == 0:
            _OPEN.pop(shared.identity, None)
            shared.env.close()


class LMDBReader:
    """Read-only access to an LMDB by record position in key order."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise DBError(f"{self.path}: no such database")
        if looks_like_leveldb(self.path):
            raise DBError(f"{self.path}: looks like a LevelDB; LEVELDB not supported, convert to LMDB")
        if not is_lmdb(self.path):
            raise DBError(f"{self.path}: not an LMDB (no data.mdb inside)")
        self._shared = _acquire_env(self.path)
        self.env, self.keys = self._shared.env, self._shared.keys

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, start: int, count: int) -> list[tuple[bytes, bytes]]:
        """`count` (key, value) pairs from position `start` on, wrapping around at the end."""
        out = []
        with self.env.begin() as txn:  # a fresh transaction per call: safe from any thread
            cursor = txn.cursor()
            position = start % len(self.keys)
            cursor.set_key(self.keys[position])
            for _ in range(count):
                out.append((cursor.key(), cursor.value()))
                position += 1
                if position == len(self.keys):
                    position = 0
                    cursor.first()
                else:
                    cursor.next()
        return out

    def close(self) -> None:
        """Let go of the environment (closed once no reader uses it). Idempotent."""
        shared, self._shared, self.env = self._shared, None, None
        if shared is not None:
            _release_env(shared)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: module globals may already be gone
            pass


def read_datums(path) -> list[tuple[bytes, caffe_pb2.Datum]]:
    """Every (key, Datum) of an LMDB, in key order (for tests and small databases)."""
    reader = LMDBReader(path)
    try:
        return [(key, caffe_pb2.Datum.FromString(value)) for key, value in reader.read(0, len(reader))]
    finally:
        reader.close()


# -- writing ---------------------------------------------------------------------------------------

def write_lmdb(path, records: Iterable[tuple[bytes, bytes]], overwrite: bool = False,
               commit_every: int = 1000) -> int:
    """Write (key, value) records to a new LMDB at `path`; returns how many were written.

    The database is built in a temporary folder beside `path` and renamed into place, so an
    interrupted conversion never leaves a half-written database. An existing `path` is refused
    unless overwrite is set, and then replaced only once the new one is complete."""
    import lmdb

    path = Path(path)
    if path.exists() and not overwrite:
        raise DBError(f"{path} already exists; remove it or pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a database folder is normally readable by all
    count = 0
    try:
        env = lmdb.open(str(tmp), map_size=64 << 20, subdir=True)
        try:
            chunk: list[tuple[bytes, bytes]] = []
            for record in records:
                chunk.append(record)
                if len(chunk) == commit_every:
                    count += _put_chunk(env, chunk, tmp)
                    chunk = []
            if chunk:
                count += _put_chunk(env, chunk, tmp)
            env.sync()
        finally:
            env.close()
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def _put_chunk(env, chunk: list[tuple[bytes, bytes]], where: Path) -> int:
    """Commit one transaction of records, growing the map when it is full (LMDB needs a size up front)."""
    import lmdb

    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in chunk:
                    if not txn.put(key, value, overwrite=False):
                        raise DBError(f"{where}: duplicate key {key!r}")
            return len(chunk)
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


def _replace(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    backup = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    backup.rmdir()
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(backup, path)  # put the old one back: nothing already saved is lost
        raise
    shutil.rmtree(backup, ignore_errors=True)


def write_datum_lmdb(path, arrays: Iterable[np.ndarray], labels: Iterable[int], first_key: int = 0,
                     overwrite: bool = False) -> int:
    """(C, H, W) arrays and labels to an LMDB of Datum with Caffe's "%08d" keys from first_key on."""
    records = (
        (b"%08d" % (first_key + i), array_to_datum(array, label).SerializeToString())
        for i, (array, label) in enumerate(zip(arrays, labels, strict=True))
    )
    return write_lmdb(path, records, overwrite=overwrite)
