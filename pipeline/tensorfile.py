"""safetensors files that are the same bytes for the same tensors.

safetensors writes its JSON header from a hash map, so the order of the ``__metadata__`` keys
(and so the file's bytes and sha256) changes from process to process. The sha256 of an SAE's
weights is the identity of the codes encoded with it, and DVC hashes every output: a retrained,
identical SAE must hash the same. The header is rewritten with sorted keys; the tensor data
and its offsets are untouched.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save

from cache.atomic import atomic_write


def canonical(blob: bytes) -> bytes:
    """A safetensors file's bytes with its header's keys sorted (padded to 8 bytes, as safetensors does)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + blob[8 + n:]


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """``tensors`` (contiguous, on the CPU) as a canonical safetensors file, written atomically."""
    blob = canonical(save(dict(tensors), metadata=dict(metadata) if metadata else None))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))
