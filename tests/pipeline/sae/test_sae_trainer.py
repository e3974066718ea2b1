"""The trainer: every step applies, NaN steps do not, resume is exact, training recovers
a planted dictionary."""

from __future__ import annotations

import copy

import pytest
import torch
from sae_helpers import ALL_ARCHS, arch_kwargs, make_sae_config, make_train_config, random_batches

from cache.errors import UserError
from pipeline.sae import (
    NonFiniteLossError,
    ReLUConfig,
    TopKConfig,
    TrainConfig,
    Trainer,
    build,
    config_class,
    evaluate,
    load_trainer,
    save_training_state,
)


def _params(sae):
    return {k: v.detach().clone() for k, v in sae.named_parameters()}


def _bf16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [
    "float32",
    pytest.param("bfloat16", marks=pytest.mark.skipif(
        not _bf16_autocast_works(), reason="no bf16 autocast on this CPU")),
])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_weights_change_every_step(arch, dtype):
    sae = build(make_sae_config(arch, dead_window_tokens=128), seed=0)
    trainer = Trainer(sae, make_train_config(dtype=dtype))
    trainer.init_from_sample(random_batches(1, batch=256, seed=9)[0])
    for i, x in enumerate(random_batches(6)):
        before = _params(sae)
        out = trainer.step(x)
        for name, value in _params(sae).items():
            assert not torch.equal(value, before[name]), f"{name} unchanged at step {i} ({dtype})"
        assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert trainer.n_steps == 6 and trainer.tokens_seen == 6 * 64


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_nan_batch_raises_and_changes_nothing(arch):
    sae = build(make_sae_config(arch), seed=0)
    trainer = Trainer(sae, make_train_config())
    for x in random_batches(3):
        trainer.step(x)
    state = copy.deepcopy(trainer.state_dict())
    bad = random_batches(1, seed=7)[0]
    bad[5, 3] = float("nan")
    with pytest.raises(NonFiniteLossError) as info:
        trainer.step(bad)
    assert info.value.step == 3 and "step 3" in str(info.value)
    assert isinstance(info.value, UserError)
    after = trainer.state_dict()
    assert after["n_steps"] == 3 and after["tokens_seen"] == state["tokens_seen"]
    for name, value in state["sae"].items():
        assert torch.equal(after["sae"][name], value), name
    assert torch.equal(after["firing"]["tokens_since_fired_S"], state["firing"]["tokens_since_fired_S"])
    for pid, pstate in state["optimizer"]["state"].items():
        for key, value in pstate.items():
            assert torch.equal(after["optimizer"]["state"][pid][key], value)
    trainer.step(random_batches(1, seed=8)[0])  # and training can go on
    assert trainer.n_steps == 4


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_state_dict_round_trip_is_exact(arch, tmp_path):
    # a small dead window so revival and the firing counters are live during the test
    cfg = make_sae_config(arch, dead_window_tokens=640)
    train_cfg = make_train_config(lr=3e-3)
    batches = random_batches(40, seed=11)

    first = Trainer(build(cfg, seed=3), train_cfg)
    first.init_from_sample(random_batches(1, batch=256, seed=12)[0])
    with torch.no_grad():
        first.sae.b_enc[:5] = -50.0  # five latents that cannot fire: dead after one window
    for x in batches[:20]:
        first.step(x)
    snapshot = first.state_dict()
    save_training_state(first, tmp_path / "ckpt")
    for x in batches[20:]:
        first.step(x)
    assert first.firing.dead_mask()[:5].all()
    assert any(t.name == "aux" for t in first.terms)

    in_memory = Trainer(build(cfg, seed=99), train_cfg)
    in_memory.load_state_dict(snapshot)
    from_disk = load_trainer(tmp_path / "ckpt", train_cfg)
    for resumed in (in_memory, from_disk):
        assert resumed.n_steps == 20
        for x in batches[20:]:
            resumed.step(x)
        for name, value in first.sae.state_dict().items():
            assert torch.equal(resumed.sae.state_dict()[name], value), name
        assert torch.equal(resumed.firing.tokens_since_fired_S, first.firing.tokens_since_fired_S)
        assert resumed.tokens_seen == first.tokens_seen
        assert torch.equal(resumed.generator.get_state(), first.generator.get_state())


def test_resume_refuses_another_sae_config():
    trainer = Trainer(build(make_sae_config("relu")), make_train_config())
    other = Trainer(build(make_sae_config("relu", d_sae=64)), make_train_config())
    with pytest.raises(UserError, match="d_sae"):
        other.load_state_dict(trainer.state_dict())


def test_fit_logs_checkpoints_and_stops_at_total_tokens():
    trainer = Trainer(build(make_sae_config("topk")), make_train_config(
        total_tokens=64 * 25, log_every=10, checkpoint_every=20))
    logs, ckpts = [], []
    last = trainer.fit(iter(random_batches(40)), on_log=lambda s, m: logs.append((s, m)),
                       on_checkpoint=lambda t: ckpts.append(t.n_steps))
    assert trainer.n_steps == 25 and trainer.tokens_seen == 64 * 25
    assert [s for s, _ in logs] == [10, 20, 25]
    assert ckpts == [20, 25]
    assert set(last) >= {"loss", "recon_loss", "l1", "aux_loss", "l0", "fvu", "lr",
                         "dead_fraction", "dense_fraction", "tokens_seen"}
    assert all(isinstance(v, float) for v in last.values())
    # resuming past the end does nothing
    assert trainer.fit(iter(random_batches(5))) == {}


def test_bad_batches_and_configs_give_user_errors():
    trainer = Trainer(build(make_sae_config("relu")), make_train_config())
    with pytest.raises(UserError, match="batch_tokens=64"):
        trainer.step(torch.randn(10, 16))
    with pytest.raises(UserError, match="expects"):
        trainer.step(torch.randn(64, 15))
    with pytest.raises(UserError, match="auxk"):
        Trainer(build(make_sae_config("relu")), make_train_config(revival="auxk"))
    with pytest.raises(UserError, match="float32"):
        Trainer(build(make_sae_config("relu", dtype="bfloat16")), make_train_config())
    with pytest.raises(UserError, match="needs k"):
        TopKConfig.from_fields(d_in=8, d_sae=16)
    with pytest.raises(UserError, match="takes no k"):
        ReLUConfig.from_fields(d_in=8, d_sae=16, k=4)
    with pytest.raises(UserError, match="k=17 exceeds d_sae=16"):
        config_class("batchtopk")(d_in=8, d_sae=16, k=17)
    with pytest.raises(UserError, match="unknown SAE arch"):
        config_class("gated")
    with pytest.raises(UserError, match="dtype"):
        TrainConfig(dtype="float16")
    assert ReLUConfig.from_expansion(d_in=768, expansion=64).d_sae == 49_152
    assert ReLUConfig(d_in=8, d_sae=16).l1 == 8e-5
    assert TopKConfig(d_in=8, d_sae=16, k=2).l1 == 0.0
    assert TopKConfig(d_in=8, d_sae=16, k=2).aux_k == 16


def test_lr_schedule_warms_up_then_stays_constant():
    cfg = TrainConfig(lr=4e-4, warmup_steps=500)
    assert cfg.schedule.lr_at(0) == pytest.approx(4e-4 / 500)
    assert cfg.schedule.lr_at(249) == pytest.approx(2e-4)
    assert cfg.schedule.lr_at(499) == cfg.schedule.lr_at(10_000) == 4e-4


# --- planted dictionary recovery ------------------------------------------------------
D_PLANT, N_TRUE, P_ACTIVE, NOISE = 32, 64, 3 / 64, 0.01
# 64 random unit features in 32 dims interfere (|cos| ~ 0.18), which limits how well any
# linear-threshold encoder reconstructs: on this problem good SAEs reach FVU ≈ 0.08–0.11.
MAX_FVU = 0.15
MIN_MEAN_MAX_COS = 0.9
PLANT_SETTINGS = {
    "relu": dict(sae=dict(l1=3e-3), lr=1e-2),
    "topk": dict(sae=dict(k=4), lr=3e-3),
    "batchtopk": dict(sae=dict(k=4), lr=3e-3),
}


def _planted_batches(g, dict_FD, batch, n):
    for _ in range(n):
        active = torch.rand(batch, N_TRUE, generator=g) < P_ACTIVE
        coef = (0.5 + torch.rand(batch, N_TRUE, generator=g)) * active
        yield coef @ dict_FD + NOISE * torch.randn(batch, D_PLANT, generator=g)


@pytest.mark.parametrize("arch", sorted(PLANT_SETTINGS))
def test_recovers_planted_dictionary(arch):
    g = torch.Generator().manual_seed(0)
    dict_FD = torch.randn(N_TRUE, D_PLANT, generator=g)
    dict_FD /= dict_FD.norm(dim=1, keepdim=True)
    setting = PLANT_SETTINGS[arch]
    cfg = config_class(arch)(d_in=D_PLANT, d_sae=128, dead_window_tokens=20_000,
                             **{**arch_kwargs(arch), **setting["sae"]})
    sae = build(cfg, seed=0)
    trainer = Trainer(sae, TrainConfig(lr=setting["lr"], warmup_steps=50, batch_tokens=256,
                                       log_every=250, checkpoint_every=10_000))
    trainer.init_from_sample(next(_planted_batches(g, dict_FD, 2048, 1)))
    trainer.fit(_planted_batches(g, dict_FD, 256, 1000))

    max_cos_F = (dict_FD @ sae.W_dec.detach().T).max(dim=1).values
    held_out = evaluate(sae, _planted_batches(g, dict_FD, 4096, 2), window_tokens=8192)
    assert max_cos_F.mean() >= MIN_MEAN_MAX_COS, max_cos_F
    assert held_out["fvu"] < MAX_FVU, held_out
    if arch != "relu":
        assert held_out["l0"] <= 4.5


# --- dead-latent revival --------------------------------------------------------------
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_revival_trains_dead_latents_only_when_on(arch):
    """Latents the counter calls dead get gradient from the revival term, and only then."""
    x = random_batches(1, seed=21)[0]
    moved = {}
    for revival in ("auto", "none"):
        sae = build(make_sae_config(arch, dead_window_tokens=64), seed=0)
        trainer = Trainer(sae, make_train_config(revival=revival, warmup_steps=0))
        with torch.no_grad():
            if isinstance(sae.config, TopKConfig):  # out-competed: positive pre-activations, never in the top k
                sae.b_enc[:8], sae.b_enc[8:] = -0.5, 3.0
            else:  # a dead ReLU latent: pre-activations negative everywhere
                sae.b_enc[:8] = -50.0
        trainer.firing.tokens_since_fired_S[:8] = 64  # the counter says: dead
        trainer.firing.n_tokens = 64
        silent = sae.encode(x).fire_counts()[:8] == 0  # not trained by the main loss
        assert silent.any()
        before = sae.W_dec.detach()[:8].clone()
        out = trainer.step(x)
        # (renormalising unit rows can flip last bits, hence the tolerance)
        moved[revival] = ((sae.W_dec.detach()[:8] - before).abs().max(dim=1).values > 1e-5)[silent]
        assert (out["aux_loss"] > 0) == (revival == "auto")
    assert moved["auto"].any()
    assert not moved["none"].any()


def test_ghost_grads_revive_killed_relu_latents():
    """Half the latents start unable to fire (b_enc = −3): ghost grads make most fire again.

    Measured as "fired at least once" (tokens since last firing < tokens seen): on this
    problem revived latents can die again later, so a dead count at one moment is noisy.
    """
    g0 = torch.Generator().manual_seed(0)
    dict_FD = torch.randn(N_TRUE, D_PLANT, generator=g0)
    dict_FD /= dict_FD.norm(dim=1, keepdim=True)
    ever_fired = {}
    for revival in ("none", "ghost_grads"):
        g = torch.Generator().manual_seed(1)
        sae = build(ReLUConfig(d_in=D_PLANT, d_sae=64, l1=3e-3, dead_window_tokens=2560), seed=0)
        trainer = Trainer(sae, TrainConfig(lr=1e-2, warmup_steps=50, batch_tokens=256,
                                           revival=revival, log_every=1000))
        trainer.init_from_sample(next(_planted_batches(g, dict_FD, 2048, 1)))
        with torch.no_grad():
            sae.b_enc[:32] = -3.0
        trainer.fit(_planted_batches(g, dict_FD, 256, 300))
        since_S = trainer.firing.tokens_since_fired_S[:32]
        ever_fired[revival] = (since_S < trainer.tokens_seen).float().mean().item()
    assert ever_fired["none"] < 0.25
    assert ever_fired["ghost_grads"] > 0.6
