"""`dvc repro` runs the whole study on the tiny ConvNeXt CLIP: pretrain, the SAE of one stage, and for each dataset
extract, encode, stats, mask, groundtruth, report, MaPLe (stage offsets), the adapted store through the same SAE,
its masking, the remap, then the summary (tests/stages/test_dvc.py runs the ViT's)."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import yaml

from cache import jsonfile
from cache.check import verify
from cache.store import ActivationStore
from tests.stages.test_dvc import ENV, ROOT, reproduce

MODEL = "tiny-convnext-clip"
LAYERS = (1,)  # one stage: a study keeps one store per dataset, and a ConvNeXt's stages differ in shape
DATASETS = ("synthetic",)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study with tiny parameters and the ConvNeXt, reproduced once."""
    repo = tmp_path_factory.mktemp("study")
    return repo, reproduce(repo, pretrain={"model": MODEL}, model={"name": MODEL}, data={"datasets": list(DATASETS)},
                           extract={"layers": list(LAYERS)}, sae={"total_tokens": 10_000})


def _numbers(record) -> list[float]:
    if isinstance(record, dict):
        return [x for v in record.values() for x in _numbers(v)]
    if isinstance(record, list):
        return [x for v in record for x in _numbers(v)]
    return [float(record)] if isinstance(record, (int, float)) and not isinstance(record, bool) else []


@pytest.mark.slow
def test_repro_runs_every_stage_on_the_convnext_and_writes_valid_outputs(study):
    repo, log = study
    stages = ["pretrain", "extract-sae", *(f"train@{layer}" for layer in LAYERS), "summary"]
    stages += [f"{stage}@{dataset}" for dataset in DATASETS for stage in ("extract", "adapt", "extract-adapted")]
    stages += [f"{stage}@{dataset}-{layer}" for dataset in DATASETS for layer in LAYERS
               for stage in ("encode", "stats", "mask", "groundtruth", "remap", "report", "encode-adapted",
                             "stats-adapted", "mask-adapted")]
    assert all(f"Running stage '{stage}'" in log for stage in stages), log
    work, metrics = repo / "work", repo / "work" / "metrics"
    assert json.loads((work / "pretrain" / "config.json").read_text())["training"]["model"] == MODEL
    for dataset in DATASETS:
        data = work / dataset
        for acts in (data / "acts", data / "adapted-acts"):
            store = ActivationStore(acts, mode="r")
            assert verify(acts).ok and store.attrs["model"]["tower"] == "convnext"
            assert store.token_layout["n_tokens"] == 16 and store.d_model == 128  # stage 1: 4 x 4 x 128
        adapter = json.loads((data / "adapter" / "config.json").read_text())["adapter"]
        assert adapter["method"] == "maple-stage-offsets" and adapter["base_model"]["name"] == MODEL
        adapt = json.loads((metrics / dataset / "adapt.json").read_text())
        assert 0 <= adapt["base_accuracy"] <= 1 and 0 <= adapt["adapted_accuracy"] <= 1
        for layer in LAYERS:
            run, published = data / f"layer{layer}", metrics / dataset / f"layer{layer}"
            for name in ("masking", "masking-adapted"):
                masking = json.loads((published / f"{name}.json").read_text())
                acc = masking["accuracy"]
                assert 0 <= acc["clip"] <= 1 and set(acc["on"]) == set(acc["off"]) == {"1", "10", "all"}
            adapted_masking = json.loads((run / "adapted" / "masking" / "masking.json").read_text())
            assert adapted_masking["checks"]["max_abs_logit_diff_sae_error_term_vs_clip"] < 1e-3
            remap = json.loads((published / "remap.json").read_text())
            assert remap["n_relevant"] > 0 and sum(remap["overall"].values()) == pytest.approx(1)
            assert (run / "report" / "index.html").stat().st_size > 1000
    summary = json.loads((work / "summary" / "summary.json").read_text())
    assert set(summary["datasets"]) == set(DATASETS)
    for path in (work / "summary" / "summary.json", *metrics.rglob("*.json")):
        values = _numbers(jsonfile.loads(path.read_text()))  # strict JSON: no NaN or Infinity
        assert values and all(math.isfinite(v) for v in values), path
    assert (work / "summary.png").stat().st_size > 1000


@pytest.mark.parametrize("setting, error", [
    ({"extract": {"layers": [0, 1]}},
     "extract.layers [0, 1] are stages of the ConvNeXt tiny-convnext-clip, which differ in shape, and the study keeps "
     "one activation store per dataset: list one stage in extract.layers (one experiment per stage: dvc exp run -S "
     "'extract.layers=[1]')"),
    ({"extract": {"layers": [1], "prompt_tokens": "keep"}},
     "extract.prompt_tokens keep needs a ViT: the MaPLe prompts of the ConvNeXt tiny-convnext-clip are channel "
     "offsets, not tokens; set it to drop"),
])
def test_what_a_convnext_study_cannot_do_is_refused_before_it_starts(tmp_path, setting, error):
    """The first stage refuses settings that would fail stages later: stages of several shapes (one store per
    dataset), kept prompt tokens (the ConvNeXt has none)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pretrain"]["model"] = params["model"]["name"] = MODEL
    for section, values in setting.items():
        params[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(["pipeline", "run-stage", "pretrain"], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True)
    assert result.returncode == 2, result.stderr
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: {error}"], result.stderr
    assert not (tmp_path / "work").exists()
