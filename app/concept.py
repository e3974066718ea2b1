"""Concept addition: does adaptation give a model a concept its pretraining never showed?

The paper (SCIENCE.md, adaptation analysis) finds that adaptation mostly remaps concepts the
base model already has, and leaves open whether it can add new ones.  Real data cannot
separate the two, because nobody knows which concepts a web-pretrained CLIP has seen.  The
synthetic world can:

1. pretrain a tiny CLIP on a world with ``held_out`` values (default texture=checker): no
   training image shows them and no caption names them;
2. run the study on two downstream tasks of the synthetic dataset, each through an SAE trained
   on the base model's activations of its pretraining distribution (params ``sae_data``, which
   never shows the held-out value either, as in app/study.py): the *held-out* task (default ``texture``; its
   classes include the held-out value, images may show it) and the *control* task (default
   ``background``; only seen values);
3. adapt the model to each task (MaPLe, few-shot) and build the remap table of each
   (pipeline/remap.py: which latents are high for a class in the base and in the adapted model).

If adaptation adds the missing concept, the held-out class gains latents that were low for it
in the base model (low->high) while the control's classes do not.  Output folder:

    pretrain/                    the tiny CLIP with the held-out world (pipeline pretrain)
    <task>/...                   the study of each task (layout of app/study.py: sae-data/, sae/, synthetic/)
    concept.json                 both remap summaries, accuracies and the comparison (below)
    concept.md, concept.png      the comparison as a table and as bars

Every step is a stage run with its own resume and refusal rules, so rerunning the command
after an interruption continues where it stopped; finished steps are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from app import study
from app.params import load_params
from cache.atomic import atomic_write, write_json
from cache.errors import UserError
from pipeline.configs import Stage
from pipeline.plots import plt
from pipeline.remap import GROUP_LABELS, GROUPS, percent, read_results, results_path
from pipeline.world import TASKS, SyntheticWorld, WorldConfig, parse_held_out
from stages import adapt as adapt_stage
from stages import pretrain

log = logging.getLogger(__name__)

RESULTS_FILE = "concept.json"
TABLE_FILE = "concept.md"
PLOT_FILE = "concept.png"
ROLES = ("held_out", "control")
# each task's study, as dvc.yaml runs it, without the masking sweeps (the remap table needs none)
STEPS = ("extract-sae", "train", "extract", "encode", "stats", "adapt", "extract-adapted", "encode-adapted", "stats-adapted", "remap")
UNMASKED = ("base_masking", "adapted_masking")
DEFINITIONS = {
    "held_out_classes": "classes of the held-out task whose defining value was held out of pretraining",
    "low_high": "latents low for the class in the base model and high in the adapted one (stages/remap.py), "
                "per class: count and fraction of the class's relevant latents",
    "comparison": "mean low->high fraction over the held-out classes vs over every class of the control task "
                  "(and over the held-out task's seen classes)",
}


def _show(held_out) -> str:
    """Held-out pairs as the command line writes them: 'texture=checker, shape=ring'."""
    return ", ".join(f"{a}={v}" for a, v in held_out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """One concept-addition experiment; the study settings come from a params file."""

    out_dir: Path  # experiment folder to create or resume (pretrain/, <task>/, concept.json, concept.md, concept.png)
    params: Path = Path("params.yaml")  # study settings: pretrain, data, extract, sae, encode, stats, adapt, remap
    held_out: tuple[tuple[str, str], ...] = (("texture", "checker"),)  # attribute value pretraining never shows
    task: str = "texture"  # downstream task whose classes need a held-out value
    control: str = "background"  # downstream task built from seen values only
    layer: int | None = None  # block whose SAE is compared (default: the first of extract.layers)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "params", Path(self.params))
        object.__setattr__(self, "held_out", parse_held_out(self.held_out))
        if not self.held_out:
            raise UserError("--held-out needs at least one attribute value, e.g. texture=checker")
        for option, task in (("--task", self.task), ("--control", self.control)):
            if task not in TASKS:
                raise UserError(f"unknown {option} '{task}'; choose one of: {', '.join(TASKS)}")
        held_attributes = {attribute for attribute, _ in self.held_out}
        if not held_attributes & set(TASKS[self.task]):
            raise UserError(f"--task {self.task} has no class that needs a held-out value "
                            f"({', '.join(f'{a}={v}' for a, v in self.held_out)}); pick the task of that attribute")
        if held_attributes & set(TASKS[self.control]):
            raise UserError(f"--control {self.control} has classes with a held-out value; the control must be "
                            "built from seen values only, e.g. background")


@dataclasses.dataclass(frozen=True)
class Outputs:
    out_dir: Path
    results_path: Path
    table_path: Path
    plot_path: Path
    table_lines: tuple[str, ...]
    held_out_low_high: float | None  # mean low->high fraction of the held-out classes
    control_low_high: float | None  # mean low->high fraction of the control's classes
    seconds: float


def held_out_classes(task: str, held_out: tuple[tuple[str, str], ...]) -> list[str]:
    """Class names of ``task`` whose attribute values include a held-out one."""
    world = SyntheticWorld(WorldConfig(task=task, held_out=held_out), n_images=1, allow_held_out=True)
    held = set(held_out)
    return [name for name, values in zip(world.class_names, world.class_attributes)
            if any((attribute, value) in held for attribute, value in values.items())]


def _study_params(cfg: Config, loaded: dict[str, Any], task: str) -> dict[str, Any]:
    """The params file's settings (``loaded``) with this experiment's world, task, model and layer."""
    params = {name: dict(section or {}) for name, section in loaded.items()}
    params.setdefault("extract", {})["layers"] = [_layer(cfg, params)]
    params.setdefault("pretrain", {})["held_out"] = [list(pair) for pair in cfg.held_out]
    params.setdefault("data", {}).update(datasets=[study.WORLD_DATASET], task=task,
                                         allow_held_out=any(a in TASKS[task] for a, _ in cfg.held_out))
    params["model"] = {"name": params["pretrain"].get("model", "tiny-clip"),
                       "pretrained": str(study.resolve(study.PRETRAIN, cfg.out_dir, None, None) / pretrain.MODEL_NAME)}
    return params


def _layer(cfg: Config, params: dict[str, Any]) -> int:
    layers = params.get("extract", {}).get("layers") or []
    if cfg.layer is not None:
        return cfg.layer
    if not layers:
        raise UserError(f"{cfg.params} lists no extract.layers; pass --layer")
    return int(layers[0])


def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    loaded = load_params(cfg.params)
    base_params = _study_params(cfg, loaded, cfg.task)
    layer = base_params["extract"]["layers"][0]
    log.info("pretrain: the tiny CLIP without %s ...", _show(cfg.held_out))
    log.info("%s", study.run_step(study.STEP["pretrain"], base_params, work=cfg.out_dir))
    results: dict[str, Any] = {}
    for role, task in zip(ROLES, (cfg.task, cfg.control)):
        params = _study_params(cfg, loaded, task)
        where = {"work": cfg.out_dir / task, "dataset": study.WORLD_DATASET, "layer": layer}
        for name in STEPS:
            log.info("%s task (%s), %s ...", task, role.replace("_", "-"), name)
            log.info("%s task: %s", task, study.run_step(study.STEP[name], params, **where, drop=UNMASKED))
        results[role] = _side(task, where, cfg.held_out)
    record = {"held_out": [list(pair) for pair in cfg.held_out], "layer": layer,
              "tasks": {role: results[role]["task"] for role in ROLES}, **_compare(results),
              "sides": results, "definitions": DEFINITIONS}
    lines = _table(record)
    write_json(cfg.out_dir / RESULTS_FILE, record)
    atomic_write(cfg.out_dir / TABLE_FILE, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    _plot(cfg.out_dir / PLOT_FILE, record)
    return Outputs(out_dir=cfg.out_dir, results_path=cfg.out_dir / RESULTS_FILE,
                   table_path=cfg.out_dir / TABLE_FILE, plot_path=cfg.out_dir / PLOT_FILE, table_lines=tuple(lines),
                   held_out_low_high=record["held_out_low_high"], control_low_high=record["control_low_high"],
                   seconds=time.perf_counter() - started)


def _side(task: str, where: dict[str, Any], held_out: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """One task's remap summary, per-class low->high and adaptation accuracies."""
    remap_dir = study.resolve(study.STEP["remap"].paths["out_dir"], **where)
    adapter = study.resolve(study.STEP["adapt"].paths["out_dir"], **where)
    remap = read_results(remap_dir)
    adapt = json.loads((adapter / adapt_stage.METRICS_NAME).read_text())
    accuracy = adapt.get("per_class") or {}
    per_class = {name: {"relevant": row["relevant"], "low_high": row["low_high"],
                        "n_low_high": (round(row["low_high"] * row["relevant"])
                                       if row["low_high"] is not None else 0),
                        "base_accuracy": (accuracy.get(name) or {}).get("base"),
                        "adapted_accuracy": (accuracy.get(name) or {}).get("adapted")}
                 for name, row in remap["per_class"].items()}
    return {"task": task, "held_out_classes": held_out_classes(task, held_out), "overall": remap["overall"],
            "per_class": per_class,
            "accuracy": {k: adapt.get(k) for k in ("base_accuracy", "probe_accuracy", "adapted_accuracy")},
            "remap": str(results_path(remap_dir)), "adapter": str(adapter)}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _compare(results: dict[str, Any]) -> dict[str, Any]:
    held, control = results["held_out"], results["control"]
    new = held["held_out_classes"]
    return {
        "held_out_low_high": _mean([held["per_class"][c]["low_high"] for c in new]),
        "seen_low_high": _mean([row["low_high"] for c, row in held["per_class"].items() if c not in new]),
        "control_low_high": _mean([row["low_high"] for row in control["per_class"].values()]),
    }



def _table(record: dict[str, Any]) -> list[str]:
    held = _show(record["held_out"])
    lines = [f"concept addition at layer {record['layer']}: pretraining never showed {held}",
             f"low->high (mean fraction of a class's relevant latents): held-out classes "
             f"{percent(record['held_out_low_high'])}, the task's seen classes {percent(record['seen_low_high'])}, "
             f"control classes {percent(record['control_low_high'])}", "",
             "| task | class | relevant | low->high | base zero-shot | adapted |", "|---|---|---|---|---|---|"]
    for role in ROLES:
        side = record["sides"][role]
        for name, row in side["per_class"].items():
            mark = " (held out)" if name in side["held_out_classes"] else ""
            lines.append(f"| {side['task']} | {name}{mark} | {row['relevant']} | {row['n_low_high']} "
                         f"({percent(row['low_high'])}) | {percent(row['base_accuracy'])} | "
                         f"{percent(row['adapted_accuracy'])} |")
        acc = side["accuracy"]
        lines.append(f"| {side['task']} | all classes | | | {percent(acc['base_accuracy'])} | "
                     f"{percent(acc['adapted_accuracy'])} |")
    return lines


def _plot(path: Path, record: dict[str, Any]) -> None:
    """Group shares of each task, and low->high per class (held-out classes highlighted)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    width = 0.38
    for k, role in enumerate(ROLES):
        overall = record["sides"][role]["overall"]
        shares = [overall.get(g) or 0.0 for g in GROUPS]
        left.bar(np.arange(len(GROUPS)) + (k - 0.5) * width, shares, width,
                 label=f"{record['sides'][role]['task']} ({role.replace('_', '-')})")
    left.set_xticks(np.arange(len(GROUPS)), [GROUP_LABELS[g] for g in GROUPS])
    left.set_ylabel("share of relevant latents (pooled)")
    left.legend(fontsize=8)
    names, values, colours = [], [], []
    for role in ROLES:
        side = record["sides"][role]
        for name, row in side["per_class"].items():
            names.append(f"{side['task']}: {name}")
            values.append(row["low_high"] or 0.0)
            colours.append("tab:red" if name in side["held_out_classes"] else
                           ("tab:blue" if role == "held_out" else "tab:grey"))
    right.bar(np.arange(len(names)), values, color=colours)
    right.set_xticks(np.arange(len(names)), names, rotation=60, ha="right", fontsize=7)
    right.set_ylabel("low->high fraction of the class")
    right.set_title("red: class of a held-out value; blue: seen classes of that task; grey: control", fontsize=9)
    fig.suptitle(f"Concept addition, layer {record['layer']}: held out "
                 + _show(record["held_out"]))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


__all__ = ["Config", "Outputs", "run", "held_out_classes"]


def summary(out: Outputs) -> str:
    return "\n".join([*out.table_lines, f"-> {out.results_path}, {out.table_path}, {out.plot_path} ({out.seconds:.0f} s)"])


STAGE = Stage(name="concept-addition", config=Config, run=run, summary=summary, reads=("params",),
              writes=("out_dir",), persist=True,
              help="""Can adaptation add a concept pretraining never showed? Pretrain a tiny CLIP without the
    held-out value, then adapt it to a task that needs that value and to a control task, and
    compare their remap tables: new concepts show as low->high latents of the held-out class.

    Rerunning the same command resumes; finished steps are skipped.""")
