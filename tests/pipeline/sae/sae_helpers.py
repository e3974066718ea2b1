"""Shared helpers for the SAE tests: tiny configs and deterministic batches."""

from __future__ import annotations

import dataclasses

import torch

from pipeline.sae import SAEConfig, TrainConfig, config_class, registered_archs


def arch_kwargs(arch: str, k: int = 4) -> dict:
    """The fields an architecture's config needs beyond the common ones (k for the TopK family)."""
    return {"k": k} if "k" in {f.name for f in dataclasses.fields(config_class(arch))} else {}


def make_sae_config(arch: str = "relu", **overrides) -> SAEConfig:
    fields = {"d_in": 16, "d_sae": 48, "dead_window_tokens": 1_000, **arch_kwargs(arch)}
    fields.update(overrides)
    return config_class(arch).from_fields(**fields)


def make_train_config(**overrides) -> TrainConfig:
    fields = {"lr": 1e-3, "warmup_steps": 5, "batch_tokens": 64, "log_every": 10,
              "checkpoint_every": 10}
    fields.update(overrides)
    return TrainConfig(**fields)


def random_batches(n_batches: int, *, batch: int = 64, d_in: int = 16, seed: int = 0, offset=0.0):
    """Deterministic non-centred Gaussian batches (mean `offset`, some heavier dims)."""
    g = torch.Generator().manual_seed(seed)
    scale_D = torch.linspace(0.5, 2.0, d_in)
    return [offset + torch.randn(batch, d_in, generator=g) * scale_D for _ in range(n_batches)]


ALL_ARCHS = registered_archs()
