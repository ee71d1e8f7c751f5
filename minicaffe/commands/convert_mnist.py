"""minicaffe convert-mnist IMAGES LABELS OUT_DB: MNIST IDX files to an LMDB of Datum, as Caffe's
convert_mnist_data.

Each record is a Datum with channels 1, height/width from the IDX header, the raw pixel bytes and the
label, under the key "%08d" of the item's index in the IDX files (keys sort in insertion order).
--start/--count convert a slice (e.g. a train/test split of one file). The database is built beside
OUT_DB and renamed into place; an existing OUT_DB is kept unless --overwrite is given, and --overwrite
replaces only an existing LMDB (a folder holding just data.mdb and lock.mdb, or an LMDB data file):
anything else there, such as a folder of the user's files, is refused and nothing is deleted.
"""

from __future__ import annotations

import argparse

from ..datasets import read_mnist
from ..db import DBError, write_datum_lmdb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", help="IDX images file (e.g. train-images-idx3-ubyte[.gz])")
    parser.add_argument("labels", help="IDX labels file (e.g. train-labels-idx1-ubyte[.gz])")
    parser.add_argument("out_db", help="the LMDB folder to create")
    parser.add_argument("--start", type=int, default=0, help="first item to convert (default 0)")
    parser.add_argument("--count", type=int, default=None, help="how many items (default: all from --start)")
    parser.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"],
                        help="database type; only lmdb is supported (the default)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DB if it is an existing LMDB (anything else is refused)")


def run(args: argparse.Namespace) -> int:
    if args.backend != "lmdb":
        raise DBError(f"{args.out_db}: the {args.backend} backend is not supported; use --backend lmdb")
    images, labels = read_mnist(args.images, args.labels)
    total = len(images)
    count = total - args.start if args.count is None else args.count
    if not 0 <= args.start < total or count <= 0 or args.start + count > total:
        raise ValueError(f"{args.images} has {total} items; --start {args.start} --count {count} "
                         f"is outside 0..{total}")
    part = slice(args.start, args.start + count)
    written = write_datum_lmdb(args.out_db, images[part, None], labels[part], first_key=args.start,
                               overwrite=args.overwrite)
    print(f"Processed {written} files.")
    return 0
