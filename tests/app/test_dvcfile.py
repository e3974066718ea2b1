"""dvc.yaml is the study's graph: generated from app/study.py, with each stage's real code deps."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import stages
from app import dvcfile, study

ROOT = Path(__file__).resolve().parents[2]


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_committed_dvc_yaml_is_the_generated_one():
    assert (ROOT / "dvc.yaml").read_text() == dvcfile.render(), "dvc.yaml is stale: run `pipeline dvc-yaml`"


@pytest.mark.slow
@pytest.mark.parametrize("step", study.STEPS, ids=lambda s: s.name)
def test_code_deps_cover_what_the_stage_really_imports(step):
    """Import the stage module in a fresh interpreter: every project module it loads is a dep
    (the static walk may list more: imports inside functions)."""
    module = stages.load(step.stage).module
    probe = (f"import sys, json, {module}; print(json.dumps(sorted(m for m in sys.modules "
             f"if m.split('.')[0] in {dvcfile.PACKAGES!r})))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout)
    files = {str(dvcfile.module_file(m).relative_to(ROOT)) for m in loaded}
    files = {f for f in files if (ROOT / f).stat().st_size}
    deps = set(_dvc_stages()[step.name]["deps"])
    assert files <= deps, f"{step.name} imports {sorted(files - deps)} that dvc.yaml does not list"
    assert set(dvcfile.code_deps(module)) <= deps


def test_code_deps_are_only_what_the_stage_imports():
    """Touching the report's heatmaps must not rerun extraction: no stage depends on a whole package."""
    deps = {name: set(entry["deps"]) for name, entry in _dvc_stages().items()}
    assert "pipeline" not in deps["extract"] and "pipeline/heatmaps.py" in deps["report"]
    assert "pipeline/heatmaps.py" not in deps["extract"] and "pipeline/heatmaps.py" not in deps["train"]
    assert "pipeline/remap.py" in deps["remap"] and "stages/mask.py" not in deps["remap"]
    assert "stages/templates" in deps["report"]  # editing a page's template rewrites the report


def test_outs_are_the_folders_each_stage_declares_it_writes():
    dvc = _dvc_stages()
    for step in study.STEPS:
        spec = stages.load(step.stage)
        paths = {f.name for f in dataclasses.fields(spec.config)} & set(step.paths)
        assert paths <= set(spec.reads) | set(spec.writes) | set(spec.logs), f"{step.name} binds an undeclared path"
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc[step.name]["outs"]]
        assert outs == [dvcfile._dvc(step.paths[f]) for f in spec.writes]
        reads = [dvcfile._dvc(step.paths[f]) for f in spec.reads if f in step.paths]
        assert set(reads) <= set(dvc[step.name]["deps"])


def test_the_adapted_branch_is_explicit():
    """The adapted model's extract, encode, stats and mask are stages of their own, each feeding remap."""
    dvc = _dvc_stages()
    assert {"extract-adapted", "encode-adapted", "stats-adapted", "mask-adapted"} <= set(dvc)
    assert "stages/extract.py" not in dvc["adapt"]["deps"]
    remap_deps = set(dvc["remap"]["deps"])
    for stage in ("stats-adapted", "mask-adapted", "stats", "mask"):
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in dvc[stage]["outs"]]
        assert set(outs) <= remap_deps, stage
