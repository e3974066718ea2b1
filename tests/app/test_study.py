"""`pipeline run-stage`: which instance of the study a call names, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from app import study
from app.cli import main
from tests.helpers import assert_one_line_error

PARAMS = "data:\n  datasets: [synthetic]\nextract:\n  layers: [1, 3]\n"


def _run_stage(tmp_path: Path, params: str, *args: str) -> tuple[int, str]:
    path = tmp_path / "params.yaml"
    path.write_text(params)
    result = CliRunner().invoke(main, ["run-stage", *args, "--params", str(path)])
    return result.exit_code, result.output


@pytest.mark.parametrize("args, needle", [
    (("train",), "stage 'train' needs --dataset"),
    (("train", "--dataset", "eurosat", "--layer", "3"), "dataset 'eurosat' is not in data.datasets (synthetic)"),
    (("train", "--dataset", "synthetic", "--layer", "2"), "layer 2 is not in extract.layers (1, 3)"),
    (("stats", "--dataset", "synthetic"), "needs --layer"),
])
def test_a_stage_instance_must_be_one_of_the_study(tmp_path, args, needle):
    assert_one_line_error(*_run_stage(tmp_path, PARAMS, *args), needle)


def test_unknown_keys_are_refused_by_name(tmp_path):
    code, output = _run_stage(tmp_path, PARAMS + "remap:\n  tau_hi: 0.5\n", "remap", "--dataset", "synthetic",
                              "--layer", "3")
    assert_one_line_error(code, output, "unknown key 'tau_hi' in section 'remap'")


def test_each_instance_has_its_own_folders():
    """No two stage instances write the same folder, and the layout is the documented one."""
    instances = [("synthetic", 1), ("eurosat", 1), ("synthetic", 3)]
    outs = [study.resolve(t, study.WORK, d, l) for step in study.STEPS for t in step.paths.values()
            for d, l in instances if t == step.paths["out_dir"]]
    unique = {(step.name, d, l) if "layer" in step.per else (step.name, d) for step in study.STEPS
              for d, l in instances if step.per} | {("pretrain",)}
    assert len(set(outs)) == len(unique)
    assert study.resolve(study.STEP["train"].paths["out_dir"], study.WORK, "synthetic", 1) == Path(
        "work/synthetic/layer1/sae")
    assert study.resolve(study.STEP["extract-adapted"].paths["out_dir"], study.WORK, "eurosat", 1) == Path(
        "work/eurosat/adapted-acts")


def test_dvc_metrics_copies_keep_the_numbers_only():
    record = {"accuracy": 0.5, "n": 3, "ok": True, "name": "x", "ks": [1, 2],
              "eval": {"world": {"seed": 0, "task": "shape"}, "split": "test"}, "none": None,
              "provenance": {"layer": 3}, "config": {"k": 1}, "per_class": {"cat": {"high_high": 1.0}}}
    assert study._numbers(record) == {"accuracy": 0.5, "n": 3, "eval": {"world": {"seed": 0}}}


@pytest.mark.parametrize("section, needle", [
    ("sae:\n  batch_images: true\n", "sae.batch_images must be an integer (got True)"),
    ("sae:\n  expansion: eight\n", "sae.expansion must be a number"),
    ("sae:\n  total_tokens: '5000'\n", "sae.total_tokens must be an integer (got '5000')"),
    ("sae:\n  arch: relux\n", "sae.arch must be one of relu, topk, batchtopk"),
    ("stats:\n  top_k: 2.5\n", "stats.top_k must be an integer"),
])
def test_each_value_is_type_checked_against_its_field(tmp_path, section, needle):
    step = "stats" if section.startswith("stats") else "train"
    code, output = _run_stage(tmp_path, PARAMS + section, step, "--dataset", "synthetic", "--layer", "3")
    assert_one_line_error(code, output, needle)


def test_a_scalar_is_not_a_list(tmp_path):
    code, output = _run_stage(tmp_path, "data:\n  datasets: [synthetic]\nextract:\n  layers: 3\n", "train",
                              "--dataset", "synthetic", "--layer", "3")
    assert_one_line_error(code, output, "extract.layers must be a list of integers (got 3)")


def test_an_unknown_section_is_refused_by_name(tmp_path):
    code, output = _run_stage(tmp_path, PARAMS + "sea:\n  l1: 0.1\n", "train", "--dataset", "synthetic",
                              "--layer", "3")
    assert_one_line_error(code, output, "unknown section 'sea'")
