"""SAE training losses: plain functions of one signature, ``loss(f: Forward, *, options) -> Tensor``.

One signature so the trainer can sum any list of terms (``pipeline.sae.trainer.Objective``).
Every loss is a mean over tokens of a per-token value (whole-batch quantities come in through
``Forward``), so a batch split into micro-batches has the loss Σ_c (B_c / B)·loss(chunk c).
All return a 0-dim float32 tensor and compute in float32 whatever the input dtype
(bf16 autocast outputs are upcast). The trainer calls them in normalised units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.sae.base import Codes


@dataclass(frozen=True)
class Forward:
    """What a loss may look at: one training batch's forward pass, in normalised units."""

    x_BD: Tensor  # input
    x_hat_BD: Tensor  # reconstruction
    pre_BS: Tensor  # encoder pre-activations
    codes: Codes
    W_dec_SD: Tensor  # decoder rows
    dead_S: Tensor | None = None  # latents dead at this step (None when no loss needs them)
    residual_var: Tensor | None = None  # mean_b ‖e_b − ē‖² of the whole batch when this is one of its
                                        # micro-batches (None: this forward is the whole batch)

TOKEN_NORM_EPS = 1e-6
"""Floor on a token's L2 norm in ``recon_loss_token_norm`` (as in the reference)."""


def token_norm_errors(f: Forward, *, eps: float = TOKEN_NORM_EPS) -> Tensor:
    """(B, D): each element's squared error (x_bd − x̂_bd)² divided by its token's ‖x_b‖ (floored at ``eps``)."""
    x, x_hat = f.x_BD.float(), f.x_hat_BD.float()
    return (x - x_hat).pow(2) / x.norm(dim=1, keepdim=True).clamp_min(eps)


def squared_errors(f: Forward) -> Tensor:
    """(B, D): each element's squared error (x_bd − x̂_bd)²."""
    return (f.x_BD.float() - f.x_hat_BD.float()).pow(2)


def recon_loss_token_norm(f: Forward, *, eps: float = TOKEN_NORM_EPS) -> Tensor:
    """The PatchSAE reference reconstruction term: ``token_norm_errors`` averaged over tokens *and* dimensions:

        L = 1/(B·D) Σ_b Σ_d (x_bd − x̂_bd)² / ‖x_b‖  =  1/D · mean_b ‖x_b − x̂_b‖² / ‖x_b‖

    The 1/D factor matches the reference's element-wise mean, which λ = 8e-5 was tuned with.
    """
    return token_norm_errors(f, eps=eps).mean()


def mse(f: Forward) -> Tensor:
    """Mean over tokens and dimensions of (x − x̂)²."""
    return squared_errors(f).mean()


def l1_penalty(f: Forward) -> Tensor:
    """Sum of |f| over latents, averaged over tokens (the trainer weighs it by λ)."""
    return f.codes.l1().float().mean()


def auxk_loss(f: Forward, *, aux_k: int) -> Tensor:
    """AuxK (Gao et al. 2024): make the dead latents model the main model's error.

    e = x − x̂ (detached). Per token, take the ``aux_k`` largest pre-activations among the
    dead latents (fewer if fewer are dead), ReLU them, and decode with their decoder rows
    without b_dec: ê. The loss is the normalised squared error, a ratio of batch totals:

        L_aux = Σ_b ‖e_b − ê_b‖² / Σ_b ‖e_b − ē‖²  =  mean_b ‖e_b − ê_b‖² / v
                (ē: the per-dimension batch mean of e; v = mean_b ‖e_b − ē‖², ``f.residual_var``
                 when this forward is a micro-batch of the batch)

    so it is O(1) whatever the scale of the residual. 0 when no latent is dead. Gradients
    reach W_enc, b_enc, b_dec (through the pre-activations) and the dead rows of W_dec.
    """
    x_BD, x_hat_BD, pre_BS, W_dec_SD = f.x_BD, f.x_hat_BD, f.pre_BS, f.W_dec_SD
    dead_idx = f.dead_S.nonzero().squeeze(1)
    n_dead = dead_idx.numel()
    if n_dead == 0:
        return x_BD.new_zeros((), dtype=torch.float32)
    e_BD = (x_BD.float() - x_hat_BD.float()).detach()
    vals_BK, pos_BK = pre_BS[:, dead_idx].float().topk(min(aux_k, n_dead), dim=1, sorted=False)
    e_hat_BD = F.embedding_bag(
        dead_idx[pos_BK], W_dec_SD.float(), per_sample_weights=torch.relu(vals_BK), mode="sum"
    )
    var = (e_BD - e_BD.mean(dim=0)).pow(2).sum(dim=1).mean() if f.residual_var is None else f.residual_var
    return (e_BD - e_hat_BD).pow(2).sum(dim=1).mean() / var.float().clamp_min(1e-12)


def ghost_grads_loss(
    f: Forward, *, match: Callable[[Forward], Tensor] = token_norm_errors, eps: float = TOKEN_NORM_EPS
) -> Tensor:
    """Ghost gradients (Anthropic, Jan 2024; the PatchSAE reference's revival method).

    e = x − x̂ (detached). The dead latents act with exp(pre) instead of ReLU, so they get
    gradient even when pre < 0; their decoded output g is rescaled per token to half of
    ‖e_b‖ (factor ‖e_b‖ / (2‖g_b‖ + eps), detached). Because of that rescaling, exp(pre − m_b)
    with m_b the token's largest dead pre-activation (detached) gives the same values and
    gradients as exp(pre) in exact arithmetic; it is used so very negative or large
    pre-activations neither underflow nor overflow. Per element, the ghost error is
    γ_bd = (g_bd − e_bd)² / ‖e_b‖ and is rescaled by the detached factor
    r_bd / (γ_bd + eps), r = ``match(f)`` the main loss's per-element error (B, D); the loss
    is the mean over tokens and dimensions, so its value ≈ the reconstruction loss and each
    element's gradient is weighted by that element's own error ratio, as in the reference
    (and SAELens). 0 when no latent is dead. Only the dead latents' encoder columns, encoder
    biases and decoder rows, and b_dec, receive its gradient.
    """
    x_BD, x_hat_BD, pre_BS, W_dec_SD = f.x_BD, f.x_hat_BD, f.pre_BS, f.W_dec_SD
    dead_idx = f.dead_S.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return x_BD.new_zeros((), dtype=torch.float32)
    e_BD = (x_BD.float() - x_hat_BD.float()).detach()
    pre_dead = pre_BS[:, dead_idx].float()
    ghost_BS = torch.exp(pre_dead - pre_dead.max(dim=1, keepdim=True).values.detach())
    g_BD = ghost_BS @ W_dec_SD[dead_idx].float()
    e_norm_B1 = e_BD.norm(dim=1, keepdim=True)
    g_BD = g_BD * (e_norm_B1 / (2 * g_BD.norm(dim=1, keepdim=True) + eps)).detach()
    ghost_err_BD = (g_BD - e_BD).pow(2) / e_norm_B1.clamp_min(eps)
    rescale_BD = (match(f).float() / (ghost_err_BD + eps)).detach()
    return (ghost_err_BD * rescale_BD).mean()
