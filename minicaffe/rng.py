"""Random numbers that can be replayed.

Every draw comes from a counter-based generator (Philox) keyed by (random seed, purpose, names...), e.g.
("filler", layer name, blob index) or ("dropout", layer name, iteration). The same key gives the same
numbers on any machine, in any order of calls, so a run resumed from a snapshot draws what an
uninterrupted run would have drawn.

In a data-parallel run (minicaffe.parallel) ranks > 0 add their rank to every key of stream() and key32(),
so each rank draws its own dropout masks and crops; shared_stream() leaves it out, for what all ranks must
draw alike (the data order they share out).
"""

from __future__ import annotations

import hashlib

import numpy as np

_seed = {"value": 1701, "rank": 0}  # Caffe's default when random_seed is unset is time-based; ours is fixed


def set_random_seed(seed: int) -> None:
    _seed["value"] = int(seed)


def random_seed() -> int:
    return _seed["value"]


def set_rank(rank: int) -> None:
    """This process is rank `rank` of a data-parallel run (0: draws as a single process)."""
    _seed["rank"] = int(rank)


def _digest(key: tuple, shared: bool = False) -> bytes:
    rank = () if shared or not _seed["rank"] else (f"rank {_seed['rank']}",)
    return hashlib.sha256("\0".join(str(k) for k in (_seed["value"], *rank, *key)).encode()).digest()


def stream(*key) -> np.random.Generator:
    """A generator keyed by the global seed and `key` (strings and integers)."""
    return _generator(_digest(key))


def shared_stream(*key) -> np.random.Generator:
    """stream(*key), the same on every rank of a data-parallel run."""
    return _generator(_digest(key, shared=True))


def _generator(digest: bytes) -> np.random.Generator:
    words = np.frombuffer(digest[:16], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=words))


def key32(*key) -> int:
    """A 32-bit integer seed for kernels that draw on the device (same key -> same value)."""
    return int.from_bytes(_digest(key)[:4], "little")
