"""Per block of the model, how well a linear probe reads each attribute of the synthetic world from the
raw activations: which values the model encodes linearly, so a value no SAE latent covers can be called
the model's miss (no block reads it) or the SAE's (its block reads it). Definitions: ``pipeline.blockprobe``.

Reads every block an activation store of ``pipeline extract --dataset synthetic`` holds (or those given),
one chunk of images at a time; the world is rebuilt from what the store records (scenes only, no rendering).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from cache import atomic, schema
from cache.errors import UserError, require_threads
from cache.layout import n_prompt_tokens, patch_slice
from cache.store import ActivationStore, one_writer
from pipeline import blockprobe as bp
from pipeline import groundtruth as gt
from pipeline import runfiles
from pipeline.configs import Stage
from pipeline.probe import ProbeConfig
from pipeline.threads import sized
from pipeline.world import SyntheticWorld

log = logging.getLogger(__name__)

RECORD_FILE, TABLE_FILE, MARKDOWN_FILE, PLOT_FILE = "blockprobe.json", "blockprobe.parquet", "blockprobe.md", \
    "blockprobe.png"
OUR_FILES = (RECORD_FILE, TABLE_FILE, MARKDOWN_FILE, PLOT_FILE)
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Which store's blocks to probe, for which attributes."""

    cache_dir: Path  # activation store of the synthetic world (pipeline extract --dataset synthetic)
    out_dir: Path  # folder to write: blockprobe.json, blockprobe.parquet, blockprobe.md, blockprobe.png (an earlier
                   # result there is replaced)
    layers: tuple[int, ...] = ()  # comma-separated blocks to probe (default: every block the store holds)
    attributes: tuple[str, ...] = tuple(gt.ATTRIBUTE_VALUES)  # comma-separated attributes to probe
    train_fraction: float = 0.5  # share of the valid images the probes are fitted on; the rest score them
    seed: int = 0  # seed of the train/test split of the images
    auroc_threshold: float = 0.95  # a value is readable at a block when its probe AUROC reaches this
    l2: float = 1e-3  # probe weight decay: l2/2 * |W|^2 added to the mean cross-entropy
    plots: bool = True  # write blockprobe.png
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use

    def __post_init__(self) -> None:
        require_threads(self.threads)
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "attributes", gt.check_attributes(self.attributes))
        if not 0 < self.train_fraction < 1:
            raise UserError(f"--train-fraction must be between 0 and 1 (got {self.train_fraction})")
        if not 0.5 <= self.auroc_threshold <= 1:
            raise UserError(f"--auroc-threshold must be in [0.5, 1] (got {self.auroc_threshold})")
        ProbeConfig(l2=self.l2)  # refuses a bad l2 with its own message


@dataclasses.dataclass(frozen=True)
class Outputs:
    out_dir: Path
    record_path: Path
    table_path: Path
    plot_path: Path | None
    n_images: int
    layers: tuple[int, ...]
    readable: dict[int, int]  # per block: values its probes read at the threshold
    n_values: int  # values with a defined AUROC
    seconds: float


@sized
@one_writer
def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    store = ActivationStore(cfg.cache_dir, mode="r")
    store.require_complete()
    world = gt.store_world(store.attrs.get(schema.ATTR_DATASET) or {}, store.attrs.get(schema.ATTR_PREPROCESS) or {},
                           store.class_names, store.image_ids, str(store.path))
    layout = store.token_layout
    if n_prompt_tokens(layout):
        raise UserError(f"{store.path} keeps an adapted model's vision prompt tokens; probe the base model's store "
                        "(or one extracted with --prompt-tokens drop)")
    layers = cfg.layers or tuple(store.layers)
    for layer in layers:
        store.acts(layer)  # refuses a block the store does not hold, in one line
    runfiles.refuse_foreign_files(cfg.out_dir, OUR_FILES)

    rows = np.flatnonzero(store.valid)
    train_N = bp.split_train(len(rows), cfg.train_fraction, cfg.seed)
    synthetic = SyntheticWorld(world.config, n_images=int(world.index_N.max()) + 1, split=world.split,
                               allow_held_out=world.allow_held_out)
    values = [gt.scene_values(synthetic.scene(int(world.index_N[row]))) for row in rows]
    codes = gt.value_codes(values, cfg.attributes)
    class_index = layout.get("class_token_index")
    patches = patch_slice(layout, store.n_tokens)
    grid_hw = tuple(int(g) for g in layout.get("patch_grid") or ())
    if len(grid_hw) != 2 or grid_hw[0] * grid_hw[1] != patches.stop - patches.start:
        raise UserError(f"{store.path}'s token layout records no patch grid matching its "
                        f"{patches.stop - patches.start} patch tokens; re-extract it")
    probe_config = ProbeConfig(l2=cfg.l2)
    table = []
    for layer in layers:
        features_NF = _features(store, layer, rows, int(layout["n_prefix_tokens"]), class_index, patches, grid_hw)
        results = bp.probe_attributes(features_NF, codes, train_N, probe_config)
        table += bp.rows(layer, results, cfg.auroc_threshold)
        log.info("block %d: %s", layer, ", ".join(f"{r.attribute} {r.accuracy:.2f}" for r in results))

    import pandas as pd

    frame = pd.DataFrame(table)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    for name in OUR_FILES:  # the record first: the folder is incomplete until it is rewritten; no stale plot
        (cfg.out_dir / name).unlink(missing_ok=True)
    atomic.atomic_write(cfg.out_dir / TABLE_FILE, lambda tmp: frame.to_parquet(tmp, index=False))
    atomic.atomic_write(cfg.out_dir / MARKDOWN_FILE, lambda tmp: Path(tmp).write_text(markdown(frame)))
    plot_path = _plot(cfg.out_dir / PLOT_FILE, frame, cfg.auroc_threshold) if cfg.plots else None
    defined = frame[frame["auroc"].notna()]
    readable = {layer: int(defined.loc[defined["layer"] == layer, "readable"].sum()) for layer in layers}
    n_values = int(defined["layer"].eq(layers[0]).sum())
    record = {
        "blockprobe_format_version": FORMAT_VERSION, "n_images": len(rows), "n_train": int(train_N.sum()),
        "layers": list(layers), "features": list(bp.FEATURES if class_index is not None else bp.FEATURES[1:]),
        "readable_values": {str(k): v for k, v in readable.items()}, "n_values": n_values,
        "config": {"attributes": list(cfg.attributes), "train_fraction": cfg.train_fraction, "seed": cfg.seed,
                   "auroc_threshold": cfg.auroc_threshold, "l2": cfg.l2},
        "provenance": {"world": world.config.to_dict(), "split": world.split,
                       "acts_config_sha256": store.config_sha256},
        "definitions": bp.__doc__.split("Definitions:", 1)[1].strip(),
    }
    atomic.write_json(cfg.out_dir / RECORD_FILE, record)  # last: the folder is complete
    return Outputs(out_dir=cfg.out_dir, record_path=cfg.out_dir / RECORD_FILE, table_path=cfg.out_dir / TABLE_FILE,
                   plot_path=plot_path, n_images=len(rows), layers=layers, readable=readable, n_values=n_values,
                   seconds=time.perf_counter() - started)


def _features(store: ActivationStore, layer: int, rows: np.ndarray, n_prefix: int, class_index: int | None,
              patches: slice, grid_hw: tuple[int, int]) -> np.ndarray:
    """Pooled features of the valid images ``rows`` at one block, read a shard at a time."""
    parts = []
    for k in range(store.n_shards):
        sl = store.shard_slice(k)
        keep = rows[(rows >= sl.start) & (rows < sl.stop)] - sl.start
        if len(keep):
            acts_NTD = store.read(layer, sl.start, sl.stop)[keep]
            parts.append(bp.pooled_features(acts_NTD, n_prefix, class_index, patches, grid_hw))
    return np.concatenate(parts)


def markdown(frame) -> str:
    """Blocks as columns, one line per attribute value (AUROC, ** when readable), then each attribute's accuracy."""
    layers = list(dict.fromkeys(frame["layer"]))
    head = ["| attribute | value | " + " | ".join(f"block {b}" for b in layers) + " |",
            "|---|---|" + "---:|" * len(layers)]
    by = frame.set_index(["layer", "attribute", "value"])
    lines = []
    for attribute, value in dict.fromkeys(zip(frame["attribute"], frame["value"])):
        cells = []
        for b in layers:
            score, readable = by.loc[(b, attribute, value), ["auroc", "readable"]]
            cells.append("–" if np.isnan(score) else f"**{score:.3f}**" if readable else f"{score:.3f}")
        lines.append(f"| {attribute} | {value} | " + " | ".join(cells) + " |")
    accuracy = frame.drop_duplicates(["layer", "attribute"]).set_index(["attribute", "layer"])
    for attribute in dict.fromkeys(frame["attribute"]):
        cells = [f"{accuracy.loc[(attribute, b), 'accuracy']:.3f} (chance {accuracy.loc[(attribute, b), 'chance']:.2f})"
                 for b in layers]
        lines.append(f"| {attribute} | *accuracy* | " + " | ".join(cells) + " |")
    return "\n".join(head + lines) + "\n"


def _plot(path: Path, frame, threshold: float) -> Path:
    """AUROC of every value (rows) at every block (columns), readable ones marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(frame["layer"]))
    labels = list(dict.fromkeys(f"{a}={v}" for a, v in zip(frame["attribute"], frame["value"])))
    grid = frame.assign(label=[f"{a}={v}" for a, v in zip(frame["attribute"], frame["value"])]).pivot(
        index="label", columns="layer", values="auroc").loc[labels, layers].to_numpy(float)
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(layers), 0.25 * len(labels) + 1.4))
    image = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    for (i, j), score in np.ndenumerate(grid):
        if score >= threshold:
            ax.text(j, i, "✓", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(layers)), [f"block {b}" for b in layers])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(f"linear probe AUROC per value (✓: >= {threshold:g})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(out: Outputs) -> str:
    per_block = ", ".join(f"block {b}: {out.readable[b]}" for b in out.layers)
    return (f"values read by a linear probe at AUROC >= the threshold, of {out.n_values}: {per_block}; "
            f"{out.n_images} images in {out.seconds:.1f} s -> {out.out_dir}")


STAGE = Stage(name="block-probe", config=Config, run=run, summary=summary, reads=("cache_dir",), writes=("out_dir",),
              help="Per block, a linear probe's accuracy and AUROC for every attribute value of the synthetic world, "
                   "from the raw activations: what the model encodes linearly.")
