"""`pipeline plan`: sizes from the formats, the training-step memory formula against a direct count of
tensor bytes, JSON output, one-line refusals of a bad params file, and extract's free-space refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from app import plan
from app.cli import main
from cache import space
from pipeline.sae import TrainConfig, Trainer, build, config_class
from tests.helpers import TINY_ARGS, assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_DATASETS = ["imagenet", "eurosat", "caltech101", "oxfordpets", "stanfordcars", "flowers102", "food101",
                  "fgvcaircraft", "sun397", "dtd", "ucf101"]


SAE_DATA = "sae_data: imagenet"


def paper_params(**data) -> dict:
    """The paper's shape: ViT-B-16, block 10, one SAE on ImageNet train, expansion 64, 516M tokens, 128 images per
    step."""
    return {"sae_data": {"dataset": "imagenet", "split": "train"},
            "data": {"datasets": PAPER_DATASETS, **data}, "model": {"name": "ViT-B-16", "pretrained": "openai"},
            "extract": {"layers": [10]},
            "sae": {"arch": "relu", "expansion": 64, "total_tokens": 516_000_000, "batch_images": 128}}


def _rows(params, **kw) -> dict:
    return {(r.stage, r.dataset): r for r in plan.sizes(params, **kw)}


def test_the_imagenet_train_store_at_block_10_is_387_gb():
    rows = _rows(paper_params())
    store = rows["extract-sae", SAE_DATA]
    assert store.images == 1_281_167 and store.tokens == 1_281_167 * 197
    assert store.disk_bytes == 1_281_167 * 197 * 768 * 2
    assert store.disk_bytes == pytest.approx(387.6e9, rel=0.01)
    assert "assumed: imagenet train has 1,281,167" in store.disk_note
    val = rows["extract", "imagenet"]  # the analysed ImageNet: its default (val) split
    assert val.images == 50_000 and rows["extract-adapted", "imagenet"].disk_bytes == val.disk_bytes


def test_the_paper_preset_plans_one_sae_and_eleven_datasets():
    preset = yaml.safe_load((Path(__file__).resolve().parents[2] / "presets" / "paper.yaml").read_text())
    rows = plan.sizes(preset, l0=150)
    assert [r.stage for r in rows].count("train") == 1 and [r.stage for r in rows].count("encode") == 11
    assert next(r for r in rows if r.stage == "extract-sae").disk_bytes == pytest.approx(387.6e9, rel=0.01)
    assert next(r for r in rows if r.stage == "train").tokens == 2_621_440 * 197


def test_paper_study_token_counts_and_sae_sizes_are_exact():
    rows = _rows(paper_params(), l0=50)
    batch = 128 * 197
    n_steps = math.ceil(516_000_000 / batch)
    train = rows["train", SAE_DATA]
    assert [key[0] for key in rows].count("train") == 1  # one SAE reads every dataset
    assert train.tokens == n_steps * batch == 20_464 * 25_216 == 516_020_224
    assert train.disk_bytes == 5 * (2 * 768 * 49_152 + 49_152 + 768) * 4
    micro = TrainConfig().part_tokens(49_152)  # the trainer's automatic micro-batch at this width
    assert micro < batch and "per micro-batch" in train.disk_note
    assert train.peak_bytes == plan.step_memory(d_in=768, d_sae=49_152, arch="relu", batch_tokens=micro) < 4e9
    for dataset, n in {"imagenet": 50_000, "eurosat": 27_000, "caltech101": 8_677, "dtd": 1_880,
                       "food101": 25_250, "sun397": 108_754}.items():
        assert rows["extract", dataset].images == n
        assert rows["encode", dataset].tokens == n * 197
        assert rows["encode", dataset].disk_bytes == n * 197 * 50 * 8


def test_codes_size_says_whether_it_is_expected_or_an_upper_bound():
    relu = _rows(paper_params(limit=100))["encode", "dtd"]
    assert relu.disk_bytes == 100 * 197 * 49_152 * 8 and relu.disk_note.startswith("upper bound")
    topk = _rows({**paper_params(limit=100), "sae": {"arch": "topk", "k": 32, "expansion": 64}})["encode", "dtd"]
    assert topk.disk_bytes == 100 * 197 * 32 * 8 and topk.disk_note.startswith("expected: L0 = k = 32")


def test_the_dvc_cache_follows_the_rule_that_writes_dvc_yaml(monkeypatch):
    monkeypatch.setattr(plan, "_cached_outs", lambda: {"work/${item.dataset}/acts": False})
    made = plan.Plan("p", tuple(plan.sizes(paper_params(limit=10), l0=10)), None)
    uncached = sum(r.disk_bytes for r in made.rows if r.stage == "extract")
    assert made.dvc_cache_bytes == made.disk_bytes - uncached
    assert made.dvc_overhead == pytest.approx((2 * made.disk_bytes - uncached) / made.disk_bytes)


class _LiveBytes(TorchDispatchMode):
    """The most bytes held at once by tensors created inside the mode (storages in ``known`` excluded)."""

    def __init__(self, known: set[int]):
        super().__init__()
        self.known, self.live, self.peak = known, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.live.setdefault(t.untyped_storage().data_ptr(),
                                     (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _counted_step_bytes(arch: str, *, dead: bool, d_in=64, d_sae=4096, n_tokens=512) -> int:
    """Bytes of the SAE, its Adam state and counters, plus the peak of one step's new tensors."""
    extra = {"l1": 8e-5} if arch == "relu" else {"k": 32}
    sae = build(config_class(arch).from_expansion(d_in=d_in, expansion=d_sae / d_in, **extra), seed=0)
    trainer = Trainer(sae, TrainConfig(batch_tokens=n_tokens, warmup_steps=0))
    dead_S = torch.zeros(d_sae, dtype=torch.bool)
    dead_S[: d_sae // 2] = dead
    trainer.firing.dead_mask = lambda: dead_S  # revival active (dead) or not, whatever the counters say
    x_BD = torch.randn(n_tokens, d_in)
    trainer.step(x_BD)
    kept = [*sae.parameters(), *sae.buffers(), *(t for s in trainer.optimizer.state.values() for t in s.values()
                                                 if t.dim()),
            trainer.firing.tokens_since_fired_S, trainer.firing.window_counts_S, trainer.firing.last_freq_S]
    counter = _LiveBytes({t.untyped_storage().data_ptr() for t in kept})
    with counter:
        trainer.step(x_BD)
    return sum(t.numel() * t.element_size() for t in kept) + counter.peak  # the gradients are made in the step


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_step_memory_formula_matches_a_direct_count_of_tensor_bytes(arch):
    formula = plan.step_memory(d_in=64, d_sae=4096, arch=arch, batch_tokens=512)
    assert _counted_step_bytes(arch, dead=True) == pytest.approx(formula, rel=0.05)
    assert _counted_step_bytes(arch, dead=False) <= formula  # an upper bound before revival starts


def test_step_memory_scales_with_the_micro_batch():
    whole = plan.step_memory(d_in=768, d_sae=49_152, arch="relu", batch_tokens=128 * 197)
    micro = plan.step_memory(d_in=768, d_sae=49_152, arch="relu", batch_tokens=4096)
    assert whole - micro == (5 * 49_152 + 4 * 768) * (128 * 197 - 4096) * 4


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_plan_json_parses_and_its_totals_add_up(tmp_path):
    params = tmp_path / "paper.yaml"
    params.write_text(yaml.safe_dump(paper_params(limit=1000)))
    code, output = _cli("plan", "--params", params, "--no-calibrate", "--l0", "20", "--json")
    assert code == 0, output
    made = json.loads(output)
    assert made["params"] == str(params) and len(made["rows"]) == 2 + 4 * len(PAPER_DATASETS)
    assert made["totals"]["disk_bytes"] == sum(r["disk_bytes"] for r in made["rows"])
    assert made["totals"]["seconds"] is None and made["calibration"] is None
    code, text = _cli("plan", "--params", params, "--no-calibrate", "--l0", "20")
    assert code == 0 and "ViT-B-16" not in text and "train  " in text and "(work + cache) / work" in text


def test_calibrated_plan_of_a_tiny_study_prices_every_row(tmp_path):
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump({"data": {"limit": 40}, "model": {"name": "tiny-vit", "pretrained": "none"},
                                      "extract": {"layers": [1]}, "sae": {"expansion": 2, "total_tokens": 20_000}}))
    made = plan.make(params)
    assert all(r.seconds > 0 for r in made.rows) and made.calibration.md5_bytes_per_s > 0
    assert made.hash_seconds == pytest.approx(made.disk_bytes / made.calibration.md5_bytes_per_s)
    assert made.seconds == pytest.approx(sum(r.seconds for r in made.rows) + made.hash_seconds)
    assert any("tiny-vit forward to block 1" in h for h in made.calibration.how)


def test_a_missing_or_malformed_params_file_is_one_line(tmp_path):
    assert_one_line_error(*_cli("plan", "--params", tmp_path / "nope.yaml"), "nope.yaml does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  datasets: [imagenet\n  limit: 3\n")
    assert_one_line_error(*_cli("plan", "--params", bad, "--no-calibrate"), "bad.yaml is not valid YAML")
    odd = tmp_path / "odd.yaml"
    odd.write_text("data:\n  datasets: [imagenet]\n  limits: 3\n")
    assert_one_line_error(*_cli("plan", "--params", odd, "--no-calibrate"), "unknown key 'limits'")
    split = tmp_path / "split.yaml"
    split.write_text("data:\n  datasets: [caltech101]\n  split: train\nmodel:\n  name: ViT-B-16\n")
    assert_one_line_error(*_cli("plan", "--params", split, "--no-calibrate"), "caltech101' has no split 'train'")


def test_extract_refuses_a_store_that_cannot_fit_before_its_first_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(space, "free_bytes", lambda folder: 1000)
    out = tmp_path / "store"
    code, output = _cli("extract", *TINY_ARGS, "--out", out)
    assert_one_line_error(code, output, f"{out} needs about", "1000.0 B free", "nothing was written")
    assert not out.exists()
