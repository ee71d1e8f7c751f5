#!/usr/bin/env python3
"""Regenerate minicaffe/proto/caffe_pb2.py from protos/caffe.proto.

    python tools/gen_proto.py            # rewrite the generated module
    python tools/gen_proto.py --check    # exit 1 if the committed module is stale

Uses grpc_tools.protoc in-process (pip install grpcio-tools).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos"
PROTO_FILE = PROTO_DIR / "caffe.proto"
OUT_DIR = ROOT / "minicaffe" / "proto"
GENERATED = OUT_DIR / "caffe_pb2.py"


def generate(out_dir: Path) -> Path:
    """Run protoc on caffe.proto, writing caffe_pb2.py into ``out_dir``."""
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        str(PROTO_FILE),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    return out_dir / "caffe_pb2.py"


def fresh_bytes() -> bytes:
    """The bytes a regeneration would produce right now."""
    with tempfile.TemporaryDirectory(prefix="minicaffe-proto-") as tmp:
        return generate(Path(tmp)).read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed module differs",
    )
    opts = parser.parse_args(argv)

    if opts.check:
        current = GENERATED.read_bytes() if GENERATED.exists() else b""
        if fresh_bytes() != current:
            print(
                f"{GENERATED.relative_to(ROOT)} is stale; "
                "run python tools/gen_proto.py",
                file=sys.stderr,
            )
            return 1
        print(f"{GENERATED.relative_to(ROOT)} is up to date")
        return 0

    with tempfile.TemporaryDirectory(prefix="minicaffe-proto-") as tmp:
        produced = generate(Path(tmp))
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(produced, GENERATED)
    print(f"wrote {GENERATED.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
