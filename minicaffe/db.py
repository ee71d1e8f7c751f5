"""LMDB databases of Caffe ``Datum`` records: reading by position, writing atomically, Datum helpers.

Caffe's Data layer walks an LMDB with a cursor in key order; here a record is found by its position in
that order (the key list is read once when the database is opened), so a data layer can read the batch
for any iteration directly, which is what makes a resumed run read the same batches.

Reading is thread-safe: the environment is opened read-only without the lock file, and every read
opens its own short read transaction, so a prefetch thread and the main thread never share one.

Faults are errors, not crashes: every lmdb call is wrapped so that its error becomes a DBError naming
the database and the record key. LMDB trusts the file it maps into memory: touching a page beyond the
end of a truncated data.mdb kills the process with SIGBUS, a page of the wrong type aborts it on an
assertion, a node size that reaches past its page makes it read beyond the map. So at open, before LMDB
walks it, data.mdb must hold every page the environment says it uses ((last_pgno + 1) * page size), and
its B-tree is walked once with plain reads checking each page header, node and value size (_check_tree).
Not guarded against: a file truncated or rewritten by another process while it is open (LMDB's own
checks still turn some of that into errors, as a read of a page of the wrong type).
"""

from __future__ import annotations

import io as _io
import os
import secrets
import shutil
import struct
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from .proto import caffe_pb2


class DBError(ValueError):
    """A database that cannot be opened, read or written; the message names its path."""


def key_name(key: bytes) -> str:
    """A record key as one line of text for messages: Caffe's keys are ASCII and show as they are, other
    bytes are escaped as in Python's bytes literals, and a long key is cut."""
    shown = repr(key[:80])[2:-1]
    return shown if len(key) <= 80 else f"{shown}... ({len(key)} bytes)"


@contextmanager
def lmdb_errors(path, doing: str, key: bytes | None = None) -> Iterator[None]:
    """Turn an lmdb error raised in the block into a DBError naming the database, the action and the
    record key (lmdb's own messages name neither)."""
    import lmdb

    try:
        yield
    except lmdb.Error as error:
        raise DBError(_lmdb_message(path, doing, key, error)) from None


def _lmdb_message(path, doing: str, key: bytes | None, error: Exception) -> str:
    record = "" if key is None else f" record {key_name(key)}"
    return f"{path}: cannot {doing}{record} ({type(error).__name__}: {error})"


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


def parse_datum(value: bytes, where: str) -> caffe_pb2.Datum:
    """A serialized Datum (a database value); anything that does not parse is a DBError naming `where`."""
    try:
        return caffe_pb2.Datum.FromString(value)
    except DecodeError as error:
        raise DBError(f"{where} is not a Datum ({error})") from None


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

    def __init__(self, path: Path, identity, env, keys: list[bytes]):
        self.path, self.identity, self.env, self.keys = path, identity, env, keys
        self.readers = 0


# LMDB allows one open environment per file in a process (a TRAIN and a TEST net, or two nets, may
# read the same database), so readers share them. The count of readers is explicit and the last one
# closes the environment under the lock: a registry that forgot an environment (e.g. through weak
# references) before it was really closed made the next open fail with "already open".
_OPEN: dict[tuple[int, int], _Env] = {}
_OPEN_LOCK = threading.Lock()


def _acquire_env(path: Path) -> _Env:
    data_file = path / "data.mdb" if path.is_dir() else path
    try:
        stat = data_file.stat()
    except OSError as error:
        raise DBError(f"{data_file}: cannot open the LMDB ({error.strerror})") from None
    if stat.st_size == 0:  # LMDB's own message for this is "Bad file descriptor"
        raise DBError(f"{data_file}: truncated LMDB: the file is empty")
    identity = (stat.st_dev, stat.st_ino)
    with _OPEN_LOCK:
        shared = _OPEN.get(identity)
        if shared is None:
            shared = _OPEN[identity] = _open_env(path, data_file, identity)
        shared.readers += 1
        return shared


def _open_env(path: Path, data_file: Path, identity) -> _Env:
    """Open the environment read-only, check that data.mdb holds every page it uses, and list its keys."""
    import lmdb

    with lmdb_errors(path, "open the LMDB"):
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False,
                        subdir=path.is_dir(), max_readers=126)
    try:
        with lmdb_errors(path, "read the LMDB header"):
            info, stat = env.info(), env.stat()
        try:
            size, needed = os.stat(data_file).st_size, (info["last_pgno"] + 1) * stat["psize"]
            if size < needed:
                raise DBError(f"{data_file}: truncated or corrupt LMDB: the file has {size} bytes, its "
                              f"{info['last_pgno'] + 1} pages of {stat['psize']} bytes need {needed}")
            _check_tree(data_file, info["last_pgno"], stat["psize"])
        except OSError as error:
            raise DBError(f"{data_file}: cannot read the LMDB ({error.strerror})") from None
        keys: list[bytes] = []
        with lmdb_errors(path, "list the keys of the LMDB"), env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                keys.append(key)
    except BaseException:
        env.close()
        raise
    return _Env(path, identity, env, keys)


# LMDB's on-disk layout (lmdb.h/mdb.c, 64-bit builds): a page starts with a 16-byte header (pgno u64,
# pad u16, flags u16, lower u16, upper u16) then u16 offsets of its nodes; a node is lo u16, hi u16,
# flags u16, key size u16, then the key and the data (a branch node's lo/hi/flags hold the child page).
_PAGE_HEADER, _NODE_HEADER = 16, 8
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
_F_BIGDATA = 0x01
_P_INVALID = 2**64 - 1
_MIN_PAGE_SIZE, _MAX_PAGE_SIZE = 256, 0x10000  # what LMDB accepts (MDB_MINPAGESIZE.. MAX_PAGESIZE)
_MAX_DEPTH = 32  # LMDB's cursor stack (CURSOR_STACK): no tree it can read is deeper


def _check_tree(data_file: Path, last_pgno: int, psize: int) -> None:
    """Walk the main B-tree of data.mdb with plain reads, as LMDB would, and raise a DBError for any page
    or node that points outside the file or its page: LMDB trusts these (a wrong page type aborts it on
    an assertion, a wrong size makes it read past the map), so they are checked before it walks them.

    This reads the branch and leaf pages once, as listing the keys does anyway; overflow pages (large
    values) are not read, only their range checked."""
    if struct.calcsize("P") != 8:  # the layout below is that of 64-bit builds
        return
    if not _MIN_PAGE_SIZE <= psize <= _MAX_PAGE_SIZE:
        raise DBError(f"{data_file}: corrupt LMDB: its page size is {psize} bytes")
    with open(data_file, "rb") as file:
        def page(pgno: int) -> bytes:
            data = os.pread(file.fileno(), psize, pgno * psize)
            if len(data) < psize:  # the file changed since its size was checked
                raise DBError(f"{data_file}: truncated LMDB: page {pgno} is past the end of the file")
            return data

        def corrupt(what: str) -> DBError:
            return DBError(f"{data_file}: corrupt LMDB: {what}")

        # LMDB uses the meta page (0 or 1) of the latest transaction.
        metas = [page(i) for i in (0, 1)]
        meta = max(metas, key=lambda m: struct.unpack_from("=Q", m, 144)[0])
        depth, entries, root = struct.unpack_from("=H", meta, 94)[0], *struct.unpack_from("=QQ", meta, 120)
        if root == _P_INVALID:  # an empty database
            if entries:
                raise corrupt(f"its header counts {entries} records, its tree is empty")
            return
        if not 1 <= depth <= _MAX_DEPTH:
            raise corrupt(f"its tree depth is {depth}")
        seen: set[int] = set()
        found = 0

        def walk(pgno: int, level: int) -> None:
            nonlocal found
            if pgno > last_pgno or pgno in seen:
                raise corrupt(f"page {pgno} is {'beyond the last page' if pgno > last_pgno else 'reused'}")
            seen.add(pgno)
            data = page(pgno)
            own, flags, lower, upper = struct.unpack_from("=QxxHHH", data)
            kind = _P_LEAF if level == depth else _P_BRANCH
            if own != pgno or flags & (_P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META | _P_LEAF2) != kind:
                raise corrupt(f"page {pgno} has a wrong header")
            count = (lower - _PAGE_HEADER) // 2
            if not (_PAGE_HEADER < lower <= upper <= psize) or count < 1:
                raise corrupt(f"page {pgno} has a wrong node count")
            for offset in struct.unpack_from(f"={count}H", data, _PAGE_HEADER):
                if not upper <= offset <= psize - _NODE_HEADER:
                    raise corrupt(f"page {pgno} has a node outside it")
                lo, hi, node_flags, key_size = struct.unpack_from("=HHHH", data, offset)
                end = offset + _NODE_HEADER + key_size
                if kind == _P_BRANCH:
                    if end > psize:
                        raise corrupt(f"page {pgno} has a key outside it")
                    walk(lo | hi << 16 | node_flags << 32, level + 1)
                    continue
                size = lo | hi << 16
                if node_flags & ~_F_BIGDATA:
                    raise corrupt(f"page {pgno} has a node with flags {node_flags:#x} (sub-databases "
                                  "and duplicate keys are not supported)")
                if node_flags & _F_BIGDATA:
                    if end + 8 > psize:
                        raise corrupt(f"page {pgno} has a node outside it")
                    first = struct.unpack_from("=Q", data, end)[0]
                    if first + (_PAGE_HEADER + size + psize - 1) // psize > last_pgno + 1:
                        raise corrupt(f"page {pgno} has a value of {size} bytes beyond the last page")
                elif end + size > psize:
                    raise corrupt(f"page {pgno} has a value of {size} bytes outside it")
                found += 1

        walk(root, 1)
        if found != entries:
            raise corrupt(f"its header counts {entries} records, {found} were found")


def _release_env(shared: _Env) -> None:
    with _OPEN_LOCK:
        shared.readers -= 1
        if shared.readers == 0:
            _OPEN.pop(shared.identity, None)
            with lmdb_errors(shared.path, "close the LMDB"):
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
        if count <= 0:
            return []
        if not self.keys:
            raise DBError(f"{self.path}: the database is empty")
        out = []
        position = start % len(self.keys)
        key = self.keys[position]
        # A fresh transaction per call: safe from any thread.
        with lmdb_errors(self.path, "read", key), self.env.begin() as txn:
            cursor = txn.cursor()
            found = cursor.set_key(key)
            for i in range(count):
                with lmdb_errors(self.path, "read", key):
                    if i:
                        found = cursor.first() if position == 0 else cursor.next()
                    if not found or cursor.key() != key:
                        raise DBError(f"{self.path}: record {key_name(key)} is gone: the database "
                                      "changed while it was open")
                    out.append((key, cursor.value()))
                position = (position + 1) % len(self.keys)
                key = self.keys[position]
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
        return [(key, parse_datum(value, f"{reader.path} record {key_name(key)}"))
                for key, value in reader.read(0, len(reader))]
    finally:
        reader.close()


# -- writing ---------------------------------------------------------------------------------------

def write_lmdb(path, records: Iterable[tuple[bytes, bytes]], overwrite: bool = False,
               commit_every: int = 1000) -> int:
    """Write (key, value) records to a new LMDB at `path`; returns how many were written.

    The database is built in a temporary folder beside `path` and renamed into place, so an
    interrupted conversion never leaves a half-written database. An existing `path` is refused
    unless overwrite is set, and even then only an existing LMDB is replaced (never a folder of other
    files), once the new one is complete."""
    import lmdb

    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise DBError(f"{path} already exists; remove it or pass --overwrite to replace it")
        not_lmdb = _why_not_an_lmdb(path)
        if not_lmdb:
            raise DBError(f"{path} {not_lmdb}; --overwrite replaces only an existing LMDB, so nothing "
                          "was deleted: remove it yourself or choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Mode 0777 less the umask, which the kernel applies (mkdtemp would make it private, 0700).
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp, 0o777)
    count = 0
    try:
        with lmdb_errors(path, "create the LMDB"):
            env = lmdb.open(str(tmp), map_size=64 << 20, subdir=True)
        try:
            chunk: list[tuple[bytes, bytes]] = []
            for record in records:
                chunk.append(record)
                if len(chunk) == commit_every:
                    count += _put_chunk(env, chunk, path)
                    chunk = []
            if chunk:
                count += _put_chunk(env, chunk, path)
            with lmdb_errors(path, "write the LMDB to disk"):
                env.sync()
        finally:
            with lmdb_errors(path, "close the LMDB"):
                env.close()
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def _why_not_an_lmdb(path: Path) -> str | None:
    """Why `path` is not an LMDB that --overwrite may replace (None if it is one): a folder holding
    only data.mdb and lock.mdb, or a single data file (an LMDB written with subdir=False)."""
    import lmdb

    if path.is_symlink():
        return "is a symbolic link"
    if path.is_dir():
        names = sorted(entry.name for entry in path.iterdir())
        others = [name for name in names if name not in ("data.mdb", "lock.mdb")]
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            return f"is a folder holding files other than an LMDB's data.mdb and lock.mdb ({shown})"
        if "data.mdb" not in names:
            return "is a folder without an LMDB's data.mdb"
        if not all((path / name).is_file() and not (path / name).is_symlink() for name in names):
            return "holds a data.mdb or lock.mdb that is not a regular file"
        return None
    if not path.is_file():
        return "is not a regular file or folder"
    try:  # read-only without the lock: only the header is read, nothing is created
        lmdb.open(str(path), readonly=True, lock=False, subdir=False).close()
    except lmdb.Error:
        return "is a file that is not an LMDB"
    return None


def _put_chunk(env, chunk: list[tuple[bytes, bytes]], path: Path) -> int:
    """Commit one transaction of records, growing the map when it is full (LMDB needs a size up front)."""
    import lmdb

    while True:
        key = None
        try:
            with env.begin(write=True) as txn:
                for key, value in chunk:
                    if not txn.put(key, value, overwrite=False):
                        raise DBError(f"{path}: duplicate key {key_name(key)}")
                key = None  # what fails from here on is the commit, not one record
            return len(chunk)
        except lmdb.MapFullError:  # grown below, then the chunk is written again
            pass
        except lmdb.Error as error:
            raise DBError(_lmdb_message(path, "write", key, error)) from None
        with lmdb_errors(path, "grow the LMDB"):
            env.set_mapsize(env.info()["map_size"] * 2)


def _replace(tmp: Path, path: Path) -> None:
    if not (path.exists() or path.is_symlink()):
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
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink()


def write_datum_lmdb(path, arrays: Iterable[np.ndarray], labels: Iterable[int], first_key: int = 0,
                     overwrite: bool = False) -> int:
    """(C, H, W) arrays and labels to an LMDB of Datum with Caffe's "%08d" keys from first_key on."""
    records = (
        (b"%08d" % (first_key + i), array_to_datum(array, label).SerializeToString())
        for i, (array, label) in enumerate(zip(arrays, labels, strict=True))
    )
    return write_lmdb(path, records, overwrite=overwrite)
