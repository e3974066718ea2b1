"""SIGKILL at creation, midway and at the last write of every command that writes: the same
command run again finishes, and its outputs equal those of a run that was never interrupted
(timings aside)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from app import study

ROOT = Path(__file__).resolve().parents[2]
LAYER = 1
STEPS = ("pretrain", "extract", "import", "train", "encode", "stats", "mask", "groundtruth", "report", "adapt",
         "remap", "summary")
ORDER = [s.name for s in study.STEPS] + ["import"]  # dependency order; import is not a study stage
IMPORT = ["import", "acts.npy", "--labels", "labels.npy", "--chunk-images", "4", "--shard-images", "8", "--out",
          "work/imported"]
KILL_POINTS = ("creation", "midway", "last write")
TIMING = re.compile(r"seconds|elapsed|per_s(ec)?$|_s$|throughput|tokens_per|images_per_s|duration", re.I)

pytestmark = pytest.mark.slow


def _env(outputs: list[Path], **extra: str) -> dict[str, str]:
    return {**os.environ, "FAULT_UNDER": os.pathsep.join(map(str, outputs)), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), **extra}


def _command(name: str) -> list[str]:
    if name == "import":
        return [sys.executable, "-m", "tests.faults.killer", *IMPORT]
    step = study.STEP[name]
    args = [sys.executable, "-m", "tests.faults.killer", "run-stage", name]
    args += ["--dataset", "synthetic"] if "dataset" in step.per else []
    return args + (["--layer", str(LAYER)] if "layer" in step.per else [])


def _outputs(root: Path, name: str) -> list[Path]:
    """The folders and published files one stage instance writes (dvc.yaml's outs)."""
    if name == "import":
        return [root / IMPORT[-1]]
    step = study.STEP[name]
    spec = __import__("stages").load(step.stage)
    templates = [step.paths[w] for w in spec.writes] + [*step.metrics.values(), *step.plots.values()]
    return [root / study.resolve(t, study.WORK, "synthetic", LAYER) for t in templates]


def _run(root: Path, name: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(name), cwd=root, env=_env(_outputs(root, name), **env), capture_output=True,
                          text=True)


def _plain(record):
    """A JSON or torch.load'ed record without timings, tensors as (dtype, shape, bytes), so == compares it."""
    if isinstance(record, torch.Tensor):
        return str(record.dtype), tuple(record.shape), record.numpy().tobytes()
    if isinstance(record, dict):
        return {k: _plain(v) for k, v in record.items() if not TIMING.search(str(k))}
    if isinstance(record, (list, tuple)):
        return [_plain(v) for v in record]
    return record


def _read(p: Path) -> object:
    if p.suffix == ".json":
        return _plain(json.loads(p.read_text()))
    if p.suffix == ".pt":  # trainer states also record their wall time
        return _plain(torch.load(p, weights_only=True))
    return p.read_bytes()


def _content(paths: list[Path]) -> dict[str, object]:
    """Every file under the outputs: JSON and trainer states without their timings, any other file byte
    for byte."""
    out: dict[str, object] = {}
    for top in paths:
        for p in sorted([top] if top.is_file() else top.rglob("*")):
            if not p.is_file() or p.name == ".lock":
                continue
            key = str(p.relative_to(top.parent))
            out[key] = _read(p)
    return out


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The study's stage instances for one dataset and layer, tiny settings, each run once cleanly,
    counting its writes."""
    root = tmp_path_factory.mktemp("killed")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pretrain"].update(steps=6, batch_size=16, warmup_steps=1, eval_images=40)
    params["data"].update(limit=48, datasets=["synthetic"])
    params["sae_data"]["limit"] = 48
    params["extract"]["layers"] = [LAYER]
    params["sae"].update(total_tokens=20_000, batch_images=16, warmup_steps=5)
    params["mask"].update(ks=[1, 10, "all"], n_seeds=1, probe_images=16)
    params["summary"]["ks"] = [10]
    params["adapt"].update(shots=1, epochs=2, test_limit=40)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    rng = np.random.default_rng(0)
    np.save(root / "acts.npy", rng.standard_normal((40, 5, 16)).astype(np.float16))
    np.save(root / "labels.npy", np.arange(40) % 3)
    writes = {}
    for name in ORDER:
        for p in _outputs(root, name):  # as in the tests: Path.mkdir(parents=True) tries the output folder twice
            p.parent.mkdir(parents=True, exist_ok=True)
        result = _run(root, name, FAULT_COUNT_FILE=str(root / "count"))
        assert result.returncode == 0, result.stdout + result.stderr
        writes[name] = int((root / "count").read_text())
    return root, writes


def _kill_at(point: str, n_writes: int) -> int:
    return {"creation": 3, "midway": max(4, n_writes // 2), "last write": n_writes}[point]


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("name", STEPS)
def test_a_killed_stage_reruns_to_the_uninterrupted_result(tiny_study, name, point):
    root, writes = tiny_study
    outputs = _outputs(root, name)
    reference = _content(outputs)
    backup = root.parent / f"{root.name}-backup"
    for p in outputs:  # the study stays in place: stores record absolute paths of their inputs
        (backup / p.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(p, backup / p.relative_to(root))
    try:
        killed = _run(root, name, FAULT_KILL_AT=str(_kill_at(point, writes[name])))
        assert killed.returncode == -9, f"not killed (exit {killed.returncode}):\n{killed.stderr[-2000:]}"
        rerun = _run(root, name)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        got = _content(outputs)
        assert sorted(got) == sorted(reference)
        differ = [k for k in reference if got[k] != reference[k]]
        assert not differ, f"{name} killed at {point}: these files differ from the uninterrupted run: {differ}"
    finally:
        for p in outputs:
            if p.exists():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            shutil.move(backup / p.relative_to(root), p)
        shutil.rmtree(backup, ignore_errors=True)
