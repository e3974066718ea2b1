"""Pretraining a tiny CLIP on the synthetic world: learning, resume, refusals, checkpoint loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner

from app.cli import main
from cache.errors import UserError
from pipeline.models import load_model
from pipeline.world import SyntheticWorld, WorldConfig
from stages import pretrain
from tests.helpers import sigkill_when

ROOT = Path(__file__).resolve().parents[2]

# A short run that learns something: seed 0 reached 0.22 zero-shot (loss 4.35 -> 2.37).
SHORT_RUN = dict(steps=60, batch_size=64, warmup_steps=5, eval_images=200)
SHORT_RUN_MIN_ACCURACY = 0.12  # zero-shot, 20 classes (chance 0.05)


def make_pretrain_config(out_dir: Path, **overrides) -> pretrain.Config:
    """A fast config: CPU, 2 threads, no progress bar; override anything."""
    base = dict(out_dir=out_dir, device="cpu", threads=2, progress=False, checkpoint_every=1000)
    base.update(overrides)
    return pretrain.Config(**base)


def _tiny(out_dir: Path, **overrides) -> pretrain.Config:
    """A few steps of a small batch: for file-format, resume and refusal tests."""
    base = dict(steps=6, batch_size=16, warmup_steps=2, eval_images=20, workers=0)
    base.update(overrides)
    return make_pretrain_config(out_dir, **base)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> pretrain.Outputs:
    return pretrain.run(make_pretrain_config(tmp_path_factory.mktemp("short") / "run", **SHORT_RUN))


def test_short_run_lowers_the_loss_and_beats_chance(short_run):
    state = torch.load(short_run.trainer_state_path, weights_only=True)
    losses = state["losses"]
    assert state["step"] == len(losses) == SHORT_RUN["steps"]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses
    assert short_run.final_loss == pytest.approx(np.mean(losses[-10:]))
    assert short_run.n_classes == 20
    assert short_run.accuracy >= SHORT_RUN_MIN_ACCURACY


def test_run_folder_contents(short_run):
    out = short_run.out_dir
    assert {p.name for p in out.iterdir()} >= {"config.json", "trainer_state.pt", "model.pt", "metrics.json",
                                              "loss.png"}
    assert not list(out.glob("*.tmp"))
    config = json.loads(short_run.config_path.read_text())
    assert config["format_version"] == pretrain.FORMAT_VERSION
    assert config["world"] == WorldConfig(seed=0, image_size=32, task="shape_colour").to_dict()
    assert config["training"]["batch_size"] == 64 and config["training"]["model"] == "tiny-clip"
    metrics = json.loads(short_run.metrics_path.read_text())
    assert metrics["accuracy"] == short_run.accuracy and metrics["steps"] == 60
    assert metrics["mean_recall"] == short_run.mean_recall and 0 < short_run.mean_recall <= 1
    assert metrics["eval"]["split"] == "test" and metrics["eval"]["n_images"] == 200
    assert metrics["seconds"] >= metrics["train_seconds"] > 0
    assert short_run.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_loads_by_name_and_gives_the_trained_features(short_run):
    state = torch.load(short_run.trainer_state_path, weights_only=True)
    in_memory = open_clip.create_model("tiny-clip")
    in_memory.load_state_dict(state["model"])
    in_memory.eval()
    loaded = load_model("tiny-clip", str(short_run.model_path))
    assert loaded.checkpoint_sha256 is not None
    world = SyntheticWorld(WorldConfig(seed=5), n_images=8, split="test", transform=loaded.preprocess)
    images = torch.stack([world[i][0] for i in range(8)])
    with torch.inference_mode():
        assert torch.equal(loaded.model.encode_image(images), in_memory.encode_image(images))
        tokens = open_clip.get_tokenizer("tiny-clip")(["a photo of a red circle."])
        assert torch.equal(loaded.model.encode_text(tokens), in_memory.encode_text(tokens))


def test_rerun_of_a_finished_run_does_not_train_again(short_run):
    cfg = make_pretrain_config(short_run.out_dir, **SHORT_RUN)
    before = short_run.model_path.stat().st_mtime_ns
    again = pretrain.run(cfg)
    assert again.start_step == again.steps == 60
    assert again.accuracy == short_run.accuracy
    assert short_run.model_path.stat().st_mtime_ns == before


def test_training_batches_match_the_eval_transform_and_are_deterministic():
    model = load_model("tiny-clip", "none")
    world = SyntheticWorld(WorldConfig(seed=1), n_images=64, split="train")
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    pairs = pretrain.PairBatches(world, 16, open_clip.get_tokenizer("tiny-clip"), mean, std)
    images_BRHW, tokens_BQ, true_BB, _ = pairs[2]
    reference = torch.stack([model.preprocess(world[i][0]) for i in range(32, 48)])
    torch.testing.assert_close(images_BRHW, reference, rtol=0, atol=1e-6)
    assert tokens_BQ.shape == (16, 32) and tokens_BQ.dtype == torch.int64
    assert torch.equal(pairs[2][1], tokens_BQ) and torch.equal(pairs[2][2], true_BB) and len(pairs) == 4
    assert torch.equal(tokens_BQ, open_clip.get_tokenizer("tiny-clip")([world.partial_caption(i) for i in range(32, 48)]))


def test_a_caption_is_true_of_the_images_that_show_everything_it_names():
    world = SyntheticWorld(WorldConfig(seed=2), n_images=256, split="train")
    pairs = pretrain.PairBatches(world, 256, open_clip.get_tokenizer("tiny-clip"), (0.5,) * 3, (0.5,) * 3)
    true_BB = pairs[0][2]
    scenes = [world.scene(i) for i in range(256)]
    captions = [world.partial_caption(i) for i in range(256)]
    assert true_BB.dtype == torch.bool and true_BB.diagonal().all()
    short = [j for j, c in enumerate(captions) if c == f"a photo of a {scenes[j]['colour']} {scenes[j]['shape']}"]
    sized = [j for j, c in enumerate(captions) if c.startswith(f"a photo of a {scenes[j]['size']} ")]
    assert len(short) > 10 and len(sized) > 10
    checked = {"short": 0, "object differs": 0, "size differs": 0}
    for i, scene in enumerate(scenes):
        for j in range(256):
            same_object = (scenes[j]["shape"], scenes[j]["colour"]) == (scene["shape"], scene["colour"])
            if not same_object:  # every caption names the object's colour and shape
                assert not true_BB[i, j]
                checked["object differs"] += 1
            elif j in short:  # 'a photo of a red circle' is true of every red circle
                assert true_BB[i, j]
                checked["short"] += 1
            elif j in sized and scenes[j]["size"] != scene["size"]:
                assert not true_BB[i, j]
                checked["size differs"] += 1
    assert min(checked.values()) > 20, checked


class _Embeddings(torch.nn.Module):
    """Stands in for a CLIP whose embeddings are given."""

    def __init__(self, image_BE, text_BE, logit_scale):
        super().__init__()
        self.image_BE, self.text_BE, self.logit_scale = image_BE, text_BE, torch.tensor(logit_scale)

    def encode_image(self, _, normalize):
        return torch.nn.functional.normalize(self.image_BE, dim=-1)

    def encode_text(self, _, normalize):
        return torch.nn.functional.normalize(self.text_BE, dim=-1)


def test_contrastive_loss_is_clips_with_own_captions_and_spreads_the_target_over_positives():
    gen = torch.Generator().manual_seed(0)
    image_BE, text_BE = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    model = _Embeddings(image_BE, text_BE, 2.5)
    own = pretrain.contrastive_loss(model, None, None, torch.eye(6, dtype=torch.bool))
    clip = open_clip.ClipLoss()(model.encode_image(None, True), model.encode_text(None, True), model.logit_scale.exp())
    torch.testing.assert_close(own, clip, rtol=1e-6, atol=1e-6)

    positive_BB = torch.eye(6, dtype=torch.bool)
    positive_BB[0, 1] = positive_BB[1, 0] = positive_BB[2, 1] = True  # captions 0, 1 true of images 0, 1; caption 1 of 2
    logits_BB = model.logit_scale.exp() * model.encode_image(None, True) @ model.encode_text(None, True).T
    image_log_BB, text_log_BB = logits_BB.log_softmax(1), logits_BB.T.log_softmax(1)
    image_terms = [-(image_log_BB[0, 0] + image_log_BB[0, 1]) / 2, -(image_log_BB[1, 0] + image_log_BB[1, 1]) / 2,
                   -(image_log_BB[2, 1] + image_log_BB[2, 2]) / 2] + [-image_log_BB[k, k] for k in (3, 4, 5)]
    text_terms = [-(text_log_BB[0, 0] + text_log_BB[0, 1]) / 2, -(text_log_BB[1, 0] + text_log_BB[1, 1]
                                                                  + text_log_BB[1, 2]) / 3,
                  -text_log_BB[2, 2]] + [-text_log_BB[k, k] for k in (3, 4, 5)]
    expected = (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2
    torch.testing.assert_close(pretrain.contrastive_loss(model, None, None, positive_BB), expected)


def test_bfloat16_loss_runs_the_encoders_in_bfloat16_and_stays_close_to_float32():
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip").train()
    world = SyntheticWorld(WorldConfig(seed=3), n_images=16, split="train")
    pairs = pretrain.PairBatches(world, 16, open_clip.get_tokenizer("tiny-clip"), (0.5,) * 3, (0.5,) * 3)
    images_BRHW, tokens_BQ, true_BB, _ = pairs[0]
    seen = []
    hook = model.visual.transformer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    full = pretrain.contrastive_loss(model, images_BRHW, tokens_BQ, true_BB, "float32")
    half = pretrain.contrastive_loss(model, images_BRHW, tokens_BQ, true_BB, "bfloat16")
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16] and half.dtype == torch.float32
    assert half != full and half.item() == pytest.approx(full.item(), rel=0.02)
    half.backward()  # the math attention kernel's backward: every weight gets a float32 gradient
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_object_patches_are_those_at_least_half_covered_by_the_object():
    world = SyntheticWorld(WorldConfig(seed=4), n_images=8, split="train")
    pairs = pretrain.PairBatches(world, 8, open_clip.get_tokenizer("tiny-clip"), (0.5,) * 3, (0.5,) * 3, grid=(8, 8))
    object_BP = pairs[0][3]
    assert object_BP.shape == (8, 64) and object_BP.any(1).all()
    for i in range(8):
        mask_HW = world.mask(i)  # 32 x 32 pixels, 4 x 4 per patch
        share_P = torch.from_numpy(mask_HW.reshape(8, 4, 8, 4).mean((1, 3)).reshape(64))
        assert torch.equal(object_BP[i], share_P >= 0.5)
    assert pretrain.PairBatches(world, 8, open_clip.get_tokenizer("tiny-clip"), (0.5,) * 3,
                                (0.5,) * 3)[0][3].shape == (8, 0)


def test_the_patch_term_scores_every_object_patch_against_the_captions_of_its_image():
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip").eval()
    world = SyntheticWorld(WorldConfig(seed=5), n_images=6, split="train")
    pairs = pretrain.PairBatches(world, 6, open_clip.get_tokenizer("tiny-clip"), (0.5,) * 3, (0.5,) * 3, grid=(8, 8))
    images_BRHW, tokens_BQ, true_BB, object_BP = pairs[0]
    true_BB[0, 1] = True  # a second positive for image 0
    with torch.no_grad():
        clip = pretrain.contrastive_loss(model, images_BRHW, tokens_BQ, true_BB)
        both = pretrain.contrastive_loss(model, images_BRHW, tokens_BQ, true_BB, "float32", object_BP, 0.3)
        model.visual.output_tokens = True
        pooled_BE, tokens_BPD = model.visual(images_BRHW)
        model.visual.output_tokens = False
        torch.testing.assert_close(pooled_BE, model.encode_image(images_BRHW))  # what the pooled term reads
        text_BE = model.encode_text(tokens_BQ, normalize=True)
        terms = []
        for i in range(6):
            for p in object_BP[i].nonzero()[:, 0]:
                patch_E = torch.nn.functional.normalize(tokens_BPD[i, p] @ model.visual.proj, dim=-1)
                log_B = (model.logit_scale.exp() * text_BE @ patch_E).log_softmax(0)
                terms.append(-log_B[true_BB[i]].mean())
    assert len(terms) == int(object_BP.sum()) > 6
    torch.testing.assert_close(both, clip + 0.3 * torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight", [-0.5, float("inf"), float("nan")])
def test_a_patch_term_weight_that_is_not_finite_and_non_negative_is_refused(tmp_path, weight):
    with pytest.raises(UserError, match="--patch-loss must be a finite number, 0 or more"):
        _tiny(tmp_path / "run", patch_loss=weight)
    assert not (tmp_path / "run").exists()


def test_the_patch_term_is_refused_for_a_tower_without_patch_tokens(tmp_path):
    with pytest.raises(UserError, match="--patch-loss needs an open_clip ViT image tower"):
        pretrain.run(_tiny(tmp_path / "run", model="tiny-convnext-clip", patch_loss=1.0))
    assert not (tmp_path / "run").exists()


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = _tiny(Path("unused"), steps=100, warmup_steps=10, lr=1e-3)
    lrs = [pretrain.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert 0 < lrs[-1] < 1e-5


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("precision", pretrain.PRECISIONS)
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, precision):
    whole = pretrain.run(_tiny(tmp_path / "whole", checkpoint_every=2, workers=1, precision=precision))
    real_lr_at = pretrain.lr_at

    def crash_at_step_5(step, cfg):
        if step == 5:
            raise _Killed
        return real_lr_at(step, cfg)

    cfg = _tiny(tmp_path / "crashed", checkpoint_every=2, precision=precision)
    monkeypatch.setattr(pretrain, "lr_at", crash_at_step_5)
    with pytest.raises(_Killed):
        pretrain.run(cfg)
    monkeypatch.setattr(pretrain, "lr_at", real_lr_at)
    assert torch.load(tmp_path / "crashed" / "trainer_state.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "crashed" / "metrics.json").exists()
    resumed = pretrain.run(cfg)
    assert resumed.start_step == 4 and whole.start_step == 0
    a, b = _weights(whole.model_path), _weights(resumed.model_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # byte for byte: stores record the checkpoint's sha256, so it must not vary from run to run
    assert whole.model_path.read_bytes() == resumed.model_path.read_bytes()
    sa, sb = _weights(whole.trainer_state_path), _weights(resumed.trainer_state_path)
    assert sa["losses"] == sb["losses"]
    assert all(torch.equal(x, y) for x, y in zip(sa["optimizer"]["state"][0].values(),
                                                  sb["optimizer"]["state"][0].values()))
    assert resumed.accuracy == whole.accuracy


def test_another_config_in_the_same_folder_is_refused(tmp_path):
    first = pretrain.run(_tiny(tmp_path / "run", steps=3))
    with pytest.raises(UserError, match=r"holds another pretraining run \(training.lr is 0.002 there, 0.001 now\)"):
        pretrain.run(_tiny(tmp_path / "run", steps=3, lr=1e-3))
    with pytest.raises(UserError, match="world.seed"):
        pretrain.run(_tiny(tmp_path / "run", steps=3, seed=1))
    assert json.loads(first.config_path.read_text())["training"]["lr"] == 0.002
    # evaluation-only options are not part of the identity: a new evaluation, no retraining
    other_eval = pretrain.run(_tiny(tmp_path / "run", steps=3, eval_images=10, templates="openai"))
    assert other_eval.start_step == 3
    assert json.loads(first.metrics_path.read_text())["eval"]["templates"] == "openai"
    replaced = pretrain.run(_tiny(tmp_path / "run", steps=3, lr=1e-3, overwrite=True))
    assert replaced.start_step == 0
    assert json.loads(replaced.config_path.read_text())["training"]["lr"] == 0.001


@pytest.mark.parametrize("overrides, needle", [
    ({"batch_size": 1}, "--batch-size must be at least 2"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"warmup_steps": 6}, "--warmup-steps must be in [0, steps)"),
    ({"world": "imagenet"}, "unknown --world 'imagenet'"),
    ({"model": "tiny-clipp"}, "unknown model 'tiny-clipp'"),
    ({"task": "nope"}, "unknown --task 'nope'"),
    ({"templates": "mine"}, "unknown --templates 'mine'"),
    ({"positives": "all"}, "unknown --positives 'all'"),
    ({"precision": "float16"}, "unknown --precision 'float16'"),
])
def test_bad_config_values_are_user_errors(tmp_path, overrides, needle):
    with pytest.raises(UserError) as err:
        _tiny(tmp_path, **overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cli_refusal_is_one_line(tmp_path):
    args = ["pretrain", "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "16", "--warmup-steps", "1",
            "--eval-images", "10", "--device", "cpu", "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "zero-shot accuracy" in result.output and "model.pt" in result.output
    result = CliRunner().invoke(main, args[:-1] + ["--lr", "0.01", "--no-progress"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--overwrite" in errors[0]


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "app.cli", "pretrain", "--world", "synthetic", "--out", str(out),
           "--steps", "40", "--batch-size", "32", "--warmup-steps", "2", "--checkpoint-every", "4",
           "--eval-images", "40", "--device", "cpu", "--threads", "2", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    state_path = out / "trainer_state.pt"
    sigkill_when(cmd, state_path.exists, env=env, cwd=ROOT, timeout=300)
    killed_at = torch.load(state_path, weights_only=True)["step"]
    assert 0 < killed_at < 40 and not (out / "metrics.json").exists()
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    resumed_at = [line for line in rerun.stderr.splitlines() if "resuming" in line]
    assert len(resumed_at) == 1 and f"from step {killed_at} of 40" in resumed_at[0], rerun.stderr
    assert torch.load(state_path, weights_only=True)["step"] == 40
    assert json.loads((out / "metrics.json").read_text())["steps"] == 40
    assert "trained 40 steps" in rerun.stdout


def test_a_tiny_convnext_clip_pretrains_and_its_checkpoint_loads(tmp_path):
    """The same stage trains the ConvNeXt CLIP (another model name); the saved weights are the trained ones."""
    out = pretrain.run(make_pretrain_config(tmp_path / "run", model="tiny-convnext-clip", **{**SHORT_RUN, "steps": 150}))
    state = torch.load(out.trainer_state_path, weights_only=True)
    assert np.mean(state["losses"][-10:]) < 0.8 * np.mean(state["losses"][:5]), state["losses"]
    assert out.accuracy >= SHORT_RUN_MIN_ACCURACY
    loaded = load_model("tiny-convnext-clip", str(out.model_path))
    assert loaded.tower.kind == "convnext"
    in_memory = open_clip.create_model("tiny-convnext-clip")
    in_memory.load_state_dict(state["model"])
    in_memory.eval()
    world = SyntheticWorld(WorldConfig(seed=5), n_images=4, split="test", transform=loaded.preprocess)
    images = torch.stack([world[i][0] for i in range(4)])
    with torch.inference_mode():
        assert torch.equal(loaded.model.encode_image(images), in_memory.encode_image(images))
