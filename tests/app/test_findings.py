"""`pipeline findings` quotes mean per-class recall beside accuracy, and still reads metrics written without it."""

from __future__ import annotations

import copy

from app import findings


def _found() -> dict:
    table = {"clip": 0.9, "sae_all_on": 0.8, "on": {"50": 0.7}, "off": {"50": 0.2}}
    return {
        "pretrain": {"accuracy": 0.75, "mean_recall": 0.6, "n_classes": 4, "chance": 0.25, "final_loss": 1.5},
        "sae": {"dead_fraction": 0.0, "fvu": 0.1, "l0": 30.0},
        "sae_config": {"d_in": 8, "d_sae": 64, "arch": "relu"},
        "masking": {"accuracy": {**table, "random_on": {"50": {"mean": 0.1, "std": 0.01}},
                                 "random_off": {"50": {"mean": 0.85, "std": 0.02}}},
                    "mean_recall": {"clip": 0.85, "sae_all_on": 0.75, "on": {"50": 0.65}, "off": {"50": 0.15}}},
        "groundtruth": None,
        "adapt": {"base_accuracy": 0.5, "adapted_accuracy": 0.7, "probe_accuracy": 0.6, "base_mean_recall": 0.45,
                  "adapted_mean_recall": 0.66, "probe_mean_recall": 0.55, "n_test_images": 100, "shots": 4},
        "remap": None,
    }


def test_findings_quote_mean_recall_beside_accuracy():
    text = "\n".join(findings.lines(_found(), "synthetic", 3))
    assert "75.0 % zero-shot (mean per-class recall 60.0 %)" in text
    assert "plain CLIP scores 0.900 (mean per-class recall 0.850)" in text
    assert "all latents on: 0.800 (mean per-class recall 0.750)" in text
    assert "**0.200** (mean per-class recall 0.150)" in text and "gives 0.700 (mean per-class recall 0.650)" in text
    assert "0.500 → 0.700 (mean per-class recall 0.450 → 0.660)" in text


def test_findings_read_metrics_written_before_mean_recall():
    old = copy.deepcopy(_found())
    del old["pretrain"]["mean_recall"], old["masking"]["mean_recall"]
    for key in ("base_mean_recall", "adapted_mean_recall", "probe_mean_recall"):
        del old["adapt"][key]
    text = "\n".join(findings.lines(old, "synthetic", 3))
    assert "recall" not in text
    assert "75.0 % zero-shot on the 4 classes" in text and "0.500 → 0.700 on 100 test images" in text


def test_a_convnext_study_speaks_of_stages_not_blocks():
    assert findings.layer_unit({"model": {"name": "tiny-convnext-clip"}}) == "stage"
    assert findings.layer_unit({"model": {"name": "tiny-clip"}}) == "block"
    text = "\n".join(findings.lines(_found(), "synthetic", 0, "stage"))
    assert "**SAE** (stage 0, one for every dataset" in text and "block" not in text
