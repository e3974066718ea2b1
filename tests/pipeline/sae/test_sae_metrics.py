"""Each metric against a plain numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sae_helpers import make_sae_config, random_batches

from pipeline.sae import Codes, FiringCounter, RunningMetrics, build, evaluate
from pipeline.sae.losses import (
    Forward,
    auxk_loss,
    ghost_grads_loss,
    l1_penalty,
    mse,
    recon_loss_token_norm,
    token_norm_errors,
)


def _batches_with_different_means():
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (n, mean) in enumerate([(30, 0.0), (50, 5.0), (20, -3.0), (64, 12.0)]):
        x = mean + torch.randn(n, 8, generator=g) * (1 + i)
        x_hat = x + 0.3 * torch.randn(n, 8, generator=g) + 0.1
        acts = torch.relu(torch.randn(n, 12, generator=g))
        out.append((x, x_hat, Codes(d_sae=12, acts_BS=acts)))
    return out


def test_running_metrics_match_numpy_ratio_of_totals():
    batches = _batches_with_different_means()
    metrics = RunningMetrics()
    for x, x_hat, codes in batches:
        metrics.update(x, x_hat, codes)
    got = metrics.compute()

    x = np.concatenate([b[0].numpy() for b in batches]).astype(np.float64)
    x_hat = np.concatenate([b[1].numpy() for b in batches]).astype(np.float64)
    acts = np.concatenate([b[2].acts_BS.numpy() for b in batches]).astype(np.float64)
    err = ((x - x_hat) ** 2).sum()
    want_fvu = err / ((x - x.mean(axis=0)) ** 2).sum()
    assert got["n_tokens"] == len(x)
    assert got["mse"] == pytest.approx(((x - x_hat) ** 2).mean(), rel=1e-10)
    assert got["fvu"] == pytest.approx(want_fvu, rel=1e-9)
    assert got["token_norm_loss"] == pytest.approx(
        (((x - x_hat) ** 2).mean(axis=1) / np.linalg.norm(x, axis=1)).mean(), rel=1e-9
    )
    assert got["l0"] == pytest.approx((acts > 0).sum(axis=1).mean(), rel=1e-12)
    assert got["l1"] == pytest.approx(np.abs(acts).sum(axis=1).mean(), rel=1e-6)

    # the reference is discriminating: the two known-wrong formulas give other numbers
    per_batch = np.mean([
        ((b[0].numpy() - b[1].numpy()) ** 2).sum()
        / ((b[0].numpy() - b[0].numpy().mean(0)) ** 2).sum() for b in batches
    ])
    around_zero = err / (x**2).sum()
    for wrong in (per_batch, around_zero):
        assert abs(wrong - want_fvu) > 0.2 * want_fvu


def test_running_metrics_refuses_empty():
    from cache.errors import UserError

    with pytest.raises(UserError, match="empty"):
        RunningMetrics().compute()


def test_losses_match_numpy():
    g = torch.Generator().manual_seed(1)
    x, x_hat = torch.randn(20, 6, generator=g), torch.randn(20, 6, generator=g)
    acts = torch.relu(torch.randn(20, 9, generator=g))
    xn, xhn = x.double().numpy(), x_hat.double().numpy()
    want = (((xn - xhn) ** 2).mean(axis=1) / np.linalg.norm(xn, axis=1)).mean()
    f = Forward(x, x_hat, torch.zeros(20, 9), Codes(d_sae=9, acts_BS=acts), torch.zeros(9, 6))
    assert recon_loss_token_norm(f).item() == pytest.approx(want, rel=1e-5)
    assert mse(f).item() == pytest.approx(((xn - xhn) ** 2).mean(), rel=1e-5)
    assert l1_penalty(f).item() == pytest.approx(
        acts.double().numpy().sum(axis=1).mean(), rel=1e-5
    )


def test_auxk_loss_matches_numpy_and_only_trains_dead_latents():
    g = torch.Generator().manual_seed(2)
    B, D, S = 16, 5, 10
    x, x_hat = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    pre = torch.randn(B, S, generator=g, requires_grad=True)
    W_dec = torch.randn(S, D, generator=g, requires_grad=True)
    dead = torch.zeros(S, dtype=torch.bool)
    dead[[1, 4, 7]] = True

    codes = Codes(d_sae=S, acts_BS=torch.relu(pre))
    loss = auxk_loss(Forward(x, x_hat, pre, codes, W_dec, dead), aux_k=2)
    e = (x - x_hat).double().numpy()
    p = pre.detach().double().numpy()
    e_hat = np.zeros_like(e)
    for b in range(B):
        cols = [1, 4, 7]
        top = sorted(cols, key=lambda j: -p[b, j])[:2]
        for j in top:
            e_hat[b] += max(p[b, j], 0.0) * W_dec.detach().double().numpy()[j]
    want = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert loss.item() == pytest.approx(want, rel=1e-5)

    loss.backward()
    alive = ~dead
    assert (W_dec.grad[alive] == 0).all() and (pre.grad[:, alive] == 0).all()
    assert W_dec.grad[dead].abs().sum() > 0
    assert auxk_loss(Forward(x, x_hat, pre, codes, W_dec, torch.zeros(S, dtype=torch.bool)), aux_k=2).item() == 0


def test_ghost_grads_loss_matches_recon_and_only_trains_dead_latents():
    g = torch.Generator().manual_seed(3)
    B, D, S = 16, 5, 10
    x, x_hat = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    pre = torch.randn(B, S, generator=g, requires_grad=True)
    W_dec = torch.randn(S, D, generator=g, requires_grad=True)
    dead = torch.zeros(S, dtype=torch.bool)
    dead[[0, 3]] = True
    f = Forward(x, x_hat, pre, Codes(d_sae=S, acts_BS=torch.relu(pre)), W_dec, dead)
    loss = ghost_grads_loss(f, match=lambda _: torch.full((B, D), 0.123))
    # each element rescaled to the recon error, r·γ/(γ + 1e-6): a little under r where γ is tiny
    assert 0.95 * 0.123 < loss.item() <= 0.123
    loss.backward()
    assert (W_dec.grad[~dead] == 0).all() and (pre.grad[:, ~dead] == 0).all()
    assert pre.grad[:, dead].abs().sum() > 0


def _ghost_reference(x, W_enc, b_enc, W_dec, b_dec, dead):
    """The reference's ghost-grad formula, written out plainly: (recon loss, ghost loss)."""
    pre = (x - b_dec) @ W_enc + b_enc
    x_hat = torch.relu(pre) @ W_dec + b_dec
    mse_loss = (x_hat - x) ** 2 / (x**2).sum(dim=-1, keepdim=True).sqrt()
    residual = x - x_hat
    ghost_out = torch.exp(pre[:, dead]) @ W_dec[dead, :]
    scale = torch.norm(residual, dim=-1) / (1e-6 + torch.norm(ghost_out, dim=-1) * 2)
    ghost_out = ghost_out * scale[:, None].detach()
    ghost = (ghost_out - residual.detach()) ** 2 / (residual.detach() ** 2).sum(dim=-1, keepdim=True).sqrt()
    ghost = (mse_loss / (ghost + 1e-6)).detach() * ghost
    return mse_loss.mean(), ghost.mean()


def _ghost_scalar_rescale(f: Forward):
    """The former formula: one detached scalar makes the ghost loss's value equal the recon loss."""
    dead_idx = f.dead_S.nonzero().squeeze(1)
    e = (f.x_BD - f.x_hat_BD).detach()
    g_BD = torch.exp(f.pre_BS[:, dead_idx]) @ f.W_dec_SD[dead_idx]
    e_norm = e.norm(dim=1, keepdim=True)
    g_BD = g_BD * (e_norm / (2 * g_BD.norm(dim=1, keepdim=True) + 1e-6)).detach()
    raw = ((g_BD - e).pow(2).mean(dim=1) / e_norm.squeeze(1)).mean()
    return raw * (recon_loss_token_norm(f).detach() / raw.detach())


def test_ghost_grads_loss_and_gradients_match_the_reference_per_element_rescale():
    sae = build(make_sae_config("relu", d_in=12, d_sae=40), seed=4)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-1.0, 0.5, 40))
        sae.b_dec.copy_(0.3 * torch.ones(12))
    x = random_batches(1, batch=32, d_in=12, seed=5, offset=1.0)[0]
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    params = ("W_enc", "b_enc", "W_dec", "b_dec")

    def grads(loss):
        return [g.clone() for g in torch.autograd.grad(loss, [getattr(sae, n) for n in params])]

    pre = sae.pre_acts(x)
    codes = sae.activate(pre)
    f = Forward(x, sae.decode_normed(codes), pre, codes, sae.W_dec, dead)
    ours = ghost_grads_loss(f, match=token_norm_errors)
    ours_grads = grads(ours)
    # the reference in float64: 1/(γ + 1e-6) amplifies rounding, so even the reference's own
    # float32 gradients are ~1e-4 (relative norm) from it; ours must be as close
    params64 = [getattr(sae, n).detach().double().requires_grad_() for n in params]
    recon_ref, ghost_ref = _ghost_reference(x.double(), *params64, dead)
    assert ours.item() == pytest.approx(ghost_ref.item(), rel=1e-5)
    assert ghost_ref.item() == pytest.approx(recon_ref.item(), rel=1e-2)  # the reference's value ≈ its recon loss
    for name, got, want in zip(params, ours_grads, torch.autograd.grad(ghost_ref, params64)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 3e-4, (name, err)

    pre = sae.pre_acts(x)
    codes = sae.activate(pre)
    scalar = _ghost_scalar_rescale(Forward(x, sae.decode_normed(codes), pre, codes, sae.W_dec, dead))
    assert scalar.item() == pytest.approx(recon_ref.item(), rel=1e-5)  # its value is the recon loss ...
    scalar_grads = grads(scalar)
    for name, got, old in zip(params, ours_grads, scalar_grads):  # ... but other gradients
        assert (got - old).norm() > 0.3 * got.norm(), name


def _numpy_firing_reference(fire_NS: np.ndarray, window: int, threshold: float):
    """Dead: no firing in the last `window` tokens. Dense: freq > threshold over the last
    complete window (windows are consecutive blocks of `window` tokens from the start)."""
    n = len(fire_NS)
    dead = ~fire_NS[n - window:].any(axis=0)
    last = (n // window) - 1
    freq = fire_NS[last * window:(last + 1) * window].mean(axis=0)
    return dead.mean(), (freq > threshold).mean()


@pytest.mark.parametrize("n_batches", [10, 13, 29])
def test_firing_counter_dead_and_dense_over_window(n_batches):
    B, S, window = 20, 40, 100
    rng = np.random.default_rng(n_batches)
    rates = np.concatenate([np.full(10, 0.0), np.full(10, 0.003), np.full(10, 0.05), np.full(10, 0.3)])
    fire_NS = rng.random((n_batches * B, S)) < rates
    fire_NS[: B, :5] = True  # five never-again latents fire once, in the first batch

    counter = FiringCounter(S, window_tokens=window)
    for i in range(n_batches):
        acts = torch.from_numpy(fire_NS[i * B:(i + 1) * B].astype(np.float32))
        counter.update(Codes(d_sae=S, acts_BS=acts))
    want_dead, want_dense = _numpy_firing_reference(fire_NS, window, 0.1)
    assert counter.dead_fraction().item() == pytest.approx(want_dead)
    assert counter.dense_fraction().item() == pytest.approx(want_dense)
    assert counter.dead_fraction().item() >= 10 / 40  # the never-firing ones at least


def test_firing_counter_is_nan_before_one_window_and_counts_sparse_codes():
    counter = FiringCounter(6, window_tokens=10)
    codes = Codes.fixed_width(6, torch.tensor([[1.0, 0.0], [2.0, 3.0], [0.5, 0.0]]), torch.tensor([[0, 1], [0, 5], [2, 3]]))
    assert codes.fire_counts().tolist() == [2, 0, 1, 0, 0, 1]
    counter.update(codes)
    assert math.isnan(counter.dead_fraction().item())
    assert math.isnan(counter.dense_fraction().item())
    for _ in range(3):
        counter.update(codes)
    assert counter.dead_mask().tolist() == [False, True, False, True, True, False]


def test_evaluate_reports_original_units_and_window():
    sae = build(make_sae_config("relu", norm_scale=7.0, dead_window_tokens=128), seed=0)
    batches = [7.0 * b for b in random_batches(4, offset=1.0)]
    got = evaluate(sae, batches)
    ref = RunningMetrics()
    with torch.no_grad():
        for x in batches:
            x_hat, codes = sae(x)
            ref.update(x, x_hat, codes)
    want = ref.compute()
    for key in want:
        assert got[key] == pytest.approx(want[key])
    assert got["window_tokens"] == 128 and 0 <= got["dead_fraction"] <= 1
