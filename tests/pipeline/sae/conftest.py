"""Fixtures for the SAE tests (helpers live in sae_helpers.py)."""

import pytest
import test_arch  # noqa: F401  registers "test_jumprelu" before sae_helpers lists every arch
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These SAEs are tiny: one thread is fastest, and on a busy machine several threads
    spin-wait on each other (a 64×16 @ 16×48 matmul measured 700× slower with 2 threads
    while another process held both cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
