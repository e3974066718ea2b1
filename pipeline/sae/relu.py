"""ReLU SAE with an L1 penalty: the PatchSAE paper's default (λ = 8e-5)."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sae.base import SAE, Codes, register


@register("relu")
class ReLUSAE(SAE):
    """f = ReLU(pre); sparsity comes from the L1 term of the loss. Codes are dense (B, S).

    Dead latents are revived by ghost gradients by default (the reference method).
    """

    default_l1 = 8e-5
    default_revival = "ghost_grads"

    def activate(self, pre_BS: Tensor) -> Codes:
        return Codes(d_sae=self.config.d_sae, acts_BS=torch.relu(pre_BS))
