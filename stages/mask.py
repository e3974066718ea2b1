"""Masking experiments: are SAE latents class-discriminative? (SCIENCE.md "Masking experiments")

For every mode ("on", "off") and k, the SAE is spliced into the model at its layer
(``pipeline.splice``) and the evaluation images are classified with a fixed head:

- "on":  keep only the image's class's top-k latents (every other latent zeroed);
- "off": zero the image's class's top-k latents, keep the rest;
- k = "all" means every latent ("on" = the full reconstruction, "off" = only b_dec).

The class is the image's **ground-truth** label (the paper's protocol: the mask uses the
label, so this measures whether the class's latents carry the class, not a deployable
classifier). A class's top-k latents are the k latents with the highest class-level counts
in the statistics folder (``class_counts.npy``; ties go to the lower latent index; when k
exceeds the number of latents with a non-zero count, zero-count latents fill the set in
index order — ``masking.json`` lists each class's number of non-zero latents).

Splicing replaces every token's residual by the reconstruction from the masked codes,
without the error term by default (the paper); ``error_term=True`` splices
x̂_masked + (x − x̂). Baselines: plain CLIP; the SAE spliced with all latents on (no error
term); the SAE spliced with the error term and nothing masked (equals plain CLIP); and a
random-latent-set baseline of the same sizes: for each seed and class, a uniformly random
ordering of all latents whose first k form the set (nested in k like the top-k sets),
masked the same way; reported as mean ± sample standard deviation over the seeds.

Heads (fixed while masking): the zero-shot classifier of the CLIP text tower (class-name
prompts, 80 OpenAI templates, ``pipeline.zeroshot``; cached per model and class names), or
a linear probe (``pipeline.probe``) fit on plain CLIP's final image embeddings of held-out
images. Before any masking, plain CLIP's accuracy with the head is computed and logged
(PITFALLS: a zero-shot gap may be prompts or class names, not the SAE).

An adapted model (``adapter``: a MaPLe folder from ``pipeline adapt``) is masked with the
base model's SAE from images: the SAE sees the tap at the base model's token positions and
the vision prompt tokens rejoin them, unmasked, for the blocks after the tap; the zero-shot
head is the adapter's learned prompt per class. Its stores hold no prompt tokens, so they
cannot serve the tap: with ``cache_dir`` (a store extracted with this adapter) the store
only names the images, which are read and run up to the tap. An adapted store without
its adapter, or another adapter's store, is refused.

The masked forwards reuse the tapped residuals of an activation store when ``cache_dir``
is given: only the blocks after the tap run (and no image is read). Otherwise images are
run up to the tap once per batch. Either way the SAE encodes each batch once and every
mask reuses those codes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cache import schema
from cache.store import ActivationStore
from pipeline import maple, runfiles, splice, zeroshot
from pipeline.datasets import ImageSet, open_dataset, synthetic_options
from cache.errors import UserError
from pipeline.latents import LatentStats, json_safe
from pipeline.models import DTYPES, LoadedModel, file_sha256, load_model, resolve_device
from pipeline.configs import Option, Stage
from pipeline.probe import LinearProbe, ProbeConfig, fit_linear_probe
from pipeline.sae import SAE, load_sae

log = logging.getLogger(__name__)

ALL = "all"
DEFAULT_KS: tuple[int | str, ...] = (1, 2, 5, 10, 50, 100, 500, 1000, 2000, ALL)
HEADS = ("auto", "zeroshot", "probe")
TEMPLATE_CHOICES = ("auto", "openai", "world", "dataset")

RESULTS_FILE = "masking.json"
PER_CLASS_FILE = "per_class.csv"
PLOT_FILE = "accuracy_vs_k.png"
OUR_FILES = (RESULTS_FILE, PER_CLASS_FILE, PLOT_FILE)
CODES_BUDGET_BYTES = 256 * 2**20  # dense codes of one SAE chunk (tokens x latents x 4 bytes)

DEFINITIONS: dict[str, str] = {
    "splice": "at the tap (block index, 0-based, residual output), every token's residual is replaced by the SAE "
              "reconstruction from the masked codes, then the remaining blocks, ln_post, pooling and proj run "
              "as in open_clip",
    "on": "keep only the latents of the set (the image's class's top-k), zero every other latent; "
          "k=all: the full reconstruction",
    "off": "zero the latents of the set, keep the rest; k=all: only b_dec remains at every token",
    "class": "the ground-truth label of the image (paper protocol: the mask uses the label)",
    "top_k": "the k latents with the highest class-level counts (class_counts.npy of the statistics folder) for the "
             "class; ties go to the lower latent index; zero-count latents fill sets larger than the number of "
             "latents the class activates",
    "error_term": "with the error term the tap holds x_hat_masked + (x - x_hat), computed as "
                  "x - (x_hat - x_hat_masked)",
    "random": "per seed and class a uniformly random ordering of all latents; its first k form the set (nested in k); "
              "masked like the top-k sets; mean and sample standard deviation over seeds; at k=all every set is "
              "every latent",
    "sae_all_on": "the SAE spliced with every latent on and no error term",
    "sae_error_term": "the SAE spliced with the error term and nothing masked (equals plain CLIP)",
    "accuracy": "top-1 accuracy over the evaluation images (valid rows not used to fit the probe)",
    "class_token_only": "the last block is computed for the class-token query alone, the only row the class-token "
                        "pooling reads (equal to the full block up to float rounding)",
}


def parse_k(value: int | str) -> int | str:
    """An int >= 1 or "all"."""
    if isinstance(value, str):
        if value.strip().lower() == ALL:
            return ALL
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"k must be a positive integer or 'all', got '{value}'") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"k must be a positive integer or 'all', got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """One masking sweep. Dataset fields may be left out when ``cache_dir`` is given (the store's are used)."""

    OPTIONS: ClassVar = {"modes": Option("--mode"), "ks": Option("--k"), "n_seeds": Option("--seeds"),
                         "class_token_only": Option("--full-last-block"),
                         "classifier_cache_dir": Option(default=Path.home() / ".cache" / "patchsae-pipeline" / "classifiers")}

    sae_dir: Path  # trained SAE folder; its config names the model and layer
    stats_dir: Path  # statistics folder of that SAE (`pipeline stats`): class_counts.npy picks the top-k latents
    out_dir: Path  # results folder: masking.json, per_class.csv, accuracy_vs_k.png
    cache_dir: Path | None = None  # activation store holding the SAE's layer: reuse its residuals, run only the blocks
                                   # after the tap (no images read)
    adapter: Path | None = None  # MaPLe adapter folder (pipeline adapt --out): mask the adapted model with the base
                                 # model's SAE (reads images: a --cache store of this adapter only names them)
    dataset: str | None = None  # evaluation dataset (see pipeline.datasets); default: the store's
    root: str | None = None  # dataset root; default: the store's
    split: str | None = None  # evaluation split; default: the store's, else the dataset's default split
    limit: int | None = None  # seeded subset of the split, as in `pipeline extract`; default: the store's
    seed: int | None = None  # subset seed and random-init seed, as in extract; default: the store's, else 0
    model: str | None = None  # open_clip model name; default: the one the SAE records (else ViT-B-16)
    pretrained: str | None = None  # open_clip tag, checkpoint path, or none; default: the SAE's (else openai)
    layer: int | None = None  # block index to splice at; default: the SAE's layer (a different one is refused)
    modes: tuple[str, ...] = ("on", "off")  # on = keep only the class's top-k latents; off = zero them
    ks: tuple[int | str, ...] = DEFAULT_KS  # set sizes; 'all' = every latent
    error_term: bool = False  # splice the sweep as x_hat_masked + (x - x_hat) (paper: without)
    n_seeds: int = 3  # random-latent-set baselines (0 = none)
    random_seed: int = 0  # seed of the random latent sets and of the probe's held-out images
    head: Literal["auto", "zeroshot", "probe"] = "auto"  # auto = probe for random weights (--pretrained none),
                                                         # zero-shot otherwise
    templates: Literal["auto", "openai", "world", "dataset"] = "auto"  # zero-shot templates: auto (world for synthetic,
                                                                       # the 80 OpenAI ones otherwise), dataset (its own,
                                                                       # e.g. EuroSAT's 'a centered satellite photo of {}.')
    class_prompts: Path | None = None  # JSON list of C names (or {class name: prompt name}) used in the prompts
    classifier_cache_dir: Path | None = None  # where zero-shot classifiers are cached per model and class names
                                              # (none: not cached)
    probe_split: str | None = None  # probe training split; None: held-out images of the evaluation split
    probe_images: int = 1000  # probe training images (with the evaluation split: at most half of its images)
    probe_l2: float = 1e-3  # probe weight decay (see pipeline.probe)
    batch_size: int = 32  # images per batch (the SAE works on smaller chunks when its codes are large)
    tail_rows: int = 64  # images per forward of the blocks after the tap (masks are stacked)
    class_token_only: bool = True  # the last block for the class token only, which is all the pooling reads; the flag
                                   # computes it for every token (equal up to float rounding)
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (GPU when present)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # model compute precision
    workers: int = 0  # image-decoding processes (0 = main process)
    plots: bool = True  # write accuracy_vs_k.png
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        for name in ("sae_dir", "stats_dir", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in ("cache_dir", "adapter", "class_prompts", "classifier_cache_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if isinstance(self.modes, str) or not all(isinstance(m, str) for m in self.modes):
            raise UserError(f"modes must be a list of the strings 'on'/'off', got {self.modes!r} (in YAML write "
                            "[\"on\", \"off\"]: unquoted on/off are booleans)")
        modes = tuple(dict.fromkeys(m.strip().lower() for m in self.modes))
        bad = [m for m in modes if m not in splice.MODES]
        if bad or not modes:
            raise UserError(f"unknown --mode '{bad[0] if bad else ''}'; use on, off or on,off")
        object.__setattr__(self, "modes", modes)
        if isinstance(self.ks, (str, int)):
            raise UserError(f"ks must be a list such as [1, 10, 100, 'all'], got {self.ks!r}")
        ks = [parse_k(k) for k in self.ks]
        if not ks:
            raise UserError("no k given; pass e.g. --k 1,10,100,all")
        ints = sorted({k for k in ks if k != ALL})
        object.__setattr__(self, "ks", tuple(ints) + ((ALL,) if ALL in ks else ()))
        if self.head not in HEADS:
            raise UserError(f"unknown --head '{self.head}'; use one of {', '.join(HEADS)}")
        if self.templates not in TEMPLATE_CHOICES:
            raise UserError(f"unknown --templates '{self.templates}'; use one of {', '.join(TEMPLATE_CHOICES)}")
        if self.n_seeds < 0:
            raise UserError(f"--seeds must be 0 or more (got {self.n_seeds})")
        if self.probe_images < 2:
            raise UserError(f"--probe-images must be at least 2 (got {self.probe_images})")
        if self.batch_size < 1 or self.tail_rows < 1:
            raise UserError("--batch-size and tail_rows must be at least 1")
        if self.workers < 0:
            raise UserError(f"--workers must be 0 or more (got {self.workers})")
        if self.layer is not None and self.layer < 0:
            raise UserError(f"--layer must be a block index >= 0 (got {self.layer})")
        if self.cache_dir is None and self.dataset is None:
            raise UserError("give --dataset (with --root) to read images, or --cache STORE to reuse its activations")
        if self.adapter is not None and self.class_prompts is not None:
            raise UserError("--class-prompts does not apply with --adapter: the adapted model prompts the names "
                            "it was trained with")
        ProbeConfig(l2=self.probe_l2)  # validates


@dataclasses.dataclass(frozen=True)
class Outputs:
    out_dir: Path
    results_path: Path
    per_class_path: Path
    plot_path: Path | None
    source: str  # "cache" or "images"
    head: str  # "zeroshot" or "probe"
    n_images: int  # evaluation images
    n_classes: int
    layer: int
    clip_accuracy: float
    sae_all_on_accuracy: float
    sae_error_term_accuracy: float
    accuracy: dict[str, dict[str, float]]  # mode -> k -> accuracy
    random_accuracy: dict[str, dict[str, tuple[float, float]]]  # mode -> k -> (mean, std)
    seconds: float
    sweep_seconds: float  # the masked forwards alone (pass over the evaluation images)


# ---------------------------------------------------------------------------------------
# Checks


def _pretrained_id(pretrained: str) -> str:
    """The pretrained string as load_model records it (absolute path for files)."""
    if pretrained.lower() == "none":
        return "none"
    path = Path(pretrained).expanduser()
    return str(path.resolve()) if path.is_file() else pretrained


def resolve_layer(cfg: Config, sae: SAE) -> int:
    """The splice layer: the SAE's; a requested layer that differs is refused."""
    trained = sae.config.layer
    if trained is None and cfg.layer is None:
        raise UserError(f"the SAE in {cfg.sae_dir} does not record its layer; pass --layer with the block it was "
                        "trained on")
    if trained is not None and cfg.layer is not None and cfg.layer != trained:
        raise UserError(f"the SAE in {cfg.sae_dir} was trained on layer {trained}, not layer {cfg.layer}; splice "
                        f"it at --layer {trained} or use an SAE trained on layer {cfg.layer}")
    return trained if trained is not None else int(cfg.layer)


def _model_of(cfg: Config, sae: SAE) -> tuple[str, str]:
    """(model name, pretrained): the given ones, else what the SAE records, else ViT-B-16/openai."""
    rec_name, _, rec_weights = sae.config.model.partition("/")
    name = cfg.model or rec_name or "ViT-B-16"
    pretrained = cfg.pretrained or (rec_weights if rec_name and name == rec_name else "") or "openai"
    return name, pretrained


def check_sae_model(sae: SAE, model: str, pretrained: str, sae_dir: Path) -> None:
    """Refuse an SAE whose config names another model (name/pretrained) than the one masked."""
    recorded = sae.config.model
    wanted = f"{model}/{_pretrained_id(pretrained)}"
    if not recorded:
        log.warning("the SAE in %s does not record its model; assuming %s", sae_dir, wanted)
        return
    rec_name, _, rec_weights = recorded.partition("/")
    want_name, _, want_weights = wanted.partition("/")
    if rec_name != want_name or rec_weights.lower() != want_weights.lower():
        raise UserError(f"the SAE in {sae_dir} was trained on {recorded}, not {wanted}; pass --model/--pretrained "
                        "of the model it was trained on or use an SAE of this model")


def check_stats(stats: LatentStats, sae: SAE, weights_sha256: str, layer: int, sae_dir: Path) -> None:
    """Refuse statistics computed with another SAE (weights sha256 via the stats' provenance) or layer."""
    prov = stats.meta.get("provenance") or {}
    recorded = prov.get("sae_weights_sha256")
    if not recorded and prov.get("codes_store"):
        try:  # older stats: ask the code store they were computed from
            from cache.codes import CodeStore

            recorded = CodeStore(prov["codes_store"]).attrs.get("sae_weights_sha256")
        except Exception:  # noqa: BLE001 - a missing or foreign store leaves it unknown
            recorded = None
    if not recorded:
        raise UserError(f"{stats.path} does not say which SAE its codes came from (no sae_weights_sha256 in its "
                        "provenance); rerun `pipeline encode` and `pipeline stats` with this SAE")
    if recorded != weights_sha256:
        raise UserError(f"{stats.path} was computed from another SAE (weights {recorded[:12]}, {sae_dir} has "
                        f"{weights_sha256[:12]}); pass the --stats of this SAE, or encode and compute them with it")
    if stats.d_sae != sae.config.d_sae:
        raise UserError(f"{stats.path} has {stats.d_sae} latents but the SAE has {sae.config.d_sae}; pass the "
                        "--stats of this SAE")
    if prov.get("layer") is not None and int(prov["layer"]) != layer:
        raise UserError(f"{stats.path} was computed at layer {prov['layer']}, the SAE splices at layer {layer}; "
                        "pass the --stats of this SAE and layer")


def check_ks(ks: Sequence[int | str], d_sae: int) -> None:
    big = [k for k in ks if k != ALL and k > d_sae]
    if big:
        raise UserError(f"k={big[0]} exceeds the SAE's {d_sae} latents; use k <= {d_sae} or 'all'")


def check_classes(class_names: Sequence[str], stats: LatentStats, source: str) -> None:
    if list(class_names) != list(stats.class_names):
        ours, theirs = list(class_names), list(stats.class_names)
        if len(ours) != len(theirs):
            detail = f"{len(ours)} classes vs {len(theirs)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            detail = f"class {i} is '{ours[i]}' vs '{theirs[i]}'"
        raise UserError(f"the classes of {source} do not match those of {stats.path} ({detail}); use statistics "
                        "computed on the same dataset, or the dataset they were computed on")


# ---------------------------------------------------------------------------------------
# Evaluation rows: where the tap comes from


@dataclasses.dataclass
class Batch:
    rows: np.ndarray  # indices into the source's rows
    labels: np.ndarray  # int64
    x_BTD: torch.Tensor | None = None  # tapped residuals (pass B)
    images: torch.Tensor | None = None  # preprocessed images (images source, pass A)
    prompts_BXD: torch.Tensor | None = None  # an adapted model's vision prompt tokens at the tap (pass B)


class CacheSource:
    """Rows of an activation store; the tap is read from ``acts/<layer>``, invalid rows are skipped."""

    kind = "cache"

    def __init__(self, store: ActivationStore, layer: int):
        self.store, self.layer = store, layer
        self.labels = store.labels
        self.valid = store.valid
        self.image_ids = [str(i) for i in store.image_ids]
        self.n_rows = store.n_images

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        want = np.zeros(self.n_rows, bool)
        want[rows] = True
        want &= self.valid
        acts = self.store.acts(self.layer)
        step = max(batch_size, self.store.images_per_chunk)  # whole chunks per read
        for start in range(0, self.n_rows, step):
            stop = min(start + step, self.n_rows)
            keep = np.flatnonzero(want[start:stop])
            if not len(keep):
                continue
            block = acts[start:stop]
            for s in range(0, len(keep), batch_size):
                local = keep[s:s + batch_size]
                x = torch.from_numpy(np.ascontiguousarray(block[local])).to(torch.float32)
                yield Batch(rows=start + local, labels=self.labels[start + local], x_BTD=x)

    def plain_features(self, model: LoadedModel, rows: np.ndarray, batch_size: int, tail_rows: int,
                       class_token_only: bool = False) -> Iterator[tuple[Batch, torch.Tensor]]:
        for batch in self.batches(rows, max(batch_size, tail_rows)):
            yield batch, splice.finish_forward(model.visual, batch.x_BTD.to(model.device, DTYPES[model.dtype]),
                                               self.layer, class_token_only=class_token_only)


class _SafeRows(Dataset):
    """``(image, label, ok, row)`` for chosen rows; an unreadable image gives ok=False."""

    def __init__(self, data: Dataset, rows: np.ndarray, image_size: int):
        self.data, self.rows, self.image_size = data, rows, image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool, int]:
        row = int(self.rows[i])
        try:
            image, label = self.data[row]
            return image, int(label), True, row
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for corrupt files
            log.warning("skipping unreadable image %d: %s", row, str(err).splitlines()[0])
            return torch.zeros(3, self.image_size, self.image_size), -1, False, row


class ImageSource:
    """Rows of a dataset; the tap is computed by running the model up to the layer."""

    kind = "images"

    def __init__(self, images: ImageSet, model: LoadedModel, layer: int, workers: int):
        self.images, self.model, self.layer, self.workers = images, model, layer, workers
        self.image_ids = list(images.image_ids)
        self.n_rows = len(images)
        self.labels = np.full(self.n_rows, -1, np.int64)  # filled by the first pass
        self.valid = np.ones(self.n_rows, bool)

    def _loader(self, rows: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        loader = DataLoader(_SafeRows(self.images.dataset, rows, self.model.image_size), batch_size=batch_size,
                            num_workers=self.workers, pin_memory=self.model.device.startswith("cuda"))
        for images, labels, ok, rows_b in loader:
            ok = ok.numpy().astype(bool)
            rows_b = rows_b.numpy()
            self.valid[rows_b[~ok]] = False
            self.labels[rows_b[ok]] = labels.numpy()[ok]
            if ok.any():
                yield images[torch.from_numpy(ok)], rows_b[ok], labels.numpy()[ok]

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        for images, rows_b, labels in self._loader(rows, batch_size):
            x = splice.tap_forward(self.model.visual, images, self.layer).to(torch.float32)
            yield Batch(rows=rows_b, labels=labels, x_BTD=x)

    def plain_features(self, model: LoadedModel, rows: np.ndarray, batch_size: int, tail_rows: int,
                       class_token_only: bool = False) -> Iterator[tuple[Batch, torch.Tensor]]:
        for images, rows_b, labels in self._loader(rows, batch_size):
            with torch.inference_mode():
                feats = model.model.encode_image(images.to(model.device, DTYPES[model.dtype]))
            yield Batch(rows=rows_b, labels=labels), feats


class AdaptedImageSource(ImageSource):
    """Rows of a dataset through a MaPLe-adapted model.

    The SAE sees the tap at the base model's positions (class token and patches); the
    vision prompt tokens at the tap ride along in the batch and rejoin them for the blocks
    after the tap (``AdaptedCLIP.finish``), unmasked.
    """

    def __init__(self, images: ImageSet, model: LoadedModel, adapted: maple.AdaptedCLIP, layer: int, workers: int):
        super().__init__(images, model, layer, workers)
        self.adapted = adapted

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        for images, rows_b, labels in self._loader(rows, batch_size):
            x_BTD, prompts_BXD = self.adapted.tap_with_prompts(images, (self.layer,))[self.layer]
            yield Batch(rows=rows_b, labels=labels, x_BTD=x_BTD.to(torch.float32), prompts_BXD=prompts_BXD)

    def plain_features(self, model: LoadedModel, rows: np.ndarray, batch_size: int, tail_rows: int,
                       class_token_only: bool = False) -> Iterator[tuple[Batch, torch.Tensor]]:
        for images, rows_b, labels in self._loader(rows, batch_size):
            with torch.inference_mode():
                feats = self.adapted.encode_image(images)
            yield Batch(rows=rows_b, labels=labels), feats


def _image_source(images: ImageSet, model: LoadedModel, adapted: maple.AdaptedCLIP | None, layer: int,
                  workers: int) -> ImageSource:
    if adapted is None:
        return ImageSource(images, model, layer, workers)
    return AdaptedImageSource(images, model, adapted, layer, workers)


# ---------------------------------------------------------------------------------------
# Latent sets


def top_latents(counts_CS: np.ndarray, k_max: int) -> np.ndarray:
    """``(C, k_max)`` latents by descending class count, ties to the lower latent index."""
    out = np.empty((counts_CS.shape[0], k_max), np.int64)
    for c in range(counts_CS.shape[0]):
        out[c] = np.argsort(-np.asarray(counts_CS[c], np.int64), kind="stable")[:k_max]
    return out


def random_latents(n_seeds: int, n_classes: int, d_sae: int, k_max: int, seed: int) -> np.ndarray:
    """``(n_seeds, C, k_max)``: per seed and class, the first k_max of a random ordering of the latents."""
    out = np.empty((n_seeds, n_classes, k_max), np.int64)
    for s in range(n_seeds):
        rng = np.random.default_rng([seed, s])
        for c in range(n_classes):
            out[s, c] = rng.permutation(d_sae)[:k_max]
    return out


@dataclasses.dataclass(frozen=True)
class Variant:
    """One masked forward of the sweep."""

    key: str
    family: str  # baseline, topk, random
    mode: str
    k: int | str | None  # None for baselines
    seed: int | None
    error_term: bool


def plan_variants(cfg: Config) -> list[Variant]:
    variants = [Variant("sae_error_term", "baseline", "on", ALL, None, True),
                Variant("sae_all_on", "baseline", "on", ALL, None, False)]
    for mode in cfg.modes:
        for k in cfg.ks:
            variants.append(Variant(f"{mode}/k={k}", "topk", mode, k, None, cfg.error_term))
    for seed in range(cfg.n_seeds):
        for mode in cfg.modes:
            for k in cfg.ks:
                if k != ALL:  # at k=all the random set is every latent: same as the top-k row
                    variants.append(Variant(f"random_{mode}/k={k}/seed={seed}", "random", mode, k, seed,
                                            cfg.error_term))
    return variants


# ---------------------------------------------------------------------------------------
# Heads


def _prompt_names(cfg: Config, class_names: list[str]) -> list[str]:
    return zeroshot.read_class_prompts(cfg.class_prompts, class_names)


def zero_shot_head(cfg: Config, model: LoadedModel, class_names: list[str],
                   dataset_name: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    if cfg.templates == "auto":  # the world's prompts; else the 80 OpenAI ones (the paper's protocol)
        template_set = "world" if dataset_name == "synthetic" else "openai"
    elif cfg.templates == "dataset":  # the dataset's own prompts where the literature has them
        template_set = dataset_name if dataset_name in zeroshot.DATASET_TEMPLATES else "openai"
    else:
        template_set = cfg.templates
    names = _prompt_names(cfg, class_names)
    W_CE = zeroshot.cached_text_classifier(model, names, zeroshot.TEMPLATE_SETS[template_set],
                                           cache_dir=cfg.classifier_cache_dir)
    info = {"kind": "zeroshot", "templates": template_set,
            "n_templates": len(zeroshot.TEMPLATE_SETS[template_set]), "prompt_names": names,
            "logits": "100 x cosine(image embedding, prompt-averaged class embedding)"}
    return (lambda f: zeroshot.zero_shot_logits(f, W_CE)), info


def adapted_head(cfg: Config, adapted: maple.AdaptedCLIP,
                 class_names: list[str]) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """The adapted model's own classifier: its learned prompt per class (templates do not apply)."""
    record = maple.read_adapter_config(cfg.adapter)
    trained_on = list(record["class_names"])
    if trained_on != list(class_names):
        raise UserError(f"the adapter in {cfg.adapter} was trained on other classes ({len(trained_on)}: "
                        f"{trained_on[0]}, ...) than these ({len(class_names)}: {class_names[0]}, ...); mask it on "
                        "its dataset")
    names = list(record["prompt_names"])
    with torch.inference_mode():
        W_CE = adapted.encode_text(names, normalize=True).float()
    info = {"kind": "zeroshot", "templates": "the adapter's learned MaPLe prompt", "prompt_names": names,
            "logits": "100 x cosine(adapted image embedding, adapted class embedding)"}
    return (lambda f: zeroshot.zero_shot_logits(f, W_CE)), info


# ---------------------------------------------------------------------------------------
# The run


def _resolve_data(cfg: Config, store: ActivationStore | None) -> dict[str, Any]:
    """dataset/root/split/limit/seed: given ones, else the store's; given ones must match the store's."""
    fields = {"dataset": cfg.dataset, "root": cfg.root, "split": cfg.split, "limit": cfg.limit, "seed": cfg.seed}
    if store is None:
        if fields["seed"] is None:
            fields["seed"] = 0
        return fields
    ds = dict(store.attrs.get(schema.ATTR_DATASET) or {})
    recorded = {"dataset": ds.get("name"), "root": ds.get("root"), "split": ds.get("split"),
                "limit": ds.get("limit"), "seed": ds.get("seed", 0)}
    for name, value in fields.items():
        if value is None:
            fields[name] = recorded[name]
            continue
        theirs = recorded[name]
        same = (str(Path(value).expanduser().resolve()) == str(Path(theirs).resolve()) if name == "root" and theirs
                else value == theirs)
        if not same:
            option = "--dataset" if name == "dataset" else f"--{name}"
            raise UserError(f"{option} {value} does not match the store {store.path} ({name} {theirs}); leave it "
                            "out to use the store's, or pass the store extracted from this data")
    if fields["seed"] is None:
        fields["seed"] = 0
    fields["world"] = ds.get("world")  # the synthetic world's task and held-out values, as extracted
    return fields


def _open_store(cfg: Config, layer: int, model_name: str, pretrained: str) -> ActivationStore:
    store = ActivationStore(cfg.cache_dir, mode="r")
    store.require_complete()
    if layer not in store.layers:
        raise UserError(f"the store {store.path} holds layers {store.layers}, not the SAE's layer {layer}; extract "
                        f"--layers {layer} or run without --cache")
    m = store.attrs.get(schema.ATTR_MODEL) or {}
    stored_adapter = (store.attrs.get(schema.ATTR_CONFIG) or {}).get("adapter")
    if stored_adapter and cfg.adapter is None:
        raise UserError(f"the store {store.path} holds an adapted model's activations; pass its --adapter DIR to mask "
                        "that model")
    if cfg.adapter is not None and stored_adapter != maple.adapter_identity(cfg.adapter):
        what = "another adapter's" if stored_adapter else "the base model's"
        raise UserError(f"the store {store.path} holds {what} activations, not those of the adapter in {cfg.adapter}; "
                        f"pass the store extracted with --adapter {cfg.adapter}, or --dataset/--root without --cache")
    if m.get("name") != model_name or str(m.get("pretrained", "")).lower() != _pretrained_id(pretrained).lower():
        raise UserError(f"the store {store.path} holds activations of {m.get('name')}/{m.get('pretrained')}, not "
                        f"{model_name}/{_pretrained_id(pretrained)}; pass that model or a store of this one")
    return store


def _holdout(valid: np.ndarray, n_probe: int, seed: int) -> np.ndarray:
    """Seeded random probe rows among the valid rows, ascending."""
    candidates = np.flatnonzero(valid)
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.permutation(candidates)[:n_probe])


def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    sae = load_sae(cfg.sae_dir, device=device)
    weights_sha = file_sha256(cfg.sae_dir / "weights.safetensors")
    layer = resolve_layer(cfg, sae)
    model_name, pretrained = _model_of(cfg, sae)
    check_sae_model(sae, model_name, pretrained, cfg.sae_dir)
    stats = LatentStats(cfg.stats_dir)
    check_stats(stats, sae, weights_sha, layer, cfg.sae_dir)
    d_sae = sae.config.d_sae
    check_ks(cfg.ks, d_sae)
    runfiles.refuse_foreign_files(cfg.out_dir, OUR_FILES)

    store = _open_store(cfg, layer, model_name, pretrained) if cfg.cache_dir is not None else None
    data = _resolve_data(cfg, store)
    if store is not None:
        check_classes(store.class_names, stats, f"the store {store.path}")
        if store.d_model != sae.config.d_in:
            raise UserError(f"the SAE expects width {sae.config.d_in} but {store.path} holds width {store.d_model}")
        if sae.config.cache_config_sha256 and sae.config.cache_config_sha256 != store.config_sha256:
            log.info("the SAE was trained on another store (config %s); masking %s with it",
                     sae.config.cache_config_sha256[:12], store.path)

    model = load_model(model_name, pretrained, device=device, dtype=cfg.dtype, init_seed=data["seed"])
    model.check_layers((layer,))
    if model.width != sae.config.d_in:
        raise UserError(f"the SAE expects width {sae.config.d_in} but {model_name} has width {model.width}")
    head_kind = cfg.head if cfg.head != "auto" else ("probe" if model.pretrained == "none" else "zeroshot")
    adapted = maple.load_adapter(cfg.adapter, model) if cfg.adapter is not None else None

    if store is not None and adapted is None:
        source: CacheSource | ImageSource = CacheSource(store, layer)
        class_names = store.class_names
    else:  # an adapted store names the images; the tap is recomputed with the prompt tokens it lacks
        images = open_dataset(data["dataset"], root=data["root"], split=data["split"], transform=model.preprocess,
                              limit=data["limit"], seed=data["seed"], image_size=model.image_size,
                              **synthetic_options(data.get("world")))
        check_classes(images.class_names, stats, f"dataset '{images.name}' split '{images.split}'")
        source = _image_source(images, model, adapted, layer, cfg.workers)
        class_names = images.class_names
        data["split"] = images.split
    n_classes = len(class_names)

    # -- probe rows and pass A: plain CLIP on every row it needs --------------------------------
    same_split = head_kind == "probe" and cfg.probe_split in (None, data["split"])
    all_rows = np.flatnonzero(source.valid) if source.kind == "cache" else np.arange(source.n_rows)
    probe_rows = (_holdout(source.valid, min(cfg.probe_images, len(all_rows) // 2), cfg.random_seed)
                  if same_split else np.zeros(0, np.int64))
    plain_rows = all_rows
    features: dict[int, torch.Tensor] = {}
    log.info("plain CLIP on %d images (%s)", len(plain_rows), "cached tap through the remaining blocks"
             if source.kind == "cache" else "open_clip encode_image")
    for batch, feats in source.plain_features(model, plain_rows, cfg.batch_size, cfg.tail_rows,
                                              cfg.class_token_only):
        for r, f in zip(batch.rows.tolist(), feats.float().cpu()):
            features[r] = f
    labels_all = source.labels
    valid_rows = np.array(sorted(features), np.int64)
    eval_rows = np.setdiff1d(valid_rows, probe_rows)
    if not len(eval_rows):
        raise UserError("no evaluation images are left (all unreadable or used for the probe); raise --limit or "
                        "pass --probe-split")
    bad = labels_all[eval_rows]
    if (bad < 0).any() or (bad >= n_classes).any():
        raise UserError("some evaluation images have labels outside the class list; re-extract the store")

    head_info: dict[str, Any]
    if head_kind == "zeroshot":
        zeroshot.warn_if_world_differs(model.pretrained, data["dataset"], data["seed"], model.image_size)
        head, head_info = (zero_shot_head(cfg, model, class_names, data["dataset"]) if adapted is None
                           else adapted_head(cfg, adapted, class_names))
    else:
        probe, head_info = _fit_probe(cfg, model, adapted, data, features, labels_all, probe_rows, same_split,
                                     class_names)
        head = probe.logits

    plain_logits: dict[int, torch.Tensor] = {}
    for s in range(0, len(eval_rows), 4096):
        rows = eval_rows[s:s + 4096].tolist()
        logits = head(torch.stack([features[r] for r in rows]).to(model.device)).cpu()
        plain_logits.update(zip(rows, logits))
    clip_correct_C, totals_C = _score_rows(plain_logits, labels_all, eval_rows, n_classes)
    clip_acc = float(clip_correct_C.sum() / totals_C.sum())
    chance = 1.0 / n_classes
    log.info("plain CLIP accuracy with the %s head: %.4f on %d images (chance %.4f)", head_kind, clip_acc,
             len(eval_rows), chance)
    if model.pretrained != "none" and clip_acc <= 1.5 * chance:
        log.warning("plain CLIP is near chance (%.4f vs %.4f): check the class names and prompts "
                    "(--class-prompts, --templates) before reading anything into the masking results",
                    clip_acc, chance)

    # -- pass B: the sweep ---------------------------------------------------------------------------
    counts_CS = np.asarray(stats.class_counts())
    finite = [k for k in cfg.ks if k != ALL]
    k_max = max(finite) if finite else 0
    top_CK = torch.from_numpy(top_latents(counts_CS, k_max)) if k_max else None
    random_sets = (torch.from_numpy(random_latents(cfg.n_seeds, n_classes, d_sae, k_max, cfg.random_seed))
                   if k_max and cfg.n_seeds else None)  # (n_seeds, C, k_max)
    variants = plan_variants(cfg)
    sweep_started = time.perf_counter()
    correct_VC, max_diff = _sweep(cfg, source, model, sae, layer, eval_rows, variants, top_CK, random_sets, head,
                                  plain_logits, n_classes)
    sweep_seconds = time.perf_counter() - sweep_started

    results = _assemble(cfg, variants, correct_VC, totals_C, clip_correct_C, chance)
    clip_source = ("the cached tap (float16 store) through the blocks after the tap" if source.kind == "cache"
                   else "open_clip encode_image on the images")
    nonzero_C = (counts_CS > 0).sum(1)
    record = {
        "accuracy": results["accuracy"],
        "random_per_seed": results["random_per_seed"],
        "n_images": int(len(eval_rows)), "n_classes": n_classes, "n_probe_images": int(len(probe_rows)),
        "layer": layer, "d_sae": d_sae, "source": source.kind, "clip_source": clip_source, "head": head_info,
        "checks": {"max_abs_logit_diff_sae_error_term_vs_clip": max_diff},
        "top_latents": {"nonzero_latents_per_class": nonzero_C.tolist(),
                        "threshold": (stats.meta.get("config") or {}).get("threshold")},
        "class_names": class_names, "definitions": DEFINITIONS,
        "config": {"modes": list(cfg.modes), "ks": list(cfg.ks), "error_term": cfg.error_term, "n_seeds": cfg.n_seeds,
                   "random_seed": cfg.random_seed, "head": head_kind, "dataset": data, "model": model_name,
                   "pretrained": model.pretrained, "dtype": cfg.dtype, "class_token_only": cfg.class_token_only,
                   "adapter": maple.adapter_identity(cfg.adapter) if cfg.adapter is not None else None},
        "provenance": {"sae_dir": str(cfg.sae_dir.resolve()), "sae_weights_sha256": weights_sha,
                       "adapter_dir": str(cfg.adapter.resolve()) if cfg.adapter is not None else None,
                       "sae_config": sae.config.to_dict(), "stats_dir": str(cfg.stats_dir.resolve()),
                       "stats_provenance": stats.meta.get("provenance"),
                       "cache_dir": str(cfg.cache_dir.resolve()) if cfg.cache_dir else None,
                       "cache_config_sha256": store.config_sha256 if store is not None else None},
        "seconds": {"total": time.perf_counter() - started, "sweep": sweep_seconds},
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / RESULTS_FILE).write_text(json.dumps(json_safe(record), indent=2))
    _write_per_class(cfg.out_dir / PER_CLASS_FILE, variants, correct_VC, totals_C, clip_correct_C, class_names)
    plot_path = None
    if cfg.plots:
        plot_path = _plot(cfg.out_dir / PLOT_FILE, cfg, results["accuracy"], d_sae, chance,
                          title=f"{model_name} layer {layer}, {data['dataset']} ({len(eval_rows)} images), "
                                f"{head_kind} head")
    acc = results["accuracy"]
    return Outputs(out_dir=cfg.out_dir, results_path=cfg.out_dir / RESULTS_FILE,
                   per_class_path=cfg.out_dir / PER_CLASS_FILE, plot_path=plot_path, source=source.kind,
                   head=head_kind, n_images=int(len(eval_rows)), n_classes=n_classes, layer=layer,
                   clip_accuracy=acc["clip"], sae_all_on_accuracy=acc["sae_all_on"],
                   sae_error_term_accuracy=acc["sae_error_term"],
                   accuracy={m: dict(acc[m]) for m in cfg.modes},
                   random_accuracy={m: {k: (v["mean"], v["std"]) for k, v in acc.get(f"random_{m}", {}).items()}
                                    for m in cfg.modes if cfg.n_seeds},
                   seconds=time.perf_counter() - started, sweep_seconds=sweep_seconds)


def _sweep(cfg: Config, source: CacheSource | ImageSource, model: LoadedModel, sae: SAE, layer: int,
           eval_rows: np.ndarray, variants: list[Variant], top_CK: torch.Tensor | None,
           random_sets: torch.Tensor | None, head: Callable[[torch.Tensor], torch.Tensor],
           plain_logits: dict[int, torch.Tensor], n_classes: int) -> tuple[np.ndarray, float]:
    """Every variant on every evaluation image: correct counts per (variant, class), and the largest
    |logit| difference between the error-term splice and plain CLIP (a parity check)."""
    correct_VC = np.zeros((len(variants), n_classes), np.int64)
    max_diff = 0.0
    d_sae = sae.config.d_sae
    chunk = max(1, min(cfg.batch_size, CODES_BUDGET_BYTES // max(1, model.n_tokens * d_sae * 4)))
    per_group = max(1, cfg.tail_rows // chunk)
    device = sae.W_dec.device
    bar = tqdm(total=len(eval_rows), unit="img", desc="masking", disable=not cfg.progress, dynamic_ncols=True)
    for batch in source.batches(eval_rows, cfg.batch_size):
        for s in range(0, len(batch.rows), chunk):
            rows = batch.rows[s:s + chunk]
            labels_B = torch.from_numpy(batch.labels[s:s + chunk])
            enc = splice.encode_tap(sae, batch.x_BTD[s:s + chunk].to(device))
            for g in range(0, len(variants), per_group):
                group = list(range(g, min(g + per_group, len(variants))))
                xs = [_splice_variant(sae, enc, variants[v], labels_B, top_CK, random_sets) for v in group]
                if batch.prompts_BXD is None:
                    feats = splice.finish_many(model.visual, xs, layer, max_rows=cfg.tail_rows,
                                               class_token_only=cfg.class_token_only)
                else:  # the prompt tokens ride along unchanged: the SAE sees the base positions only
                    feats = [source.adapted.finish(x, batch.prompts_BXD[s:s + chunk], layer) for x in xs]
                for v, f in zip(group, feats):
                    logits = head(f).cpu()
                    pred = logits.argmax(1).numpy()
                    np.add.at(correct_VC[v], labels_B.numpy(), pred == labels_B.numpy())
                    if variants[v].key == "sae_error_term":
                        ref = torch.stack([plain_logits[r] for r in rows.tolist()])
                        max_diff = max(max_diff, float((logits - ref).abs().max()))
            bar.update(len(rows))
    bar.close()
    return correct_VC, max_diff


def _splice_variant(sae: SAE, enc: splice.Encoded, v: Variant, labels_B: torch.Tensor,
                    top_CK: torch.Tensor | None, random_sets: torch.Tensor | None) -> torch.Tensor:
    if v.k == ALL:
        idx = None
    elif v.family == "random":
        idx = random_sets[v.seed][labels_B, :v.k]
    else:
        idx = top_CK[labels_B, :v.k]
    xhat = splice.masked_reconstruction(sae, enc, v.mode, idx)
    return splice.splice_input(enc, xhat, error_term=v.error_term)


def _score_rows(logits: dict[int, torch.Tensor], labels: np.ndarray, rows: np.ndarray,
                n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    correct = np.zeros(n_classes, np.int64)
    totals = np.zeros(n_classes, np.int64)
    for r in rows.tolist():
        c = int(labels[r])
        totals[c] += 1
        correct[c] += int(int(logits[r].argmax()) == c)
    return correct, totals


def _fit_probe(cfg: Config, model: LoadedModel, adapted: maple.AdaptedCLIP | None, data: dict[str, Any],
               features: dict[int, torch.Tensor],
               labels: np.ndarray, probe_rows: np.ndarray, same_split: bool,
               class_names: list[str]) -> tuple[LinearProbe, dict[str, Any]]:
    n_classes = len(class_names)
    if same_split:
        rows = [r for r in probe_rows.tolist() if r in features]
        x = torch.stack([features[r] for r in rows])
        y = torch.from_numpy(labels[rows])
        split = data["split"]
    else:
        if data["dataset"] is None:
            raise UserError("--probe-split needs --dataset and --root to read the probe's images")
        probe_set = open_dataset(data["dataset"], root=data["root"], split=cfg.probe_split,
                                 transform=model.preprocess, limit=cfg.probe_images, seed=data["seed"],
                                 image_size=model.image_size, **synthetic_options(data.get("world")))
        if probe_set.class_names != class_names:
            raise UserError(f"probe split '{cfg.probe_split}' has other classes than the evaluation split; "
                            "pick a split of the same dataset")
        src = _image_source(probe_set, model, adapted, 0, cfg.workers)
        xs, ys = [], []
        for batch, feats in src.plain_features(model, np.arange(src.n_rows), cfg.batch_size, cfg.tail_rows):
            xs.append(feats.float().cpu())
            ys.append(torch.from_numpy(batch.labels))
        if not xs:
            raise UserError(f"no readable images in probe split '{cfg.probe_split}'")
        x, y = torch.cat(xs), torch.cat(ys)
        split = probe_set.split
    probe = fit_linear_probe(x, y, n_classes, ProbeConfig(l2=cfg.probe_l2))
    log.info("linear probe fit on %d images of split '%s' (train accuracy %.4f)", probe.n_train, split,
             probe.train_accuracy)
    info = {"kind": "probe", "split": split, "n_train": probe.n_train, "train_accuracy": probe.train_accuracy,
            "held_out_from_evaluation": same_split, "l2": cfg.probe_l2,
            "features": "plain CLIP final image embeddings, L2-normalised then standardised",
            "fit": "multinomial logistic regression, full-batch L-BFGS from zero, float64"}
    return probe, info


def _assemble(cfg: Config, variants: list[Variant], correct_VC: np.ndarray, totals_C: np.ndarray,
              clip_correct_C: np.ndarray, chance: float) -> dict[str, Any]:
    n = totals_C.sum()
    acc_V = correct_VC.sum(1) / n
    by_key = {v.key: float(a) for v, a in zip(variants, acc_V)}
    accuracy: dict[str, Any] = {"clip": float(clip_correct_C.sum() / n), "sae_all_on": by_key["sae_all_on"],
                                "sae_error_term": by_key["sae_error_term"], "chance": chance}
    for mode in cfg.modes:
        accuracy[mode] = {str(k): by_key[f"{mode}/k={k}"] for k in cfg.ks}
    per_seed: dict[str, dict[str, list[float]]] = {}
    if cfg.n_seeds:
        for mode in cfg.modes:
            per_seed[mode] = {}
            accuracy[f"random_{mode}"] = {}
            for k in cfg.ks:
                vals = ([by_key[f"{mode}/k={k}"]] * cfg.n_seeds if k == ALL else
                        [by_key[f"random_{mode}/k={k}/seed={s}"] for s in range(cfg.n_seeds)])
                per_seed[mode][str(k)] = vals
                std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                accuracy[f"random_{mode}"][str(k)] = {"mean": float(np.mean(vals)), "std": std}
    return {"accuracy": accuracy, "random_per_seed": per_seed}


def _write_per_class(path: Path, variants: list[Variant], correct_VC: np.ndarray, totals_C: np.ndarray,
                     clip_correct_C: np.ndarray, class_names: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "family", "mode", "k", "seed", "error_term", "class_index", "class_name", "n_images",
                    "n_correct", "accuracy"])
        rows = [("clip", "baseline", "", "", "", "", clip_correct_C)]
        rows += [(v.key, v.family, v.mode, v.k, "" if v.seed is None else v.seed, v.error_term, correct_VC[i])
                 for i, v in enumerate(variants)]
        for key, family, mode, k, seed, err, correct_C in rows:
            for c, name in enumerate(class_names):
                n = int(totals_C[c])
                acc = "" if n == 0 else f"{correct_C[c] / n:.6g}"
                w.writerow([key, family, mode, k, seed, err, c, name, n, int(correct_C[c]), acc])


def _plot(path: Path, cfg: Config, acc: dict[str, Any], d_sae: int, chance: float, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [d_sae if k == ALL else k for k in cfg.ks]
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    colours = {"on": "tab:blue", "off": "tab:red"}
    for mode in cfg.modes:
        ys = [acc[mode][str(k)] for k in cfg.ks]
        ax.plot(xs, ys, marker="o", color=colours[mode], label=f'"{mode}": class top-k latents')
        if cfg.n_seeds:
            r = acc[f"random_{mode}"]
            mean = np.array([r[str(k)]["mean"] for k in cfg.ks])
            std = np.array([r[str(k)]["std"] for k in cfg.ks])
            ax.plot(xs, mean, ls="--", marker=".", color=colours[mode], alpha=0.7,
                    label=f'"{mode}": random latents ({cfg.n_seeds} seeds, ±1 sd)')
            ax.fill_between(xs, mean - std, mean + std, color=colours[mode], alpha=0.12)
    ax.axhline(acc["clip"], color="k", lw=1, label=f"plain CLIP ({acc['clip']:.3f})")
    ax.axhline(acc["sae_all_on"], color="tab:gray", lw=1, ls=":",
               label=f"SAE, all latents on ({acc['sae_all_on']:.3f})")
    ax.axhline(chance, color="tab:gray", lw=0.8, ls="-.", label=f"chance ({chance:.3f})")
    if len(set(xs)) > 1:
        ax.set_xscale("log")
    ax.set_xticks(xs, [("all" if k == ALL else str(k)) for k in cfg.ks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("k (latents in the class's set; ground-truth class)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary(out: Outputs) -> str:
    lines = [f"{out.head} head, {out.n_images} images, {out.n_classes} classes, layer {out.layer} "
             f"(tap from the {out.source}); sweep {out.sweep_seconds:.1f} s of {out.seconds:.1f} s",
             f"  plain CLIP {out.clip_accuracy:.4f}   SAE all on {out.sae_all_on_accuracy:.4f}   "
             f"SAE + error term {out.sae_error_term_accuracy:.4f}"]
    for mode, row in out.accuracy.items():
        rand = out.random_accuracy.get(mode, {})
        cells = "  ".join(f"k={k}: {a:.3f}" + (f" (rand {rand[k][0]:.3f}±{rand[k][1]:.3f})" if k in rand else "")
                          for k, a in row.items())
        lines.append(f"  {mode:3s} {cells}")
    lines.append(f"  -> {out.results_path}, {out.per_class_path}" + (f", {out.plot_path}" if out.plot_path else ""))
    return "\n".join(lines)


STAGE = Stage(name="mask", config=Config, run=run, summary=summary,
              reads=("sae_dir", "stats_dir", "cache_dir", "adapter"), writes=("out_dir",),
              help="""Masking experiments: accuracy with the SAE spliced in and each class's top-k latents on or off.

    The mask of an image uses its ground-truth class (the paper's protocol). Plain CLIP's
    accuracy with the head is computed first and printed before any masking.""")
