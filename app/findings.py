"""What a finished study found, in a few lines: `pipeline findings`.

Reads the metrics the study published under work/ (the files dvc.yaml declares) for one
dataset and block, and says what they show: the model's zero-shot accuracy, the SAE's
reconstruction and sparsity, the masking drops, ground-truth coverage (synthetic world),
and the adaptation and remap results. `make demo` ends with it; `make figures` writes it
into README.md between its ``findings`` markers, so the README's figures are always the
output of the committed code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from app import study
from cache.errors import UserError

BEGIN, END = "<!-- findings:begin (written by `make figures`) -->", "<!-- findings:end -->"
COVERED_AUROC = 0.95  # a value is covered when some latent detects it at this AUROC (groundtruth stage)
MASK_K = "50"  # the masking figures quoted: the class's top-50 latents (else the largest k of the sweep)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _published(step: str, field: str) -> str:
    return study.STEP[step].metrics[field]


def collect(work: Path, dataset: str, layer: int) -> dict[str, Any]:
    """The published metrics of one dataset and block (None for stages not run)."""
    def at(template: str) -> Path:
        return study.resolve(template, work, dataset, layer)

    found = {
        "pretrain": _read(at(_published("pretrain", "metrics_path"))),
        "sae": _read(at(_published("train", "metrics_path"))),
        "sae_config": _read(at(study.SAE + "/config.json")),
        "masking": _read(at(_published("mask", "results_path"))),
        "groundtruth": _read(at(_published("groundtruth", "groundtruth_path"))),
        "adapt": _read(at(_published("adapt", "metrics_path"))),
        "remap": _read(at(_published("remap", "results_path"))),
        "summary": _read(at(study.STEP["summary"].paths["out_dir"] + "/summary.json")),
    }
    if found["sae"] is None:
        raise UserError(f"no trained SAE under {at(study.SAE)}; run the study first (`dvc repro` or `make demo`)")
    return found


def _summary_lines(record: Mapping[str, Any], layer: int, unit: str) -> list[str]:
    """The cross-dataset table of one block: remap groups, adaptation, top-k masking drops."""
    from stages.summary import table_lines

    rows = {d: {key: row for key, row in layers.items() if key == f"layer{layer}"}
            for d, layers in record["datasets"].items()}
    return ["", f"Across datasets, one SAE ({unit} {layer}; work/summary/index.html):", "",
            *table_lines(rows, tuple(record["ks"]))]


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _recall(x: float | None, fmt: str = "pct") -> str:
    """`` (mean per-class recall …)``, or nothing for metrics written before it was reported."""
    if x is None:
        return ""
    return f" (mean per-class recall {_pct(x) if fmt == 'pct' else f'{x:.3f}'})"


def lines(f: Mapping[str, Any], dataset: str, layer: int, unit: str = "block") -> list[str]:
    """The findings as Markdown bullets; ``unit`` names what a layer is (``layer_unit``)."""
    out = []
    if (p := f["pretrain"]) is not None:
        out.append(f"- **Tiny CLIP**: {_pct(p['accuracy'])} zero-shot{_recall(p.get('mean_recall'))} on the "
                   f"{p['n_classes']} classes of the "
                   f"synthetic world (chance {_pct(p['chance'])}), final loss {p['final_loss']:.3f}.")
    s, c = f["sae"], f["sae_config"] or {}
    dead = "no dead latents" if not s["dead_fraction"] else f"{_pct(s['dead_fraction'])} dead"
    out.append(f"- **SAE** ({unit} {layer}, one for every dataset, {c.get('d_in', '?')} → {c.get('d_sae', '?'):,}, "
               f"{c.get('arch', '?')}): FVU {s['fvu']:.3f}, L0 {s['l0']:.0f}, {dead}.")
    if (m := f["masking"]) is not None:
        a, r = m["accuracy"], m.get("mean_recall") or {}
        ks = [k for k in a["off"] if k.isdigit()]
        k = MASK_K if MASK_K in ks else max(ks, key=int, default=None)
        if k is not None:
            off, on, r_off, r_on = a["off"][k], a["on"][k], a["random_off"][k], a["random_on"][k]
            out.append(f"- **Masking**: plain CLIP scores {a['clip']:.3f}{_recall(r.get('clip'), 'frac')} (through "
                       f"the SAE, all latents on: {a['sae_all_on']:.3f}{_recall(r.get('sae_all_on'), 'frac')}). "
                       f"Switching **off** each class's top-{k} latents drops it to "
                       f"**{off:.3f}**{_recall((r.get('off') or {}).get(k), 'frac')}; {k} random latents leave "
                       f"{r_off['mean']:.3f} ± {r_off['std']:.3f}. "
                       f"Keeping only the top-{k} **on** gives {on:.3f}{_recall((r.get('on') or {}).get(k), 'frac')}, "
                       f"{k} random ones "
                       f"{r_on['mean']:.3f} ± {r_on['std']:.3f}.")
    if (g := f["groundtruth"]) is not None and "best_auroc" in g:
        best = g["best_auroc"]
        covered = [v for v, auc in best.items() if auc >= COVERED_AUROC]
        shapes = {v: auc for v, auc in best.items() if v.startswith("shape=")}
        top_shape = max(shapes, key=shapes.get) if shapes else None
        shape_note = ("every shape covered" if shapes and all(v in covered for v in shapes) else
                      f"best shape {top_shape.split('=')[1]} at {shapes[top_shape]:.2f}" if top_shape else "")
        out.append(f"- **Ground truth**: {len(covered)} of {g['n_values']} attribute values have a latent with "
                   f"AUROC ≥ {COVERED_AUROC}: {', '.join(v.split('=')[1] for v in covered) or 'none'}"
                   f"{'; ' + shape_note if shape_note else ''}.")
    if (d := f["adapt"]) is not None:
        verdict = ("zero-shot already matches or beats the probe" if d["probe_accuracy"] <= d["base_accuracy"]
                   else f"the probe shows {_pct(d['probe_accuracy'] - d['base_accuracy'])} to gain")
        recall = (f" (mean per-class recall {d['base_mean_recall']:.3f} → {d['adapted_mean_recall']:.3f})"
                  if "base_mean_recall" in d else "")
        out.append(f"- **MaPLe**: {d['base_accuracy']:.3f} → {d['adapted_accuracy']:.3f}{recall} on "
                   f"{d['n_test_images']:,} test images; the {d['shots']}-shot linear probe reaches "
                   f"{d['probe_accuracy']:.3f} ({verdict}).")
    if (r := f["remap"]) is not None:
        o = r["overall"]
        out.append(f"- **Remap** of the relevant latents: {_pct(o['high_high'])} high→high, {_pct(o['partial'])} "
                   f"partial, {_pct(o['low_high'])} low→high, {_pct(o['high_low'])} high→low.")
    if (t := f.get("summary")) is not None:
        out += _summary_lines(t, layer, unit)
    return out


def layer_unit(params: Mapping[str, Any]) -> str:
    """What a layer index of the study's model counts: a ViT's blocks, a ConvNeXt's stages."""
    from pipeline.models import names_convnext

    return "stage" if names_convnext(str((params.get("model") or {}).get("name", ""))) else "block"


def default_instance(params: Mapping[str, Any]) -> tuple[str, int]:
    """The study's first dataset and last tapped block: what the README reports."""
    dataset = study.data_section(params).datasets[0]
    layers = study.config_for(study.STEP["extract"], params, dataset, None).layers
    return dataset, layers[-1]


def write_into(readme: Path, text: str) -> None:
    """Replace what stands between the findings markers of ``readme`` with ``text``."""
    body = readme.read_text()
    if BEGIN not in body or END not in body:
        raise UserError(f"{readme} has no findings markers ({BEGIN} … {END}); add them where the figures go")
    head, rest = body.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
