"""A test-only architecture: adding one is one module plus ``register``; the contract and trainer tests pick it up."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sae import SAE, Codes, register


@register("test_jumprelu")
class JumpReLUSAE(SAE):
    """f = pre · [pre > 0.05]: a fixed-threshold JumpReLU, trained with L1 and ghost grads like relu."""

    default_l1 = 1e-3
    default_revival = "ghost_grads"

    def activate(self, pre_BS: Tensor) -> Codes:
        return Codes(d_sae=self.config.d_sae, acts_BS=pre_BS * (pre_BS > 0.05))
