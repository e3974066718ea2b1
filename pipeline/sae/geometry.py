"""Decoder-geometry helpers: geometric median for b_dec, unit-norm decoder rows."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from cache.errors import UserError
from pipeline.sae.base import SAE

logger = logging.getLogger(__name__)


@torch.no_grad()
def geometric_median(
    x_ND: Tensor, *, max_iter: int = 200, tol: float = 1e-6
) -> Tensor:
    """The point minimising Σ_n ‖x_n − y‖, by Weiszfeld iterations in float64.

    Starts at the mean; each iteration is y ← Σ w_n x_n / Σ w_n with w_n = 1 / ‖x_n − y‖
    (distances floored at 1e-12 × their mean, so an iterate landing on a data point stays
    finite). Stops when a step moves y by less than ``tol`` × the mean distance of the
    points to y (a scale-free tolerance), or after ``max_iter`` iterations (logged).
    Returns a float64 (D,) tensor on the input's device.
    """
    if x_ND.ndim != 2 or x_ND.shape[0] == 0:
        raise UserError(
            f"geometric median needs a non-empty (N, D) sample, got shape {tuple(x_ND.shape)}"
        )
    x = x_ND.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise UserError("sample for the b_dec init contains NaN/inf: run `pipeline verify`")
    y_D = x.mean(dim=0)
    for it in range(max_iter):
        dist_N = (x - y_D).norm(dim=1)
        mean_dist = dist_N.mean()
        if mean_dist == 0:  # every point equal
            return y_D
        w_N = 1.0 / dist_N.clamp_min(1e-12 * mean_dist)
        new_D = (w_N @ x) / w_N.sum()
        step = (new_D - y_D).norm()
        y_D = new_D
        if step <= tol * mean_dist:
            logger.debug("geometric median converged after %d iterations", it + 1)
            return y_D
    logger.warning("geometric median: no convergence to tol=%g in %d iterations", tol, max_iter)
    return y_D


@torch.no_grad()
def init_b_dec_(sae: SAE, x_ND: Tensor) -> None:
    """Set ``b_dec`` to the geometric median of a raw-unit sample, in normalised units.

    The sample is divided by ``config.norm_scale`` first, so ``b_dec`` lives in the same
    units as the rest of the SAE.
    """
    xn_ND = x_ND.detach().to(torch.float64) / sae.config.norm_scale
    median_D = geometric_median(xn_ND)
    if median_D.shape != sae.b_dec.shape:
        raise UserError(
            f"b_dec init sample has width {median_D.shape[0]} but the SAE has d_in="
            f"{sae.config.d_in}: use activations of the layer the SAE was built for"
        )
    sae.b_dec.copy_(median_D.to(sae.b_dec))


@torch.no_grad()
def remove_parallel_grad_(sae: SAE) -> None:
    """Remove from ``W_dec.grad`` each row's component parallel to that decoder row.

    Keeps the update tangent to the unit sphere (to first order), so the optimiser cannot
    grow row norms to cheat the L1 term. Call after ``backward`` and before the step.
    """
    grad = sae.W_dec.grad
    if grad is None:
        return
    # g − (g·w / ‖w‖²) w, without first building w / ‖w‖ (fewer passes over (S, D))
    W_SD = sae.W_dec
    coef_S1 = (grad * W_SD).sum(dim=1, keepdim=True) / W_SD.norm(dim=1, keepdim=True).pow(2).clamp_min(1e-24)
    grad.addcmul_(W_SD, coef_S1, value=-1)


@torch.no_grad()
def normalize_decoder_(sae: SAE) -> None:
    """Rescale every decoder row to unit L2 norm (call after each optimiser step)."""
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
