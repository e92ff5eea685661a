"""Seeds of every problem the library samples, kept in disjoint streams.

Meta-training, validation, baseline tuning and testing draw problems from
separate streams, so a test problem is never a training or tuning problem and
every optimizer compared on a stream sees the same problems:

    derive_seed("train", run_seed, trajectory, i)   # meta-training
    derive_seed("val", i)                           # validation (best checkpoint)
    derive_seed("tune", i)                          # baseline learning-rate search
    derive_seed("test", i)                          # compare / benchmarks
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 62-bit seed that is a deterministic hash of ``parts``."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def stream(name: str, n: int, *prefix: object) -> list[int]:
    return [derive_seed(name, *prefix, i) for i in range(n)]
