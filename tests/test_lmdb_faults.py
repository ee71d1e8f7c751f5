"""LMDB faults are errors, not crashes (issue #9): truncated and bit-flipped data.mdb files and values
that are not Datums end in a DBError naming the database (and the record), never in a signal.

LMDB maps data.mdb into memory: a truncated file used to kill the process with SIGBUS, and a page of
the wrong type aborts LMDB on an assertion. So every read of a damaged file runs in a subprocess, where
a crash fails the test (with its signal) instead of killing pytest.
"""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from minicaffe.db import DBError, LMDBReader, read_datums, write_datum_lmdb, write_lmdb
from minicaffe.proto import caffe_pb2

PAGE = 4096


def build_db(path: Path, count: int = 20, shape=(3, 24, 24)) -> Path:
    """An LMDB of `count` raw Datums; 1728-byte values make two records a leaf page, so the file has
    many pages; larger ones (more than half a page) go to overflow pages."""
    rng = np.random.default_rng(0)
    write_datum_lmdb(path, rng.integers(0, 256, (count, *shape), dtype=np.uint8),
                     [i % 10 for i in range(count)])
    assert (path / "data.mdb").stat().st_size % PAGE == 0
    return path


def python(code: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def describe(result: subprocess.CompletedProcess) -> str:
    if result.returncode < 0:
        return f"killed by {signal.Signals(-result.returncode).name}: {result.stderr[-2000:]}"
    return f"exit {result.returncode}: {result.stdout[-1000:]} {result.stderr[-2000:]}"


def assert_one_line_error(result: subprocess.CompletedProcess, *names) -> str:
    """The process exited 1 (not a signal) with a one-line error, its last line of stderr, naming `names`."""
    assert result.returncode == 1, describe(result)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    for name in names:
        assert str(name) in last, last
    return last


# A Net whose Data layer reads the database at argv[1]; any error is printed as one line.
NET_READS = """
import sys
import minicaffe
from minicaffe import io
from minicaffe.db import DBError
from minicaffe.proto import caffe_pb2
text = ('layer { name: "d" type: "Data" top: "data" top: "label" '
        'data_param { source: "%s" batch_size: 7 backend: LMDB } }' % sys.argv[1])
try:
    net = minicaffe.Net(io.parse_text(text, caffe_pb2.NetParameter()), minicaffe.TEST)
    for _ in range(4):
        net.forward()
except (minicaffe.NetError, minicaffe.LayerError, DBError) as error:
    sys.exit(str(error))
print("read")
"""


def truncate(db: Path, cut: str) -> int:
    data = db / "data.mdb"
    size = data.stat().st_size
    length = {"empty": 0, "part of the header": 100, "only the meta pages": 2 * PAGE, "half": size // 2,
              "three pages short": size - 3 * PAGE, "one byte short": size - 1}[cut]
    os.truncate(data, length)
    return length


CUTS = ["empty", "part of the header", "only the meta pages", "half", "three pages short", "one byte short"]


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_data_mdb_is_an_error_in_a_net(tmp_path, cut):
    db = build_db(tmp_path / "db")
    assert python(NET_READS, db).returncode == 0  # the whole file reads
    truncate(db, cut)
    message = assert_one_line_error(python(NET_READS, db), db)
    assert "layer 'd' (Data)" in message


def test_truncation_is_detected_at_open(tmp_path):
    db = build_db(tmp_path / "db")
    size = truncate(db, "three pages short")
    message = assert_one_line_error(python(
        "import sys\nfrom minicaffe.db import LMDBReader, DBError\n"
        "try: LMDBReader(sys.argv[1])\nexcept DBError as e: sys.exit(str(e))", db))
    pages = size // PAGE + 3
    assert message == (f"{db / 'data.mdb'}: truncated or corrupt LMDB: the file has {size} bytes, its "
                       f"{pages} pages of {PAGE} bytes need {pages * PAGE}")


SOLVER = """net: "{net}"
base_lr: 0.01 lr_policy: "fixed" max_iter: 3 display: 1 snapshot_prefix: "{prefix}" solver_mode: CPU
"""
TRAIN_NET = """layer {{ name: "d" type: "Data" top: "data" top: "label"
  data_param {{ source: "{db}" batch_size: 4 backend: LMDB }} transform_param {{ scale: 0.0039 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param {{ num_output: 10 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def train(tmp_path: Path, db: Path) -> subprocess.CompletedProcess:
    (tmp_path / "net.prototxt").write_text(TRAIN_NET.format(db=db))
    (tmp_path / "solver.prototxt").write_text(SOLVER.format(net=tmp_path / "net.prototxt",
                                                            prefix=tmp_path / "snap"))
    return subprocess.run([sys.executable, "-m", "minicaffe.cli", "train", "--solver",
                           str(tmp_path / "solver.prototxt")], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("cut", ["half", "three pages short"])
def test_truncated_data_mdb_is_an_error_in_minicaffe_train(tmp_path, cut):
    db = build_db(tmp_path / "db")
    trained = train(tmp_path, db)
    assert trained.returncode == 0, describe(trained)
    truncate(db, cut)
    message = assert_one_line_error(train(tmp_path, db), db / "data.mdb")
    assert message.startswith("minicaffe train: error:") and "truncated or corrupt LMDB" in message


# -- bit flips -------------------------------------------------------------------------------------

def page_flags(data: bytes) -> list[int]:
    return [struct.unpack_from("=H", data, pgno * PAGE + 10)[0] for pgno in range(len(data) // PAGE)]


def poke(path: Path, offset: int, value: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(value)


def test_leaf_page_of_the_wrong_type_is_an_error(tmp_path):
    """LMDB asserts a page's type while listing keys (SIGABRT): the page headers are checked first."""
    db = build_db(tmp_path / "db")
    flags = page_flags((db / "data.mdb").read_bytes())
    leaf = flags.index(0x02)
    poke(db / "data.mdb", leaf * PAGE + 10, struct.pack("=H", 0x04))  # leaf -> overflow page
    message = assert_one_line_error(python(NET_READS, db), db / "data.mdb")
    assert f"corrupt LMDB: page {leaf} has a wrong header" in message


# Fields of LMDB's meta page (MDB_meta after the 16-byte page header; the main tree is mm_dbs[1]).
@pytest.mark.parametrize("field, offset, value, expected", [
    ("last page", 136, struct.pack("=Q", 10**6), "truncated or corrupt LMDB: the file has"),
    ("record count", 120, struct.pack("=Q", 999), "its header counts 999 records, 20 were found"),
    ("root page", 128, struct.pack("=Q", 10**6), "corrupt LMDB: page 1000000 is beyond the last page"),
    ("tree depth", 94, struct.pack("=H", 40000), "corrupt LMDB: its tree depth is 40000"),
    ("tree depth", 94, struct.pack("=H", 3), "has a wrong header"),
    ("page size", 40, struct.pack("=I", 100), "MDB_INVALID"),  # LMDB checks this one itself
])
def test_corrupt_meta_page_is_an_error(tmp_path, field, offset, value, expected):
    db = build_db(tmp_path / "db")
    for meta in (0, PAGE):  # both meta pages, whichever LMDB picks
        poke(db / "data.mdb", meta + offset, value)
    assert expected in assert_one_line_error(python(NET_READS, db), db)


def test_value_size_beyond_the_file_is_an_error(tmp_path):
    """A node's data size that reaches past its page (or past the last page for a large value) would
    make LMDB copy memory beyond the map."""
    for shape, where in [((3, 24, 24), "outside it"), ((3, 40, 40), "beyond the last page")]:
        db = build_db(tmp_path / f"db{shape[1]}", count=4, shape=shape)
        data = (db / "data.mdb").read_bytes()
        leaf = page_flags(data).index(0x02)
        node = struct.unpack_from("=H", data, leaf * PAGE + 16)[0]  # the leaf's first node
        poke(db / "data.mdb", leaf * PAGE + node + 2, struct.pack("=H", 0x7FFF))  # size's high half
        assert where in assert_one_line_error(python(NET_READS, db), db / "data.mdb")


# Reads copies of argv[1]/data.mdb, each damaged by one "position:mask" argument (the hex mask is
# XORed in at the position), and prints one line per copy: "<damage> read" or "<damage> error <message>".
DAMAGED_READS = """
import sys
from minicaffe.db import DBError, datum_to_array, read_datums
source, target = sys.argv[1], sys.argv[2]
original = open(source + "/data.mdb", "rb").read()
for flip in sys.argv[3:]:
    position, mask = flip.split(":")
    position, mask = int(position), bytes.fromhex(mask)
    damaged = bytearray(original)
    for i, byte in enumerate(mask[:len(damaged) - position]):
        damaged[position + i] ^= byte
    with open(target + "/data.mdb", "wb") as file:
        file.write(damaged)
    try:
        for key, datum in read_datums(target):
            datum_to_array(datum, where=f"{target} record {key!r}")
        print(flip, "read", flush=True)
    except DBError as error:
        print(flip, "error", error, flush=True)
"""


def structural_bytes(data: bytes) -> list[int]:
    """Offsets of the bytes LMDB interprets: meta fields, page headers, node offsets, node headers and
    keys (the values' first bytes, the Datum's tags, are included too)."""
    offsets = list(range(0, 160)) + list(range(PAGE, PAGE + 160))
    for pgno, flags in enumerate(page_flags(data)):
        base = pgno * PAGE
        if flags in (0x01, 0x02):
            lower = struct.unpack_from("=H", data, base + 12)[0]
            offsets += range(base, base + lower)
            for node in struct.unpack_from(f"={(lower - 16) // 2}H", data, base + 16):
                offsets += range(base + node, base + node + 24)
        else:
            offsets += range(base, base + 16)
    return offsets


@pytest.mark.parametrize("damage", ["bit flips", "garbage"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 24, 24), (3, 40, 40)])
def test_damaged_pages_are_errors_not_crashes(tmp_path, shape, damage):
    """Single-bit flips, or runs of 2 to 4096 random bytes, in the bytes LMDB interprets: each copy reads
    (damage LMDB does not use, or in pixel data) or ends in a DBError naming the file; none crashes."""
    source = build_db(tmp_path / "source", count=40, shape=shape)
    (tmp_path / "damaged").mkdir()
    data = (source / "data.mdb").read_bytes()
    rng = random.Random(9)
    positions = rng.sample(structural_bytes(data), 400)
    if damage == "bit flips":
        flips = [f"{position}:{1 << rng.randrange(8):02x}" for position in positions]
    else:
        flips = [f"{position}:{rng.randbytes(rng.choice([2, 8, 64, PAGE])).hex()}" for position in positions]
    result = python(DAMAGED_READS, source, tmp_path / "damaged", *flips, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == len(flips), \
        f"damage {flips[len(lines)][:80] if len(lines) < len(flips) else '?'}: {describe(result)}"
    errors = [line for line in lines if line.split()[1] == "error"]
    assert all(str(tmp_path / "damaged") in line for line in errors), errors[:3]
    assert len(errors) > 20  # the damage does hit what LMDB checks


# -- read-time faults and values that are not Datums -----------------------------------------------

CORRUPT_AFTER_OPEN = """
import struct, sys
from minicaffe.db import DBError, LMDBReader
reader = LMDBReader(sys.argv[1])
with open(sys.argv[1] + "/data.mdb", "r+b") as file:  # the map shows the file's pages as they change
    for leaf in map(int, sys.argv[2:]):
        file.seek(leaf * 4096 + 10)
        file.write(struct.pack("=H", 0x04))
try:
    reader.read(0, 3)
except DBError as error:
    sys.exit(str(error))
"""


def test_a_page_damaged_after_open_is_an_error_naming_the_record(tmp_path):
    db = build_db(tmp_path / "db")
    flags = page_flags((db / "data.mdb").read_bytes())
    leaves = [pgno for pgno, flag in enumerate(flags) if flag == 0x02]
    message = assert_one_line_error(python(CORRUPT_AFTER_OPEN, db, *leaves))
    assert message.startswith(f"{db}: cannot read record 00000000 (CorruptedError: ")


def test_values_that_are_not_datums(tmp_path):
    write_lmdb(tmp_path / "db", [(b"00000000", caffe_pb2.Datum(channels=1, height=1, width=1,
                                                              data=b"x").SerializeToString()),
                                 (b"bad\xff", b"\xff\xff\xff not a protobuf")])
    with pytest.raises(DBError, match=re.escape(f"{tmp_path / 'db'} record bad\\xff is not a Datum (")):
        read_datums(tmp_path / "db")
    reader = LMDBReader(tmp_path / "db")
    assert [key for key, _ in reader.read(1, 3)] == [b"bad\xff", b"00000000", b"bad\xff"]
    reader.close()


def test_write_errors_name_the_database_and_record(tmp_path):
    db = re.escape(str(tmp_path / "db"))
    with pytest.raises(DBError, match=rf"^{db}: duplicate key 0001$"):
        write_lmdb(tmp_path / "db", [(b"0001", b"a"), (b"0001", b"b")])
    long_key = re.escape(f"{'k' * 80}... (600 bytes)")
    with pytest.raises(DBError, match=rf"^{db}: cannot write record {long_key} \(BadValsizeError"):
        write_lmdb(tmp_path / "db", [(b"k" * 600, b"a")])  # LMDB keys are at most 511 bytes
    assert not (tmp_path / "db").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_map_grows_for_large_databases(tmp_path):
    """MapFullError is how LMDB asks for a larger map; it is handled, not reported."""
    values = [(b"%04d" % i, bytes(1 << 20)) for i in range(70)]  # 70 MiB > the 64 MiB first map
    assert write_lmdb(tmp_path / "db", values, commit_every=100) == 70
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    assert env.stat()["entries"] == 70
    env.close()
