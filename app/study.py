"""The study that `dvc repro` runs: which stage instances exist, where their files live, which
params.yaml sections set them.

The shape is the paper's: for each tapped block, **one** SAE is trained on one dataset
(``sae_data``; the paper: ImageNet train, the offline default: the tiny CLIP's own pretraining
distribution), and every dataset of ``data.datasets`` is encoded, analysed, masked, adapted
(MaPLe) and remapped through that same SAE. A ``summary`` stage then lays the datasets side by
side (the paper's Table 1). Training one SAE per dataset is the setting
``sae_data.dataset = <that dataset>`` with ``data.datasets = [<that dataset>]``, one experiment per
dataset (README, "One SAE or one per dataset").

Every DVC stage is one row of :data:`STEPS`: a registered stage (stages/), the folders its
Config's path fields are bound to, and the params sections that set the rest. dvc.yaml is
generated from this table (`pipeline dvc-yaml`), and `pipeline run-stage NAME [--dataset D]
[--layer L]` runs one instance from it, so the graph DVC sees and the work done are the same.
Everything is written under ``work/``:

    work/pretrain/                          the tiny CLIP (pretrain), + pretrain-live/
    work/sae-data/acts                      activation store of the SAE's training images (extract-sae)
    work/sae/layer<L>                       the SAE of block L (train), + layer<L>-live/
    work/<dataset>/acts                     activation store, every layer of extract.layers (extract)
    work/<dataset>/adapter                  MaPLe prompts (adapt), + adapter-live/
    work/<dataset>/adapted-acts             activation store of the adapted model (extract-adapted)
    work/<dataset>/layer<L>/codes           sparse codes through the SAE of block L (encode)
    work/<dataset>/layer<L>/stats           per-latent statistics (stats)
    work/<dataset>/layer<L>/masking         masking sweep (mask), + masking-accuracy_vs_k.png
    work/<dataset>/layer<L>/groundtruth     SAE latents vs the world's attributes (groundtruth; synthetic only)
    work/<dataset>/layer<L>/adapted/codes   the adapted model through the same SAE (encode-adapted),
                               .../stats    its statistics (stats-adapted), .../masking its masking (mask-adapted)
                               .../remap    the remap table (remap), + remap.png
    work/<dataset>/layer<L>/report          HTML report (report)
    work/metrics/...                        every stage's numbers, published for `dvc metrics show`
    work/summary/                           the cross-dataset table, plot and page (summary)

A dataset key is a dataset name (`pipeline extract --help`) or ``synthetic-<task>``: the
synthetic world with that task's classes (pipeline/world.py TASKS), so one study can read
several downstream tasks of the same world through one SAE.

The model may be a ViT or a ConvNeXt (``model.name``, ``pretrain.model``); a ConvNeXt study taps
one stage, as its stages differ in shape and each dataset has one store (``check_tower_settings``).

A ``*-live/`` folder is the dvclive log of a training stage (pipeline/livelog.py): its
metrics.json and plots/metrics are dvc.yaml metrics and plots, which `dvc exp show`, `dvc plots
show` and the VS Code extension read while the stage runs.

Stages run with ``overwrite``: DVC reruns a stage exactly when its params or inputs changed,
and the old outputs then belong to a config that no longer exists. Resumable outputs (stores,
checkpoints) are ``persist`` in dvc.yaml, so an interrupted repro resumes them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import stages
from cache import jsonfile
from cache.atomic import atomic_write
from cache.errors import UserError
from cache.store import StoreLock
from pipeline import livelog
from pipeline.configs import from_section

WORK = Path("work")
WORLD_DATASET = "synthetic"  # the only dataset with ground truth (and its synthetic-<task> keys)
PRETRAIN = "{work}/pretrain"
SAE_DATA = "{work}/sae-data"
SAE = "{work}/sae/layer{layer}"
DATA = "{work}/{dataset}"
RUN = "{work}/{dataset}/layer{layer}"
METRICS = "{work}/metrics"  # every published metrics file; the summary stage depends on the folder
DATA_METRICS = METRICS + "/{dataset}"
RUN_METRICS = METRICS + "/{dataset}/layer{layer}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    """params.yaml ``data``: the datasets read through the SAE, and how each is read."""

    datasets: tuple[str, ...] = ("synthetic",)  # each is encoded, analysed, adapted and remapped (dvc.yaml matrix)
    roots: Mapping[str, Any] | None = None  # local folder of each dataset (synthetic needs none)
    split: str | None = None  # null = each dataset's default split
    splits: Mapping[str, Any] | None = None  # per dataset key, a split that replaces ``split`` (eurosat: test)
    limit: int | None = None  # images per dataset (synthetic: how many to generate)
    seed: int = 0  # seed of the subset and of the synthetic images
    task: str = "shape_colour"  # the key 'synthetic' only: which attributes make the classes
    allow_held_out: bool = False  # synthetic only: may images show values pretrain.held_out kept from the model?


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaeDataSection:
    """params.yaml ``sae_data``: the images every block's one SAE is trained on (paper: ImageNet train)."""

    dataset: str = "synthetic"  # a dataset key, like those of data.datasets
    root: str | None = None  # its local folder (synthetic needs none)
    split: str | None = None  # null = the dataset's default split
    limit: int | None = None  # images (null = all; synthetic: how many to generate)
    seed: int = 1  # seed of the subset and of the synthetic images (not data.seed: other images than the analysed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """params.yaml ``model``: the CLIP every stage after pretrain reads."""

    name: str = "tiny-clip"  # open_clip model name
    pretrained: str = "none"  # open_clip tag, a checkpoint file, or none


@dataclasses.dataclass(frozen=True)
class Step:
    """One DVC stage: a registered stage bound to the study's folders.

    ``paths`` binds Config path fields to folders (templates over {work}, {dataset}, {layer});
    ``sections`` are the params.yaml sections that set it (``data``, ``sae_data`` and ``model``
    are the study's own, mapped onto the stage's fields; ``extract`` lends its ``layers`` to a
    stage with a ``layers`` field; any other section's keys are the Config's field names);
    ``metrics`` and ``plots`` publish Outputs paths where dvc.yaml declares them (outside the
    stage's folder, which DVC tracks as a whole).
    """

    name: str
    stage: str
    per: tuple[str, ...]  # matrix axes: () once, ("layer",), ("dataset",), or ("dataset", "layer")
    paths: Mapping[str, str]
    sections: tuple[str, ...]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # other bound Config values
    ignore: tuple[str, ...] = ()  # keys of the sections this step leaves at the Config's defaults
    metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)  # Outputs field -> published file
    plots: Mapping[str, str] = dataclasses.field(default_factory=dict)
    extra_deps: tuple[str, ...] = ()  # folders read through a params value (the tiny CLIP's model.pt)

    @property
    def section(self) -> str:
        """The section named after the stage's own settings (the last one listed)."""
        return self.sections[-1]


_MODEL_DEP = (PRETRAIN,)
STEPS: tuple[Step, ...] = (
    Step("pretrain", "pretrain", (), {"out_dir": PRETRAIN, "live_dir": PRETRAIN + "-live"}, ("pretrain",),
         metrics={"metrics_path": METRICS + "/pretrain.json"}),
    Step("extract-sae", "extract", (), {"out_dir": SAE_DATA + "/acts"}, ("sae_data", "model", "extract"),
         extra_deps=_MODEL_DEP),
    Step("train", "train", ("layer",),
         {"cache_dir": SAE_DATA + "/acts", "out_dir": SAE, "live_dir": SAE + "-live"}, ("sae",),
         metrics={"metrics_path": METRICS + "/sae/layer{layer}.json"}),
    Step("extract", "extract", ("dataset",), {"out_dir": DATA + "/acts"}, ("data", "model", "extract"),
         extra_deps=_MODEL_DEP),
    Step("encode", "encode", ("dataset", "layer"),
         {"cache_dir": DATA + "/acts", "sae_dir": SAE, "out_dir": RUN + "/codes"}, ("encode",)),
    Step("stats", "stats", ("dataset", "layer"),
         {"codes_dir": RUN + "/codes", "cache_dir": DATA + "/acts", "out_dir": RUN + "/stats"}, ("stats",),
         metrics={"summary_path": RUN_METRICS + "/stats.json"}),
    Step("mask", "mask", ("dataset", "layer"),
         {"cache_dir": DATA + "/acts", "sae_dir": SAE, "stats_dir": RUN + "/stats",
          "out_dir": RUN + "/masking"}, ("model", "mask"),
         metrics={"results_path": RUN_METRICS + "/masking.json"},
         plots={"plot_path": RUN + "/masking-accuracy_vs_k.png"}),
    Step("groundtruth", "groundtruth", ("dataset", "layer"),
         {"stats_dir": RUN + "/stats", "codes_dir": RUN + "/codes", "cache_dir": DATA + "/acts",
          "out_dir": RUN + "/groundtruth"}, ("groundtruth",),
         metrics={"groundtruth_path": RUN_METRICS + "/groundtruth.json"}),
    Step("report", "report", ("dataset", "layer"),
         {"stats_dir": RUN + "/stats", "groundtruth_dir": RUN + "/groundtruth", "out_dir": RUN + "/report"},
         ("report",)),
    Step("adapt", "adapt", ("dataset",), {"out_dir": DATA + "/adapter", "live_dir": DATA + "/adapter-live"},
         ("data", "model", "adapt"),
         metrics={"metrics_path": DATA_METRICS + "/adapt.json"}, extra_deps=_MODEL_DEP),
    Step("extract-adapted", "extract", ("dataset",), {"adapter": DATA + "/adapter", "out_dir": DATA + "/adapted-acts"},
         ("data", "model", "extract"), extra_deps=_MODEL_DEP),
    Step("encode-adapted", "encode", ("dataset", "layer"),
         {"cache_dir": DATA + "/adapted-acts", "sae_dir": SAE, "out_dir": RUN + "/adapted/codes"},
         ("encode",)),
    Step("stats-adapted", "stats", ("dataset", "layer"),
         {"codes_dir": RUN + "/adapted/codes", "cache_dir": DATA + "/adapted-acts", "out_dir": RUN + "/adapted/stats"},
         ("stats",), fixed={"plots": False}),
    Step("mask-adapted", "mask", ("dataset", "layer"),
         {"cache_dir": DATA + "/adapted-acts", "sae_dir": SAE, "stats_dir": RUN + "/stats",
          "adapter": DATA + "/adapter", "out_dir": RUN + "/adapted/masking"}, ("model", "mask"),
         ignore=("head", "templates"),  # the adapted model is read out by its own prompts
         metrics={"results_path": RUN_METRICS + "/masking-adapted.json"}),
    Step("remap", "remap", ("dataset", "layer"),
         {"base_dir": RUN + "/stats", "adapted_dir": RUN + "/adapted/stats", "base_masking": RUN + "/masking",
          "adapted_masking": RUN + "/adapted/masking", "out_dir": RUN + "/adapted/remap"}, ("remap",),
         metrics={"results_path": RUN_METRICS + "/remap.json"}, plots={"plot_path": RUN + "/remap.png"}),
    Step("summary", "summary", (), {"metrics_dir": METRICS, "out_dir": "{work}/summary"},
         ("data", "extract", "summary"),
         metrics={"results_path": "{work}/summary-metrics.json"}, plots={"plot_path": "{work}/summary.png"}),
)
STEP = {s.name: s for s in STEPS}
SECTIONS = ("pretrain", "sae_data", "data", "model", "extract", "sae", "encode", "stats", "mask", "groundtruth",
            "adapt", "remap", "report", "summary")


def check_sections(params: Mapping[str, Any]) -> None:
    """An unknown top-level section is refused by name (a typo would otherwise be ignored)."""
    for name in params:
        if name not in SECTIONS:
            raise UserError(f"params.yaml: unknown section '{name}'; known sections: {', '.join(SECTIONS)}")


def data_section(params: Mapping[str, Any]) -> DataSection:
    data = from_section(DataSection, "data", params.get("data"), bound={})
    for key in data.datasets:
        dataset_of(key, data.task)
    return data


def sae_data_section(params: Mapping[str, Any]) -> SaeDataSection:
    section = from_section(SaeDataSection, "sae_data", params.get("sae_data"), bound={})
    dataset_of(section.dataset, "shape_colour")
    return section


def dataset_of(key: str, task: str) -> tuple[str, str | None]:
    """The dataset name and synthetic task of a dataset key (``synthetic-texture`` -> synthetic, texture)."""
    from pipeline.datasets import DATASET_NAMES
    from pipeline.world import TASKS

    if key in DATASET_NAMES:
        return key, (task if key == WORLD_DATASET else None)
    name, _, world_task = key.partition("-")
    if name == WORLD_DATASET and world_task in TASKS:
        return WORLD_DATASET, world_task
    raise UserError(f"unknown dataset '{key}' in params.yaml; use one of {', '.join(DATASET_NAMES)}, or "
                    f"synthetic-<task> with a task of {', '.join(TASKS)}")


def is_world(key: str | None) -> bool:
    """Does the dataset key name the synthetic world (the only data with ground truth)?"""
    return key is not None and (key == WORLD_DATASET or key.startswith(WORLD_DATASET + "-"))


def _bound_data(params: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """The data fields of one dataset key: its root from ``data.roots``, the shared rest (``task`` and
    ``allow_held_out`` shape the synthetic world only)."""
    data = data_section(params)
    name, task = dataset_of(dataset, data.task)
    world = {"synthetic_task": task, "allow_held_out": data.allow_held_out} if task is not None else {}
    split = (data.splits or {}).get(dataset, data.split)
    return {"dataset": name, "root": (data.roots or {}).get(dataset), "split": split, "limit": data.limit,
            "seed": data.seed, **world}


def _bound_sae_data(params: Mapping[str, Any]) -> dict[str, Any]:
    """The data fields of the SAE's training images (``sae_data``)."""
    section = sae_data_section(params)
    name, task = dataset_of(section.dataset, "shape_colour")
    world = {"synthetic_task": task} if task is not None else {}
    return {"dataset": name, "root": section.root, "split": section.split, "limit": section.limit,
            "seed": section.seed, **world}


def _bound_model(params: Mapping[str, Any]) -> dict[str, Any]:
    model = from_section(ModelSection, "model", params.get("model"), bound={})
    return {"model": model.name, "pretrained": model.pretrained}


def layers_of(params: Mapping[str, Any]) -> tuple[int, ...]:
    """extract.layers: the blocks the study taps (one SAE each)."""
    return tuple(config_for(STEP["extract"], params, data_section(params).datasets[0], None).layers)


def resolve(template: str, work: Path, dataset: str | None, layer: int | None) -> Path:
    return Path(template.format(work=work, dataset=dataset, layer=layer))


def config_for(step: Step, params: Mapping[str, Any], dataset: str | None, layer: int | None,
               work: Path = WORK, drop: tuple[str, ...] = ()) -> Any:
    """The stage Config of one instance: bound paths, the study's data and model values, and the
    step's own section, each value type-checked. ``drop`` leaves bound inputs unset."""
    spec = stages.load(step.stage)
    names = {f.name: f for f in dataclasses.fields(spec.config)}
    bound: dict[str, Any] = {field: resolve(t, work, dataset, layer) for field, t in step.paths.items()}
    if "data" in step.sections and "dataset" in step.per:
        bound.update(_bound_data(params, dataset))
    if "sae_data" in step.sections:
        bound.update(_bound_sae_data(params))
    if "model" in step.sections:
        bound.update(_bound_model(params))
    if "datasets" in names:
        bound["datasets"] = data_section(params).datasets
    if "layers" in names and step.stage != "extract":
        bound["layers"] = layers_of(params)
    if "layer" in step.per and "layer" in names and names["layer"].default is dataclasses.MISSING:
        bound["layer"] = layer
    # threads: the machine's, not the study's (default: the CPUs this process may use)
    bound.update({"overwrite": True, "progress": False, "threads": None, **step.fixed})
    bound = {k: v for k, v in bound.items() if k in names and k not in drop}
    own = {k: v for k, v in (params.get(step.section) or {}).items() if k not in step.ignore}
    return from_section(spec.config, step.section, own, bound=bound)


def _made_here(params: Mapping[str, Any], work: Path) -> bool:
    """Is the study's model the tiny CLIP its own pretrain stage makes?"""
    pretrained = Path(from_section(ModelSection, "model", params.get("model"), bound={}).pretrained)
    return pretrained.parent == resolve(PRETRAIN, work, None, None)


def missing_inputs(params: Mapping[str, Any], work: Path = WORK) -> list[str]:
    """Every input the study needs and cannot find (weights, dataset folders), one line each, so a
    study refuses before its first stage rather than hours into it."""
    from pipeline.datasets import SOURCES
    from pipeline.models import missing_weights

    model = from_section(ModelSection, "model", params.get("model"), bound={})
    why = None if _made_here(params, work) else missing_weights(model.name, model.pretrained)
    lines = [f"model.pretrained: {why}"] if why else []
    data, sae_data = data_section(params), sae_data_section(params)
    wanted = [("sae_data.root", sae_data.dataset, sae_data.root)]
    wanted += [(f"data.roots.{key}", key, (data.roots or {}).get(key)) for key in data.datasets]
    for setting, key, root in wanted:
        name, _ = dataset_of(key, data.task)
        if name in SOURCES and (root is None or not Path(str(root)).expanduser().is_dir()):
            where = "is not set" if root is None else f"is {root}, which does not exist"
            lines.append(f"{setting} ({key}) {where}: {SOURCES[name].how_to_get}, then set {setting} to that folder")
    return lines


def run_step(step: Step, params: Mapping[str, Any], dataset: str | None = None, layer: int | None = None,
             work: Path = WORK, drop: tuple[str, ...] = ()) -> str:
    """Run one instance and publish its metrics and plots where dvc.yaml declares them; returns
    the stage's summary."""
    spec = stages.load(step.stage)
    if step.stage == "pretrain" and not _made_here(params, work):
        out_dir = resolve(step.paths["out_dir"], work, None, None)
        with StoreLock(out_dir):  # one writer per folder, as every stage: a running pretrain is not overwritten
            atomic_write(out_dir / NOT_USED, lambda tmp: Path(tmp).write_text(
                "model.pretrained is not this folder's tiny CLIP: nothing to pretrain\n"))
        live = resolve(step.paths["live_dir"], work, None, None)  # dvc.yaml declares its files: they must exist
        (live / livelog.PLOTS_DIR).mkdir(parents=True, exist_ok=True)
        _publish_record({"used": 0}, live / livelog.METRICS_FILE)
        _publish_record({"used": 0}, resolve(step.metrics["metrics_path"], work, None, None))
        return "pretrain: not used (model.pretrained names other weights)"
    if step.stage == "groundtruth" and not is_world(dataset):
        from pipeline import groundtruth as gt

        out_dir = resolve(step.paths["out_dir"], work, dataset, layer)
        path = gt.write_not_applicable(out_dir, f"{dataset} has no ground-truth attributes; only the synthetic "
                                                "world does")
        _publish_metrics(path, resolve(step.metrics["groundtruth_path"], work, dataset, layer))
        return f"groundtruth: not applicable to {dataset}"
    if step.stage == "report" and not is_world(dataset):
        drop = (*drop, "groundtruth_dir")
    out = spec.run(config_for(step, params, dataset, layer, work, drop))
    for field, template in step.metrics.items():
        _publish_metrics(getattr(out, field), resolve(template, work, dataset, layer))
    for field, template in step.plots.items():
        dst = resolve(template, work, dataset, layer)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(getattr(out, field), dst)
    return f"{step.name}: {spec.summary(out)}"


NOT_USED = "NOT_USED.txt"  # what the pretrain stage leaves when the study reads other weights
NOT_METRICS = ("definitions", "provenance", "config", "per_class", "checks")  # stay in the stage's own file


def _numbers(record: Any) -> Any:
    """The numbers of a JSON record, nesting kept: what `dvc metrics show` should tabulate
    (definitions, provenance, settings, per-class detail and lists stay in the stage's own file)."""
    if isinstance(record, dict):
        kept = {k: _numbers(v) for k, v in record.items() if k not in NOT_METRICS}
        return {k: v for k, v in kept.items() if v is not None and v != {}}
    if isinstance(record, (int, float)) and not isinstance(record, bool):
        return record
    return None


def _publish_metrics(src: Path, dst: Path) -> None:
    _publish_record(json.loads(Path(src).read_text()), dst)


def _publish_record(record: Any, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(jsonfile.dumps(_numbers(record)) + "\n")


def check_tower_settings(params: Mapping[str, Any]) -> None:
    """Settings a ConvNeXt study cannot take, refused before its first stage: extract.layers of several shapes (the
    study keeps one activation store per dataset; a ViT's blocks share one shape, a ConvNeXt's stages never do, as
    each shrinks the map and widens it) and kept prompt tokens (its MaPLe prompts are channel offsets)."""
    from pipeline.models import names_convnext

    model = from_section(ModelSection, "model", params.get("model"), bound={})
    if not names_convnext(model.name):
        return
    layers = layers_of(params)
    if len(layers) > 1:
        raise UserError(f"extract.layers {list(layers)} are stages of the ConvNeXt {model.name}, which differ in "
                        "shape, and the study keeps one activation store per dataset: list one stage in "
                        "extract.layers (one experiment per stage: dvc exp run -S 'extract.layers=[1]')")
    for section in ("extract", "mask"):
        if (params.get(section) or {}).get("prompt_tokens") == "keep":
            raise UserError(f"{section}.prompt_tokens keep needs a ViT: the MaPLe prompts of the ConvNeXt "
                            f"{model.name} are channel offsets, not tokens; set it to drop")


def run_stage(name: str, params: Mapping[str, Any], dataset: str | None, layer: int | None) -> str:
    """Run one stage instance of dvc.yaml (``pipeline run-stage``); returns its summary."""
    check_sections(params)
    if name not in STEP:
        raise UserError(f"unknown stage '{name}'; the study's stages: {', '.join(STEP)}")
    step = STEP[name]
    if missing := missing_inputs(params):
        raise UserError(f"the study cannot run: {len(missing)} input{'s' * (len(missing) > 1)} missing (fix "
                        "each, then rerun):\n  - " + "\n  - ".join(missing))
    check_tower_settings(params)
    if "dataset" in step.per:
        datasets = data_section(params).datasets
        if dataset is None:
            raise UserError(f"stage '{name}' needs --dataset (one of data.datasets in params.yaml)")
        if dataset not in datasets:
            raise UserError(f"dataset '{dataset}' is not in data.datasets ({', '.join(map(str, datasets))}) "
                            "of params.yaml")
    elif dataset is not None:
        raise UserError(f"stage '{name}' takes no --dataset: it runs once for the whole study"
                        + (" (one SAE per block reads every dataset)" if name == "train" else ""))
    if "layer" in step.per:
        if layer is None:
            raise UserError(f"stage '{name}' needs --layer (a block index of extract.layers)")
        layers = layers_of(params)
        if layer not in layers:
            raise UserError(f"layer {layer} is not in extract.layers ({', '.join(map(str, layers))}) of params.yaml")
    elif layer is not None:
        raise UserError(f"stage '{name}' takes no --layer")
    return run_step(step, params, dataset, layer)
