"""safetensors files written by the project are the same bytes for the same tensors."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

WRITE = """
import sys, torch
from pipeline.tensorfile import save_tensors
torch.manual_seed(0)
save_tensors(sys.argv[1], {"W_enc": torch.randn(4, 3), "b_enc": torch.zeros(3), "h": torch.ones(2, dtype=torch.float16)},
             {"format_version": "1", "arch": "relu", "layer": "3", "model": "tiny"})
"""


def test_every_process_writes_the_same_bytes_and_safetensors_reads_them(tmp_path):
    """safetensors orders its metadata by a per-process hash: unsorted, SAE weights hashed differently per run."""
    paths = [tmp_path / f"w{i}.safetensors" for i in range(6)]
    for p in paths:
        subprocess.run([sys.executable, "-c", WRITE, str(p)], check=True)
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}) == 1
    torch.manual_seed(0)
    assert torch.equal(load_file(paths[0])["W_enc"], torch.randn(4, 3))
    with safe_open(paths[0], "pt") as f:
        assert f.metadata() == {"format_version": "1", "arch": "relu", "layer": "3", "model": "tiny"}
