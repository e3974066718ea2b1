"""Ground-truth evaluation of an SAE on the synthetic world: per latent the attribute value it
detects (AUROC, purity) and how well its patch map covers the object (IoU, pointing).

Definitions: ``pipeline.groundtruth`` (module docstring and ``DEFINITIONS``, copied into
``groundtruth.json``). The statistics folder names the code and activation stores; the store's
attributes name the world it was extracted from, which is regenerated from its seed (scenes
and object masks only, no rendering). A ``--world`` that differs from it is refused.

One pass over the code shards turns each into sparse (image, latent) pairs; the metrics are
then computed from the pairs of all valid images at once (memory grows with the pairs).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cache import schema
from cache.codes import CodeStore
from cache.errors import UserError, require_threads
from cache.layout import n_prompt_tokens
from cache.store import ActivationStore, one_writer
from pipeline import groundtruth as gt
from pipeline.configs import Stage
from pipeline.latents import LatentStats
from pipeline.progress import next_steps
from pipeline.threads import sized
from pipeline.world import SyntheticWorld, object_coverage

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """What to evaluate against which ground truth."""

    stats_dir: Path  # statistics folder (pipeline stats) of the codes to evaluate; names both stores
    out_dir: Path  # folder to write: groundtruth.json, latents.csv, values.csv, groundtruth.png (an earlier
                   # ground-truth folder there is replaced)
    world: Mapping[str, Any] | None = None  # world the store must come from, checked against the store's own:
                                            # key=value pairs such as seed=0,image_size=32,task=shape_colour, or a
                                            # JSON file of those keys and held_out (default: the store's, unchecked)
    codes_dir: Path | None = None  # code store (default: the one the statistics were computed from)
    cache_dir: Path | None = None  # activation store (default: the one the statistics were computed from)
    attributes: tuple[str, ...] = tuple(gt.ATTRIBUTE_VALUES)  # comma-separated attributes whose values are scored
    score: Literal["max_patch", "mean"] = "max_patch"  # image-level score: max_patch (max over patches) or mean (over all tokens)
    auroc_threshold: float = 0.95  # a value has a dedicated latent when some latent reaches this AUROC for it
    map_threshold: float = 0.5  # a patch is on when f_j >= this fraction of the image's max patch (and > 0)
    object_fraction: float = 0.5  # a patch is an object patch when this fraction of its pixels is object
    plots: bool = True  # write groundtruth.png
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use

    def __post_init__(self) -> None:
        require_threads(self.threads)
        for name in ("stats_dir", "out_dir", "codes_dir", "cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "attributes", gt.check_attributes(self.attributes))
        if self.world is not None:
            object.__setattr__(self, "world", dict(self.world))
        if self.score not in gt.SCORES:
            raise UserError(f"unknown --score '{self.score}'; choose one of: {', '.join(gt.SCORES)}")
        if not 0.5 <= self.auroc_threshold <= 1:
            raise UserError(f"--auroc-threshold must be in [0.5, 1] (got {self.auroc_threshold})")
        if not 0 <= self.map_threshold <= 1:
            raise UserError(f"--map-threshold must be in [0, 1] (got {self.map_threshold})")
        if not 0 < self.object_fraction <= 1:
            raise UserError(f"--object-fraction must be in (0, 1] (got {self.object_fraction})")


@dataclasses.dataclass(frozen=True)
class Outputs:
    out_dir: Path
    groundtruth_path: Path
    latents_path: Path
    values_path: Path
    plot_path: Path | None
    n_images: int  # evaluated (valid) images
    n_latents: int
    n_values: int  # attribute values with a defined AUROC
    n_covered: int  # of those, values with a dedicated latent
    mean_iou_dedicated: float | None
    seconds: float


def _open(cfg: Config) -> tuple[LatentStats, CodeStore, ActivationStore]:
    """The statistics and both stores, refused unless they belong together and are complete."""
    stats = LatentStats(cfg.stats_dir)
    prov = stats.meta["provenance"]
    codes = CodeStore(cfg.codes_dir or prov["codes_store"])
    store = ActivationStore(cfg.cache_dir or prov["acts_store"], mode="r")
    if codes.attrs.get(schema.ATTR_CONFIG_SHA256) != prov["codes_config_sha256"]:
        raise UserError(f"{codes.path} is not the code store the statistics {cfg.stats_dir} were computed from; "
                        "pass the right --codes or rerun `pipeline stats`")
    if codes.attrs.get("acts_config_sha256") != store.config_sha256:
        raise UserError(f"{codes.path} was encoded from another activation store than {store.path}; "
                        "pass the --cache the codes were encoded from")
    if (codes.n_images, codes.images_per_shard, codes.n_tokens) != (store.n_images, store.images_per_shard,
                                                                    store.n_tokens):
        raise UserError(f"{codes.path} and {store.path} disagree on images, shard size or tokens; "
                        "re-encode the store with `pipeline encode`")
    codes.require_complete()
    store.require_complete()
    return stats, codes, store


@sized
@one_writer
def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    stats, codes, store = _open(cfg)
    world = gt.store_world(store.attrs.get(schema.ATTR_DATASET) or {}, store.attrs.get(schema.ATTR_PREPROCESS) or {},
                           store.class_names, store.image_ids, str(store.path))
    if cfg.world is not None:
        gt.check_world(cfg.world, world.config)
    layout = dict(codes.attrs.get("token_layout") or store.token_layout)
    n_prefix = int(layout.get("n_prefix_tokens", 1))
    if n_prompt_tokens(layout):
        raise UserError(f"{store.path} keeps an adapted model's vision prompt tokens, which have no place in the "
                        "attribute ground truth; pass the store of the base model (or one extracted with "
                        "--prompt-tokens drop)")
    grid_hw = tuple(int(g) for g in layout["patch_grid"])
    if len(grid_hw) != 2 or grid_hw[0] * grid_hw[1] != codes.n_tokens - n_prefix:
        raise UserError(f"the token layout's patch grid {list(grid_hw)} does not match "
                        f"{codes.n_tokens - n_prefix} patch tokens; fix the store's token_layout attribute")
    gt.prepare_dir(cfg.out_dir, check_only=True)

    valid_N = store.valid
    rows = np.flatnonzero(valid_N)
    if not len(rows):
        raise UserError(f"{store.path} holds no valid images; re-extract it")
    log.info("ground truth of %d latents over %d images of %s", codes.d_sae, len(rows), world.config)
    synthetic = SyntheticWorld(world.config, n_images=int(world.index_N.max()) + 1, split=world.split,
                               allow_held_out=world.allow_held_out)
    object_NP = np.zeros((store.n_images, grid_hw[0] * grid_hw[1]), bool)
    values = []
    for row in rows:
        scene = synthetic.scene(int(world.index_N[row]))
        values.append(gt.scene_values(scene))
        mask_HW = object_coverage(scene, world.config.image_size) >= 0.5
        object_NP[row] = gt.patch_object_masks(mask_HW[None], grid_hw, cfg.object_fraction)[0]
    codes_by_attribute = gt.value_codes(values, cfg.attributes)

    eval_index_N = np.full(store.n_images, -1, np.int64)
    eval_index_N[rows] = np.arange(len(rows))
    parts = []
    for k, shard in codes.shards():
        sl = store.shard_slice(k)
        pairs = gt.image_pairs(shard.token_ptr, shard.indices, shard.values, object_NP[sl], n_tokens=codes.n_tokens,
                               n_prefix=n_prefix, d_sae=codes.d_sae, score=cfg.score,
                               map_threshold=cfg.map_threshold, first_image=sl.start)
        pairs = dataclasses.replace(pairs, image=eval_index_N[pairs.image])
        parts.append(pairs.select(pairs.image >= 0))  # encode writes no codes for invalid images; never count them
    pairs = gt.Pairs.concat(parts)
    result = gt.evaluate(pairs, codes_by_attribute, object_NP[rows].sum(1), codes.d_sae, cfg.auroc_threshold)

    gt.prepare_dir(cfg.out_dir, check_only=False)
    out = cfg.out_dir
    latents = gt.latent_table(result)
    value_table = gt.value_table(result, gt.one_token_ceiling(codes_by_attribute, object_NP[rows], grid_hw))
    latents_path, values_path = gt.write_tables(out, latents, value_table)
    plot_path = gt.write_plot(out, value_table, latents, cfg.auroc_threshold) if cfg.plots else None

    defined = gt.defined_values(value_table, len(rows))
    covered = value_table["dedicated"]
    covered_object = covered & value_table["object"]
    mean_iou = _mean(value_table.loc[covered_object, "iou"])
    record = {
        "groundtruth_format_version": gt.GROUNDTRUTH_FORMAT_VERSION,
        "n_images": len(rows), "n_images_with_object_patch": int(object_NP[rows].any(1).sum()),
        "n_latents": codes.d_sae, "n_alive": int((result.n_active_S > 0).sum()),
        "n_values": int(defined.sum()), "n_values_covered": int(covered.sum()),
        "fraction_values_covered": float(covered.sum() / defined.sum()) if defined.any() else None,
        "mean_iou_dedicated": mean_iou, "mean_pointing_dedicated": _mean(value_table.loc[covered_object, "pointing"]),
        "best_auroc": {f"{a}={v}": x for a, v, x in zip(value_table["attribute"], value_table["value"],
                                                        value_table["auroc"])},
        "one_token_ceiling": {f"{a}={v}": x for a, v, x in zip(value_table["attribute"], value_table["value"],
                                                               value_table["ceiling"])},
        "config": {"attributes": list(cfg.attributes), "score": cfg.score, "auroc_threshold": cfg.auroc_threshold,
                   "map_threshold": cfg.map_threshold, "object_fraction": cfg.object_fraction},
        "provenance": {"world": world.config.to_dict(), "split": world.split,
                       "acts_config_sha256": store.config_sha256,
                       "codes_config_sha256": codes.attrs[schema.ATTR_CONFIG_SHA256],
                       "stats_dir": str(stats.path.resolve()), "layer": codes.attrs.get("layer"),
                       "sae_weights_sha256": codes.attrs.get("sae_weights_sha256")},
        "definitions": gt.DEFINITIONS,
    }
    groundtruth_path = gt.write_record(out, record)  # last: the folder is complete
    return Outputs(out_dir=out, groundtruth_path=groundtruth_path, latents_path=latents_path,
                   values_path=values_path, plot_path=plot_path, n_images=len(rows), n_latents=codes.d_sae,
                   n_values=record["n_values"], n_covered=record["n_values_covered"], mean_iou_dedicated=mean_iou,
                   seconds=time.perf_counter() - started)


def _mean(series) -> float | None:
    values = series.dropna().to_numpy(float)
    return float(values.mean()) if len(values) else None


def summary(out: Outputs) -> str:
    iou = "n/a" if out.mean_iou_dedicated is None else f"{out.mean_iou_dedicated:.3f}"
    return (f"{out.n_covered} of {out.n_values} attribute values have a dedicated latent "
            f"(mean IoU {iou}); {out.n_latents} latents over {out.n_images} images in {out.seconds:.1f} s "
            f"-> {out.out_dir}\n"
            + next_steps(f"pipeline report --stats STATS_DIR --groundtruth {out.out_dir} --out REPORT_DIR"))


STAGE = Stage(name="groundtruth", config=Config, run=run, summary=summary,
              reads=("stats_dir", "codes_dir", "cache_dir"), writes=("out_dir",),
              help="Score latents against the synthetic world: best attribute value (AUROC, purity), IoU and pointing.")
