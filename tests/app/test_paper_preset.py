"""presets/paper.yaml is the paper's study, and the README's table says so value by value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from app import study
from app.cli import main

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "presets" / "paper.yaml"
# the paper's own settings: every key of these sections (but devices) must have a README row
DOCUMENTED = ("model", "extract", "sae_data", "sae", "adapt")
UNDOCUMENTED = {"extract.batch_size", "extract.device", "sae.device", "sae.token_kind", "adapt.device",
                "adapt.test_limit", "sae_data.root", "sae_data.seed"}


def _table() -> dict[str, object]:
    text = (ROOT / "README.md").read_text()
    body = text.split("<!-- paper-preset:begin -->", 1)[1].split("<!-- paper-preset:end -->", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (m := re.fullmatch(r"`([\w.]+)`", cells[0])):
            rows[m.group(1)] = yaml.safe_load(cells[1].strip("`"))
    return rows


def _lookup(params: dict, key: str) -> object:
    value = params
    for part in key.split("."):
        value = value[part]
    return value


@pytest.fixture(scope="module")
def preset() -> dict:
    return yaml.safe_load(PRESET.read_text())


def test_every_row_of_the_readme_table_is_the_preset(preset):
    rows = _table()
    assert len(rows) >= 30
    for key, value in rows.items():
        assert _lookup(preset, key) == value, key


def test_every_paper_setting_of_the_preset_has_a_row(preset):
    rows = _table()
    keys = {f"{section}.{key}" for section in DOCUMENTED for key in preset[section]}
    assert keys - UNDOCUMENTED <= set(rows), sorted(keys - UNDOCUMENTED - set(rows))


def test_the_preset_is_a_valid_study_with_the_papers_numbers(preset):
    study.check_sections(preset)
    for step in study.STEPS:
        study.config_for(step, preset, "eurosat" if "dataset" in step.per else None, 10 if "layer" in step.per else None)
    train = study.config_for(study.STEP["train"], preset, None, 10)
    assert train.total_tokens == 2_621_440 * 197 and train.batch_images * 197 == 25_216
    assert int(train.expansion * 768) == 49_152
    assert len(study.data_section(preset).datasets) == 11
    assert study.config_for(study.STEP["extract"], preset, "eurosat", None).split == "test"


def test_without_data_and_weights_it_refuses_once_per_missing_input(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing downloaded here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run-stage", "extract-sae", "--params", str(PRESET)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "error: the study cannot run: 13 inputs missing (fix each, then rerun):"
    items = [line for line in lines[1:] if line.startswith("  - ")]
    assert len(items) == 13 == len(lines) - 1
    assert items[0].startswith("  - model.pretrained: ViT-B-16 weights 'openai' are not in the local cache")
    assert "sae_data.root (imagenet) is not set: arrange ImageNet as ROOT/<split>/<wnid>/*.JPEG" in items[1]
    assert sum("data.roots." in item for item in items) == 11
    assert not (tmp_path / "work").exists()


def test_the_pretrain_stage_does_nothing_when_the_study_reads_other_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {"model": {"name": "tiny-clip", "pretrained": "none"}}
    assert study.run_stage("pretrain", params, None, None) == (
        "pretrain: not used (model.pretrained names other weights)")
    assert (tmp_path / "work" / "pretrain" / study.NOT_USED).is_file()
    assert (tmp_path / "work" / "pretrain-live" / "plots" / "metrics").is_dir()
    assert (tmp_path / "work" / "metrics" / "pretrain.json").read_text().strip() == '{\n  "used": 0\n}'


def _leaves(record: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in record.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_the_convnext_preset_is_the_default_study_with_the_convnext_values_only():
    default = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    convnext = _leaves(yaml.safe_load((ROOT / "presets" / "convnext.yaml").read_text()))
    changed = {key: convnext[key] for key in default if convnext[key] != default[key]}
    assert convnext.keys() == default.keys()
    assert changed == {"pretrain.model": "tiny-convnext-clip", "pretrain.steps": 1800, "model.name": "tiny-convnext-clip",
                       "extract.layers": [0], "adapt.lr": 0.05}
    study.check_tower_settings(yaml.safe_load((ROOT / "presets" / "convnext.yaml").read_text()))  # one stage, no keep
