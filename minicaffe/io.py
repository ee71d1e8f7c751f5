"""Reading and writing Caffe's files: prototxt (text), .caffemodel / .solverstate / .binaryproto (binary).

Errors name the file and, for text, the line and column; a file is written to a temporary name and
renamed into place, so a crash or a full disk never leaves a half-written model over a good one.

Every file the product reads goes through ``open_file`` (defined in minicaffe.files, which
caffe_io can import too, and re-exported here): it must be a regular file of at most protobuf's 2 GB
limit. Text prototxt is read as bytes, as Caffe does: bytes that are not UTF-8 are fine in comments.

This is also pycaffe's ``caffe.io``: its image and blob helpers (Transformer, load_image, ...) are
defined in minicaffe.caffe_io and imported here, so ``caffe.io.Transformer``, ``import minicaffe.io``
and ``from minicaffe.io import load_image`` all work as with pycaffe.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from pathlib import Path

from google.protobuf import message, text_format

from .caffe_io import (
    Transformer,
    array_to_blobproto,
    array_to_datum,
    arraylist_to_blobprotovector_str,
    blobproto_to_array,
    blobprotovector_str_to_arraylist,
    datum_to_array,
    load_image,
    oversample,
    resize_image,
)
from .files import PROTOBUF_LIMIT, FormatError, excerpt, file_name, open_file, read_file
from .proto import caffe_pb2
from .upgrade import upgrade_net

__all__ = [
    # pycaffe's caffe.io (minicaffe.caffe_io)
    "Transformer", "load_image", "resize_image", "oversample", "blobproto_to_array", "array_to_blobproto",
    "arraylist_to_blobprotovector_str", "blobprotovector_str_to_arraylist", "array_to_datum",
    "datum_to_array",
    # Caffe's files
    "FormatError", "PROTOBUF_LIMIT", "open_file", "read_file", "excerpt", "parse_text", "read_text",
    "read_binary", "read_net_param", "read_solver_param",
    "write_atomic", "write_binary", "write_text", "upgrade_net",
]


def _parse_error_detail(error: text_format.ParseError) -> str:
    """Protobuf's message without its position, and with the tokens (or the whole line) it quotes
    from the file cut short: an error names the file, line and column, it does not echo the file."""
    detail = str(error).split(" : ", 1)[-1]
    if "surrogates not allowed" in detail:
        return "a string value holds bytes that are not UTF-8 (they are fine in comments)"
    quoted = re.sub(r"""(["'])(.*?)\1(?=[\s.:,;)]|$)""", lambda m: m[1] + excerpt(m[2]) + m[1], detail)
    return excerpt(quoted, 200)


def parse_text(text: str | bytes, msg, source: str = "<string>"):
    """Parse text-format protobuf into `msg`. Bytes that are not UTF-8 are kept as they are (Caffe
    reads bytes): fine in comments, an error naming the line in a string value."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="surrogateescape")
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as error:
        line, column = error.GetLine(), error.GetColumn()
        where = f"{source}:{line}:{column}" if line is not None else source
        raise FormatError(f"{where}: {_parse_error_detail(error)}") from None
    return msg


def read_text(path, msg):
    data = read_file(path)
    name = file_name(path)
    if b"\0" in data:
        raise FormatError(f"{name}: not a text prototxt (it holds NUL bytes: is it a binary .caffemodel?)")
    return parse_text(data, msg, name)


def read_binary(path, msg):
    data = read_file(path)
    try:
        msg.ParseFromString(data)
    except message.DecodeError as error:
        name = file_name(path)
        raise FormatError(f"{name}: not a binary {msg.DESCRIPTOR.name} ({error})") from None
    return msg


def read_net_param(path) -> caffe_pb2.NetParameter:
    """A NetParameter from a prototxt, or from a binary file (e.g. a .caffemodel) when not text."""
    path = Path(path)
    if path.suffix in (".caffemodel", ".binaryproto"):
        return upgrade_net(read_binary(path, caffe_pb2.NetParameter()), str(path))
    return upgrade_net(read_text(path, caffe_pb2.NetParameter()), str(path))


def read_solver_param(path) -> caffe_pb2.SolverParameter:
    return read_text(path, caffe_pb2.SolverParameter())


TEMP_SUFFIX = ".tmp"  # write_atomic's temporary files: .<target name>.<random>.tmp


def write_atomic(path, data: bytes) -> None:
    """Write via a temporary file in the same folder, then rename over the target.

    The data is fsync'd before the rename and the folder after it, so after a crash or a power cut the
    target is the old file or the new one, whole. The file's mode is what a plain open() gives (0666
    less the umask, which the kernel applies; mkstemp would make it 0600). An OSError (a full disk, ...)
    names the target."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write ({error.strerror or error})", str(path)) from None
        raise


def temp_files(prefix) -> list[Path]:
    """The temporary files write_atomic leaves behind when killed, for targets whose name starts with
    the file name of `prefix` (e.g. a snapshot_prefix), in prefix's folder: ``.<name>...tmp``."""
    prefix = Path(prefix)
    folder, start = prefix.parent, f".{prefix.name}"
    try:
        names = [p for p in folder.iterdir() if p.name.startswith(start) and p.name.endswith(TEMP_SUFFIX)]
    except OSError:  # no folder yet: nothing left behind
        return []
    return sorted(p for p in names if p.is_file() and not p.is_symlink())


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: fsync the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a folder we may write but not read: the rename stands, only less durable
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # a file system without it
            raise
    finally:
        os.close(fd)


def write_binary(path, msg) -> None:
    write_atomic(path, msg.SerializeToString())


def write_text(path, msg) -> None:
    write_atomic(path, text_format.MessageToString(msg).encode())
