"""TopK and BatchTopK SAEs: sparsity by construction, no L1 needed.

TopK (Gao et al. 2024): per token, keep the k largest pre-activations, then ReLU. Codes are
fixed-width (vals_BK, idx_BK) pairs; a slot whose value is 0 is inactive, so L0 ≤ k.

BatchTopK (Bussmann et al. 2024): during training, keep the k·B largest ReLU'd
pre-activations across the whole batch of B tokens, so tokens share a budget of k on
average. Inference cannot depend on the batch, so in eval mode a latent is active when its
ReLU'd pre-activation exceeds a threshold θ: the running estimate (rate
``config.threshold_lr``; the first estimate is taken as is) of the smallest activation kept
in each training batch. θ is a buffer saved in the checkpoint. At inference the number of
active latents per token therefore varies (mean ≈ k), and before any training step θ = 0
(every positive pre-activation is kept). Codes are dense (B, S).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sae.base import SAE, Codes, SAEConfig, register


@register("topk")
class TopKSAE(SAE):
    """Per-token TopK: exactly the k largest pre-activations, ReLU'd."""

    uses_k = True
    default_revival = "auxk"

    def activate(self, pre_BS: Tensor) -> Codes:
        vals_BK, idx_BK = pre_BS.topk(self.config.k, dim=1, sorted=False)
        return Codes(d_sae=self.config.d_sae, vals_BK=torch.relu(vals_BK), idx_BK=idx_BK)


@register("batchtopk")
class BatchTopKSAE(SAE):
    """Batch TopK in training mode; threshold θ (buffer ``threshold``) in eval mode."""

    uses_k = True
    default_revival = "auxk"

    def __init__(self, config: SAEConfig, *, generator: torch.Generator | None = None):
        super().__init__(config, generator=generator)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("n_threshold_updates", torch.zeros((), dtype=torch.int64))

    def activate(self, pre_BS: Tensor) -> Codes:
        acts_BS = torch.relu(pre_BS)
        if self.training:
            flat = acts_BS.flatten()
            n_keep = min(self.config.k * acts_BS.shape[0], flat.numel())
            vals, idx = flat.topk(n_keep, sorted=False)
            acts_BS = torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts_BS)
        else:
            acts_BS = acts_BS * (acts_BS > self.threshold.to(acts_BS.dtype))
        return Codes(d_sae=self.config.d_sae, acts_BS=acts_BS)

    @torch.no_grad()
    def update_running_stats_(self, codes: Codes) -> None:
        """Move θ toward the smallest positive activation kept in this training batch."""
        acts = codes.dense().detach().to(torch.float32)
        min_kept = torch.where(acts > 0, acts, torch.inf).min()
        seen = torch.isfinite(min_kept)
        first = self.n_threshold_updates == 0
        lr = self.config.threshold_lr
        new = torch.where(first, min_kept, self.threshold + lr * (min_kept - self.threshold))
        self.threshold.copy_(torch.where(seen, new, self.threshold))
        self.n_threshold_updates.add_(seen.to(torch.int64))

    def inference_threshold(self) -> float | None:
        return float(self.threshold)
