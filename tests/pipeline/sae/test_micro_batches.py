"""Micro-batched steps give the whole batch's update: same weights, counters and metrics."""

from __future__ import annotations

import pytest
import torch
from sae_helpers import make_sae_config, make_train_config, random_batches

from pipeline.sae import TopKConfig, TrainConfig, Trainer, build
from pipeline.sae.trainer import DENSE_COPIES, MICRO_BATCH_BYTES

N_STEPS = 8
PART = 24  # 64-token batches in parts of 24, 24 and 16


def _train(arch: str, micro_batch_tokens: int | None):
    """N_STEPS steps from the same start; a quarter of the latents cannot fire, so revival runs from step 2."""
    sae = build(make_sae_config(arch, dead_window_tokens=128), seed=0)
    trainer = Trainer(sae, make_train_config(micro_batch_tokens=micro_batch_tokens, warmup_steps=2))
    trainer.init_from_sample(random_batches(1, batch=256, seed=9, offset=1.5)[0])
    with torch.no_grad():
        if isinstance(sae.config, TopKConfig):  # out-competed: positive pre-activations, never in the top k
            sae.b_enc[:12], sae.b_enc[12:] = -0.5, 3.0
        else:  # a dead ReLU latent: pre-activations negative everywhere
            sae.b_enc[:12] = -20.0
    metrics = [trainer.step(x) for x in random_batches(N_STEPS, seed=3, offset=1.5)]
    return trainer, metrics


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_micro_batched_steps_equal_whole_batch_steps(arch):
    whole, whole_metrics = _train(arch, None)
    parts, parts_metrics = _train(arch, PART)
    assert whole.cfg.part_tokens(48) >= 64 and parts.cfg.part_tokens(48) == PART

    # revival ran (ghost grads for relu, AuxK for the TopK family) on the same dead latents
    assert all(m["aux_loss"] > 0 for m in whole_metrics[2:])
    assert torch.equal(whole.firing.tokens_since_fired_S, parts.firing.tokens_since_fired_S)
    assert torch.equal(whole.firing.window_counts_S, parts.firing.window_counts_S)
    assert whole.firing.n_tokens == parts.firing.n_tokens == N_STEPS * 64
    for a, b in zip(whole_metrics, parts_metrics):
        for key in ("loss", "recon_loss", "l1", "aux_loss", "l0", "fvu", "dead_fraction"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, equal_nan=True, msg=key)

    # float32 tolerance: parts change only the summation order; Adam divides by √v, so
    # an element with a near-zero gradient may move by a few ulps of lr more or less
    for name, value in whole.sae.state_dict().items():
        torch.testing.assert_close(parts.sae.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = (whole.sae.W_dec - build(make_sae_config(arch), seed=0).W_dec).abs().max()
    assert moved > 1e-3  # the comparison is not of untrained weights
    if arch == "batchtopk":
        assert float(parts.sae.threshold) > 0


def test_batchtopk_parts_keep_the_whole_batch_budget():
    sae = build(make_sae_config("batchtopk", k=3), seed=1)
    x = random_batches(1, batch=40, seed=4, offset=1.0)[0]
    pre = sae.pre_acts(x).detach()
    whole = sae.activate(pre).dense()
    budget = sae.batch_context(pre.split(15), 40)
    parts = torch.cat([sae.activate_part(p, budget).dense() for p in pre.split(15)])
    assert torch.equal(parts, whole)
    assert int((whole > 0).sum()) == 3 * 40
    assert budget.min_kept == whole[whole > 0].min()
    per_part = torch.cat([sae.activate(p).dense() for p in pre.split(15)])
    assert not torch.equal(per_part, whole)  # each part's own budget would keep another set


def test_automatic_parts_keep_a_paper_width_step_within_budget():
    cfg = TrainConfig()  # paper batch: 128 images x 197 tokens
    part = cfg.part_tokens(768 * 64)
    assert 256 <= part < cfg.batch_tokens
    assert DENSE_COPIES * 4 * 768 * 64 * part <= MICRO_BATCH_BYTES <= 4 * 2**30
    assert cfg.part_tokens(48) >= cfg.batch_tokens  # small SAEs take the batch in one part
    assert TrainConfig(micro_batch_tokens=100).part_tokens(768 * 64) == 100
