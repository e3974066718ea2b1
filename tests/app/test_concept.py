"""Concept addition: a held-out value stays out of pretraining, reaches only the task that asks for
it, and the experiment's comparison is computed from the two remap tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from click.testing import CliRunner

from app import concept
from app.cli import main
from cache.errors import UserError
from cache.store import ActivationStore
from pipeline.world import SyntheticWorld, WorldConfig
from stages import extract, pretrain
from tests.helpers import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
CHECKER = (("texture", "checker"),)
CHECKER_CLASS = "background with a checker pattern"


def _fake_pretrained(folder: Path, held_out=CHECKER) -> Path:
    """A random tiny CLIP saved like `pipeline pretrain` saves one (model.pt beside config.json)."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip").state_dict(), folder / "model.pt")
    world = WorldConfig(seed=0, image_size=32, held_out=held_out)
    (folder / "config.json").write_text(json.dumps({"world": world.to_dict()}))
    return folder / "model.pt"


def test_pretraining_never_shows_or_names_a_held_out_value(tmp_path):
    cfg = pretrain.Config(out_dir=tmp_path, held_out=("texture=checker", "shape=ring"), task="colour")
    assert cfg.held_out == (("shape", "ring"), ("texture", "checker"))
    world = pretrain.train_world(cfg, 32)
    assert world.task == "colour"  # shape is partly held out, so labels may not fix it
    images = SyntheticWorld(world, n_images=400)
    scenes = [images.scene(i) for i in range(400)]
    assert not any(s["texture"] == "checker" or s["shape"] == "ring" for s in scenes)
    assert {s["texture"] for s in scenes} == {"plain", "stripes", "dots"}
    captions = [images.partial_caption(i) for i in range(400)]
    assert not any("checker" in c or "ring" in c for c in captions)
    assert pretrain.train_world(pretrain.Config(out_dir=tmp_path), 32).task == "shape_colour"


def test_pretraining_refuses_to_evaluate_on_a_held_out_value(tmp_path):
    with pytest.raises(UserError, match="--task texture has classes with held-out texture=checker"):
        pretrain.Config(out_dir=tmp_path, held_out=CHECKER, task="texture")
    with pytest.raises(UserError, match="must read attribute=value"):
        pretrain.Config(out_dir=tmp_path, held_out=("checker",))
    with pytest.raises(UserError, match="unknown texture value 'tartan'"):
        pretrain.Config(out_dir=tmp_path, held_out=("texture=tartan",))


def test_extract_needs_allow_held_out_for_a_task_of_a_value_the_model_never_saw(tmp_path):
    weights = _fake_pretrained(tmp_path / "pretrain")
    args = ["extract", "--dataset", "synthetic", "--limit", "24", "--model", "tiny-clip", "--pretrained", str(weights),
            "--layers", "1", "--task", "texture", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "refused")])
    assert_one_line_error(result.exit_code, result.output, "texture 'checker'", "--allow-held-out")
    assert not (tmp_path / "refused").exists()

    result = CliRunner().invoke(main, [*args, "--allow-held-out", "--out", str(tmp_path / "held")])
    assert result.exit_code == 0, result.output
    store = ActivationStore(tmp_path / "held")
    world = store.attrs["dataset"]["world"]
    assert world["held_out"] == [["texture", "checker"]] and world["allow_held_out"] is True
    assert world["task"] == "texture" and CHECKER_CLASS in store.class_names
    assert store.attrs["config"]["world"] == world  # part of the store's identity

    # the control task: no class needs checker, and no image shows it
    control = extract.run(extract.Config(dataset="synthetic", limit=24, model="tiny-clip", pretrained=str(weights),
                                         layers=(1,), synthetic_task="background", out_dir=tmp_path / "control",
                                         progress=False))
    store = ActivationStore(control.store_dir)
    world = SyntheticWorld(WorldConfig.from_dict({k: v for k, v in store.attrs["dataset"]["world"].items()
                                                  if k != "allow_held_out"}), n_images=24)
    assert not any(world.scene(i)["texture"] == "checker" for i in range(24))


def test_task_and_allow_held_out_belong_to_the_synthetic_dataset(tmp_path):
    with pytest.raises(UserError, match="choose classes of the synthetic world"):
        extract.Config(dataset="eurosat", out_dir=tmp_path, synthetic_task="texture")
    with pytest.raises(UserError, match="unknown --task 'shapes'"):
        extract.Config(dataset="synthetic", out_dir=tmp_path, synthetic_task="shapes")


def test_experiment_settings_are_checked(tmp_path):
    with pytest.raises(UserError, match="--task background has no class that needs a held-out value"):
        concept.Config(out_dir=tmp_path, task="background", control="size")
    with pytest.raises(UserError, match="control must be built from seen values only"):
        concept.Config(out_dir=tmp_path, control="texture")
    assert concept.held_out_classes("texture", CHECKER) == [CHECKER_CLASS]
    assert concept.held_out_classes("shape_colour", (("shape", "ring"),)) == [
        "red ring", "green ring", "blue ring", "yellow ring"]


@pytest.mark.slow
def test_concept_addition_runs_both_studies_and_compares_their_remap_tables(tmp_path, monkeypatch):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pretrain"].update(steps=20, batch_size=32, warmup_steps=2, eval_images=40)
    params["data"]["limit"] = 64
    params["extract"]["layers"] = [2]
    params["sae"].update(total_tokens=30_000, batch_images=16, warmup_steps=5)
    params["adapt"].update(shots=2, epochs=2, test_limit=40)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "concept"
    result = CliRunner().invoke(main, ["concept-addition", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out classes" in result.output and CHECKER_CLASS + " (held out)" in result.output

    trained = json.loads((out / "pretrain" / "config.json").read_text())["world"]
    assert trained["held_out"] == [["texture", "checker"]]
    record = json.loads((out / "concept.json").read_text())
    assert record["tasks"] == {"held_out": "texture", "control": "background"} and record["layer"] == 2
    remaps = {role: json.loads((out / task / "synthetic" / "layer2" / "adapted" / "remap" / "remap.json").read_text())
              for role, task in record["tasks"].items()}
    held = remaps["held_out"]["per_class"]
    assert set(held) == {"plain background", "background with stripes", "background with dots", CHECKER_CLASS}
    assert record["sides"]["held_out"]["held_out_classes"] == [CHECKER_CLASS]
    assert record["held_out_low_high"] == pytest.approx(held[CHECKER_CLASS]["low_high"])
    seen = [row["low_high"] for name, row in held.items() if name != CHECKER_CLASS and row["low_high"] is not None]
    assert record["seen_low_high"] == pytest.approx(np.mean(seen) if seen else None)
    control = [row["low_high"] for row in remaps["control"]["per_class"].values() if row["low_high"] is not None]
    assert record["control_low_high"] == pytest.approx(np.mean(control) if control else None)
    for role in ("held_out", "control"):
        assert record["sides"][role]["overall"] == remaps[role]["overall"]
        metrics = json.loads((Path(record["sides"][role]["adapter"]) / "metrics.json").read_text())
        per_class = metrics["per_class"]
        assert sum(row["n_images"] for row in per_class.values()) == 40
        for head in ("base", "probe", "adapted"):  # per-class accuracies add up to the overall one
            hits = sum(row[head] * row["n_images"] for row in per_class.values() if row["n_images"])
            assert hits / 40 == pytest.approx(metrics[f"{head}_accuracy"])
    assert (out / "concept.png").stat().st_size > 0 and (out / "concept.md").read_text().count("|") > 20

    # a rerun resumes: nothing is retrained, the comparison is the same
    before = (out / "pretrain" / "model.pt").stat().st_mtime_ns
    result = CliRunner().invoke(main, ["concept-addition", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "pretrain" / "model.pt").stat().st_mtime_ns == before
    assert json.loads((out / "concept.json").read_text()) == record
