"""The faster training-step maths equals its plain form (issue 19, item 2).

BatchTopK's ``batch_top`` against the plain definition (keep every ReLU'd value ≥ the
k·B-th largest of the batch); the encoder's b_dec gradient, the L1 sum, the firing counts
and both decoders against the expressions they replaced.
"""

from __future__ import annotations

import pytest
import torch
from sae_helpers import make_sae_config, random_batches

from pipeline.sae import Codes, build
from pipeline.sae import base as sae_base
from pipeline.sae import topk as topk_module
from pipeline.sae.geometry import remove_parallel_grad_
from pipeline.sae.topk import batch_top


def _plain(pre_BS: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Dense codes of the definition: ReLU'd values ≥ the n_keep-th largest, and > 0."""
    acts_BS = torch.relu(pre_BS)
    flat = acts_BS.flatten()
    cut = flat.sort(descending=True).values[min(n_keep, flat.numel()) - 1]
    return torch.where((acts_BS >= cut) & (acts_BS > 0), acts_BS, 0.0)


def _old_flat_topk(pre_BS: torch.Tensor, n_keep: int) -> torch.Tensor:
    """BatchTopK's training codes before issue 19: a flat top-(k·B) scattered back."""
    flat = torch.relu(pre_BS).flatten()
    vals, idx = flat.topk(min(n_keep, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre_BS)


def _skewed(n_rows: int, n_latents: int, seed: int) -> torch.Tensor:
    """Pre-activations whose tokens differ in scale by 100×, as trained SAEs' do."""
    g = torch.Generator().manual_seed(seed)
    scale_B1 = torch.logspace(-1, 1, n_rows)[torch.randperm(n_rows, generator=g)][:, None]
    return (torch.randn(n_rows, n_latents, generator=g) - 1.0) * scale_B1


@pytest.mark.parametrize("n_rows,n_latents,k", [(64, 48, 4), (300, 96, 8), (7, 5, 2), (128, 256, 1)])
def test_batch_top_keeps_exactly_the_plain_definitions_latents(n_rows, n_latents, k):
    pre_BS = _skewed(n_rows, n_latents, seed=n_rows)
    codes, cut = batch_top(pre_BS, n_keep=k * n_rows)
    dense_BS = codes.dense()
    assert torch.equal(dense_BS, _plain(pre_BS, k * n_rows))
    assert torch.equal(dense_BS, _old_flat_topk(pre_BS, k * n_rows))  # no ties: the old result
    n_positive = int((pre_BS > 0).sum())
    assert int((dense_BS > 0).sum()) == min(k * n_rows, n_positive)
    assert (codes.vals_N > 0).all()  # exactly the kept entries, no padding
    assert torch.equal(codes.count_B, (dense_BS > 0).sum(dim=1))
    assert torch.equal(codes.rows_N * n_latents + codes.idx_N, dense_BS.flatten().nonzero().squeeze(1))  # CSR order
    assert float(cut) == (float(dense_BS[dense_BS > 0].min()) if n_positive >= k * n_rows else 0.0)


def test_batch_top_keeps_every_tie_at_the_cut():
    g = torch.Generator().manual_seed(3)
    pre_BS = torch.randint(-3, 4, (40, 30), generator=g).float()  # values in whole steps: many ties
    codes, cut = batch_top(pre_BS, n_keep=3 * 40)
    assert torch.equal(codes.dense(), _plain(pre_BS, 3 * 40))
    n_kept = int((codes.dense() > 0).sum())
    assert n_kept > 3 * 40  # the ties at the cut came along
    assert n_kept == int((pre_BS >= cut).sum())


def test_batch_top_edge_cases():
    g = torch.Generator().manual_seed(4)
    pre_BS = torch.randn(20, 6, generator=g)
    pre_BS[3] = -torch.rand(6, generator=g) - 0.1  # an all-negative token
    # k·B ≥ B·S: every positive value is kept; the all-negative token keeps nothing
    codes, cut = batch_top(pre_BS, n_keep=6 * 20)
    assert torch.equal(codes.dense(), torch.relu(pre_BS)) and float(cut) == 0.0
    assert not (codes.dense()[3] > 0).any()
    # fewer positive values than the budget: the same
    codes, _ = batch_top(pre_BS, n_keep=5 * 20)
    assert torch.equal(codes.dense(), _plain(pre_BS, 5 * 20))
    # an all-negative batch keeps nothing
    codes, cut = batch_top(-pre_BS.abs() - 0.1, n_keep=2 * 20)
    assert not (codes.dense() > 0).any() and float(cut) == 0.0
    # a given cut (a micro-batch of a larger batch): every ReLU'd value ≥ it
    codes, cut = batch_top(pre_BS, cut=torch.tensor(0.7))
    assert float(cut) == pytest.approx(0.7)
    assert torch.equal(codes.dense(), torch.where(torch.relu(pre_BS) >= 0.7, torch.relu(pre_BS), 0.0))


def test_batch_top_is_exact_when_the_sampled_floor_is_too_high(monkeypatch):
    """The floor is guessed from every step-th token; here those are the batch's largest."""
    monkeypatch.setattr(topk_module, "SAMPLE_VALUES", 64)
    pre_BS = torch.randn(64, 32, generator=torch.Generator().manual_seed(5)) - 1.0
    pre_BS[::32] += 10.0  # the sampled tokens (step 32): the floor lands far above the cut
    codes, _ = batch_top(pre_BS, n_keep=4 * 64)
    assert torch.equal(codes.dense(), _plain(pre_BS, 4 * 64))
    assert torch.equal(codes.dense(), _old_flat_topk(pre_BS, 4 * 64))


def test_batch_top_gradient_equals_the_plain_definitions():
    pre_BS = _skewed(50, 40, seed=6)
    w_BS = torch.randn(50, 40, generator=torch.Generator().manual_seed(7))
    grads = []
    for codes_of in (lambda p: batch_top(p, n_keep=5 * 50)[0].dense(), lambda p: _old_flat_topk(p, 5 * 50)):
        p = pre_BS.clone().requires_grad_(True)
        (codes_of(p) * w_BS).sum().backward()
        grads.append(p.grad)
    assert torch.equal(grads[0], grads[1])


def test_encoder_b_dec_gradient_and_values_equal_the_plain_form():
    sae = build(make_sae_config("relu"), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.linspace(-1, 1, 16))
        sae.b_enc.copy_(torch.linspace(-0.3, 0.2, 48))
    x_BD = random_batches(1, seed=2, offset=1.0)[0]
    w_BS = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    pre_BS = sae.pre_acts(x_BD)
    (pre_BS * w_BS).sum().backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad()
    plain_BS = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    (plain_BS * w_BS).sum().backward()
    torch.testing.assert_close(pre_BS, plain_BS, rtol=1e-6, atol=1e-6)  # the zero bias term changes no value
    for name, grad in fast.items():
        torch.testing.assert_close(grad, getattr(sae, name).grad, rtol=1e-5, atol=1e-6, msg=name)
    assert fast["b_dec"].abs().max() > 1e-3


def test_l1_sum_and_its_gradient_equal_the_abs_sum_through_relu():
    pre_BS = torch.randn(30, 12, generator=torch.Generator().manual_seed(8))
    pre_BS[0, 0] = 0.0
    grads, values = [], []
    for l1_of in (lambda f: Codes(d_sae=12, acts_BS=f).l1(), lambda f: f.abs().sum(dim=1)):
        p = pre_BS.clone().requires_grad_(True)
        value = l1_of(torch.relu(p))
        value.sum().backward()
        grads.append(p.grad)
        values.append(value)
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])


def test_fire_counts_equal_the_mask_sum_across_float_count_chunks(monkeypatch):
    acts_BS = torch.relu(torch.randn(50, 9, generator=torch.Generator().manual_seed(9)))
    expected_S = (acts_BS > 0).sum(dim=0)
    assert torch.equal(Codes(d_sae=9, acts_BS=acts_BS).fire_counts(), expected_S)
    monkeypatch.setattr(sae_base, "_EXACT_FLOAT_COUNT", 7)  # the float sums run in parts of 7 rows
    counts_S = Codes(d_sae=9, acts_BS=acts_BS).fire_counts()
    assert counts_S.dtype == torch.int64 and torch.equal(counts_S, expected_S)


def test_decoders_equal_their_plain_forms():
    """Sparse decode (uneven counts per token, an empty token, inactive 0 entries) and dense
    decode equal the dense product, in value and in the gradients of W_dec and the values."""
    sae = build(make_sae_config("topk", k=12), seed=0)
    g = torch.Generator().manual_seed(10)
    acts_BS = torch.relu(torch.randn(20, 48, generator=g) - 1.0)
    acts_BS[3] = 0.0
    acts_BS[5, :4] = 0.0
    rows_N, idx_N = (acts_BS > 0).nonzero(as_tuple=True)
    rows_N, idx_N = torch.cat([rows_N, torch.tensor([5, 5])]), torch.cat([idx_N, torch.tensor([0, 2])])
    order = (rows_N * 48 + idx_N).argsort()
    rows_N, idx_N = rows_N[order], idx_N[order]  # two inactive entries (value 0) on token 5
    vals_N = acts_BS[rows_N, idx_N].clone().requires_grad_(True)
    codes = Codes(d_sae=48, vals_N=vals_N, idx_N=idx_N, count_B=torch.bincount(rows_N, minlength=20))
    assert torch.equal(codes.dense(), acts_BS) and torch.equal(codes.rows_N, rows_N)
    w_BD = torch.randn(20, 16, generator=g)
    (sae.decode_normed(codes) * w_BD).sum().backward()
    sparse_W, sparse_v = sae.W_dec.grad.clone(), vals_N.grad.clone()
    sae.zero_grad()
    dense_BS = acts_BS.clone().requires_grad_(True)
    plain_BD = dense_BS @ sae.W_dec + sae.b_dec
    (plain_BD * w_BD).sum().backward()
    torch.testing.assert_close(sae.decode_normed(codes), plain_BD)
    torch.testing.assert_close(sparse_W, sae.W_dec.grad)
    torch.testing.assert_close(sparse_v, dense_BS.grad[rows_N, idx_N])
    torch.testing.assert_close(sae.decode_normed(Codes(d_sae=48, acts_BS=acts_BS)), plain_BD)
    torch.testing.assert_close(codes.l0(), (acts_BS > 0).sum(dim=1).float())
    torch.testing.assert_close(codes.l1(), acts_BS.sum(dim=1))
    assert torch.equal(codes.fire_counts(), (acts_BS > 0).sum(dim=0))


def test_parallel_gradient_removal_equals_the_normalised_row_form():
    sae = build(make_sae_config("relu"), seed=0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1, generator=g) + 0.5)  # rows not unit: the formula must not assume it
    grad_SD = torch.randn(48, 16, generator=g)
    sae.W_dec.grad = grad_SD.clone()
    remove_parallel_grad_(sae)
    w_SD = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    plain_SD = grad_SD - (grad_SD * w_SD).sum(dim=1, keepdim=True) * w_SD
    torch.testing.assert_close(sae.W_dec.grad, plain_SD, rtol=1e-5, atol=1e-6)
    assert (sae.W_dec.grad * w_SD).sum(dim=1).abs().max() < 1e-5
