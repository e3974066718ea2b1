"""Acceptance of the dvclive curves: `dvc exp show` lists what a train stage logged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from cache import jsonfile
from stages import importer
from tests.stages.test_dvc import _sh

TRAIN = {"cmd": "pipeline train --cache store --layer 0 --out sae --live sae-live --expansion 2 --tokens 3000 "
                "--batch-images 100 --warmup-steps 1 --log-every 5 --checkpoint-every 10 --device cpu --no-progress",
         "deps": ["store"], "outs": [{"sae": {"persist": True}}],
         "metrics": [{"sae-live/metrics.json": {"cache": False, "persist": True}}],
         "plots": [{"sae-live/plots/metrics": {"cache": False, "persist": True, "x": "step"}}]}


def _find(tree, key):
    """Every value stored under ``key`` anywhere in the JSON ``tree``."""
    if isinstance(tree, dict):
        return ([tree[key]] if key in tree else []) + [v for item in tree.values() for v in _find(item, key)]
    if isinstance(tree, list):
        return [v for item in tree for v in _find(item, key)]
    return []


@pytest.mark.slow
def test_dvc_exp_show_lists_the_live_metrics_of_a_train_run(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float16))
    importer.run(importer.Config(source_path=tmp_path / "x.npy", out_dir=tmp_path / "store"))
    (tmp_path / "x.npy").unlink()
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": TRAIN}}))
    _sh("git", "init", "-q", cwd=tmp_path)
    _sh("dvc", "init", "-q", cwd=tmp_path)
    _sh("git", "add", "-A", cwd=tmp_path)
    _sh("git", "commit", "-qm", "tiny", cwd=tmp_path)
    log = _sh("dvc", "exp", "run", cwd=tmp_path)
    assert "Running stage 'train'" in log and "dvclive" not in log, log  # dvclive stays quiet
    live = jsonfile.loads((tmp_path / "sae-live" / "metrics.json").read_text())
    last = jsonfile.loads((tmp_path / "sae" / "history.json").read_text())[-1]
    assert live["step"] == last["step"] and live["loss"] == last["loss"] and live["l0"] == last["l0"]
    shown = [m["data"] for m in _find(json.loads(_sh("dvc", "exp", "show", "--json", cwd=tmp_path)),
                                      "sae-live/metrics.json") if "data" in m]  # the workspace and the experiment
    assert live in shown, shown
    plots = json.loads(_sh("dvc", "plots", "show", "--json", "--split", cwd=tmp_path))
    curve = _find(plots, "sae-live/plots/metrics/loss.tsv")
    assert curve, "dvc plots show does not list the loss curve"
