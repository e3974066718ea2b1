"""Shared fixtures; factories live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Never wait on the Hugging Face hub in tests: offline lookups fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stages import extract  # noqa: E402
from tests.helpers import make_extract_config  # noqa: E402


@pytest.fixture
def tiny_store(tmp_path: Path) -> Path:
    cfg = make_extract_config(tmp_path)
    extract.run(cfg)
    return cfg.out_dir


@pytest.fixture
def one_thread():
    """Tiny models and SAEs: one torch thread is fastest, and immune to a busy second core
    (with two, tiny matmuls stall on each other); results are unchanged."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
