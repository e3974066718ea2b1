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
    (("encode",), "stage 'encode' needs --dataset"),
    (("encode", "--dataset", "eurosat", "--layer", "3"), "dataset 'eurosat' is not in data.datasets (synthetic)"),
    (("train", "--layer", "2"), "layer 2 is not in extract.layers (1, 3)"),
    (("train", "--dataset", "synthetic", "--layer", "3"), "stage 'train' takes no --dataset"),
    (("summary", "--layer", "3"), "stage 'summary' takes no --layer"),
    (("stats", "--dataset", "synthetic"), "needs --layer"),
])
def test_a_stage_instance_must_be_one_of_the_study(tmp_path, args, needle):
    assert_one_line_error(*_run_stage(tmp_path, PARAMS, *args), needle)


def test_unknown_keys_are_refused_by_name(tmp_path):
    code, output = _run_stage(tmp_path, PARAMS + "remap:\n  tau_hi: 0.5\n", "remap", "--dataset", "synthetic",
                              "--layer", "3")
    assert_one_line_error(code, output, "unknown key 'tau_hi' in section 'remap'")


def test_each_instance_has_its_own_folders():
    """No two stage instances write the same folder or publish the same file, and the layout is the
    documented one: one SAE per block, every dataset read through it."""
    instances = [("synthetic", 1), ("eurosat", 1), ("synthetic", 3)]
    written = [(step.name, study.resolve(t, study.WORK, d, l)) for step in study.STEPS
               for t in (step.paths["out_dir"], *step.metrics.values(), *step.plots.values())
               for d, l in instances]
    unique_per_step = {(name, path) for name, path in written}
    paths = [path for _, path in unique_per_step]
    assert len(paths) == len(set(paths))
    sae = study.STEP["train"].paths["out_dir"]
    assert {study.resolve(sae, study.WORK, d, 1) for d in ("synthetic", "eurosat")} == {Path("work/sae/layer1")}
    assert study.resolve(study.STEP["encode"].paths["sae_dir"], study.WORK, "eurosat", 1) == Path("work/sae/layer1")
    assert study.resolve(study.STEP["train"].paths["cache_dir"], study.WORK, None, 1) == Path("work/sae-data/acts")
    assert study.resolve(study.STEP["extract-adapted"].paths["out_dir"], study.WORK, "eurosat", 1) == Path(
        "work/eurosat/adapted-acts")


def test_the_summary_reads_what_the_study_publishes():
    """The summary stage's file layout under work/metrics is the one the study publishes to."""
    from stages import summary

    metrics = study.resolve(study.METRICS, study.WORK, None, None)
    for step, field, layout in (("adapt", "metrics_path", summary.ADAPT_FILE),
                                ("mask", "results_path", summary.MASKING_FILE),
                                ("remap", "results_path", summary.REMAP_FILE)):
        published = study.resolve(study.STEP[step].metrics[field], study.WORK, "synthetic-size", 7)
        assert published == metrics / layout.format(dataset="synthetic-size", layer=7)


@pytest.mark.parametrize("key, expected", [
    ("synthetic", ("synthetic", "shape_colour")), ("synthetic-texture", ("synthetic", "texture")),
    ("eurosat", ("eurosat", None))])
def test_dataset_keys_name_a_dataset_and_a_world_task(key, expected):
    assert study.dataset_of(key, "shape_colour") == expected
    params = {"data": {"datasets": [key]}}
    bound = study.config_for(study.STEP["extract"], params, key, None)
    assert (bound.dataset, bound.synthetic_task if expected[1] else None) == expected


def test_an_unknown_dataset_key_is_refused_by_name(tmp_path):
    code, output = _run_stage(tmp_path, "data:\n  datasets: [synthetic-smell]\nextract:\n  layers: [3]\n",
                              "extract", "--dataset", "synthetic-smell")
    assert_one_line_error(code, output, "unknown dataset 'synthetic-smell'", "synthetic-<task>")


def test_the_sae_data_is_bound_to_the_extract_sae_stage():
    params = {"sae_data": {"dataset": "synthetic-texture", "limit": 30, "seed": 4, "split": "val"}}
    cfg = study.config_for(study.STEP["extract-sae"], params, None, None)
    assert (cfg.dataset, cfg.synthetic_task, cfg.limit, cfg.seed, cfg.split) == ("synthetic", "texture", 30, 4, "val")
    assert cfg.out_dir == Path("work/sae-data/acts")


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
    where = ("stats", "--dataset", "synthetic") if section.startswith("stats") else ("train",)
    code, output = _run_stage(tmp_path, PARAMS + section, *where, "--layer", "3")
    assert_one_line_error(code, output, needle)


def test_a_scalar_is_not_a_list(tmp_path):
    code, output = _run_stage(tmp_path, "data:\n  datasets: [synthetic]\nextract:\n  layers: 3\n", "train",
                              "--layer", "3")
    assert_one_line_error(code, output, "extract.layers must be a list of integers (got 3)")


def test_an_unknown_section_is_refused_by_name(tmp_path):
    code, output = _run_stage(tmp_path, PARAMS + "sea:\n  l1: 0.1\n", "train", "--layer", "3")
    assert_one_line_error(code, output, "unknown section 'sea'")
