"""Content digests of what a store holds: xxh3-64 of the little-endian bytes of arrays.

xxh3 hashes at ~25 GB/s here (crc32c ~4 GB/s, a memory copy ~11 GB/s), so every reader can
check every chunk it reads without slowing the token loader. A digest covers decoded
content, not file bytes: it is independent of codecs and catches a flipped, truncated,
deleted (read back as fill values) or swapped chunk alike.
"""

from __future__ import annotations

import numpy as np
import xxhash


def digest(*arrays: np.ndarray) -> int:
    """xxh3-64 of the arrays' bytes, one after the other, as little-endian C-ordered data."""
    h = xxhash.xxh3_64()
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        h.update(a.view(np.uint8).reshape(-1))
    return h.intdigest()
