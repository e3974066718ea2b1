"""Geometric median (b_dec init) and unit-norm decoder rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_helpers import make_sae_config, make_train_config, random_batches

from cache.errors import UserError
from pipeline.sae import (
    Trainer,
    build,
    geometric_median,
    normalize_decoder_,
    remove_parallel_grad_,
)


def _sum_dist(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y, axis=1).sum())


def _outlier_sample(seed=0, n=300, d=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 2.0
    x[:30] += 80.0  # 10% far outliers drag the mean, not the median
    return x


def test_geometric_median_beats_mean_and_is_a_local_minimum():
    x = _outlier_sample()
    med = geometric_median(torch.from_numpy(x)).numpy()
    assert med.dtype == np.float64
    f_med = _sum_dist(x, med)
    assert f_med < _sum_dist(x, x.mean(0)) * 0.9
    assert np.linalg.norm(med - 2.0) < 0.5  # near the bulk, not pulled to the outliers
    # brute force: no nearby point in any of many random directions is better
    rng = np.random.default_rng(1)
    for step in (1e-1, 1e-2, 1e-3):
        for _ in range(200):
            d = rng.normal(size=x.shape[1])
            assert _sum_dist(x, med + step * d / np.linalg.norm(d)) >= f_med - 1e-9 * f_med


def test_geometric_median_1d_is_the_median_and_2d_matches_grid_search():
    rng = np.random.default_rng(3)
    x1 = np.concatenate([rng.normal(size=101), [1e3, 2e3]])[:, None]
    assert geometric_median(torch.from_numpy(x1)).item() == pytest.approx(np.median(x1), abs=1e-4)

    x2 = _outlier_sample(seed=4, n=80, d=2)
    med = geometric_median(torch.from_numpy(x2)).numpy()
    grid = np.linspace(-1.5, 1.5, 121)
    best = min(_sum_dist(x2, med + np.array([a, b])) for a in grid for b in grid)
    assert _sum_dist(x2, med) <= best + 1e-9 * best


def test_geometric_median_refuses_bad_samples():
    with pytest.raises(UserError, match="NaN"):
        geometric_median(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(UserError, match="non-empty"):
        geometric_median(torch.zeros(0, 3))
    assert torch.equal(geometric_median(torch.ones(4, 3)), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("norm_scale", [1.0, 250.0])
def test_init_from_sample_works_with_norm_scale(norm_scale):
    sae = build(make_sae_config("relu", norm_scale=norm_scale), seed=0)
    trainer = Trainer(sae, make_train_config())
    sample = torch.from_numpy(_outlier_sample(n=200, d=16)).float() * norm_scale
    trainer.init_from_sample(sample)
    want = geometric_median(sample.double()) / norm_scale
    torch.testing.assert_close(sae.b_dec.detach().double(), want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(sae.b_dec).all()
    out = trainer.step(random_batches(1)[0] * norm_scale)
    assert torch.isfinite(out["loss"])


def test_remove_parallel_grad_leaves_only_orthogonal_part():
    sae = build(make_sae_config("relu"), seed=0)
    g = torch.randn(sae.W_dec.shape, generator=torch.Generator().manual_seed(0))
    sae.W_dec.grad = g.clone()
    remove_parallel_grad_(sae)
    dots = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert dots.abs().max() < 1e-5
    # only the parallel part was removed: the difference is parallel to each row
    removed = g - sae.W_dec.grad
    torch.testing.assert_close(removed, (g * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)


def test_decoder_rows_stay_unit_norm_through_training():
    sae = build(make_sae_config("topk"), seed=0)
    trainer = Trainer(sae, make_train_config(lr=1e-2, warmup_steps=0))
    for x in random_batches(8):
        trainer.step(x)
        norms = sae.W_dec.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    normalize_decoder_(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.config.d_sae))


def test_trainer_step_removes_parallel_grad_before_the_optimiser():
    sae = build(make_sae_config("relu"), seed=0)
    trainer = Trainer(sae, make_train_config(lr=1e-2, warmup_steps=0))
    seen = {}
    rows_before = {}

    def spy(_opt, _args, _kwargs):
        seen["grad"] = sae.W_dec.grad.clone()
        rows_before["w"] = sae.W_dec.detach().clone()

    handle = trainer.optimizer.register_step_pre_hook(spy)
    trainer.step(random_batches(1)[0])
    handle.remove()
    dots = (seen["grad"] * rows_before["w"]).sum(dim=1)
    assert seen["grad"].abs().sum() > 0
    assert dots.abs().max() < 1e-6 * max(1.0, seen["grad"].abs().max().item())
