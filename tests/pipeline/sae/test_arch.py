"""A test-only architecture: adding one is one module (its config class and SAE) plus
``register``; the contract and trainer tests pick it up."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline.sae import SAE, Codes, SAEConfig, register
from pipeline.sae.base import check_number


@dataclass(frozen=True, kw_only=True)
class JumpReLUConfig(SAEConfig):
    """A fixed-threshold JumpReLU, trained with L1 and ghost grads like relu."""

    l1: float = 1e-3
    """L1 coefficient λ."""
    jump: float = 0.05
    """Threshold θ below which a pre-activation is zeroed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("jump", self.jump)


@register("test_jumprelu", JumpReLUConfig)
class JumpReLUSAE(SAE):
    """f = pre · [pre > θ]."""

    config: JumpReLUConfig
    default_revival = "ghost_grads"

    def activate(self, pre_BS: Tensor) -> Codes:
        return Codes(d_sae=self.config.d_sae, acts_BS=pre_BS * (pre_BS > self.config.jump))
