"""Random numbers that can be replayed.

Every draw comes from a counter-based generator (Philox) keyed by (random seed, purpose, names...), e.g.
("filler", layer name, blob index) or ("dropout", layer name, iteration). The same key gives the same
numbers on any machine, in any order of calls, so a run resumed from a snapshot draws what an
uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib

import numpy as np

_seed = {"value": 1701}  # Caffe's own default when random_seed is unset is time-based; ours is fixed


def set_random_seed(seed: int) -> None:
    _seed["value"] = int(seed)


def random_seed() -> int:
    return _seed["value"]


def stream(*key) -> np.random.Generator:
    """A generator keyed by the global seed and `key` (strings and integers)."""
    text = "\0".join(str(k) for k in (_seed["value"], *key)).encode()
    digest = hashlib.sha256(text).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=words))


def key32(*key) -> int:
    """A 32-bit integer seed for kernels that draw on the device (same key -> same value)."""
    text = "\0".join(str(k) for k in (_seed["value"], *key)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")
