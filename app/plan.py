"""`pipeline plan`: what a study (params.yaml) will cost before it runs — disk, tokens, the peak
memory of an SAE training step, time, and DVC's own disk and hashing overhead.

Sizes come from the formats, not from guesses: an activation store is N × T × D float16 values per
tapped block (cache/FORMAT.md); a code store 8 bytes (int32 latent id + float32 value) per nonzero,
at L0 = k for the TopK family, and for ReLU SAEs the L0 the user expects (``--l0``) or, when
unknown, the upper bound d_sae; an SAE folder at rest holds its weights 5 times (final weights,
checkpoint weights, the trainer state's weights and Adam's two moments). Times scale a short
calibration on this machine (:func:`calibrate`) linearly; the plan says how it calibrated.

DVC's overhead is read from the rule that writes dvc.yaml (app/dvcfile.py): an out DVC caches is
copied into .dvc/cache (its default link types, reflink then copy, copy on ext4), an out with
``cache: false`` is not. DVC hashes (md5) every out when it records dvc.lock, cached or not.

Measured on a tiny study (data.limit 40, every stage; work/ 191.8 MB): with every out cached,
.dvc/cache held 190.7 MB, (work + cache) / work = 1.99. So the large outs that are rebuilt exactly
from their inputs are ``cache: false`` (with ``persist: true`` kept; ``Stage.cached``): the
checksummed stores (extract, extract-adapted, encode, encode-adapted), the training folders whose
resume state dwarfs the result (pretrain: 121 MB of which 91 MB trainer state; train: 5 copies of
the weights) and the report. Stores alone gave 1.93 on the tiny study (its stores are small), about
1.01 at the paper's scale; all of them 7.4 MB cached, 1.04. DVC still hashes these outs into
dvc.lock, so `dvc status` and `dvc repro` see them change; `dvc checkout` does not restore them (a
deleted or other experiment's store is rebuilt by `dvc repro`, resuming where it stopped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from app import study
from app.params import load_params
from cache.errors import UserError
from pipeline.sae import TrainConfig

log = logging.getLogger(__name__)

# Image counts of each dataset's splits as this pipeline reads them (pipeline/datasets.py: torchvision's
# splits, EuroSAT's CoOp split file, one UCF101 frame per video). A local copy may differ: always an assumption.
KNOWN_IMAGES: dict[str, dict[str, int]] = {
    "imagenet": {"train": 1_281_167, "val": 50_000},
    "eurosat": {"all": 27_000, "train": 13_500, "val": 5_400, "test": 8_100},
    "caltech101": {"all": 8_677},
    "oxfordpets": {"trainval": 3_680, "test": 3_669},
    "stanfordcars": {"train": 8_144, "test": 8_041},
    "flowers102": {"train": 1_020, "val": 1_020, "test": 6_149},
    "food101": {"train": 75_750, "test": 25_250},
    "fgvcaircraft": {"train": 3_334, "val": 3_333, "trainval": 6_667, "test": 3_333},
    "sun397": {"all": 108_754},
    "dtd": {"train": 1_880, "val": 1_880, "test": 1_880},
    "ucf101": {"all": 13_320, "train": 9_537, "test": 3_783},
}
STORE_DTYPE_BYTES = 2  # float16 activations (cache/FORMAT.md)
CODE_ENTRY_BYTES = 8  # int32 latent id + float32 value per nonzero
SAE_COPIES_AT_REST = 5  # final weights, checkpoint weights, trainer state (weights, Adam m, Adam v)
# float32 (B, S) tensors alive at the peak of one training step, revival active (measured with a
# storage-counting dispatch mode: tests/app/test_plan.py), per architecture
STEP_BS_TENSORS = {"relu": 5, "topk": 4, "batchtopk": 4}
STEP_BD_TENSORS = 4  # float32 (B, D) tensors: input, normalised input, reconstruction, its gradient
FIRING_BYTES_PER_LATENT = 24  # the trainer's dead-latent counters: two int64 and one float64 per latent
CALIBRATION_IMAGES = 2
CALIBRATION_REPEATS = 3
CALIBRATION_MAX_LATENTS = 2048
CALIBRATION_MAX_TOKENS = 512
HASH_SAMPLE_BYTES = 64 * 2**20
STAGES = ("extract-sae", "train", "extract", "encode", "extract-adapted", "encode-adapted")
NOT_ESTIMATED = tuple(s.name for s in study.STEPS if s.name not in STAGES)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the plan needs of a model: its residual width and tokens per image."""

    name: str
    width: int  # D
    n_tokens: int  # T: class token + patches
    n_blocks: int


def geometry(name: str) -> Geometry:
    """Read from open_clip's config (no weights): T = (image_size / patch_size)² + 1."""
    import open_clip

    import pipeline.models  # noqa: F401 - registers the project's model configs (tiny-clip, tiny-vit)

    config = open_clip.get_model_config(name)
    vision = (config or {}).get("vision_cfg", {})
    if not all(k in vision for k in ("width", "image_size", "patch_size", "layers")):
        raise UserError(f"model '{name}' is not an open_clip ViT the plan can size (no vision width, image and "
                        "patch size in its config); use an open_clip ViT name such as ViT-B-16")
    size, patch = vision["image_size"], vision["patch_size"]
    h, w = (size, size) if isinstance(size, int) else size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    return Geometry(name, int(vision["width"]), (h // ph) * (w // pw) + 1, int(vision["layers"]))


def image_count(dataset: str, split: str | None, limit: int | None) -> tuple[int, str]:
    """Images of one dataset's split after ``limit``, and where the number comes from."""
    from pipeline.datasets import SOURCES, SYNTHETIC_DEFAULT_IMAGES, default_split

    if study.is_world(dataset):
        return (limit, "the limit in params") if limit else (SYNTHETIC_DEFAULT_IMAGES, "synthetic default")
    split = split or default_split(dataset)
    if dataset in SOURCES and split not in SOURCES[dataset].splits:
        raise UserError(f"dataset '{dataset}' has no split '{split}'; choose one of: "
                        f"{', '.join(SOURCES[dataset].splits)} (data.split in the params file)")
    known = KNOWN_IMAGES.get(dataset, {}).get(split)
    if known is None:
        if limit is None:
            raise UserError(f"the plan does not know how many images {dataset} ({split}) has; set data.limit")
        return limit, "the limit in params (the folder may hold fewer)"
    if limit is not None and limit < known:
        return limit, "the limit in params"
    return known, f"assumed: {dataset} {split} has {known:,}"


@dataclasses.dataclass(frozen=True)
class Row:
    """One stage instance of the study."""

    stage: str
    dataset: str
    layer: int | None
    images: int
    tokens: int  # extract: stored per block; train: trained; encode: encoded
    disk_bytes: int
    disk_note: str
    cached: bool  # does DVC copy this out into .dvc/cache (dvc.yaml as app/dvcfile.py writes it)
    peak_bytes: int | None = None  # train: one training step
    work: tuple[Any, ...] = ()  # what the calibration prices: (kind, key, units)
    seconds: float | None = None


def step_memory(*, d_in: int, d_sae: int, arch: str, batch_tokens: int) -> int:
    """Peak bytes of one float32 training step of a micro-batch of ``batch_tokens``: parameters,
    their gradients, Adam's two moments, the dead-latent counters, and the batch's activations."""
    params = (2 * d_in * d_sae + d_sae + d_in) * 4
    acts = (STEP_BS_TENSORS[arch] * d_sae + STEP_BD_TENSORS * d_in) * batch_tokens * 4
    return 4 * params + FIRING_BYTES_PER_LATENT * d_sae + acts


def _cached_outs() -> dict[str, bool]:
    """Out path template (``work/${item.dataset}/acts``) -> whether DVC caches it, from the rule that
    writes dvc.yaml."""
    from app.dvcfile import render

    cached = {}
    for stage in yaml.safe_load(render())["stages"].values():
        for out in stage.get("outs", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            cached[path] = opts.get("cache", True) is not False
    return cached


def _out_cached(step: study.Step, cached: Mapping[str, bool]) -> bool:
    template = step.paths["out_dir"].format(work="work", dataset="${item.dataset}", layer="${item.layer}")
    return cached.get(template, True)


def _store_rows(names: tuple[str, ...], label: str, extract: Any, cached: Mapping[str, bool]) -> tuple[list[Row], int,
                                                                                                     Geometry]:
    """The activation store rows of one extract config, its image count and model geometry."""
    geo = geometry(extract.model)
    bad = [layer for layer in extract.layers if not 0 <= layer < geo.n_blocks]
    if bad:
        raise UserError(f"extract.layers {bad} are not blocks of {geo.name} (0 … {geo.n_blocks - 1})")
    n, source = image_count(extract.dataset, extract.split, extract.limit)
    store = n * geo.n_tokens * geo.width * STORE_DTYPE_BYTES * len(extract.layers)
    forward = ("forward", (geo.name, max(extract.layers)), n)
    note = f"{len(extract.layers)} block(s) x N x T x D x 2 bytes (float16); images: {source}"
    rows = [Row(name, label, None, n, n * geo.n_tokens, store, note, _out_cached(study.STEP[name], cached),
                work=forward) for name in names]
    return rows, n, geo


def sizes(params: Mapping[str, Any], *, l0: float | None = None) -> list[Row]:
    """Every estimated stage instance of the study, without times: the SAE's store and one SAE per
    block, then each dataset's stores and codes through it."""
    study.check_sections(params)
    datasets = study.data_section(params).datasets  # every section is checked before anything is sized
    cached = _cached_outs()
    sae_data = study.config_for(study.STEP["extract-sae"], params, None, None)
    rows, n_sae, geo = _store_rows(("extract-sae",), f"sae_data: {study.sae_data_section(params).dataset}", sae_data,
                                   cached)
    rows += [_train_row(params, rows[0].dataset, layer, geo, n_sae, cached) for layer in sae_data.layers]
    for dataset in datasets:
        extract = study.config_for(study.STEP["extract"], params, dataset, None)
        store_rows, n, geo = _store_rows(("extract", "extract-adapted"), dataset, extract, cached)
        rows.extend(store_rows)
        for layer in extract.layers:
            rows.extend(_code_rows(params, dataset, layer, geo, n, cached, l0))
    return rows


def _train_row(params: Mapping[str, Any], label: str, layer: int, geo: Geometry, n: int,
               cached: Mapping[str, bool]) -> Row:
    train = study.config_for(study.STEP["train"], params, None, layer)
    d_sae = int(train.expansion * geo.width)
    per_image = {"all": geo.n_tokens, "patches": geo.n_tokens - 1, "cls": 1}[train.token_kind]
    batch = train.batch_images * per_image
    micro = min(batch, TrainConfig(micro_batch_tokens=train.micro_batch_tokens).part_tokens(d_sae))  # as train splits
    n_steps = math.ceil(train.total_tokens / batch)
    params_bytes = (2 * geo.width * d_sae + d_sae + geo.width) * 4
    sae_key = (train.arch, geo.width, train.k)
    return Row("train", label, layer, n, n_steps * batch, SAE_COPIES_AT_REST * params_bytes,
              f"{n_steps:,} steps of {batch:,} tokens ({micro:,} per micro-batch); SAE {geo.width} -> {d_sae:,}",
              _out_cached(study.STEP["train"], cached),
              peak_bytes=step_memory(d_in=geo.width, d_sae=d_sae, arch=train.arch, batch_tokens=micro),
              work=("sae_step", sae_key, n_steps * batch * d_sae))


def _code_rows(params: Mapping[str, Any], dataset: str, layer: int, geo: Geometry, n: int,
               cached: Mapping[str, bool], l0: float | None) -> list[Row]:
    train = study.config_for(study.STEP["train"], params, None, layer)
    d_sae = int(train.expansion * geo.width)
    sae_key = (train.arch, geo.width, train.k)
    if train.arch != "relu":
        per_token, which = float(train.k), f"expected: L0 = k = {train.k}"
    elif l0 is not None:
        per_token, which = float(l0), f"expected: L0 = {l0:g} (--l0)"
    else:
        per_token, which = float(d_sae), f"upper bound: L0 unknown, dense {d_sae:,} (pass --l0)"
    tokens = n * geo.n_tokens
    codes = int(tokens * per_token * CODE_ENTRY_BYTES)
    return [Row(name, dataset, layer, n, tokens, codes, f"{which}; 8 bytes per nonzero",
                _out_cached(study.STEP[name], cached), work=("encode", sae_key, tokens * d_sae))
            for name in ("encode", "encode-adapted")]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Rates measured on this machine, and how."""

    threads: int
    md5_bytes_per_s: float
    rates: Mapping[tuple[str, Any], float]  # (kind, key) -> seconds per unit
    how: tuple[str, ...]


def _timed(fn) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(CALIBRATION_REPEATS):
        fn()
    return (time.perf_counter() - started) / CALIBRATION_REPEATS


def calibrate(rows: list[Row]) -> Calibration:
    """Time, on this machine's CPU with torch's current threads: the md5 of a 64 MB buffer (what DVC
    hashes with), a forward of each model to its last tapped block at batch 2 on random images
    (random weights: the same arithmetic), and a few SAE steps and encodes at a reduced width."""
    import numpy as np
    import torch

    buffer = np.random.default_rng(0).bytes(HASH_SAMPLE_BYTES)
    md5_rate = HASH_SAMPLE_BYTES / _timed(lambda: hashlib.md5(buffer).digest())
    rates: dict[tuple[str, Any], float] = {}
    how = [f"md5 of a {HASH_SAMPLE_BYTES // 2**20} MB buffer: {md5_rate / 1e6:.0f} MB/s"]
    for kind, key, _ in dict.fromkeys(r.work for r in rows if r.work):
        if (kind, key) in rates:
            continue
        if kind == "forward":
            rates[kind, key] = _forward_seconds(*key) / CALIBRATION_IMAGES
            how.append(f"{key[0]} forward to block {key[1]}, batch {CALIBRATION_IMAGES}, random weights: "
                       f"{rates[kind, key] * 1e3:.1f} ms per image")
        else:
            step_s, encode_s, units = _sae_seconds(*key)
            rates["sae_step", key], rates["encode", key] = step_s / units, encode_s / units
            how.append(f"{key[0]} SAE {key[1]} -> {CALIBRATION_MAX_LATENTS:,} on {CALIBRATION_MAX_TOKENS} tokens: "
                       f"step {step_s * 1e3:.1f} ms, encode {encode_s * 1e3:.1f} ms (scaled linearly in tokens x "
                       "latents)")
    return Calibration(torch.get_num_threads(), md5_rate, rates, tuple(how))


def _forward_seconds(model_name: str, last_layer: int) -> float:
    import torch

    from pipeline.models import load_model

    logging.disable(logging.WARNING)  # random weights are the point here, not a mistake to warn about
    try:
        model = load_model(model_name, "none", device="cpu")
    finally:
        logging.disable(logging.NOTSET)
    images = torch.rand(CALIBRATION_IMAGES, 3, model.image_size, model.image_size)
    with torch.inference_mode():
        return _timed(lambda: model.tap(images, (last_layer,)))


def _sae_seconds(arch: str, d_in: int, k: int | None) -> tuple[float, float, int]:
    """Seconds of one training step and one encode of CALIBRATION_MAX_TOKENS tokens at
    CALIBRATION_MAX_LATENTS latents, and those tokens x latents."""
    import torch

    from pipeline.sae import TrainConfig, Trainer, build, config_class

    extra = {} if arch == "relu" else {"k": min(k or 32, CALIBRATION_MAX_LATENTS)}
    sae = build(config_class(arch).from_expansion(d_in=d_in, expansion=CALIBRATION_MAX_LATENTS / d_in, **extra),
                seed=0)
    trainer = Trainer(sae, TrainConfig(batch_tokens=CALIBRATION_MAX_TOKENS, warmup_steps=0))
    x_BD = torch.randn(CALIBRATION_MAX_TOKENS, d_in)
    step = _timed(lambda: trainer.step(x_BD))
    with torch.inference_mode():
        encode = _timed(lambda: sae.encode(x_BD))
    return step, encode, CALIBRATION_MAX_TOKENS * CALIBRATION_MAX_LATENTS


@dataclasses.dataclass(frozen=True)
class Plan:
    params_path: str
    rows: tuple[Row, ...]
    calibration: Calibration | None

    @property
    def disk_bytes(self) -> int:
        return sum(r.disk_bytes for r in self.rows)

    @property
    def dvc_cache_bytes(self) -> int:
        return sum(r.disk_bytes for r in self.rows if r.cached)

    @property
    def dvc_overhead(self) -> float:
        """(work + .dvc/cache) / work over the estimated outs."""
        return (self.disk_bytes + self.dvc_cache_bytes) / self.disk_bytes if self.disk_bytes else 1.0

    @property
    def hash_seconds(self) -> float | None:
        return None if self.calibration is None else self.disk_bytes / self.calibration.md5_bytes_per_s

    @property
    def seconds(self) -> float | None:
        if self.calibration is None:
            return None
        return sum(r.seconds for r in self.rows) + self.hash_seconds


def make(params_path: Path, *, calibrated: bool = True, l0: float | None = None) -> Plan:
    """The plan of the study a params file describes; ``calibrated`` adds times."""
    rows = sizes(load_params(params_path), l0=l0)
    if not calibrated:
        return Plan(str(params_path), tuple(rows), None)
    cal = calibrate(rows)
    timed = [dataclasses.replace(r, seconds=cal.rates[r.work[0], r.work[1]] * r.work[2]) for r in rows]
    return Plan(str(params_path), tuple(timed), cal)


def gb(n: float) -> str:
    """Decimal units, as disks are sold and the issue counts (387 GB)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def lines(plan: Plan) -> list[str]:
    """The plan as a table, its notes and totals."""
    head = ("stage", "dataset", "layer", "images", "tokens", "disk", "step memory", "time", "dvc cache")
    table = [head] + [(r.stage, r.dataset, "-" if r.layer is None else str(r.layer), f"{r.images:,}",
                       f"{r.tokens:,}", gb(r.disk_bytes), "-" if r.peak_bytes is None else gb(r.peak_bytes),
                       duration(r.seconds), "copy" if r.cached else "no") for r in plan.rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    out = [f"Plan of {plan.params_path} (sizes in decimal units: 1 GB = 10^9 bytes)", ""]
    out += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in table]
    out += ["", "Notes:"]
    out += sorted({f"  {r.stage}: {r.disk_note}" for r in plan.rows})
    out.append(f"  not estimated (small outputs): {', '.join(NOT_ESTIMATED)}")
    out += ["", "Totals:",
            f"  disk (work/): {gb(plan.disk_bytes)}",
            (f"  DVC cache (.dvc/cache, copies of the outs dvc.yaml caches): {gb(plan.dvc_cache_bytes)}; "
             f"(work + cache) / work = {plan.dvc_overhead:.2f}"),
            f"  DVC hashing (md5 of every out when dvc.lock is written): {duration(plan.hash_seconds)}",
            f"  time on this machine: {duration(plan.seconds)}"]
    if plan.calibration is None:
        out.append("  (no calibration: times not estimated)")
    else:
        out += [f"Calibration ({plan.calibration.threads} torch thread(s), CPU, scaled linearly):"]
        out += [f"  {h}" for h in plan.calibration.how]
    return out


def to_json(plan: Plan) -> dict[str, Any]:
    cal = plan.calibration
    return {
        "params": plan.params_path,
        "rows": [{k: v for k, v in dataclasses.asdict(r).items() if k != "work"} for r in plan.rows],
        "not_estimated": list(NOT_ESTIMATED),
        "totals": {"disk_bytes": plan.disk_bytes, "dvc_cache_bytes": plan.dvc_cache_bytes,
                   "dvc_overhead": plan.dvc_overhead, "dvc_hash_seconds": plan.hash_seconds,
                   "seconds": plan.seconds},
        "calibration": None if cal is None else {"threads": cal.threads, "md5_bytes_per_s": cal.md5_bytes_per_s,
                                                 "how": list(cal.how)},
    }
