"""`dvc repro` runs the study end to end; an SAE ablation reuses the activation cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cache import jsonfile
from cache.check import verify
from cache.codes import CodeStore
from tests.helpers import tree_digest

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)  # dvc and pipeline live beside this interpreter (the venv need not be active)
ENV = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "OMP_NUM_THREADS": "1"}


def _sh(*cmd: str, cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


LAYERS = (1, 3)
DATASETS = ("synthetic", "synthetic-texture")


def reproduce(repo: Path, **overrides: dict) -> str:
    """Copy this project's stage graph into ``repo`` with tiny parameters (then ``overrides``: section -> values), make
    it a git + DVC repo and run ``dvc repro`` once; returns its log."""
    assert shutil.which("dvc", path=ENV["PATH"]), "dvc is missing: it is a dependency (pip install -e .)"
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("app", "pipeline", "cache", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"].update(steps=6, batch_size=16, warmup_steps=1, eval_images=40)
    params["data"]["limit"] = 48
    params["sae_data"]["limit"] = 48
    params["sae"].update(total_tokens=20_000, batch_images=16, warmup_steps=5)
    params["mask"].update(ks=[1, 10, "all"], n_seeds=1, probe_images=16)
    params["summary"]["ks"] = [10]
    params["adapt"].update(shots=1, epochs=2, test_limit=40)
    for section, values in overrides.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _sh("git", "init", "-q", cwd=repo)
    _sh("dvc", "init", "-q", cwd=repo)
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "commit", "-qm", "study", cwd=repo)
    return _sh("dvc", "repro", cwd=repo)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study with tiny parameters on two datasets and two blocks, reproduced once."""
    repo = tmp_path_factory.mktemp("study")
    return repo, reproduce(repo, data={"datasets": list(DATASETS)}, extract={"layers": list(LAYERS)})


def test_repro_runs_every_stage_and_writes_valid_outputs(study):
    repo, log = study
    for stage in ("pretrain", "extract-sae", *(f"train@{layer}" for layer in LAYERS), "summary"):
        assert f"Running stage '{stage}'" in log
    work, metrics = repo / "work", repo / "work" / "metrics"
    assert verify(work / "sae-data" / "acts").ok
    pretrain = json.loads((metrics / "pretrain.json").read_text())
    assert pretrain["steps"] == 6 and 0 <= pretrain["accuracy"] <= 1
    for layer in LAYERS:
        assert json.loads((work / "sae" / f"layer{layer}" / "config.json").read_text())["layer"] == layer
        sae = json.loads((metrics / "sae" / f"layer{layer}.json").read_text())
        assert sae["steps"] > 0 and 0 <= sae["fvu"] < 10 and sae["l0"] > 0
    for dataset in DATASETS:
        for stage in ("extract", "adapt", "extract-adapted"):
            assert f"Running stage '{stage}@{dataset}'" in log
        data = work / dataset
        assert verify(data / "acts").ok and verify(data / "adapted-acts").ok
        adapt = json.loads((metrics / dataset / "adapt.json").read_text())
        assert 0 <= adapt["adapted_accuracy"] <= 1
        for layer in LAYERS:
            for stage in ("encode", "stats", "mask", "groundtruth", "remap", "report", "encode-adapted",
                          "stats-adapted", "mask-adapted"):
                assert f"Running stage '{stage}@{dataset}-{layer}'" in log
            run, published = data / f"layer{layer}", metrics / dataset / f"layer{layer}"
            assert verify(run / "codes").ok and verify(run / "adapted" / "codes").ok
            one_sae = _sha256(work / "sae" / f"layer{layer}" / "weights.safetensors")
            for codes in (run / "codes", run / "adapted" / "codes"):  # every dataset, through the block's one SAE
                assert CodeStore(codes).attrs["sae_weights_sha256"] == one_sae
            assert json.loads((published / "stats.json").read_text())["n_latents"] == 8 * 128
            assert (run / "report" / "index.html").stat().st_size > 1000
            acc = json.loads((published / "masking.json").read_text())["accuracy"]
            assert 0 <= acc["clip"] <= 1 and set(acc["on"]) == set(acc["off"]) == {"1", "10", "all"}
            groundtruth = json.loads((published / "groundtruth.json").read_text())
            assert 0 <= groundtruth["fraction_values_covered"] <= 1 and "definitions" not in groundtruth
            assert json.loads((published / "remap.json").read_text())["thresholds"]["tau_high"] == 0.5
    table = json.loads((work / "summary" / "summary.json").read_text())["datasets"]
    assert set(table) == set(DATASETS) and all(set(rows) == {f"layer{x}" for x in LAYERS} for rows in table.values())
    assert (work / "summary" / "index.html").stat().st_size > 500 and (work / "summary.png").stat().st_size > 1000
    shown = _sh("dvc", "metrics", "show", "--json", cwd=repo)
    assert "fvu" in shown and "fraction_values_covered" in shown and "high_high" in shown and "drop_off_10" in shown


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_dag_trains_one_sae_per_block_for_every_dataset(study):
    """`dvc dag`: extract-sae feeds each block's train, which feeds every dataset's encode."""
    repo, _ = study
    edges = {tuple(line.strip().rstrip(";").strip('"').split('" -> "'))
             for line in _sh("dvc", "dag", "--dot", cwd=repo).splitlines() if "->" in line}
    for layer in LAYERS:
        assert ("extract-sae", f"train@{layer}") in edges
        for dataset in DATASETS:
            for stage in ("encode", "encode-adapted", "mask", "mask-adapted"):
                assert (f"train@{layer}", f"{stage}@{dataset}-{layer}") in edges
            assert (f"remap@{dataset}-{layer}", "summary") in edges
    assert not any(edge[0].startswith("extract@") and edge[1].startswith("train") for edge in edges)


def test_one_params_list_fans_the_study_out_over_datasets_and_layers(study):
    repo, _ = study
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["datasets"] = ["synthetic", "eurosat"]
    other = repo / "other"
    other.mkdir()
    shutil.copy(repo / "dvc.yaml", other / "dvc.yaml")
    (other / "params.yaml").write_text(yaml.safe_dump(params))
    listed = _sh("dvc", "stage", "list", "--name-only", cwd=other).split()
    for dataset in ("synthetic", "eurosat"):
        assert {f"extract@{dataset}", f"adapt@{dataset}"} <= set(listed)
        assert {f"{stage}@{dataset}-{layer}" for stage in ("encode", "mask", "remap", "report")
                for layer in LAYERS} <= set(listed)
    assert {"pretrain", "extract-sae", "summary", *(f"train@{layer}" for layer in LAYERS)} <= set(listed)
    assert len(listed) == 3 + len(LAYERS) + 2 * 3 + 2 * len(LAYERS) * 9


def test_every_file_the_study_writes_is_declared_in_dvc_yaml(study):
    """Outs, metrics and plots cover the work tree: nothing a stage writes escapes DVC."""
    repo, _ = study
    declared = []
    for entry in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values():
        for kind in ("outs",):
            declared += [Path(o["path"]) for o in entry.get(kind, [])]
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    files = [p for p in (repo / "work").rglob("*") if p.is_file() and p.name != ".gitignore"]  # DVC's own
    assert files
    loose = [p for p in files if not any(p.relative_to(repo).is_relative_to(d) for d in declared)]
    published = {str(p.relative_to(repo)) for p in loose}
    names = {key.replace("${item.dataset}", dataset) for e in dvc.values() for kind in ("metrics", "plots")
             for item in e.get(kind, []) for key in item for dataset in DATASETS}
    expected = {n.replace("${item.layer}", str(layer)) for n in names for layer in LAYERS}
    undeclared = {p for p in published if not any(p == e or p.startswith(e + "/") for e in expected)}  # plot folders
    assert not undeclared, f"undeclared files: {sorted(undeclared)}"


def test_every_json_the_study_writes_is_strict(study):
    """No NaN or Infinity in any JSON file (strict parsers and browsers refuse them); a null says why."""
    repo, _ = study
    paths = sorted((repo / "work").rglob("*.json"))
    assert len(paths) > 20 and any(p.parent.name.endswith("-live") for p in paths)
    for path in paths:
        jsonfile.loads(path.read_text())  # raises on NaN, Infinity, -Infinity


def test_editing_a_library_module_reruns_exactly_the_stages_that_use_it(study):
    """remap's maths live in pipeline/remap.py: changing it makes remap stale, and nothing upstream."""
    repo, _ = study
    library = repo / "pipeline" / "remap.py"
    original = library.read_text()
    try:
        library.write_text(original + "\n# edited\n")
        status = _sh("dvc", "status", cwd=repo)
    finally:
        library.write_text(original)
    stale = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")
             and line.rstrip().endswith(":") and not line.startswith(" ")}
    assert {f"remap@synthetic-{layer}" for layer in LAYERS} <= stale, status
    assert not any(s.startswith(("extract", "train", "encode", "stats", "pretrain")) for s in stale), status


def test_findings_say_what_the_study_measured_and_write_into_a_readme(study):
    """`pipeline findings` (the end of make demo, and the README's figures) quotes the published metrics."""
    repo, _ = study
    readme = repo / "README.md"
    readme.write_text("intro\n<!-- findings:begin (written by `make figures`) -->\nold figures\n"
                      "<!-- findings:end -->\noutro\n")
    out = _sh("pipeline", "findings", "--readme", "README.md", cwd=repo)
    metrics = repo / "work" / "metrics"
    sae = json.loads((metrics / "sae" / "layer3.json").read_text())
    pretrain = json.loads((metrics / "pretrain.json").read_text())
    masking = json.loads((metrics / "synthetic" / "layer3" / "masking.json").read_text())["accuracy"]
    assert f"FVU {sae['fvu']:.3f}, L0 {sae['l0']:.0f}" in out and "block 3" in out
    assert f"{100 * pretrain['accuracy']:.1f} % zero-shot" in out
    assert f"plain CLIP scores {masking['clip']:.3f}" in out
    assert "Ground truth" in out and "MaPLe" in out and "Remap" in out and "report/index.html" in out
    assert "Across datasets" in out and all(f"| {dataset} | 3 |" in out for dataset in DATASETS)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old figures" not in text
    assert f"FVU {sae['fvu']:.3f}" in text


def test_sae_ablation_retrains_once_and_reencodes_every_dataset_without_extracting(study):
    repo, _ = study
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "commit", "-qm", "reproduced", cwd=repo)
    stores = [repo / "work" / "sae-data" / "acts", *(repo / "work" / d / "acts" for d in DATASETS)]
    before = [(tree_digest(acts), (acts / "zarr.json").stat().st_mtime_ns) for acts in stores]
    log = _sh("dvc", "exp", "run", "-S", "sae.expansion=4", cwd=repo)
    for skipped in ("pretrain", "extract-sae", *(f"extract@{d}" for d in DATASETS), *(f"adapt@{d}" for d in DATASETS)):
        assert f"Running stage '{skipped}'" not in log
    assert log.count("Running stage 'train@3'") == 1 and log.count("Running stage 'train@") == len(LAYERS)
    for dataset in DATASETS:
        assert f"Running stage 'encode@{dataset}-3'" in log and f"Running stage 'encode-adapted@{dataset}-3'" in log
    assert [(tree_digest(acts), (acts / "zarr.json").stat().st_mtime_ns) for acts in stores] == before
    assert json.loads((repo / "work" / "sae" / "layer3" / "config.json").read_text())["d_sae"] == 4 * 128
