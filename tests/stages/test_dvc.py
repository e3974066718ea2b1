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


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A git + DVC repo holding this project's stage graph, with tiny parameters, reproduced once."""
    assert shutil.which("dvc", path=ENV["PATH"]), "dvc is missing: it is a dependency (pip install -e .)"
    repo = tmp_path_factory.mktemp("study")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("app", "pipeline", "cache", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"].update(steps=6, batch_size=16, warmup_steps=1, eval_images=40)
    params["data"]["limit"] = 48
    params["extract"]["layers"] = list(LAYERS)
    params["sae"].update(total_tokens=20_000, batch_images=16, warmup_steps=5)
    params["mask"].update(ks=[1, 10, "all"], n_seeds=1, probe_images=16)
    params["adapt"].update(shots=1, epochs=2, test_limit=40)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _sh("git", "init", "-q", cwd=repo)
    _sh("dvc", "init", "-q", cwd=repo)
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "commit", "-qm", "study", cwd=repo)
    log = _sh("dvc", "repro", cwd=repo)
    return repo, log


def test_repro_runs_every_stage_and_writes_valid_outputs(study):
    repo, log = study
    assert "Running stage 'pretrain'" in log
    for stage in ("extract", "adapt", "extract-adapted"):
        assert f"Running stage '{stage}@synthetic'" in log
    work = repo / "work" / "synthetic"
    assert verify(work / "acts").ok and verify(work / "adapted-acts").ok
    pretrain = json.loads((repo / "work" / "pretrain-metrics.json").read_text())
    assert pretrain["steps"] == 6 and 0 <= pretrain["accuracy"] <= 1
    adapt = json.loads((work / "adapt-metrics.json").read_text())
    assert 0 <= adapt["adapted_accuracy"] <= 1
    for layer in LAYERS:
        for stage in ("train", "encode", "stats", "mask", "groundtruth", "remap", "report", "encode-adapted",
                      "stats-adapted", "mask-adapted"):
            assert f"Running stage '{stage}@synthetic-{layer}'" in log
        run = work / f"layer{layer}"
        assert verify(run / "codes").ok and verify(run / "adapted" / "codes").ok
        assert json.loads((run / "sae" / "config.json").read_text())["layer"] == layer
        summary = json.loads((run / "stats-summary.json").read_text())
        assert summary["n_latents"] == 8 * 128
        assert (run / "report" / "index.html").stat().st_size > 1000
        masking = json.loads((run / "masking-metrics.json").read_text())
        acc = masking["accuracy"]
        assert 0 <= acc["clip"] <= 1 and set(acc["on"]) == set(acc["off"]) == {"1", "10", "all"}
        metrics = json.loads((run / "sae-metrics.json").read_text())
        assert metrics["steps"] > 0 and 0 <= metrics["fvu"] < 10 and metrics["l0"] > 0
        groundtruth = json.loads((run / "groundtruth-metrics.json").read_text())
        assert 0 <= groundtruth["fraction_values_covered"] <= 1 and "definitions" not in groundtruth
        remap = json.loads((run / "remap-metrics.json").read_text())
        assert remap["thresholds"]["tau_high"] == 0.5
    shown = _sh("dvc", "metrics", "show", "--json", cwd=repo)
    assert "fvu" in shown and "fraction_values_covered" in shown and "high_high" in shown


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
        assert {f"{stage}@{dataset}-{layer}" for stage in ("train", "mask", "remap", "report")
                for layer in LAYERS} <= set(listed)
    assert "pretrain" in listed and len(listed) == 1 + 2 * 3 + 2 * len(LAYERS) * 10


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
    names = {key.replace("${item.dataset}", "synthetic") for e in dvc.values() for kind in ("metrics", "plots")
             for item in e.get(kind, []) for key in item}
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
    sae = json.loads((repo / "work" / "synthetic" / "layer3" / "sae-metrics.json").read_text())
    pretrain = json.loads((repo / "work" / "pretrain-metrics.json").read_text())
    masking = json.loads((repo / "work" / "synthetic" / "layer3" / "masking-metrics.json").read_text())["accuracy"]
    assert f"FVU {sae['fvu']:.3f}, L0 {sae['l0']:.0f}" in out and "block 3" in out
    assert f"{100 * pretrain['accuracy']:.1f} % zero-shot" in out
    assert f"plain CLIP scores {masking['clip']:.3f}" in out
    assert "Ground truth" in out and "MaPLe" in out and "Remap" in out and "report/index.html" in out
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old figures" not in text
    assert f"FVU {sae['fvu']:.3f}" in text


def test_sae_ablation_reuses_the_activation_cache(study):
    repo, _ = study
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "commit", "-qm", "reproduced", cwd=repo)
    acts = repo / "work" / "synthetic" / "acts"
    before, mtime = tree_digest(acts), (acts / "zarr.json").stat().st_mtime_ns
    log = _sh("dvc", "exp", "run", "-S", "sae.expansion=4", cwd=repo)
    for skipped in ("pretrain", "extract@synthetic", "adapt@synthetic"):
        assert f"Running stage '{skipped}'" not in log
    assert "Running stage 'train@synthetic-3'" in log
    assert tree_digest(acts) == before and (acts / "zarr.json").stat().st_mtime_ns == mtime
    sae = repo / "work" / "synthetic" / "layer3" / "sae"
    assert json.loads((sae / "config.json").read_text())["d_sae"] == 4 * 128
