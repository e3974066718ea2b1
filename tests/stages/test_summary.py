"""The cross-dataset summary: every column is the published number it claims to be."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cache.errors import UserError
from stages import summary


def _publish(metrics: Path, dataset: str, layer: int, seed: float) -> None:
    def put(rel: str, record: dict) -> None:
        path = metrics / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))

    put(summary.ADAPT_FILE.format(dataset=dataset), {"base_accuracy": 0.5 + seed, "adapted_accuracy": 0.8 + seed,
                                                     "base_mean_recall": 0.4 + seed, "adapted_mean_recall": 0.7 + seed})
    acc = {"clip": 0.9, "sae_all_on": 0.85 - seed, "off": {"10": 0.6 - seed, "50": 0.3, "all": 0.05},
           "on": {"10": 0.4}, "random_off": {"10": {"mean": 0.84, "std": 0.01}, "50": {"mean": 0.8, "std": 0.02}}}
    put(summary.MASKING_FILE.format(dataset=dataset, layer=layer), {"accuracy": acc})
    put(summary.REMAP_FILE.format(dataset=dataset, layer=layer),
        {"overall": {"high_high": 0.6 + seed, "partial": 0.2, "low_high": 0.15 - seed, "high_low": 0.05},
         "n_relevant": 40})


def test_each_row_is_the_published_numbers(tmp_path):
    metrics = tmp_path / "metrics"
    for i, dataset in enumerate(("synthetic", "synthetic-texture")):
        _publish(metrics, dataset, 3, seed=i / 100)
    out = summary.run(summary.Config(metrics_dir=metrics, datasets=("synthetic", "synthetic-texture"), layers=(3,),
                                     out_dir=tmp_path / "summary"))
    rows = json.loads(out.results_path.read_text())["datasets"]
    texture = rows["synthetic-texture"]["layer3"]
    assert texture["high_high"] == pytest.approx(0.61) and texture["low_high"] == pytest.approx(0.14)
    assert texture["base_accuracy"] == pytest.approx(0.51) and texture["adapted_mean_recall"] == pytest.approx(0.71)
    assert texture["drop_off_10"] == pytest.approx((0.85 - 0.01) - (0.6 - 0.01))
    assert texture["drop_off_50"] == pytest.approx(0.84 - 0.3)
    assert texture["drop_random_off_50"] == pytest.approx(0.84 - 0.8)
    assert rows["synthetic"]["layer3"]["drop_random_off_10"] == pytest.approx(0.85 - 0.84)
    table = out.table_path.read_text().splitlines()
    assert len(table) == 2 + 2 and table[3].startswith("| synthetic-texture | 3 | 0.610 | 0.200 | 0.140 | 0.050 |")
    with open(tmp_path / "summary" / "summary.csv") as f:
        records = list(csv.DictReader(f))
    assert [r["dataset"] for r in records] == ["synthetic", "synthetic-texture"]
    assert float(records[1]["drop_off_10"]) == pytest.approx(0.25)
    page = out.page_path.read_text()
    assert "synthetic-texture" in page and "summary.png" in page and out.plot_path.stat().st_size > 1000


def test_a_missing_dataset_names_the_stage_to_run(tmp_path):
    _publish(tmp_path / "metrics", "synthetic", 3, 0.0)
    cfg = summary.Config(metrics_dir=tmp_path / "metrics", datasets=("synthetic", "eurosat"), layers=(3,),
                         out_dir=tmp_path / "summary")
    with pytest.raises(UserError, match=r"eurosat/adapt.json is missing: run the adapt@eurosat stage"):
        summary.run(cfg)


def test_a_k_the_masking_run_did_not_sweep_is_refused(tmp_path):
    _publish(tmp_path / "metrics", "synthetic", 3, 0.0)
    cfg = summary.Config(metrics_dir=tmp_path / "metrics", datasets=("synthetic",), layers=(3,), ks=(20,),
                         out_dir=tmp_path / "summary")
    with pytest.raises(UserError, match="summary.ks has 20, which the masking run of synthetic"):
        summary.run(cfg)
