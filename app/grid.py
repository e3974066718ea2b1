"""The interpretability grid (the paper's third check): one SAE per setting of architecture, expansion
and sparsity, all trained from one activation store, each encoded, summarised, scored against the
synthetic world's ground truth and masked, then laid side by side. Definitions: ``pipeline.grid``.

Each setting is the study's own stages run into ``OUT/settings/<setting>/`` (sae, codes, stats,
groundtruth, masking) and closed by a ``row.json``: a rerun skips the settings whose row matches,
and resumes an interrupted one where its training checkpoint or code store stopped. On a store of
the synthetic world the block's linear probe (``pipeline block-probe``, into ``OUT/blockprobe``) says
which uncovered values are the model's miss and which the SAE's; on real data the table has no
ground-truth columns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cache import atomic, jsonfile, schema
from cache.errors import UserError, require_threads
from cache.layout import n_prompt_tokens
from cache.store import ActivationStore, one_writer
from pipeline import grid as gd
from pipeline import groundtruth as gt
from pipeline import runfiles
from pipeline.configs import Stage
from pipeline.models import resolve_device
from pipeline.progress import next_steps
from pipeline.sae.io import load_sae, read_sae_config
from pipeline.sae.metrics import evaluate
from pipeline.threads import sized
from stages import blockprobe, encode, groundtruth, mask, stats, summary as summary_stage, train

log = logging.getLogger(__name__)

RECORD_FILE, TABLE_FILE, VALUES_FILE, MARKDOWN_FILE, PLOT_FILE, PAGE_FILE = (
    "grid.json", "grid.parquet", "grid_values.parquet", "grid.md", "grid.png", "index.html")
SETTINGS_DIR, PROBE_DIR, ROW_FILE = "settings", "blockprobe", "row.json"
OUR_FILES = (RECORD_FILE, TABLE_FILE, VALUES_FILE, MARKDOWN_FILE, PLOT_FILE, PAGE_FILE, SETTINGS_DIR, PROBE_DIR)
FORMAT_VERSION = 1
ROW_VERSION = 2  # of a setting's row.json; 2: value rows carry the one-token ceiling


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Which SAEs to train, from which store, and how to score them."""

    cache_dir: Path  # activation store the SAEs are trained on (e.g. work/sae-data/acts)
    out_dir: Path  # grid folder: grid.parquet, grid_values.parquet, grid.md, grid.png, index.html, settings/
    eval_cache_dir: Path | None = None  # store every SAE is read on (default: the training store); a synthetic
                                        # world store adds the ground-truth columns
    layer: int | None = None  # block (default: the training store's only block)
    archs: tuple[str, ...] = ("relu", "topk")  # comma-separated: relu, topk, batchtopk
    expansions: tuple[float, ...] = (8.0,)  # comma-separated widths: d_sae = expansion x d_model
    l1s: tuple[float, ...] = (4e-4, 1e-3, 3e-3)  # comma-separated L1 coefficients of the relu settings
    ks: tuple[int, ...] = (8, 16, 32)  # comma-separated active latents per token of the topk/batchtopk settings
    total_tokens: int = 4_000_000  # training tokens of each SAE
    batch_images: int = 64  # images' worth of tokens per training step
    lr: float = 4e-4  # Adam learning rate after warm-up
    warmup_steps: int = 100  # linear warm-up steps
    seed: int = 0  # seed of every SAE's weights and token stream
    token_kind: Literal["all", "patches", "cls"] = "all"  # tokens trained on
    mask_k: int = 10  # masking: each class's top-k latents zeroed, against k random latents
    mask_seeds: int = 3  # random latent sets averaged for drop_random
    attributes: tuple[str, ...] = tuple(gt.ATTRIBUTE_VALUES)  # comma-separated attributes scored (synthetic only)
    auroc_threshold: float = 0.95  # a value is covered (and readable by the probe) at this AUROC
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (GPU when present)
    plots: bool = True  # write grid.png
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use
    progress: bool = True  # show progress bars

    def __post_init__(self) -> None:
        require_threads(self.threads)
        for name in ("cache_dir", "out_dir", "eval_cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "archs", tuple(str(a) for a in self.archs))
        unknown = sorted(set(self.archs) - {"relu", "topk", "batchtopk"})
        if unknown:
            raise UserError(f"--archs {','.join(unknown)}: unknown architecture; choose from relu, topk, batchtopk")
        object.__setattr__(self, "expansions", tuple(float(x) for x in self.expansions))
        object.__setattr__(self, "l1s", tuple(float(x) for x in self.l1s))
        object.__setattr__(self, "ks", tuple(int(x) for x in self.ks))
        object.__setattr__(self, "attributes", gt.check_attributes(self.attributes))
        if self.mask_k < 1 or self.mask_seeds < 1:
            raise UserError(f"--mask-k and --mask-seeds must be at least 1 (got {self.mask_k}, {self.mask_seeds})")
        if min(self.expansions, default=1) <= 0 or min(self.l1s, default=0) < 0 or min(self.ks, default=1) < 1:
            raise UserError("--expansions must be > 0, --l1s >= 0 and --ks >= 1")
        gd.settings(self.archs, self.expansions, self.l1s, self.ks)  # refuses an empty or repeated grid


@dataclasses.dataclass(frozen=True)
class Outputs:
    out_dir: Path
    table_path: Path
    markdown_path: Path
    page_path: Path
    plot_path: Path | None
    table_lines: tuple[str, ...]
    n_settings: int
    n_reused: int  # settings whose earlier row matched and were not rerun
    ground_truth: bool
    seconds: float


def _resolve_layer(cfg: Config, store: ActivationStore) -> int:
    if cfg.layer is not None:
        store.acts(cfg.layer)  # refuses a block the store does not hold
        return cfg.layer
    if len(store.layers) != 1:
        raise UserError(f"{store.path} holds blocks {list(store.layers)}; pass --layer with the one to train on")
    return int(store.layers[0])


def _has_world(store: ActivationStore) -> bool:
    return (store.attrs.get(schema.ATTR_DATASET) or {}).get("name") == "synthetic" and \
        not n_prompt_tokens(store.token_layout)


@torch.no_grad()
def eval_metrics(sae_dir: Path, store: ActivationStore, layer: int, device: str, batch_tokens: int = 65_536
                 ) -> dict[str, float]:
    """FVU, L0 and dead fraction of an SAE over every token of the store's valid images (read a shard at a time)."""
    sae = load_sae(sae_dir, device=device)
    n_tokens = int(store.valid.sum()) * store.n_tokens

    def batches():
        for k in range(store.n_shards):
            sl = store.shard_slice(k)
            acts_NTD = store.read(layer, sl.start, sl.stop)[store.valid[sl]]
            x_BD = torch.from_numpy(acts_NTD.reshape(-1, store.d_model))
            yield from (part.float() for part in x_BD.split(batch_tokens))

    m = evaluate(sae, batches(), window_tokens=n_tokens)
    return {"fvu": m["fvu"], "l0": m["l0"], "dead_fraction": m["dead_fraction"]}


def _identity(cfg: Config, setting: gd.Setting, layer: int, train_sha: str, eval_sha: str) -> dict[str, Any]:
    """What a setting's row depends on: a row.json recording anything else is recomputed."""
    keep = ("total_tokens", "batch_images", "lr", "warmup_steps", "seed", "token_kind", "mask_k", "mask_seeds",
            "attributes", "auroc_threshold")
    return {"row_version": ROW_VERSION, "setting": dataclasses.asdict(setting), "layer": layer,
            "train_store": train_sha, "eval_store": eval_sha,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items() if k in keep}}


def _run_setting(cfg: Config, setting: gd.Setting, layer: int, folder: Path, store: ActivationStore,
                 with_world: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train, encode, summarise, score and mask one SAE; its row and (with ground truth) its value rows."""
    common = dict(threads=cfg.threads, progress=cfg.progress)
    trained = train.run(train.Config(
        cache_dir=cfg.cache_dir, layer=layer, out_dir=folder / "sae", arch=setting.arch, expansion=setting.expansion,
        k=setting.k, l1=setting.l1 if setting.arch == "relu" else None, token_kind=cfg.token_kind,
        total_tokens=cfg.total_tokens, batch_images=cfg.batch_images, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
        seed=cfg.seed, device=cfg.device, overwrite=True, **common))
    eval_dir = cfg.eval_cache_dir or cfg.cache_dir
    codes = encode.run(encode.Config(cache_dir=eval_dir, sae_dir=trained.sae_dir, out_dir=folder / "codes",
                                     device=cfg.device, overwrite=True, **common))
    summarised = stats.run(stats.Config(codes_dir=codes.codes_dir, cache_dir=eval_dir, out_dir=folder / "stats",
                                        plots=False, **common))
    masked = mask.run(mask.Config(sae_dir=trained.sae_dir, stats_dir=summarised.stats_dir, out_dir=folder / "masking",
                                  cache_dir=eval_dir, modes=("off",), ks=(cfg.mask_k,), n_seeds=cfg.mask_seeds,
                                  device=cfg.device, plots=False, **common))
    d_sae = read_sae_config(trained.sae_dir).d_sae
    k = str(cfg.mask_k)
    row: dict[str, Any] = {
        "setting": setting.name, "arch": setting.arch, "expansion": setting.expansion, "d_sae": d_sae,
        "l1": setting.l1, "k": setting.k,
        **eval_metrics(trained.sae_dir, store, layer, resolve_device(cfg.device)),
        "sae_accuracy": masked.sae_all_on_accuracy,
        "drop_top": masked.sae_all_on_accuracy - masked.accuracy["off"][k],
        "drop_random": masked.sae_all_on_accuracy - masked.random_accuracy["off"][k][0],
        "train_seconds": trained.seconds,
    }
    row["sane"] = bool(row["l0"] < gd.SANE_L0 and row["fvu"] <= gd.SANE_FVU)
    if not with_world:
        return row, []
    scored = groundtruth.run(groundtruth.Config(stats_dir=summarised.stats_dir, out_dir=folder / "groundtruth",
                                                attributes=cfg.attributes, auroc_threshold=cfg.auroc_threshold,
                                                plots=False, threads=cfg.threads))
    import pandas as pd

    values = pd.read_csv(scored.values_path)
    values = values[gt.defined_values(values, scored.n_images)]
    covered = values[values["dedicated"]]
    shapes = values["attribute"] == "shape"
    row.update(n_values=len(values), n_covered=len(covered), coverage=len(covered) / len(values) if len(values) else
               float("nan"), shapes_covered=int(covered["attribute"].eq("shape").sum()), n_shapes=int(shapes.sum()),
               mean_iou=_mean(covered["iou"]), mean_pointing=_mean(covered["pointing"]),
               mean_purity=_mean(covered["purity"]))
    value_rows = [{"setting": setting.name, "attribute": r.attribute, "value": str(r.value), "auroc": float(r.auroc),
                   "ceiling": float(r.ceiling), "covered": bool(r.dedicated)} for r in values.itertuples()]
    return row, value_rows


def _earlier_row(path: Path) -> dict[str, Any] | None:
    """A finished setting's row.json; None when absent or unreadable (the setting is then computed again)."""
    try:
        return jsonfile.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # damaged (JSONDecodeError is a ValueError): never trusted
        log.warning("%s is damaged; computing its setting again", path)
        return None


def _mean(series) -> float:
    values = series.dropna().to_numpy(float)
    return float(values.mean()) if len(values) else float("nan")


@sized
@one_writer
def run(cfg: Config) -> Outputs:
    import pandas as pd

    started = time.perf_counter()
    train_store = ActivationStore(cfg.cache_dir, mode="r")
    train_store.require_complete()
    layer = _resolve_layer(cfg, train_store)
    store = ActivationStore(cfg.eval_cache_dir, mode="r") if cfg.eval_cache_dir else train_store
    store.require_complete()
    store.acts(layer)
    if store.d_model != train_store.d_model:
        raise UserError(f"{store.path} is {store.d_model} wide and {train_store.path} {train_store.d_model}: "
                        "train and read the SAEs on stores of the same model")
    runfiles.refuse_foreign_files(cfg.out_dir, OUR_FILES)
    with_world = _has_world(store)
    settings = gd.settings(cfg.archs, cfg.expansions, cfg.l1s, cfg.ks)
    log.info("grid of %d SAEs on block %d of %s, read on %s%s", len(settings), layer, train_store.path, store.path,
             " (with ground truth)" if with_world else "")

    readable: dict[tuple[str, str], tuple[float, bool]] = {}
    if with_world:
        probe = blockprobe.run(blockprobe.Config(cache_dir=store.path, out_dir=cfg.out_dir / PROBE_DIR, layers=(layer,),
                                                 attributes=cfg.attributes, auroc_threshold=cfg.auroc_threshold,
                                                 plots=False, threads=cfg.threads))
        probed = pd.read_parquet(probe.table_path)
        readable = {(a, str(v)): (float(s), bool(r)) for a, v, s, r in
                    zip(probed["attribute"], probed["value"], probed["auroc"], probed["readable"])}

    rows, value_rows, reused = [], [], 0
    for i, setting in enumerate(settings):
        folder = cfg.out_dir / SETTINGS_DIR / setting.name
        identity = _identity(cfg, setting, layer, train_store.config_sha256, store.config_sha256)
        earlier = _earlier_row(folder / ROW_FILE)
        if earlier is not None and earlier.get("identity") == identity:
            row = {k: v for k, v in earlier["row"].items() if not k.endswith(jsonfile.WHY_SUFFIX)}
            values = earlier["values"]
            reused += 1
        else:
            log.info("setting %d of %d: %s", i + 1, len(settings), setting.name)
            (folder / ROW_FILE).unlink(missing_ok=True)
            row, values = _run_setting(cfg, setting, layer, folder, store, with_world)
            atomic.write_json(folder / ROW_FILE, {"identity": identity, "row": row, "values": values})
        rows.append(row)
        value_rows += values

    frame = pd.DataFrame(rows)
    for column in ("l1", "k", "mean_iou", "mean_pointing", "mean_purity", "coverage"):
        if column in frame:  # None (no such knob, nothing to average, or read back from JSON) is NaN
            frame[column] = frame[column].astype(float)
    frame["pareto"] = gd.pareto(frame["fvu"], frame["l0"])
    values = None
    if with_world:
        values = pd.DataFrame(value_rows)
        values["probe_auroc"] = [readable[(a, v)][0] for a, v in zip(values["attribute"], values["value"])]
        values["verdict"] = gd.verdicts(values["covered"].to_numpy(bool),
                                        np.array([readable[(a, v)][1] for a, v in zip(values["attribute"],
                                                                                      values["value"])]))
        counts = values.groupby("setting")["verdict"].value_counts().unstack(fill_value=0)
        frame["sae_misses"] = [int(counts.loc[s].get(gd.SAE_MISS, 0)) for s in frame["setting"]]
        frame["model_misses"] = [int(counts.loc[s].get(gd.MODEL_MISS, 0)) for s in frame["setting"]]

    out = cfg.out_dir
    for name in (RECORD_FILE, TABLE_FILE, VALUES_FILE, MARKDOWN_FILE, PLOT_FILE, PAGE_FILE):
        (out / name).unlink(missing_ok=True)  # the record first: no stale plot or page beside a new table
    atomic.atomic_write(out / TABLE_FILE, lambda tmp: frame.to_parquet(tmp, index=False))
    if values is not None:
        atomic.atomic_write(out / VALUES_FILE, lambda tmp: values.to_parquet(tmp, index=False))
    text = gd.markdown(frame, values)
    atomic.atomic_write(out / MARKDOWN_FILE, lambda tmp: Path(tmp).write_text(text))
    plot_path = None
    if cfg.plots:
        gd.plot(out / PLOT_FILE, frame)
        plot_path = out / PLOT_FILE
    page = summary_stage.page_template("grid.html").render(
        tables=gd.tables(frame, values), legend=gd.LEGEND, plot=plot_path.name if plot_path else None, layer=layer,
        train_store=str(train_store.path),
        eval_store=str(store.path), definitions=_definitions())
    atomic.atomic_write(out / PAGE_FILE, lambda tmp: Path(tmp).write_text(page + "\n"))
    record = {"grid_format_version": FORMAT_VERSION, "layer": layer, "ground_truth": with_world,
              "settings": [s.name for s in settings], "rows": json.loads(frame.to_json(orient="records")),
              "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
              "provenance": {"train_store": train_store.config_sha256, "eval_store": store.config_sha256},
              "definitions": dict(_definitions())}
    atomic.write_json(out / RECORD_FILE, record)  # last: the folder is complete
    return Outputs(out_dir=out, table_path=out / TABLE_FILE, markdown_path=out / MARKDOWN_FILE,
                   page_path=out / PAGE_FILE, plot_path=plot_path, table_lines=tuple(text.splitlines()),
                   n_settings=len(settings), n_reused=reused, ground_truth=with_world,
                   seconds=time.perf_counter() - started)


def _definitions() -> list[tuple[str, str]]:
    """The module's definition bullets as (term, text) pairs for the page."""
    text = gd.__doc__.split("Definitions (copied into ``grid.json``):", 1)[1]
    items = [" ".join(part.split()) for part in text.split("\n- ") if part.strip()]
    return [tuple(item.split(": ", 1)) if ": " in item else (item, "") for item in items]


def summary(out: Outputs) -> str:
    reused = f" ({out.n_reused} reused from an earlier run)" if out.n_reused else ""
    world = "" if out.ground_truth else " (no ground truth: the store is not the synthetic world)"
    return "\n".join([*out.table_lines,
                      f"{out.n_settings} settings{reused}{world} in {out.seconds:.1f} s -> {out.table_path}, "
                      f"{out.markdown_path}, {out.page_path}",
                      next_steps(f"open {out.page_path}")])


STAGE = Stage(name="grid", config=Config, run=run, summary=summary, reads=("cache_dir", "eval_cache_dir"),
              writes=("out_dir",),
              help="Train one SAE per architecture x expansion x sparsity from one activation store and score each "
                   "the same way (FVU, L0, dead latents, masking drops and, on the synthetic world, ground-truth "
                   "coverage with the block probe's verdict on every miss); rerun to resume.")
