"""One contract, every registered SAE architecture."""

from __future__ import annotations

import pytest
import torch
from sae_helpers import ALL_ARCHS, make_sae_config, random_batches

from pipeline.sae import (
    Codes,
    RunningMetrics,
    build,
    load_sae,
    read_sae_config,
    registered_archs,
    save_sae,
)


def test_every_known_arch_is_registered():
    assert {"relu", "topk", "batchtopk"} <= set(registered_archs())


def _trained_like(arch: str, **overrides):
    """An SAE with non-trivial biases (and, for BatchTopK, a threshold from a train batch)."""
    sae = build(make_sae_config(arch, **overrides), seed=1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.3, 0.2, sae.config.d_sae))
        sae.b_dec.copy_(torch.linspace(-1.0, 1.0, sae.config.d_in) / sae.config.norm_scale)
    sae.train()
    x_BD = random_batches(1, seed=5)[0] * sae.config.norm_scale
    sae.update_running_stats_(sae.encode(x_BD).detach())
    return sae.eval()


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_shapes_and_encode_decode_forward_agree(arch):
    sae = _trained_like(arch)
    x_BD = random_batches(1, batch=32)[0]
    codes = sae.encode(x_BD)
    dense_BS = codes.dense()
    x_hat_BD, codes_fwd = sae(x_BD)

    assert dense_BS.shape == (32, sae.config.d_sae)
    assert x_hat_BD.shape == x_BD.shape
    assert torch.equal(codes_fwd.dense(), dense_BS)
    assert torch.equal(sae.decode(codes), x_hat_BD)
    # the dense form decodes to the same reconstruction as the native form
    torch.testing.assert_close(sae.decode(Codes(d_sae=sae.config.d_sae, acts_BS=dense_BS)), x_hat_BD)
    # decode is f W_dec + b_dec
    torch.testing.assert_close(x_hat_BD, dense_BS @ sae.W_dec + sae.b_dec)
    assert (dense_BS >= 0).all()
    assert dense_BS.count_nonzero() > 0
    # per-token summaries agree with the dense codes
    torch.testing.assert_close(codes.l0(), (dense_BS > 0).sum(1).float())
    torch.testing.assert_close(codes.l1(), dense_BS.sum(1))
    assert torch.equal(codes.fire_counts(), (dense_BS > 0).sum(0))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_encoder_is_act_of_affine_map(arch):
    """Every active code equals its pre-activation (x − b_dec) W_enc + b_enc."""
    sae = _trained_like(arch)
    x_BD = random_batches(1, batch=32)[0]
    pre_BS = (x_BD - sae.b_dec) @ sae.W_enc + sae.b_enc
    dense_BS = sae.encode(x_BD).dense()
    active = dense_BS > 0
    torch.testing.assert_close(dense_BS[active], pre_BS[active])
    assert (pre_BS[active] > 0).all()


@pytest.mark.parametrize("arch", [a for a in ALL_ARCHS if a == "topk"])
def test_topk_has_at_most_k_nonzeros_per_token(arch):
    sae = _trained_like(arch, k=3)
    codes = sae.encode(random_batches(1, batch=50)[0])
    assert codes.vals_N.shape == (150,) and codes.count_B.tolist() == [3] * 50
    assert (codes.l0() <= 3).all()
    assert (codes.dense().count_nonzero(dim=1) <= 3).all()


def test_batchtopk_train_budget_and_eval_threshold():
    sae = _trained_like("batchtopk", k=3)
    x_BD = random_batches(1, batch=40)[0]
    pre_BS = sae.pre_acts(sae.to_normed(x_BD))

    sae.train()
    train_BS = sae.encode(x_BD).dense()
    assert train_BS.count_nonzero() <= 3 * 40  # k·B across the batch, not per token
    kept = train_BS[train_BS > 0]
    dropped = torch.relu(pre_BS)[(train_BS == 0) & (pre_BS > 0)]
    assert dropped.numel() == 0 or dropped.max() <= kept.min()

    sae.eval()
    theta = sae.inference_threshold()
    assert theta > 0
    eval_BS = sae.encode(x_BD).dense()
    torch.testing.assert_close(eval_BS, torch.relu(pre_BS) * (pre_BS > theta))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    sae = _trained_like(arch, model="ViT-B-16/openai", layer=10, token_kind="patches",
                        cache_config_sha256="ab" * 32, norm_scale=3.5)
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")

    assert type(loaded) is type(sae)
    assert loaded.config == sae.config
    assert loaded.inference_threshold() == sae.inference_threshold()
    assert read_sae_config(tmp_path / "sae") == sae.config
    assert not loaded.training
    x_BD = random_batches(1, batch=32)[0] * 3.5
    x_hat, codes = sae(x_BD)
    x_hat2, codes2 = loaded(x_BD)
    assert torch.equal(x_hat, x_hat2)
    assert torch.equal(codes.dense(), codes2.dense())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_norm_scale_round_trip_metrics_in_original_units(arch, tmp_path):
    """An SAE at norm_scale s on s·x behaves like the same weights at scale 1 on x."""
    s = 40.0
    unit = _trained_like(arch)
    scaled = build(make_sae_config(arch, norm_scale=s))
    scaled.load_state_dict(unit.state_dict())
    save_sae(scaled.eval(), tmp_path / "scaled")
    scaled = load_sae(tmp_path / "scaled")
    assert scaled.config.norm_scale == s

    x_BD = random_batches(1, batch=64)[0]
    x_hat1, codes1 = unit(x_BD)
    x_hat_s, codes_s = scaled(s * x_BD)
    torch.testing.assert_close(codes_s.dense(), codes1.dense())
    torch.testing.assert_close(x_hat_s, s * x_hat1, rtol=1e-5, atol=1e-4)

    m1, ms = RunningMetrics(), RunningMetrics()
    m1.update(x_BD, x_hat1, codes1)
    ms.update(s * x_BD, x_hat_s, codes_s)
    r1, rs = m1.compute(), ms.compute()
    assert rs["mse"] == pytest.approx(s**2 * r1["mse"], rel=1e-5)
    assert rs["fvu"] == pytest.approx(r1["fvu"], rel=1e-5)
    assert rs["token_norm_loss"] == pytest.approx(s * r1["token_norm_loss"], rel=1e-5)
    assert rs["l0"] == r1["l0"]
