"""Opening the files the product reads: the one way to do it, so that every read is bounded.

A file must be a regular file: a FIFO, a device (/dev/zero, /dev/urandom) or a folder is refused
before anything is read, so a read neither blocks nor grows without end. And it must be within
protobuf's 2 GB limit (a caller may lift the limit for formats without it, such as HDF5). Errors are
FormatError naming the file. minicaffe.io re-exports all of this; it lives here so that modules below
minicaffe.io (caffe_io) can use it too.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["FormatError", "PROTOBUF_LIMIT", "open_file", "read_file", "excerpt", "file_name"]


class FormatError(ValueError):
    """A file that is not what it should be; the message names the file (and line)."""


# Protobuf refuses a message of 2 GB or more (its sizes are 32-bit signed ints); no file the product
# reads needs to be larger, and a cap keeps a wrong path from filling the memory.
PROTOBUF_LIMIT = 2**31 - 1

_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_file(path, limit: int | None = PROTOBUF_LIMIT) -> BinaryIO:
    """Open `path` for reading in binary, checking first that it is a regular file of at most `limit`
    bytes (None: any size); FormatError naming the file otherwise. The one way the product opens a file
    to read."""
    name = file_name(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_BINARY", 0))
    except OSError as error:
        raise FormatError(f"{name}: cannot read ({error.strerror or error})") from None
    except ValueError:  # a NUL byte in the name
        raise FormatError(f"{name}: cannot read (a file name cannot hold a NUL byte)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((kind for test, kind in _FILE_KINDS if test(info.st_mode)), "not a regular file")
            raise FormatError(f"{name}: cannot read: it is {kind}, not a regular file")
        if limit is not None and info.st_size > limit:
            raise FormatError(f"{name}: cannot read: {info.st_size} bytes, more than {_limit_text(limit)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_file(path, limit: int | None = PROTOBUF_LIMIT) -> bytes:
    """The bytes of the regular file `path` (see open_file)."""
    with open_file(path, limit) as f:
        try:
            if limit is None:
                data = f.read()
            else:
                # Ask for the size fstat gave (+1 to see growth), never for `limit`: read(n) allocates n
                # bytes up front, and 2 GB for a small file fails under a memory limit.
                size = os.fstat(f.fileno()).st_size
                chunks = [f.read(min(size, limit) + 1)]
                total = len(chunks[0])
                while size < total <= limit:  # it grew since fstat: read on, in bounded pieces
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
                data = b"".join(chunks)
        except OSError as error:
            raise FormatError(f"{file_name(path)}: cannot read ({error.strerror or error})") from None
    if limit is not None and len(data) > limit:  # it grew since it was checked
        raise FormatError(f"{file_name(path)}: cannot read: more than {_limit_text(limit)}")
    return data


def file_name(path) -> str:
    """A file name for an error message (a name from a prototxt must not write to the terminal)."""
    return excerpt(os.fsdecode(path), None)


def _limit_text(limit: int) -> str:
    return f"the limit of {limit} bytes" + (" (protobuf's 2 GB)" if limit == PROTOBUF_LIMIT else "")


def excerpt(text: str, limit: int | None = 32) -> str:
    """A piece of a file's content (or a name) fit for an error message: control and undecodable
    characters escaped (a file must not write to the terminal), and cut to `limit` characters."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return escaped if limit is None or len(escaped) <= limit else escaped[:limit] + "..."
