"""TopK and BatchTopK SAEs: sparsity by construction, no L1 needed.

TopK (Gao et al. 2024): per token, keep the k largest pre-activations, then ReLU. Codes are
k sparse entries per token; an entry whose value is 0 is inactive, so L0 ≤ k.

BatchTopK (Bussmann et al. 2024): during training, keep the k·B largest ReLU'd
pre-activations across the whole batch of B tokens (all of them at a tie with the k·B-th),
so tokens share a budget of k on average; training codes are sparse entries, as many per
token as it keeps (``batch_top``). Inference cannot depend on the batch, so in eval mode a
latent is active when its ReLU'd pre-activation exceeds a threshold θ: the running estimate
(rate ``config.threshold_lr``; the first estimate is taken as is) of the smallest activation
kept in each training batch. θ is a buffer saved in the checkpoint. At inference the number of
active latents per token therefore varies (mean ≈ k), and before any training step θ = 0
(every positive pre-activation is kept). Inference codes are dense (B, S).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cache.errors import UserError
from pipeline.sae.base import SAE, Codes, SAEConfig, check_int, check_number, register

DEFAULT_AUX_K = 512


@dataclass(frozen=True, kw_only=True)
class TopKConfig(SAEConfig):
    """TopK: k latents per token, no L1 needed; AuxK revives dead latents."""

    k: int
    """Latents kept per token (BatchTopK: on average over the batch), 1..d_sae."""
    aux_k: int | None = None
    """AuxK: dead latents used per token; None = min(512, d_sae)."""
    aux_coef: float = 1.0 / 32.0
    """Weight α of the AuxK loss (Gao et al. 2024 default 1/32)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("k", self.k, minimum=1)
        if self.k > self.d_sae:
            raise UserError(f"k={self.k} exceeds d_sae={self.d_sae}: lower k or widen the SAE")
        if self.aux_k is None:
            object.__setattr__(self, "aux_k", min(DEFAULT_AUX_K, self.d_sae))
        check_int("aux_k", self.aux_k, minimum=1)
        if self.aux_k > self.d_sae:
            raise UserError(f"aux_k={self.aux_k} exceeds d_sae={self.d_sae}: lower aux_k")
        check_number("aux_coef", self.aux_coef)

    def format1_fill(self) -> dict:
        return {"threshold_lr": 0.01}  # BatchTopK's own field takes its place


@dataclass(frozen=True, kw_only=True)
class BatchTopKConfig(TopKConfig):
    """BatchTopK: TopK's fields plus the rate of its inference threshold θ."""

    threshold_lr: float = 0.01
    """Rate of the running estimate of the inference threshold θ, in (0, 1]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("threshold_lr", self.threshold_lr, strict=True)
        if self.threshold_lr > 1:
            raise UserError(f"threshold_lr must be at most 1, got {self.threshold_lr}")


@register("topk", TopKConfig)
class TopKSAE(SAE):
    """Per-token TopK: exactly the k largest pre-activations, ReLU'd."""

    config: TopKConfig
    default_revival = "auxk"

    def activate(self, pre_BS: Tensor) -> Codes:
        vals_BK, idx_BK = pre_BS.topk(self.config.k, dim=1, sorted=False)
        return Codes.fixed_width(self.config.d_sae, torch.relu(vals_BK), idx_BK)


@dataclass(frozen=True)
class BatchBudget:
    """A whole training batch's BatchTopK cut, for training it in micro-batches."""

    cut: Tensor  # the k·B-th largest ReLU'd pre-activation of the batch: parts keep values ≥ it
    min_kept: Tensor  # the smallest positive kept value (inf if none), which θ follows


SAMPLE_VALUES = 2**16
"""``batch_top`` guesses its floor from about this many values of the batch (whole tokens)."""
FLOOR_MARGINS = (2, 8)
"""Floors ``batch_top`` tries: the sample's rank at these multiples of the budget, then 0."""


def batch_top(pre_BS: Tensor, *, n_keep: int | None = None, cut: Tensor | None = None) -> tuple[Codes, Tensor]:
    """BatchTopK's training selection: every ReLU'd pre-activation ≥ the cut, as sparse codes.

    The cut is ``cut`` if given, else the ``n_keep``-th largest ReLU'd value of the whole
    (B, S) batch (0 if fewer are positive); values ≥ it and > 0 are kept, so ties at the cut
    are all kept (as the micro-batched step always did). Returns (codes, cut): sparse codes
    holding exactly the kept entries, in ascending latent order within each token.

    A flat top-(k·B) over B·S values costs ~8× a per-token TopK on CPU, so instead: guess a
    floor t from a sample of tokens, gather every positive value ≥ t in one pass, and if
    there are at least ``n_keep`` of them, the cut (≥ t) is their ``n_keep``-th largest and
    every kept value is among them: the plain definition's result. Too few: a lower floor,
    at last 0 (every positive value).
    """
    n_rows, n_latents = pre_BS.shape
    with torch.no_grad():
        p_BS = pre_BS.detach().float()
        margins = iter(FLOOR_MARGINS)
        floor = cut
        while True:
            if n_keep is not None:
                margin = next(margins, None)
                floor = None if margin is None else _sample_floor(p_BS, margin * n_keep)
            flat_N = _flat_at_least(p_BS, floor)
            if n_keep is None or len(flat_N) >= n_keep or floor is None:
                break
        if n_keep is not None:
            vals_N = p_BS.reshape(-1)[flat_N]
            cut = _kth_largest(vals_N, n_keep) if len(vals_N) >= n_keep else vals_N.new_zeros(())
            flat_N = flat_N[vals_N >= cut]
        count_B = torch.bincount(flat_N // n_latents, minlength=n_rows)  # nonzero is row-major: entries in token order
    vals_N = torch.relu(pre_BS.reshape(-1)[flat_N])  # only the kept values carry gradient
    return Codes(d_sae=n_latents, vals_N=vals_N, idx_N=flat_N % n_latents, count_B=count_B), cut


def _flat_at_least(p_BS: Tensor, floor: Tensor | None) -> Tensor:
    """Ascending flat indices of the values ≥ ``floor`` (> 0 when it is None or ≤ 0).

    The two (B, S) passes are most of BatchTopK's selection, so on CPU: numpy compares (torch's
    comparison to bool runs ~3× slower there), and nonzero scans the mask 8 bytes at a time,
    then only the words with a hit (flat indices: ~20 % faster than (row, col) pairs).
    """
    strict = floor is None or not floor > 0
    if p_BS.device.type != "cpu":
        return (p_BS > 0 if strict else p_BS >= floor).reshape(-1).nonzero().squeeze(1)
    a = p_BS.numpy()
    mask_N = torch.from_numpy(np.greater(a, 0) if strict else np.greater_equal(a, float(floor))).reshape(-1)
    if mask_N.numel() % 8:
        return mask_N.nonzero().squeeze(1)
    words_W = mask_N.view(torch.int64).nonzero().squeeze(1)
    bits_N = mask_N.view(-1, 8)[words_W].reshape(-1).nonzero().squeeze(1)
    return words_W[bits_N // 8] * 8 + bits_N % 8


def _sample_floor(p_BS: Tensor, rank: int) -> Tensor:
    """A guess at the ``rank``-th largest value of ``p_BS`` from evenly spaced tokens (≥ 0)."""
    n_rows = p_BS.shape[0]
    step = max(1, n_rows * p_BS.shape[1] // SAMPLE_VALUES)
    sample = p_BS[::step].flatten()
    return torch.relu(_kth_largest(sample, max(1, rank * len(p_BS[::step]) // n_rows)))


def _kth_largest(values: Tensor, k: int) -> Tensor:
    """The k-th largest of a 1-D tensor (the smallest one if k exceeds its length)."""
    pos = values.numel() - min(k, values.numel())
    if values.device.type == "cpu":  # numpy's introselect: ~9× faster than torch's kthvalue on CPU
        return torch.from_numpy(np.partition(values.numpy(), pos)[pos:pos + 1]).reshape(())
    return values.kthvalue(pos + 1).values


@register("batchtopk", BatchTopKConfig)
class BatchTopKSAE(SAE):
    """Batch TopK in training mode (sparse codes, ``batch_top``); threshold θ (buffer
    ``threshold``) in eval mode (dense codes)."""

    config: BatchTopKConfig
    default_revival = "auxk"
    batch_wide = True

    def __init__(self, config: BatchTopKConfig, *, generator: torch.Generator | None = None, init: str = "auto"):
        super().__init__(config, generator=generator, init=init)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("n_threshold_updates", torch.zeros((), dtype=torch.int64))

    def activate(self, pre_BS: Tensor) -> Codes:
        if self.training:
            return batch_top(pre_BS, n_keep=self.config.k * pre_BS.shape[0])[0]
        acts_BS = torch.relu(pre_BS)
        acts_BS = acts_BS * (acts_BS > self.threshold.to(acts_BS.dtype))
        return Codes(d_sae=self.config.d_sae, acts_BS=acts_BS)

    @torch.no_grad()
    def batch_context(self, pre_chunks: Iterable[Tensor], n_tokens: int) -> BatchBudget:
        """The k·B largest ReLU'd values over all parts, merged part by part (never (B, S) at once)."""
        n_keep = self.config.k * n_tokens
        top = min_pos = None
        for pre_BS in pre_chunks:
            flat = torch.relu(pre_BS.detach()).flatten().float()
            part = flat.topk(min(n_keep, flat.numel()), sorted=False).values
            top = part if top is None else torch.cat([top, part]).topk(min(n_keep, len(top) + len(part))).values
            low = torch.where(flat > 0, flat, torch.inf).min()
            min_pos = low if min_pos is None else torch.minimum(min_pos, low)
        cut = top.min()
        return BatchBudget(cut=cut, min_kept=torch.where(cut > 0, cut, min_pos))

    def activate_part(self, pre_BS: Tensor, context: BatchBudget | None) -> Codes:
        if context is None:
            return self.activate(pre_BS)
        return batch_top(pre_BS, cut=context.cut)[0]

    @torch.no_grad()
    def update_running_stats_(self, codes: Codes | None, context: BatchBudget | None = None) -> None:
        """Move θ toward the smallest positive activation kept in this training batch."""
        if context is None:
            vals = (codes.acts_BS if codes.acts_BS is not None else codes.vals_N).detach().float()
            min_kept = torch.where(vals > 0, vals, torch.inf).min()
        else:
            min_kept = context.min_kept
        seen = torch.isfinite(min_kept)
        first = self.n_threshold_updates == 0
        lr = self.config.threshold_lr
        new = torch.where(first, min_kept, self.threshold + lr * (min_kept - self.threshold))
        self.threshold.copy_(torch.where(seen, new, self.threshold))
        self.n_threshold_updates.add_(seen.to(torch.int64))

    def inference_threshold(self) -> float | None:
        return float(self.threshold)
