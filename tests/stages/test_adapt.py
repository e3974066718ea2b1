"""The MaPLe adaptation stage: it learns, resumes, writes its folder; adapted stores; refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from app.cli import main
from cache.errors import UserError
from cache.store import ActivationStore
from pipeline import maple, masking
from pipeline.datasets import open_dataset
from pipeline.models import load_model
from pipeline.sae import ReLUConfig, build, save_sae
from stages import adapt, encode, extract, pretrain, stats
from tests.helpers import assert_one_line_error, sigkill_when

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]

# A tiny CLIP that has learned something (pretrained like tests/stages/test_pretrain.py's short run: ~2 min on a
# busy 2-core machine, hence slow), then a few-shot task whose base zero-shot accuracy is far from perfect.
# Measured here (seed 0, 200 test images): base zero-shot 0.560, base 32-shot linear probe 0.955, adapted 0.795.
PRETRAIN = dict(steps=60, batch_size=64, warmup_steps=5, eval_images=20, workers=0, threads=2)
FEW_SHOT = dict(dataset="synthetic", model="tiny-clip", synthetic_task="background", shots=32, n_ctx=4, depth=2,
                epochs=10, batch_size=16, lr=2.0, warmup_epochs=0, test_limit=200, device="cpu", progress=False)
MIN_GAIN = 0.10  # adapted minus base zero-shot accuracy on the test split


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "run"
    return pretrain.run(pretrain.Config(out_dir=out, device="cpu", progress=False, **PRETRAIN)).model_path


@pytest.fixture(scope="module")
def random_run(tmp_path_factory) -> adapt.Outputs:
    """A few steps on a random tiny CLIP (nothing to learn from): files, loading and rerun tests."""
    return adapt.run(_random(tmp_path_factory.mktemp("adapt") / "colour"))


def _random(out_dir: Path, **overrides) -> adapt.Config:
    """A few steps on a random tiny CLIP: for resume, file and refusal tests."""
    base = dict(dataset="synthetic", out_dir=out_dir, model="tiny-clip", pretrained="none", synthetic_task="colour",
                shots=4, n_ctx=2, depth=2, epochs=3, batch_size=4, lr=0.01, warmup_epochs=1, test_limit=16,
                checkpoint_every=2, device="cpu", progress=False)
    base.update(overrides)
    return adapt.Config(**base)


def _prompts(path: Path) -> dict[str, torch.Tensor]:
    return maple.read_prompts_file(path)


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


# ---------------------------------------------------------------------------------------
# Learning


@pytest.mark.slow
def test_adaptation_beats_the_base_model_reproducibly(clip_path, tmp_path):
    out = adapt.run(adapt.Config(out_dir=tmp_path / "a", pretrained=str(clip_path), **FEW_SHOT))
    assert out.n_classes == 4 and out.n_train_images == 128 and out.n_test_images == 200
    assert out.adapted_accuracy >= out.base_accuracy + MIN_GAIN, (out.base_accuracy, out.adapted_accuracy)
    losses = torch.load(out.out_dir / adapt.TRAINER_NAME, weights_only=True)["losses"]
    assert len(losses) == out.steps == 10 * 8
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), losses
    again = adapt.run(adapt.Config(out_dir=tmp_path / "b", pretrained=str(clip_path), **FEW_SHOT))
    assert (again.base_accuracy, again.adapted_accuracy) == (out.base_accuracy, out.adapted_accuracy)
    a, b = _prompts(out.prompts_path), _prompts(again.prompts_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_and_rerun_does_not_train_again(random_run):
    out = random_run
    assert {p.name for p in out.out_dir.iterdir()} >= set(adapt.OUR_FILES)
    config = json.loads(out.config_path.read_text())
    assert config["adapter"]["base_model"] == {"name": "tiny-clip", "pretrained": "none", "checkpoint_sha256": None}
    assert config["adapter"]["class_names"] == config["adapter"]["prompt_names"] == [
        "red object", "green object", "blue object", "yellow object"]
    assert config["data"]["shots"] == 4 and config["data"]["n_images"] == 16 and config["training"]["lr"] == 0.01
    metrics = json.loads(out.metrics_path.read_text())
    assert metrics["adapted_accuracy"] == out.adapted_accuracy and metrics["eval"]["n_images"] == 16
    for head in ("base", "probe", "adapted"):  # the mean of the per-class accuracies beside the micro accuracy
        per_class = [c[head] for c in metrics["per_class"].values() if c["n_images"]]
        assert metrics[f"{head}_mean_recall"] == pytest.approx(sum(per_class) / len(per_class))
        assert getattr(out, f"{head}_mean_recall") == metrics[f"{head}_mean_recall"]
        weighted = sum(c[head] * c["n_images"] for c in metrics["per_class"].values() if c["n_images"]) / 16
        assert metrics[f"{head}_accuracy"] == pytest.approx(weighted)
    assert metrics["steps"] == out.steps == 12 and len(torch.load(out.out_dir / adapt.TRAINER_NAME)["losses"]) == 12
    assert out.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = out.prompts_path.stat().st_mtime_ns
    again = adapt.run(_random(out.out_dir))
    assert again.start_step == again.steps and again.adapted_accuracy == out.adapted_accuracy
    assert out.prompts_path.stat().st_mtime_ns == before


def test_loaded_official_checkpoint_gives_the_same_accuracy(random_run, tmp_path):
    state = _prompts(random_run.prompts_path)
    torch.save({"state_dict": {f"prompt_learner.{k}": v for k, v in state.items()}, "epoch": 3},
               tmp_path / "model.pth.tar-3")
    loaded = adapt.run(_random(tmp_path / "loaded", weights=tmp_path / "model.pth.tar-3"))
    assert loaded.plot_path is None and loaded.steps == 0 and not (loaded.out_dir / adapt.TRAINER_NAME).exists()
    assert (loaded.base_accuracy, loaded.adapted_accuracy) == (random_run.base_accuracy, random_run.adapted_accuracy)
    assert all(torch.equal(v, _prompts(loaded.prompts_path)[k]) for k, v in state.items())
    assert json.loads(loaded.config_path.read_text())["training"]["source"] == "weights"


# ---------------------------------------------------------------------------------------
# Resume


class _Killed(Exception):
    pass


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = adapt.run(_random(tmp_path / "whole"))
    real_lr_at = adapt.lr_at

    def crash_at_step_5(step, cfg, n_train):
        if step == 5:
            raise _Killed
        return real_lr_at(step, cfg, n_train)

    cfg = _random(tmp_path / "crashed")
    monkeypatch.setattr(adapt, "lr_at", crash_at_step_5)
    with pytest.raises(_Killed):
        adapt.run(cfg)
    monkeypatch.setattr(adapt, "lr_at", real_lr_at)
    assert torch.load(tmp_path / "crashed" / adapt.TRAINER_NAME, weights_only=True)["step"] == 4
    assert not (tmp_path / "crashed" / adapt.PROMPTS_NAME).exists()
    resumed = adapt.run(cfg)
    assert resumed.start_step == 4 and whole.start_step == 0 and whole.steps == 12
    a, b = _prompts(whole.prompts_path), _prompts(resumed.prompts_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(whole.out_dir / adapt.TRAINER_NAME, weights_only=True)
    sb = torch.load(resumed.out_dir / adapt.TRAINER_NAME, weights_only=True)
    assert sa["losses"] == sb["losses"]
    assert resumed.adapted_accuracy == whole.adapted_accuracy


def test_sigkill_mid_run_then_rerun_resumes_bit_identically(tmp_path):
    epochs = 10
    whole = adapt.run(_random(tmp_path / "whole", epochs=epochs, threads=1))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "app.cli", "adapt", "--dataset", "synthetic", "--task", "colour",
           "--model", "tiny-clip", "--pretrained", "none", "--out", out, "--shots", "4", "--n-ctx", "2",
           "--depth", "2", "--epochs", epochs, "--batch-size", "4", "--lr", "0.01", "--warmup-epochs", "1",
           "--test-limit", "16", "--checkpoint-every", "2", "--device", "cpu", "--threads", "1", "--no-progress"]
    cmd = [str(c) for c in cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    state_path = out / adapt.TRAINER_NAME
    sigkill_when(cmd, state_path.exists, env=env, cwd=ROOT)
    killed_at = torch.load(state_path, weights_only=True)["step"]
    assert 0 < killed_at < whole.steps and not (out / adapt.PROMPTS_NAME).exists()
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {out} from step {killed_at} of {whole.steps}" in rerun.stderr
    assert f"(resumed at step {killed_at})" in rerun.stdout
    a, b = _prompts(whole.prompts_path), _prompts(out / adapt.PROMPTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------
# Refusals


def test_another_config_in_the_same_folder_is_refused(tmp_path):
    adapt.run(_random(tmp_path / "run", epochs=2))
    with pytest.raises(UserError, match=r"holds another adaptation run \(training.lr is 0.01 there, 0.02 now\)"):
        adapt.run(_random(tmp_path / "run", epochs=2, lr=0.02))
    replaced = adapt.run(_random(tmp_path / "run", epochs=2, lr=0.02, overwrite=True))
    assert replaced.start_step == 0


def test_cli_refusals_are_one_line(tmp_path):
    args = ["adapt", "--dataset", "synthetic", "--model", "tiny-clip", "--pretrained", "none", "--shots", "2",
            "--device", "cpu", "--no-progress"]
    assert_one_line_error(*_cli(*args, "--out", tmp_path / "a"),
                          "prompt depth 9 exceeds the model's towers (2 text and 4 vision blocks)")
    assert_one_line_error(*_cli(*args, "--out", tmp_path / "b", "--depth", "2", "--weights", tmp_path / "no.pth"),
                          "MaPLe weights", "do not exist")
    torch.save({"state_dict": {"prompt_learner.ctx": torch.zeros(2, 512),
                               "prompt_learner.proj.weight": torch.zeros(768, 512),
                               "prompt_learner.proj.bias": torch.zeros(768)}}, tmp_path / "vitb.pth")
    assert_one_line_error(*_cli(*args, "--out", tmp_path / "c", "--depth", "1", "--weights", tmp_path / "vitb.pth"),
                          "widths 512 (text) / 768 (vision), the model has 128 / 128")
    assert_one_line_error(*_cli(*args, "--out", tmp_path / "d", "--depth", "2", "--shots", "400"),
                          "fewer than --shots 400")


# ---------------------------------------------------------------------------------------
# Adapted stores, encode and mask with the base model's SAE


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """A trained random-model adapter, the base and adapted stores of 32 images, a base-model SAE and its stats."""
    root = tmp_path_factory.mktemp("stores")
    run = adapt.run(_random(root / "adapter", synthetic_task="shape_colour", shots=2, epochs=1, warmup_epochs=0))
    common = dict(dataset="synthetic", limit=32, model="tiny-clip", pretrained="none", layers=(1,), batch_size=16,
                  device="cpu", images_per_chunk=8, images_per_shard=16, progress=False)
    extract.run(extract.Config(out_dir=root / "base", **common))
    extract.run(extract.Config(out_dir=root / "adapted", adapter=run.out_dir, **common))
    store = ActivationStore(root / "base", mode="r")
    sae = build(ReLUConfig(d_in=store.d_model, d_sae=64, layer=1, model="tiny-clip/none", norm_scale=1.0,
                          cache_config_sha256=store.config_sha256), seed=0)
    save_sae(sae, root / "sae")
    encode.run(encode.Config(cache_dir=root / "base", sae_dir=root / "sae", out_dir=root / "codes", device="cpu",
                             progress=False))
    stats.run(stats.Config(codes_dir=root / "codes", cache_dir=root / "base", out_dir=root / "stats", plots=False,
                           scheduler="synchronous"))
    return {"root": root, "adapter": run.out_dir, "base": root / "base", "adapted": root / "adapted",
            "sae": root / "sae", "stats": root / "stats"}


def test_adapted_store_has_the_base_layout_and_the_adapted_activations(stores):
    base, adapted = ActivationStore(stores["base"], mode="r"), ActivationStore(stores["adapted"], mode="r")
    assert adapted.n_tokens == base.n_tokens == 65 and adapted.token_layout == base.token_layout
    config = adapted.attrs["config"]
    assert config["adapter"] == maple.adapter_identity(stores["adapter"]) and "adapter" not in base.attrs["config"]
    assert adapted.attrs["model"]["name"] == "tiny-clip" and adapted.attrs["model"]["adapter"]["n_ctx"] == 2
    assert adapted.config_sha256 != base.config_sha256
    model = load_model("tiny-clip", "none")
    data = open_dataset("synthetic", root=None, split=None, transform=model.preprocess, limit=32, image_size=32)
    images = torch.stack([data.dataset[i][0] for i in range(4)])
    with torch.inference_mode():
        expected = maple.load_adapter(stores["adapter"], model).tap(images, (1,))[1]
    stored = torch.from_numpy(np.asarray(adapted.acts(1)[:4])).float()
    torch.testing.assert_close(stored, expected.half().float(), rtol=0, atol=0)
    assert not np.array_equal(np.asarray(base.acts(1)[:4]), np.asarray(adapted.acts(1)[:4]))


def test_the_base_models_sae_encodes_the_adapted_store_and_another_models_sae_is_refused(stores, tmp_path):
    out = encode.run(encode.Config(cache_dir=stores["adapted"], sae_dir=stores["sae"], out_dir=tmp_path / "codes",
                                   device="cpu", progress=False))
    assert out.n_images == 32 and out.n_tokens == 32 * 65
    other = build(ReLUConfig(d_in=128, d_sae=64, layer=1, model="tiny-clip/openai", norm_scale=1.0), seed=0)
    save_sae(other, tmp_path / "other")
    assert_one_line_error(*_cli("encode", "--cache", stores["adapted"], "--sae", tmp_path / "other", "--out",
                                tmp_path / "codes2", "--device", "cpu", "--no-progress"),
                          "the SAE was trained on tiny-clip/openai but", "holds activations of tiny-clip/none")


def test_extract_refuses_an_adapter_of_another_base_model(stores, tmp_path):
    code, output = _cli("extract", "--dataset", "synthetic", "--limit", "8", "--model", "tiny-vit", "--pretrained",
                        "none", "--layers", "1", "--out", tmp_path / "s", "--device", "cpu", "--adapter",
                        stores["adapter"], "--no-progress")
    assert_one_line_error(code, output, "was trained on tiny-clip/none, not tiny-vit/none")


def test_mask_measures_the_adapted_model_with_the_base_sae(stores, tmp_path):
    common = ["mask", "--sae", stores["sae"], "--stats", stores["stats"], "--k", "1,all", "--seeds", "0",
              "--head", "zeroshot", "--device", "cpu", "--no-plots", "--no-progress"]
    code, output = _cli(*common, "--out", tmp_path / "m", "--adapter", stores["adapter"], "--dataset", "synthetic",
                        "--limit", "32")
    assert code == 0, output
    result = json.loads((tmp_path / "m" / masking.RESULTS_FILE).read_text())
    assert result["config"]["adapter"] == maple.adapter_identity(stores["adapter"])
    assert result["checks"]["max_abs_logit_diff_sae_error_term_vs_clip"] < 1e-3
    with torch.inference_mode():  # the plain accuracy is the adapted model's own
        model = load_model("tiny-clip", "none")
        adapted = maple.load_adapter(stores["adapter"], model)
        images = open_dataset("synthetic", root=None, split=None, transform=model.preprocess, limit=32,
                              image_size=32)
        x = torch.stack([images.dataset[i][0] for i in range(32)])
        labels = torch.tensor([images.dataset[i][1] for i in range(32)])
        predicted = (adapted.encode_image(x, normalize=True) @ adapted.encode_text(images.class_names,
                                                                                   normalize=True).T).argmax(1)
    assert result["accuracy"]["clip"] == pytest.approx(float((predicted == labels).float().mean()))
    code, output = _cli(*common, "--out", tmp_path / "m2", "--adapter", stores["adapter"], "--cache",
                        stores["adapted"])  # the adapted store of the SAE's model names the images
    assert code == 0, output
    from_store = json.loads((tmp_path / "m2" / masking.RESULTS_FILE).read_text())
    assert from_store["source"] == "images" and from_store["accuracy"] == result["accuracy"]
    assert_one_line_error(*_cli(*common, "--out", tmp_path / "m3", "--cache", stores["adapted"]),
                          "holds an adapted model's activations; pass its --adapter DIR")
    assert_one_line_error(*_cli(*common, "--out", tmp_path / "m4", "--adapter", stores["adapter"], "--cache",
                                stores["base"]), "holds the base model's activations, not those of the adapter")


def test_batches_visit_every_few_shot_image_once_per_epoch_and_resume_mid_epoch(tmp_path):
    cfg = _random(tmp_path, batch_size=3, epochs=2, seed=5)
    batches = adapt.batches_from(0, cfg, 10)
    assert len(batches) == 2 * adapt.steps_per_epoch(cfg, 10) == 8 and [len(b) for b in batches[:4]] == [3, 3, 3, 1]
    assert sorted(sum(batches[:4], [])) == sorted(sum(batches[4:], [])) == list(range(10))
    assert batches[:4] != batches[4:] and adapt.batches_from(0, cfg, 10) == batches
    assert adapt.batches_from(5, cfg, 10) == batches[5:]
    lrs = [adapt.lr_at(s, cfg, 10) for s in range(8)]
    assert lrs[:4] == [cfg.warmup_lr] * 4 and lrs[4] == cfg.lr and lrs[4] > lrs[5] > lrs[6] > lrs[7] > 0
