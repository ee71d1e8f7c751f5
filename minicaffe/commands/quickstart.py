"""minicaffe quickstart: train the embedded example, exactly as `minicaffe train --solver quickstart`
(see minicaffe.example: a small conv net on scikit-learn's 8x8 digits, converted to LMDB on first use)."""

from __future__ import annotations

import argparse

from ..example import default_work_dir
from . import common, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", "--work_dir", dest="work_dir", default=None,
                        help=f"folder for the LMDBs and the trained model (default {default_work_dir()})")
    common.add_gpu_argument(parser)


def run(args: argparse.Namespace) -> int:
    parser = argparse.ArgumentParser(prog="minicaffe train")
    train.add_arguments(parser)
    argv = ["--solver", train.QUICKSTART]
    if args.work_dir is not None:
        argv += ["--work-dir", str(args.work_dir)]
    if args.gpu is not None:
        argv += ["--gpu", str(args.gpu)]
    return train.run(parser.parse_args(argv))
