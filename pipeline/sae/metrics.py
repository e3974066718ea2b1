"""Evaluation metrics in the cache's original units, and per-latent firing counters.

``RunningMetrics`` accumulates float64 totals over any number of batches and reports
ratios of totals (never means of per-batch ratios):

    mse              Σ_b Σ_d (x − x̂)² / (n·D)
    fvu              Σ_b ‖x_b − x̂_b‖² / Σ_b ‖x_b − m‖²   (m: per-dimension mean over all tokens,
                     from Σx and Σx²: Σ‖x − m‖² = Σx² − n‖m‖²)
    token_norm_loss  mean_b ‖x_b − x̂_b‖² / (D·‖x_b‖)   (the reference training term)
    l0               mean_b number of active latents;  l1  mean_b Σ_s |f_bs|

x and x̂ must be raw (cache) units, as returned by ``SAE.forward``; codes stay in the SAE's
normalised units (l1 therefore scales with 1/norm_scale).

``FiringCounter`` tracks, per latent, tokens since it last fired (batch resolution). A
latent is *dead* when it has not fired in the last ``window_tokens`` tokens; *dense* when it
fired on more than ``dense_threshold`` (default 10%) of the tokens of the last complete
window. Windows are consecutive, non-overlapping blocks of at least ``window_tokens`` tokens
(a window closes at the first batch boundary at or after that many tokens). Both fractions
are NaN until one full window has been seen: they cannot be judged earlier.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
from torch import Tensor

from cache.errors import UserError
from pipeline.sae.base import SAE, Codes
from pipeline.sae.losses import TOKEN_NORM_EPS

logger = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of a window's tokens counts as dense."""


class RunningMetrics:
    """Float64 running sums of reconstruction and sparsity metrics; see the module doc."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.d_in = 0
        self._sums: dict[str, Tensor] = {}

    def _add(self, name: str, value: Tensor) -> None:
        if name in self._sums:
            self._sums[name] += value
        else:
            self._sums[name] = value.clone()

    @torch.no_grad()
    def update(self, x_BD: Tensor, x_hat_BD: Tensor, codes: Codes | None = None) -> None:
        """Add one batch (raw units). Without ``codes``, l0 and l1 are not reported."""
        if x_BD.shape != x_hat_BD.shape or x_BD.ndim != 2:
            raise ValueError(f"x {tuple(x_BD.shape)} and x_hat {tuple(x_hat_BD.shape)} must be (B, D)")
        x = x_BD.detach().to(torch.float64)
        err_BD = x - x_hat_BD.detach().to(torch.float64)
        err_B = err_BD.pow(2).sum(dim=1)
        if self.d_in and x.shape[1] != self.d_in:
            raise ValueError(f"batch width {x.shape[1]} differs from earlier batches' {self.d_in}")
        self.n_tokens += x.shape[0]
        self.d_in = x.shape[1]
        self._add("sq_err", err_B.sum())
        self._add("x_D", x.sum(dim=0))
        self._add("x2", x.pow(2).sum())
        self._add("token_norm", (err_B / x.norm(dim=1).clamp_min(TOKEN_NORM_EPS)).sum())
        if codes is not None:
            self._add("l0", codes.l0().to(torch.float64).sum())
            self._add("l1", codes.l1().detach().to(torch.float64).sum())

    def compute(self) -> dict[str, float]:
        """The metrics so far as floats (plus ``n_tokens``)."""
        if self.n_tokens == 0:
            raise UserError("no tokens were evaluated: the evaluation set is empty")
        n, d = self.n_tokens, self.d_in
        s = {k: v.item() for k, v in self._sums.items() if k != "x_D"}
        mean_D = self._sums["x_D"] / n
        total_var = s["x2"] - n * mean_D.pow(2).sum().item()
        out = {
            "mse": s["sq_err"] / (n * d),
            "fvu": s["sq_err"] / total_var if total_var > 0 else math.nan,
            "token_norm_loss": s["token_norm"] / (n * d),
            "n_tokens": float(n),
        }
        if "l0" in s:
            out["l0"] = s["l0"] / n
            out["l1"] = s["l1"] / n
        return out


class FiringCounter:
    """Per-latent firing bookkeeping over windows of tokens; see the module doc."""

    def __init__(
        self,
        d_sae: int,
        *,
        window_tokens: int,
        dense_threshold: float = DENSE_THRESHOLD,
        device: torch.device | str | None = None,
    ) -> None:
        if window_tokens < 1:
            raise UserError(f"window_tokens must be >= 1, got {window_tokens}")
        self.d_sae = d_sae
        self.window_tokens = window_tokens
        self.dense_threshold = dense_threshold
        self.tokens_since_fired_S = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.window_counts_S = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.last_freq_S = torch.full((d_sae,), math.nan, dtype=torch.float64, device=device)
        self.n_window_tokens = 0
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, codes: Codes) -> None:
        """Count one batch of codes (no host sync)."""
        self.add(codes.fire_counts(), codes.n_tokens)

    @torch.no_grad()
    def add(self, counts_S: Tensor, n: int) -> None:
        """Count one batch of ``n`` tokens given its per-latent firing counts (a batch seen in
        parts must be added once, with the parts' summed counts, to keep batch resolution)."""
        counts_S = counts_S.to(self.window_counts_S.device)
        fired_S = counts_S > 0
        self.tokens_since_fired_S.add_(n).masked_fill_(fired_S, 0)
        self.window_counts_S += counts_S
        self.n_window_tokens += n
        self.n_tokens += n
        if self.n_window_tokens >= self.window_tokens:
            self.last_freq_S = self.window_counts_S.to(torch.float64) / self.n_window_tokens
            self.window_counts_S.zero_()
            self.n_window_tokens = 0

    def dead_mask(self) -> Tensor:
        """Bool (S,): latents that have not fired in the last ``window_tokens`` tokens."""
        return self.tokens_since_fired_S >= self.window_tokens

    def dead_fraction(self) -> Tensor:
        """Fraction of dead latents (0-dim float64 tensor; NaN before one full window)."""
        return self._judged(self.dead_mask())

    def dense_fraction(self) -> Tensor:
        """Fraction of latents firing on > ``dense_threshold`` of the last complete window."""
        return self._judged(self.last_freq_S > self.dense_threshold)

    def _judged(self, mask_S: Tensor) -> Tensor:
        if self.n_tokens < self.window_tokens:
            return torch.tensor(math.nan, dtype=torch.float64, device=mask_S.device)
        return mask_S.to(torch.float64).mean()

    def state_dict(self) -> dict:
        return {
            "window_tokens": self.window_tokens,
            "dense_threshold": self.dense_threshold,
            "tokens_since_fired_S": self.tokens_since_fired_S.clone(),
            "window_counts_S": self.window_counts_S.clone(),
            "last_freq_S": self.last_freq_S.clone(),
            "n_window_tokens": self.n_window_tokens,
            "n_tokens": self.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["tokens_since_fired_S"].shape != (self.d_sae,):
            raise UserError(
                f"firing-counter state is for {state['tokens_since_fired_S'].shape[0]} latents, "
                f"this SAE has {self.d_sae}: resume with the SAE the state was saved from"
            )
        device = self.tokens_since_fired_S.device
        self.window_tokens = int(state["window_tokens"])
        self.dense_threshold = float(state["dense_threshold"])
        self.tokens_since_fired_S = state["tokens_since_fired_S"].to(device).clone()
        self.window_counts_S = state["window_counts_S"].to(device).clone()
        self.last_freq_S = state["last_freq_S"].to(device).clone()
        self.n_window_tokens = int(state["n_window_tokens"])
        self.n_tokens = int(state["n_tokens"])


@torch.no_grad()
def evaluate(
    sae: SAE, batches: Iterable[Tensor], *, window_tokens: int | None = None
) -> dict[str, float]:
    """Held-out metrics of ``sae`` over raw-unit batches (eval mode, restored afterwards).

    Returns RunningMetrics' values plus ``dead_fraction`` and ``dense_fraction`` over a
    window of ``window_tokens`` (default ``sae.config.dead_window_tokens``) and that
    ``window_tokens``. With fewer evaluated tokens than the window, both are NaN.
    """
    was_training = sae.training
    sae.eval()
    metrics = RunningMetrics()
    window = window_tokens or sae.config.dead_window_tokens
    firing = FiringCounter(sae.config.d_sae, window_tokens=window, device=sae.W_dec.device)
    try:
        for x_BD in batches:
            x_BD = x_BD.to(sae.W_dec.device)
            x_hat_BD, codes = sae(x_BD)
            metrics.update(x_BD, x_hat_BD, codes)
            firing.update(codes)
    finally:
        sae.train(was_training)
    out = metrics.compute()
    if firing.n_tokens < window:
        logger.warning(
            "evaluated %d tokens, fewer than the %d-token window: dead/dense fractions are NaN",
            firing.n_tokens, window,
        )
    out["dead_fraction"] = firing.dead_fraction().item()
    out["dense_fraction"] = firing.dense_fraction().item()
    out["window_tokens"] = float(window)
    return out


@torch.inference_mode()
def mean_error(sae: SAE, batches: Iterable[Tensor]) -> tuple[Tensor, int]:
    """(E[x − x̂] per dimension in raw units, float32 (D,); tokens seen) over raw-unit batches.

    Eval mode (restored afterwards), as at inference; accumulated in float64.
    """
    was_training = sae.training
    sae.eval()
    total_D = torch.zeros(sae.config.d_in, dtype=torch.float64, device=sae.W_dec.device)
    n = 0
    try:
        for x_BD in batches:
            x_BD = x_BD.to(sae.W_dec.device, torch.float32)
            x_hat_BD, _ = sae(x_BD)
            total_D += (x_BD - x_hat_BD.float()).sum(0, dtype=torch.float64)
            n += x_BD.shape[0]
    finally:
        sae.train(was_training)
    if n == 0:
        raise UserError("no tokens to measure the SAE's mean reconstruction error on; check the store")
    return (total_D / n).float(), n
