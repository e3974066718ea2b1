"""Stage two: training from a store (planted dictionary, resume, refusals) and sparse codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import stages.train as train_stage
from app.cli import main
from cache import jsonfile
from cache.check import verify
from cache.codes import CodeStore
from cache.errors import UserError
from cache.store import ActivationStore
from pipeline.sae import load_sae
from stages import encode, importer
from stages.train import Config
from tests.helpers import make_extract_config, sigkill_when

pytestmark = pytest.mark.usefixtures("one_thread")

D, N_TRUE, P_ACTIVE, NOISE = 32, 64, 3 / 64, 0.01
MIN_MEAN_MAX_COS, MAX_FVU = 0.9, 0.15  # 64 features in 32 dims interfere: good SAEs reach FVU ~0.1
SETTINGS = {"relu": dict(l1=3e-3, lr=1e-2), "topk": dict(k=4, lr=3e-3), "batchtopk": dict(k=4, lr=3e-3)}




@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store of x = sparse codes x unit dictionary + noise, (n, d) tokens, plus the dictionary."""
    tmp = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    planted_dirs = rng.standard_normal((N_TRUE, D))  # (planted features, D); no key letter for them
    planted_dirs /= np.linalg.norm(planted_dirs, axis=1, keepdims=True)
    n = 40_000
    coef = (rng.random((n, N_TRUE)) < P_ACTIVE) * (0.5 + rng.random((n, N_TRUE)))
    x_ND = coef @ planted_dirs + NOISE * rng.standard_normal((n, D))
    np.save(tmp / "x.npy", x_ND.astype(np.float16))
    importer.run(importer.Config(source_path=tmp / "x.npy", out_dir=tmp / "store", images_per_chunk=512,
                                 images_per_shard=4096))
    return tmp / "store", planted_dirs


def _cfg(store, out, arch="relu", **overrides) -> Config:
    s = dict(SETTINGS[arch])
    base = dict(cache_dir=store, layer=0, out_dir=out, arch=arch, expansion=4, total_tokens=256 * 1000,
                batch_images=256, warmup_steps=50, val_fraction=0.1, dead_window_tokens=20_000, log_every=100,
                checkpoint_every=400, device="cpu", progress=False, lr=s.pop("lr"), **s)
    base.update(overrides)
    return Config(**base)


@pytest.mark.parametrize("arch", sorted(SETTINGS))
def test_planted_dictionary_is_recovered_from_a_store(planted, tmp_path, arch):
    store, planted_dirs = planted
    out = train_stage.run(_cfg(store, tmp_path / arch, arch))
    sae = load_sae(out.sae_dir)
    assert sae.config.arch == arch and sae.config.d_sae == 128
    max_cos = (torch.from_numpy(planted_dirs).float() @ sae.W_dec.detach().T).max(dim=1).values
    assert max_cos.mean() >= MIN_MEAN_MAX_COS, max_cos
    assert out.metrics["fvu"] < MAX_FVU and out.metrics["eval_split"] == "val"
    metrics = json.loads(out.metrics_path.read_text())
    for key in ("mse", "fvu", "l0", "l1", "token_norm_loss", "dead_fraction", "dense_fraction", "lr", "tokens_per_s"):
        assert np.isfinite(metrics[key]), key
    history = json.loads((out.sae_dir / "history.json").read_text())
    assert history[0]["fvu"] > history[-1]["fvu"] and out.plot_path.stat().st_size > 10_000


def test_interrupted_training_resumes_to_identical_weights(planted, tmp_path, monkeypatch):
    store, _ = planted
    cfg = _cfg(store, tmp_path / "ref", total_tokens=256 * 120, checkpoint_every=40)
    train_stage.run(cfg)
    reference = load_sae(cfg.out_dir)

    real_save = train_stage.save_training_state
    calls = []

    def save_then_die(trainer, path):
        real_save(trainer, path)
        calls.append(trainer.n_steps)
        if len(calls) == 2:
            raise KeyboardInterrupt  # dies right after the step-80 checkpoint

    interrupted = _cfg(store, tmp_path / "cut", total_tokens=256 * 120, checkpoint_every=40)
    monkeypatch.setattr(train_stage, "save_training_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(interrupted)
    monkeypatch.setattr(train_stage, "save_training_state", real_save)
    out = train_stage.run(interrupted)
    assert calls == [40, 80] and out.resumed_from_step == 80 and out.steps == 120
    resumed = load_sae(interrupted.out_dir)
    for name, p in reference.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    curves = [(run.out_dir / "dvclive" / "plots" / "metrics" / "loss.tsv").read_text() for run in (cfg, interrupted)]
    assert curves[0].splitlines()[1:] and [r.split("\t")[0] for r in curves[1].splitlines()] == \
        [r.split("\t")[0] for r in curves[0].splitlines()]  # every step once, as in the uninterrupted run


def test_a_run_shorter_than_the_dead_window_writes_null_and_why(planted, tmp_path):
    out = train_stage.run(_cfg(planted[0], tmp_path / "short", total_tokens=256 * 30, dead_window_tokens=10**7))
    metrics = jsonfile.loads(out.metrics_path.read_text())
    assert metrics["train_dead_fraction"] is None
    assert metrics["train_dead_fraction_why"] == "run shorter than the dead-latent window (7680 of 10000000 tokens)"
    history = jsonfile.loads(out.history_path.read_text())
    assert history[-1]["dead_fraction"] is None and "dead-latent window" in history[-1]["dead_fraction_why"]
    assert "dead run shorter than the dead-latent window" in train_stage.summary(out)


@pytest.mark.slow
def test_sigkill_during_training_then_rerun_resumes(planted, tmp_path):
    store, _ = planted
    args = [sys.executable, "-m", "app.cli", "train", "--cache", str(store), "--layer", "0", "--expansion", "4",
            "--l1", "3e-3", "--lr", "1e-2", "--tokens", str(256 * 1200), "--batch-images", "256",
            "--checkpoint-every", "100", "--log-every", "100", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matmuls: one thread each, immune to a busy core
    ref = subprocess.run([*args, "--out", str(tmp_path / "ref")], capture_output=True, text=True, env=env)
    assert ref.returncode == 0, ref.stderr
    ckpt = tmp_path / "cut" / "checkpoint" / "trainer.pt"
    sigkill_when([*args, "--out", str(tmp_path / "cut")],
                 lambda: ckpt.exists() and torch.load(ckpt, weights_only=True)["n_steps"] >= 300, env=env, timeout=300)
    step = torch.load(ckpt, weights_only=True)["n_steps"]
    assert 300 <= step < 1200, f"the kill landed at step {step}; the test needs a mid-run kill"
    rerun = subprocess.run([*args, "--out", str(tmp_path / "cut")], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0 and f"resumed at step {step}" in rerun.stdout, rerun.stdout + rerun.stderr
    a, b = load_sae(tmp_path / "ref"), load_sae(tmp_path / "cut")
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name


@pytest.mark.parametrize("arch", sorted(SETTINGS))
def test_encode_round_trip_matches_sae_encode(planted, tmp_path, arch):
    store_dir, _ = planted
    cfg = _cfg(store_dir, tmp_path / "sae", arch, total_tokens=256 * 60)
    train_stage.run(cfg)
    out = encode.run(encode.Config(cache_dir=store_dir, sae_dir=cfg.out_dir, out_dir=tmp_path / "codes",
                                   batch_tokens=3000, device="cpu", progress=False))
    sae = load_sae(cfg.out_dir)
    acts = torch.from_numpy(ActivationStore(store_dir).acts(0)[:].astype(np.float32))[:, 0]
    with torch.no_grad():
        expected_NS = sae.encode(acts).dense().numpy()
    codes = CodeStore(out.codes_dir)
    for i in (0, 1, 4095, 4096, 39_999):
        np.testing.assert_array_equal(codes.image(i)[0], expected_NS[i])
    for j in (0, 17, 127):
        np.testing.assert_array_equal(codes.latent(j)[:, 0], expected_NS[:, j])
    assert out.nnz == int((expected_NS > 0).sum())
    assert verify(out.codes_dir).ok


def test_encode_resumes_and_verify_flags_damage(planted, tmp_path):
    store_dir, _ = planted
    cfg = _cfg(store_dir, tmp_path / "sae", total_tokens=256 * 20)
    train_stage.run(cfg)
    enc = encode.Config(cache_dir=store_dir, sae_dir=cfg.out_dir, out_dir=tmp_path / "codes", device="cpu",
                        progress=False)
    encode.run(enc)
    codes = CodeStore(enc.out_dir, mode="r+")
    before = codes.read_shard(3)
    codes.group["done"][3] = 0
    assert not verify(enc.out_dir).ok
    encode.run(enc)
    after = CodeStore(enc.out_dir).read_shard(3)
    assert all(np.array_equal(getattr(before, f), getattr(after, f)) for f in ("token_ptr", "indices", "values"))
    codes.group["shards/000002/indices"][0] = 10_000  # behind the writer's back: the digest no longer matches
    report = verify(enc.out_dir)
    assert not report.ok and "does not match its checksum" in report.damaged[2][0] and report.repairable == [2]
    shard = codes.read_shard(1)  # written so by the writer (digest matches): a structural check catches it
    shard.indices[0] = 10_000
    codes.write_shard(1, shard)
    report = verify(enc.out_dir)
    assert "latent ids outside" in report.damaged[1][0]


def test_refusals(planted, tmp_path):
    store_dir, _ = planted
    with pytest.raises(UserError, match="layer 7 is not in"):
        train_stage.run(_cfg(store_dir, tmp_path / "a", layer=7))
    cfg = _cfg(store_dir, tmp_path / "sae", total_tokens=256 * 5)
    train_stage.run(cfg)
    with pytest.raises(UserError, match=r"holds another SAE training run \(identity.total_tokens is 1280 there"):
        train_stage.run(_cfg(store_dir, tmp_path / "sae", total_tokens=256 * 6))
    with pytest.raises(UserError, match="revival 'auxk' needs a TopK-family SAE"):
        train_stage.run(_cfg(store_dir, tmp_path / "refused", revival="auxk"))
    assert not (tmp_path / "refused").exists()  # a refused run leaves no file behind
    tiny = make_extract_config(tmp_path)  # width 64: does not fit an SAE of width 32
    from stages import extract

    extract.run(tiny)
    result = CliRunner().invoke(main, ["encode", "--cache", str(tiny.out_dir), "--sae", str(cfg.out_dir),
                                       "--out", str(tmp_path / "c"), "--device", "cpu"])
    assert result.exit_code == 2 and "expects width 32" in result.output
    ActivationStore(tiny.out_dir).group["done"][0] = 0
    result = CliRunner().invoke(main, ["train", "--cache", str(tiny.out_dir), "--layer", "3", "--out",
                                       str(tmp_path / "t"), "--device", "cpu"])
    assert result.exit_code == 2 and "pipeline verify" in result.output


def test_nan_loss_stops_keeps_checkpoint_and_names_the_step(planted, tmp_path):
    store_dir, _ = planted
    cfg = _cfg(store_dir, tmp_path / "nan", lr=1e12, warmup_steps=0, checkpoint_every=1, log_every=1,
               total_tokens=256 * 200)
    with pytest.raises(UserError, match=r"training stopped at step \d+: the loss became NaN/inf"):
        train_stage.run(cfg)
    state = torch.load(cfg.out_dir / "checkpoint" / "trainer.pt", weights_only=True)
    weights = load_sae(cfg.out_dir / "checkpoint").state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert state["n_steps"] >= 1


def test_early_stop_when_validation_fvu_stalls(planted, tmp_path):
    store_dir, _ = planted
    cfg = _cfg(store_dir, tmp_path / "stall", lr=1e-12, warmup_steps=0, log_every=5, early_stop_patience=2,
               total_tokens=256 * 400)
    out = train_stage.run(cfg)
    history = json.loads((cfg.out_dir / "history.json").read_text())
    assert out.steps < 400 and len(history) <= 4 and all("val_fvu" in h for h in history)


def test_encode_refuses_an_sae_of_another_layer(planted, tmp_path):
    store_dir, _ = planted
    cfg = _cfg(store_dir, tmp_path / "sae", total_tokens=256 * 5)
    train_stage.run(cfg)
    config = json.loads((cfg.out_dir / "config.json").read_text())
    config["layer"] = 5
    (cfg.out_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trained on layer 5, which .* does not hold"):
        encode.run(encode.Config(cache_dir=store_dir, sae_dir=cfg.out_dir, out_dir=tmp_path / "c", device="cpu"))


def test_the_mean_reconstruction_error_is_stored_with_the_sae(planted, tmp_path):
    from cache.loader import TokenLoader
    from pipeline.sae.io import MEAN_ERROR_NAME, load_mean_error, save_sae

    cfg = _cfg(planted[0], tmp_path / "err", total_tokens=256 * 30, mean_error_tokens=5000)
    out = train_stage.run(cfg)
    stored = load_mean_error(out.sae_dir)
    sae = load_sae(out.sae_dir)
    assert stored.n_tokens == 5120 and stored.token_kind == "all"  # whole 256-token batches, at least 5000
    assert stored.cache_config_sha256 == ActivationStore(planted[0], mode="r").config_sha256
    # By hand: the same training tokens, x - x_hat averaged per dimension.
    loader = TokenLoader(ActivationStore(planted[0], mode="r"), train_stage.LoaderConfig(
        layer=0, batch_tokens=256, val_fraction=0.1, seed=0), split="train")
    x_ND = torch.cat([x.float() for x, _ in zip(loader.batches(0), range(20))])
    with torch.no_grad():
        want_D = (x_ND - sae(x_ND)[0]).double().mean(0).float()
    torch.testing.assert_close(stored.mean_error_D, want_D, rtol=0, atol=1e-6)
    assert stored.mean_error_D.abs().max() > 1e-4  # a real, non-zero bias of this short run
    # Measured with these weights only: new weights make it stale, refused in one line.
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    save_sae(sae, out.sae_dir)
    with pytest.raises(UserError, match=f"{MEAN_ERROR_NAME} was measured with other weights"):
        load_mean_error(out.sae_dir)


def test_micro_batches_reach_the_trainer_and_give_the_same_sae(planted, tmp_path, monkeypatch):
    store, _ = planted
    seen = []

    class Spy(train_stage.Trainer):
        def step(self, x_BD):
            seen.append(self.cfg.part_tokens(self.sae.config.d_sae))
            return super().step(x_BD)

    monkeypatch.setattr(train_stage, "Trainer", Spy)
    whole = load_sae(train_stage.run(_cfg(store, tmp_path / "whole", total_tokens=256 * 20)).sae_dir)
    parts = load_sae(train_stage.run(_cfg(store, tmp_path / "parts", total_tokens=256 * 20,
                                          micro_batch_tokens=100)).sae_dir)
    assert seen[0] >= 256 and set(seen[20:]) == {100} and len(seen) == 40
    for name, p in whole.state_dict().items():
        torch.testing.assert_close(parts.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(UserError, match="--micro-batch-tokens must be at least 1"):
        _cfg(store, tmp_path / "bad", micro_batch_tokens=0)
