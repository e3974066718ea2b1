"""The study that `dvc repro` runs: params.yaml sections -> stage configs, and where outputs live.

dvc.yaml fans the study out over ``data.datasets`` x ``extract.layers`` (DVC ``matrix``);
each stage instance calls ``pipeline run-stage NAME --dataset D --layer L``, which lands in
``run_stage``.  Everything is written under ``work/``:

    work/pretrain/                      the tiny CLIP (pretrain), + pretrain-metrics.json, pretrain-loss.png
    work/<dataset>/acts                 activation store, every layer of extract.layers (extract)
    work/<dataset>/adapter              MaPLe prompts (adapt), + adapt-metrics.json
    work/<dataset>/adapted-acts         activation store of the adapted model (adapt)
    work/<dataset>/layer<L>/sae         SAE checkpoint (train), + sae-metrics.json, sae-history.json
    work/<dataset>/layer<L>/codes       sparse codes (encode)
    work/<dataset>/layer<L>/stats       per-latent statistics (stats), + stats-summary.json
    work/<dataset>/layer<L>/masking     masking sweep (mask), + masking-metrics.json, masking-accuracy_vs_k.png
    work/<dataset>/layer<L>/groundtruth SAE latents vs the world's attributes (groundtruth; synthetic only)
    work/<dataset>/layer<L>/adapted     codes, stats, masking of the adapted model with this SAE, and the
                                        remap table (remap), + remap-metrics.json, remap.png
    work/<dataset>/layer<L>/report      HTML report (report)

Stages run with ``overwrite``: DVC reruns a stage exactly when its params or inputs changed,
and the old outputs then belong to a config that no longer exists.  Resumable outputs
(store, checkpoints) are ``persist`` in dvc.yaml, so an interrupted repro resumes them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cache.errors import UserError
from app.params import section

WORK = Path("work")
WORLD_DATASET = "synthetic"  # the only dataset with ground truth
DATA_KEYS = ("datasets", "roots", "split", "limit", "seed", "task", "allow_held_out")
EXTRACT_KEYS = ("layers", "batch_size", "device", "dtype", "workers", "scheduler", "n_workers")


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where one (dataset, layer) instance of the study keeps its outputs."""

    dataset: str
    layer: int | None = None
    work: Path = WORK  # root of every output (pipeline concept-addition runs studies under its own folder)

    @property
    def pretrain(self) -> Path:
        return self.work / "pretrain"

    @property
    def data(self) -> Path:
        return self.work / self.dataset

    @property
    def acts(self) -> Path:
        return self.data / "acts"

    @property
    def adapter(self) -> Path:
        return self.data / "adapter"

    @property
    def adapted_acts(self) -> Path:
        return self.data / "adapted-acts"

    @property
    def run(self) -> Path:
        if self.layer is None:
            raise UserError("this stage needs --layer (a block index of extract.layers)")
        return self.data / f"layer{self.layer}"

    def __getattr__(self, name: str) -> Path:  # sae, codes, stats, masking, groundtruth, adapted, report
        if name in ("sae", "codes", "stats", "masking", "groundtruth", "adapted", "report"):
            return self.run / name
        raise AttributeError(name)


def _fields(stage_config: type, *excluded: str) -> set[str]:
    return {f.name for f in dataclasses.fields(stage_config)} - set(excluded)


def _copy(src: Path, dst: Path) -> None:
    """A metrics or plot file beside the run, where dvc.yaml declares it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


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


def _copy_metrics(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(_numbers(json.loads(src.read_text())), indent=2) + "\n")


def _model(params: dict[str, Any]) -> dict[str, str]:
    model = section(params, "model", ("name", "pretrained"))
    return {"model": str(model.get("name", "tiny-clip")), "pretrained": str(model.get("pretrained", "none"))}


def _data(params: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The extract/adapt settings of one dataset: its root from ``data.roots``, the shared rest
    (``task`` and ``allow_held_out`` shape the synthetic world only)."""
    data = section(params, "data", DATA_KEYS)
    roots = data.get("roots") or {}
    world = ({"synthetic_task": data.get("task") or "shape_colour", "allow_held_out": bool(data.get("allow_held_out"))}
             if dataset == WORLD_DATASET else {})
    return {"dataset": dataset, "root": roots.get(dataset), "split": data.get("split"), "limit": data.get("limit"),
            "seed": int(data.get("seed", 0)), **world}


def pretrain(params: dict[str, Any], paths: Paths | None) -> str:
    from stages import pretrain as stage

    paths = paths or Paths("")
    p = section(params, "pretrain", _fields(stage.Config, "out_dir", "overwrite", "progress", "world"))
    out = stage.run(stage.Config(out_dir=paths.pretrain, overwrite=True, progress=False, **p))
    _copy_metrics(out.metrics_path, paths.work / "pretrain-metrics.json")
    _copy(out.plot_path, paths.work / "pretrain-loss.png")
    return (f"pretrain: {out.steps} steps, loss {out.final_loss:.3f}, zero-shot {100 * out.accuracy:.1f}% "
            f"on {out.n_classes} classes -> {out.model_path}")


def extract(params: dict[str, Any], paths: Paths) -> str:
    from stages import extract as stage

    ext = section(params, "extract", EXTRACT_KEYS)
    out = stage.run(stage.Config(**_data(params, paths.dataset), **_model(params), out_dir=paths.acts,
                                 overwrite=True, progress=False, **ext))
    return f"extract: {out.n_computed} of {out.n_images} images computed -> {out.store_dir}"


def train(params: dict[str, Any], paths: Paths) -> str:
    from stages import train as stage

    sae = section(params, "sae", _fields(stage.Config, "cache_dir", "out_dir", "overwrite", "progress", "layer"))
    out = stage.run(stage.Config(cache_dir=paths.acts, out_dir=paths.sae, layer=paths.layer, overwrite=True,
                                 progress=False, **sae))
    _copy_metrics(out.metrics_path, paths.run / "sae-metrics.json")
    _copy(out.sae_dir / "history.json", paths.run / "sae-history.json")
    return f"train: {out.steps} steps, FVU {out.metrics['fvu']:.4f}, L0 {out.metrics['l0']:.1f} -> {out.sae_dir}"


def encode(params: dict[str, Any], paths: Paths) -> str:
    from stages import encode as stage

    enc = section(params, "encode", ("device", "batch_tokens"))
    out = stage.run(stage.Config(cache_dir=paths.acts, sae_dir=paths.sae, out_dir=paths.codes, overwrite=True,
                                 progress=False, **enc))
    return f"encode: {out.n_tokens} tokens, mean L0 {out.mean_l0:.1f} -> {out.codes_dir}"


def stats(params: dict[str, Any], paths: Paths) -> str:
    from stages import stats as stage

    st = section(params, "stats", ("top_k", "threshold", "scheduler", "n_workers"))
    out = stage.run(stage.Config(codes_dir=paths.codes, cache_dir=paths.acts, out_dir=paths.stats, **st))
    _copy_metrics(out.summary_path, paths.run / "stats-summary.json")
    return f"stats: {out.n_latents} latents, {out.n_dead} dead -> {out.stats_dir}"


def _mask_settings(params: dict[str, Any]) -> dict[str, Any]:
    return section(params, "mask", ("modes", "ks", "error_term", "n_seeds", "random_seed", "head", "templates",
                                    "probe_images", "probe_l2", "batch_size", "device"))


def mask(params: dict[str, Any], paths: Paths) -> str:
    from stages import mask as stage

    out = stage.run(stage.Config(cache_dir=paths.acts, sae_dir=paths.sae, stats_dir=paths.stats,
                                 out_dir=paths.masking, progress=False, **_model(params), **_mask_settings(params)))
    _copy_metrics(out.results_path, paths.run / "masking-metrics.json")
    _copy(out.plot_path, paths.run / "masking-accuracy_vs_k.png")
    return f"mask: plain CLIP {out.clip_accuracy:.4f}, SAE all on {out.sae_all_on_accuracy:.4f} -> {out.out_dir}"


def groundtruth(params: dict[str, Any], paths: Paths) -> str:
    """Ground truth exists for the synthetic world only; other datasets get a record saying so."""
    from pipeline import groundtruth as gt
    from stages import groundtruth as stage

    g = section(params, "groundtruth", ("attributes", "score", "auroc_threshold", "map_threshold",
                                        "object_fraction"))
    metrics = paths.run / "groundtruth-metrics.json"
    if paths.dataset != WORLD_DATASET:
        shutil.rmtree(paths.groundtruth, ignore_errors=True)
        paths.groundtruth.mkdir(parents=True)
        record = {"applicable": 0, "why": f"{paths.dataset} has no ground-truth attributes; only the synthetic "
                                          "world does"}
        (paths.groundtruth / gt.GROUNDTRUTH_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _copy_metrics(paths.groundtruth / gt.GROUNDTRUTH_FILE, metrics)
        return f"groundtruth: not applicable to {paths.dataset}"
    out = stage.run(stage.Config(stats_dir=paths.stats, codes_dir=paths.codes, cache_dir=paths.acts,
                                 out_dir=paths.groundtruth, **g))
    _copy_metrics(out.groundtruth_path, metrics)
    return (f"groundtruth: {out.n_covered} of {out.n_values} attribute values have a dedicated latent "
            f"-> {out.out_dir}")


def adapt(params: dict[str, Any], paths: Paths) -> str:
    """MaPLe prompts on the dataset's few-shot split, then the adapted model's activation store."""
    from stages import adapt as stage
    from stages import extract as extract_stage

    a = section(params, "adapt", _fields(stage.Config, "dataset", "out_dir", "root", "model", "pretrained", "seed",
                                         "overwrite", "progress", "weights", "class_prompts", "synthetic_task",
                                         "allow_held_out"))
    data = _data(params, paths.dataset)
    world = {k: data[k] for k in ("synthetic_task", "allow_held_out") if k in data}
    out = stage.run(stage.Config(dataset=paths.dataset, root=data["root"], seed=data["seed"], out_dir=paths.adapter,
                                 overwrite=True, progress=False, **_model(params), **world, **a))
    _copy_metrics(out.metrics_path, paths.data / "adapt-metrics.json")
    ext = section(params, "extract", EXTRACT_KEYS)
    store = extract_stage.run(extract_stage.Config(**data, **_model(params), out_dir=paths.adapted_acts,
                                                   adapter=paths.adapter, overwrite=True, progress=False, **ext))
    return (f"adapt: base zero-shot {out.base_accuracy:.4f}, adapted {out.adapted_accuracy:.4f} on "
            f"{out.n_test_images} test images; adapted store -> {store.store_dir}")


def remap(params: dict[str, Any], paths: Paths, masking: bool = True) -> str:
    """The adapted model through the base model's SAE: codes, statistics, masking (unless ``masking``
    is False; then the base model's masking is not read either), then the remap table."""
    from stages import encode as encode_stage
    from stages import mask as mask_stage
    from stages import remap as stage
    from stages import stats as stats_stage

    rm = section(params, "remap", ("tau_high", "tau_low", "normalise"))
    adapted = paths.adapted
    enc = section(params, "encode", ("device", "batch_tokens"))
    encode_stage.run(encode_stage.Config(cache_dir=paths.adapted_acts, sae_dir=paths.sae, out_dir=adapted / "codes",
                                         overwrite=True, progress=False, **enc))
    st = section(params, "stats", ("top_k", "threshold", "scheduler", "n_workers"))
    stats_stage.run(stats_stage.Config(codes_dir=adapted / "codes", cache_dir=paths.adapted_acts,
                                       out_dir=adapted / "stats", plots=False, **st))
    if masking:
        m = _mask_settings(params)
        m.pop("head", None), m.pop("templates", None)  # the adapted model is read out by its own prompts
        mask_stage.run(mask_stage.Config(cache_dir=paths.adapted_acts, sae_dir=paths.sae, stats_dir=paths.stats,
                                         out_dir=adapted / "masking", adapter=paths.adapter, progress=False,
                                         **_model(params), **m))
    out = stage.run(stage.Config(base_dir=paths.stats, adapted_dir=adapted / "stats", out_dir=adapted / "remap",
                                 base_masking=paths.masking if masking else None,
                                 adapted_masking=adapted / "masking" if masking else None, **rm))
    _copy_metrics(out.results_path, paths.run / "remap-metrics.json")
    _copy(out.plot_path, paths.run / "remap.png")
    return f"remap: {out.n_classes} classes, {out.d_sae} latents -> {out.out_dir}"


def report(params: dict[str, Any], paths: Paths) -> str:
    from stages import report as stage

    rep = section(params, "report", ("n_latents", "n_low_entropy", "min_references"))
    gt_dir = paths.groundtruth if paths.dataset == WORLD_DATASET else None
    out = stage.run(stage.Config(stats_dir=paths.stats, out_dir=paths.report, groundtruth_dir=gt_dir, **rep))
    return f"report: {len(out.latent_pages)} latent pages -> {out.index_path}"


STAGES: dict[str, Callable[[dict[str, Any], Any], str]] = {
    "pretrain": pretrain, "extract": extract, "adapt": adapt, "train": train, "encode": encode, "stats": stats,
    "mask": mask, "groundtruth": groundtruth, "remap": remap, "report": report}


def run_stage(name: str, params: dict[str, Any], dataset: str | None, layer: int | None) -> str:
    """Run one stage instance of dvc.yaml; returns its one-line summary."""
    if name == "pretrain":
        return pretrain(params, None)
    datasets = section(params, "data", DATA_KEYS).get("datasets") or []
    if dataset is None:
        raise UserError(f"stage '{name}' needs --dataset (one of data.datasets in params.yaml)")
    if dataset not in datasets:
        raise UserError(f"dataset '{dataset}' is not in data.datasets ({', '.join(map(str, datasets))}) of params.yaml")
    if layer is not None:
        layers = section(params, "extract", EXTRACT_KEYS).get("layers") or []
        if layer not in layers:
            raise UserError(f"layer {layer} is not in extract.layers ({', '.join(map(str, layers))}) of params.yaml")
    return STAGES[name](params, Paths(dataset, layer))
