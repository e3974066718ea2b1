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

A splice correction (``splice_correction``, ``pipeline.splice.Correction``) is added to every
splice without the error term (all-on, on, off, random sets): none (the default, this
project's runs), ``mean_error`` (the SAE's mean error E[x − x̂], stored with it by
``pipeline train``, else measured on ``cache_dir``), or ``constant:<value>``. The paper's
numbers need ``constant:0.105131256516992``: the reference code splices x̂ − SAE_BIAS.

Heads (fixed while masking): the zero-shot classifier of the CLIP text tower (class-name
prompts, 80 OpenAI templates, ``pipeline.zeroshot``; cached per model and class names), or
a linear probe (``pipeline.probe``) fit on plain CLIP's final image embeddings of held-out
images. Before any masking, plain CLIP's accuracy with the head is computed and logged
(PITFALLS: a zero-shot gap may be prompts or class names, not the SAE).

An adapted model (``adapter``: a MaPLe folder from ``pipeline adapt``) is masked with the
base model's SAE from images: the SAE sees the tap at the base model's token positions and
the vision prompt tokens rejoin them, unmasked, for the blocks after the tap; the zero-shot
head is the adapter's learned prompt per class. With ``prompt_tokens: keep`` (the paper's
reference) the SAE encodes the prompt tokens too and they are masked like every other token;
the default follows the ``cache_dir`` store (``pipeline extract --prompt-tokens``), and a
request that contradicts the store is refused. Either way the tap is recomputed from the
images: with ``cache_dir`` (a store extracted with this adapter) the store only names the
images, which are read and run up to the tap. An adapted store without its adapter, or
another adapter's store, is refused.

The masked forwards reuse the tapped residuals of an activation store when ``cache_dir``
is given: only the blocks after the tap run (and no image is read). Otherwise images are
run up to the tap once per batch. Either way the SAE encodes each batch once and every
mask reuses those codes.

This stage checks and wires; the sources of the tap are ``pipeline.sources``, the heads
``pipeline.heads``, the latent sets, variants and results folder ``pipeline.masking``, and the
masked forwards ``pipeline.sweep``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from cache import schema
from cache.errors import UserError, require_threads
from cache.loader import LoaderConfig, TokenLoader
from cache.store import ActivationStore, one_writer
from pipeline import maple, masking, runfiles, scores, splice, zeroshot
from pipeline.configs import Option, Stage
from pipeline.datasets import open_dataset, synthetic_options
from pipeline.heads import TEMPLATE_CHOICES, adapted_head, probe_head, zero_shot_head
from pipeline.latents import LatentStats
from pipeline.masking import ALL, parse_k
from pipeline.models import file_sha256, load_model, resolve_device
from pipeline.probe import ProbeConfig
from pipeline.progress import announce, next_steps
from pipeline.sae import SAE, load_sae, mean_error
from pipeline.sae.io import MEAN_ERROR_NAME, WEIGHTS_NAME, load_mean_error
from pipeline.sources import CacheSource, ImageSource, image_source
from pipeline.sweep import score_rows, sweep
from pipeline.threads import sized

log = logging.getLogger(__name__)

DEFAULT_KS: tuple[int | str, ...] = (1, 2, 5, 10, 50, 100, 500, 1000, 2000, ALL)
HEADS = ("auto", "zeroshot", "probe")
MEAN_ERROR_TOKENS = 200_000  # tokens of --cache the mean error is measured on when the SAE folder lacks it


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
    prompt_tokens: Literal["drop", "keep"] | None = None  # with --adapter: the SAE encodes and masks MaPLe's vision
                                                          # prompt tokens too (keep, the paper) or they pass the splice
                                                          # unmasked (drop); default: the --cache store's, else drop
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
    splice_correction: str = "none"  # added to every splice without the error term: none, mean_error (the SAE's
                                     # E[x - x_hat]), constant:<value> (the paper's code: constant:0.105131256516992)
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
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        require_threads(self.threads)
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
        object.__setattr__(self, "splice_correction", str(splice.Correction.parse(self.splice_correction)))
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
        if self.prompt_tokens not in (None, "drop", "keep"):
            raise UserError(f"unknown --prompt-tokens '{self.prompt_tokens}'; use drop or keep")
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
    mean_recall: dict[str, Any]  # mean per-class recall: clip, sae_all_on, sae_error_term, and mode -> k -> recall
    splice_correction: str  # what was added to every splice without the error term
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
    stored_prompts = _stored_prompt_tokens(store)
    if cfg.adapter is not None and cfg.prompt_tokens not in (None, stored_prompts):
        raise UserError(f"--prompt-tokens {cfg.prompt_tokens} contradicts the store {store.path}, extracted with "
                        f"--prompt-tokens {stored_prompts}; leave it out, or pass a store extracted with "
                        f"--prompt-tokens {cfg.prompt_tokens}")
    if m.get("name") != model_name or str(m.get("pretrained", "")).lower() != _pretrained_id(pretrained).lower():
        raise UserError(f"the store {store.path} holds activations of {m.get('name')}/{m.get('pretrained')}, not "
                        f"{model_name}/{_pretrained_id(pretrained)}; pass that model or a store of this one")
    return store


def correction_shift(cfg: Config, sae: SAE, store: ActivationStore | None,
                     layer: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The vector added to every splice without the error term (raw units, on the SAE's device), and its record."""
    correction = splice.Correction.parse(cfg.splice_correction)
    d, device = sae.config.d_in, sae.W_dec.device
    if correction.kind == "none":
        return None, {"kind": "none"}
    if correction.kind == "constant":
        return torch.full((d,), correction.value, dtype=torch.float32, device=device), {"kind": "constant",
                                                                                         "value": correction.value}
    stored = load_mean_error(cfg.sae_dir)
    if stored is not None:
        shift_D, info = stored.mean_error_D, {"source": f"{MEAN_ERROR_NAME} of the SAE folder",
                                               "n_tokens": stored.n_tokens, "token_kind": stored.token_kind,
                                               "cache_config_sha256": stored.cache_config_sha256}
    elif store is None or cfg.adapter is not None:
        raise UserError(f"the SAE in {cfg.sae_dir} has no {MEAN_ERROR_NAME} (trained before it was stored): pass "
                        "--cache with the base model's store to measure it there, or --splice-correction none")
    else:
        tokens = TokenLoader(store, LoaderConfig(layer=layer, token_kind=sae.config.token_kind), split="all")
        b = min(8192, MEAN_ERROR_TOKENS, tokens.tokens_per_epoch)  # whole batches within one epoch: no token twice
        loader = TokenLoader(store, LoaderConfig(layer=layer, batch_tokens=b, token_kind=sae.config.token_kind),
                             split="all")
        n_batches = min(MEAN_ERROR_TOKENS, loader.tokens_per_epoch) // b
        batches = (x.float() for x, _ in zip(loader.batches(0), range(n_batches)))
        shift_D, n = mean_error(sae, batches)
        info = {"source": f"measured on the store {store.path}", "n_tokens": n, "token_kind": sae.config.token_kind,
                "cache_config_sha256": store.config_sha256}
    shift_D = shift_D.to(device, torch.float32)
    return shift_D, {"kind": "mean_error", **info, "mean": float(shift_D.mean()),
                     "mean_abs": float(shift_D.abs().mean())}


def _prompt_tokens(cfg: Config, store: ActivationStore | None) -> str | None:
    """An adapted model's prompt tokens: kept (encoded and masked) or dropped (unmasked); None for the base model."""
    if cfg.adapter is None:
        return None
    if cfg.prompt_tokens is not None:
        return cfg.prompt_tokens
    return _stored_prompt_tokens(store) if store is not None else "drop"


def _stored_prompt_tokens(store: ActivationStore) -> str:
    """What ``pipeline extract --prompt-tokens`` did with an adapted store's prompt tokens (absent: drop)."""
    return (store.attrs.get(schema.ATTR_CONFIG) or {}).get("prompt_tokens", "drop")


def _holdout(valid: np.ndarray, n_probe: int, seed: int) -> np.ndarray:
    """Seeded random probe rows among the valid rows, ascending."""
    candidates = np.flatnonzero(valid)
    rng = np.random.default_rng([seed, 7])
    return np.sort(rng.permutation(candidates)[:n_probe])


@sized
@one_writer
def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    sae = load_sae(cfg.sae_dir, device=device)
    weights_sha = file_sha256(cfg.sae_dir / WEIGHTS_NAME)
    layer = resolve_layer(cfg, sae)
    model_name, pretrained = _model_of(cfg, sae)
    check_sae_model(sae, model_name, pretrained, cfg.sae_dir)
    stats = LatentStats(cfg.stats_dir)
    check_stats(stats, sae, weights_sha, layer, cfg.sae_dir)
    d_sae = sae.config.d_sae
    check_ks(cfg.ks, d_sae)
    runfiles.refuse_foreign_files(cfg.out_dir, masking.OUR_FILES)

    store = _open_store(cfg, layer, model_name, pretrained) if cfg.cache_dir is not None else None
    data = _resolve_data(cfg, store)
    if store is not None:
        check_classes(store.class_names, stats, f"the store {store.path}")
        if store.d_model != sae.config.d_in:
            raise UserError(f"the SAE expects width {sae.config.d_in} but {store.path} holds width {store.d_model}")
        if sae.config.cache_config_sha256 and sae.config.cache_config_sha256 != store.config_sha256:
            log.info("the SAE was trained on another store (config %s); masking %s with it",
                     sae.config.cache_config_sha256[:12], store.path)

    shift_D, correction = correction_shift(cfg, sae, store, layer)
    if shift_D is not None:
        log.info("splice correction %s: %.4g on average per element (not with the error term)", cfg.splice_correction,
                 float(shift_D.mean()))

    model = load_model(model_name, pretrained, device=device, dtype=cfg.dtype, init_seed=data["seed"])
    model.check_layers((layer,))
    if model.width(layer) != sae.config.d_in:
        raise UserError(f"the SAE expects width {sae.config.d_in} but layer {layer} of {model_name} has width "
                        f"{model.width(layer)}")
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
        source = image_source(images, model, adapted, layer, cfg.workers,
                              keep_prompts=_prompt_tokens(cfg, store) == "keep")
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
    unit = model.tower.unit
    via = f"cached activations, then the {unit}s after it" if source.kind == "cache" else "images through the model"
    announce("mask",
             f"{len(plain_rows):,} images of {data['dataset']}, {head_kind} head, {', '.join(cfg.modes)} runs for "
             f"k = {', '.join(map(str, cfg.ks))} and {cfg.n_seeds} random sets each, spliced at {unit} {layer} ({via})",
             f"into {cfg.out_dir}")
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
        head, head_info = (zero_shot_head(model, class_names, data["dataset"], templates=cfg.templates,
                                          class_prompts=cfg.class_prompts, cache_dir=cfg.classifier_cache_dir)
                           if adapted is None else adapted_head(cfg.adapter, adapted, class_names))
    else:
        probe, head_info = probe_head(model, adapted, data, features, labels_all, probe_rows, same_split, class_names,
                                      probe_split=cfg.probe_split, probe_images=cfg.probe_images,
                                      probe_l2=cfg.probe_l2, batch_size=cfg.batch_size, tail_rows=cfg.tail_rows,
                                      workers=cfg.workers)
        head = probe.logits

    plain_logits: dict[int, torch.Tensor] = {}
    for s in range(0, len(eval_rows), 4096):
        rows = eval_rows[s:s + 4096].tolist()
        logits = head(torch.stack([features[r] for r in rows]).to(model.device)).cpu()
        plain_logits.update(zip(rows, logits))
    clip_correct_C, totals_C = score_rows(plain_logits, labels_all, eval_rows, n_classes)
    clip_acc = float(clip_correct_C.sum() / totals_C.sum())
    chance = 1.0 / n_classes
    log.info("plain CLIP accuracy with the %s head: %.4f (mean per-class recall %.4f) on %d images (chance %.4f)",
             head_kind, clip_acc, scores.mean_recall(clip_correct_C, totals_C), len(eval_rows), chance)
    if model.pretrained != "none" and clip_acc <= 1.5 * chance:
        log.warning("plain CLIP is near chance (%.4f vs %.4f): check the class names and prompts "
                    "(--class-prompts, --templates) before reading anything into the masking results",
                    clip_acc, chance)

    # -- pass B: the sweep ---------------------------------------------------------------------------
    counts_CS = np.asarray(stats.class_counts())
    finite = [k for k in cfg.ks if k != ALL]
    k_max = max(finite) if finite else 0
    top_CK = torch.from_numpy(masking.top_latents(counts_CS, k_max)) if k_max else None
    random_sets = (torch.from_numpy(masking.random_latents(cfg.n_seeds, n_classes, d_sae, k_max, cfg.random_seed))
                   if k_max and cfg.n_seeds else None)  # (n_seeds, C, k_max)
    variants = masking.plan_variants(cfg.modes, cfg.ks, cfg.n_seeds, cfg.error_term)
    sweep_started = time.perf_counter()
    correct_MC, max_diff = sweep(source, model, sae, layer, eval_rows, variants, top_CK, random_sets, head,
                                 plain_logits, n_classes, batch_size=cfg.batch_size, tail_rows=cfg.tail_rows,
                                 class_token_only=cfg.class_token_only, progress=cfg.progress, shift_D=shift_D)
    sweep_seconds = time.perf_counter() - sweep_started

    results = masking.assemble(cfg.modes, cfg.ks, cfg.n_seeds, variants, correct_MC, totals_C, clip_correct_C, chance)
    clip_source = ("the cached tap (float16 store) through the blocks after the tap" if source.kind == "cache"
                   else "open_clip encode_image on the images")
    nonzero_C = (counts_CS > 0).sum(1)
    record = {
        "accuracy": results["accuracy"],
        "mean_recall": results["mean_recall"],
        "random_per_seed": results["random_per_seed"],
        "n_images": int(len(eval_rows)), "n_classes": n_classes, "n_probe_images": int(len(probe_rows)),
        "layer": layer, "d_sae": d_sae, "source": source.kind, "clip_source": clip_source, "head": head_info,
        "checks": {"max_abs_logit_diff_sae_error_term_vs_clip": max_diff},
        "splice_correction": correction,
        "top_latents": {"nonzero_latents_per_class": nonzero_C.tolist(),
                        "threshold": (stats.meta.get("config") or {}).get("threshold")},
        "class_names": class_names, "definitions": masking.DEFINITIONS,
        "config": {"modes": list(cfg.modes), "ks": list(cfg.ks), "error_term": cfg.error_term,
                   "splice_correction": cfg.splice_correction, "n_seeds": cfg.n_seeds,
                   "random_seed": cfg.random_seed, "head": head_kind, "dataset": data, "model": model_name,
                   "pretrained": model.pretrained, "dtype": cfg.dtype, "class_token_only": cfg.class_token_only,
                   "adapter": maple.adapter_identity(cfg.adapter) if cfg.adapter is not None else None,
                   "prompt_tokens": _prompt_tokens(cfg, store)},
        "provenance": {"sae_dir": str(cfg.sae_dir.resolve()), "sae_weights_sha256": weights_sha,
                       "adapter_dir": str(cfg.adapter.resolve()) if cfg.adapter is not None else None,
                       "sae_config": sae.config.to_dict(), "stats_dir": str(cfg.stats_dir.resolve()),
                       "stats_provenance": stats.meta.get("provenance"),
                       "cache_dir": str(cfg.cache_dir.resolve()) if cfg.cache_dir else None,
                       "cache_config_sha256": store.config_sha256 if store is not None else None},
        "seconds": {"total": time.perf_counter() - started, "sweep": sweep_seconds},
    }
    results_path = masking.write_results(cfg.out_dir, record)
    per_class_path = masking.write_per_class(cfg.out_dir, variants, correct_MC, totals_C, clip_correct_C, class_names)
    plot_path = None
    if cfg.plots:
        plot_path = masking.write_plot(cfg.out_dir, cfg.modes, cfg.ks, cfg.n_seeds, results["accuracy"], d_sae, chance,
                                       title=f"{model_name} layer {layer}, {data['dataset']} ({len(eval_rows)} "
                                             f"images), {head_kind} head", recall=results["mean_recall"])
    acc, rec = results["accuracy"], results["mean_recall"]
    return Outputs(out_dir=cfg.out_dir, results_path=results_path, per_class_path=per_class_path,
                   plot_path=plot_path, source=source.kind,
                   head=head_kind, n_images=int(len(eval_rows)), n_classes=n_classes, layer=layer,
                   clip_accuracy=acc["clip"], sae_all_on_accuracy=acc["sae_all_on"],
                   sae_error_term_accuracy=acc["sae_error_term"],
                   accuracy={m: dict(acc[m]) for m in cfg.modes},
                   mean_recall={key: rec[key] for key in ("clip", "sae_all_on", "sae_error_term")}
                   | {m: dict(rec[m]) for m in cfg.modes},
                   splice_correction=cfg.splice_correction,
                   random_accuracy={m: {k: (v["mean"], v["std"]) for k, v in acc.get(f"random_{m}", {}).items()}
                                    for m in cfg.modes if cfg.n_seeds},
                   seconds=time.perf_counter() - started, sweep_seconds=sweep_seconds)


def summary(out: Outputs) -> str:
    lines = [f"{out.head} head, {out.n_images} images, {out.n_classes} classes, layer {out.layer} "
             f"(tap from the {out.source}); sweep {out.sweep_seconds:.1f} s of {out.seconds:.1f} s",
             f"  plain CLIP {out.clip_accuracy:.4f}   SAE all on {out.sae_all_on_accuracy:.4f}   "
             f"SAE + error term {out.sae_error_term_accuracy:.4f}"
             + (f"   (splice correction {out.splice_correction})" if out.splice_correction != "none" else ""),
             f"  mean per-class recall: plain CLIP {out.mean_recall['clip']:.4f}   SAE all on "
             f"{out.mean_recall['sae_all_on']:.4f}   SAE + error term {out.mean_recall['sae_error_term']:.4f}"]
    for mode, row in out.accuracy.items():
        rand = out.random_accuracy.get(mode, {})
        cells = "  ".join(f"k={k}: {a:.3f}" + (f" (rand {rand[k][0]:.3f}±{rand[k][1]:.3f})" if k in rand else "")
                          for k, a in row.items())
        lines.append(f"  {mode:3s} {cells}")
        lines.append(f"  {'':3s} mean recall " + "  ".join(f"k={k}: {r:.3f}" for k, r in out.mean_recall[mode].items()))
    lines.append(f"  -> {out.results_path}, {out.per_class_path}" + (f", {out.plot_path}" if out.plot_path else ""))
    lines.append(next_steps(f"open {out.plot_path or out.results_path}",
                            "pipeline remap --base BASE_MASK_DIR --adapted ADAPTED_MASK_DIR --out REMAP_DIR (base vs MaPLe)"))
    return "\n".join(lines)


STAGE = Stage(name="mask", config=Config, run=run, summary=summary,
              reads=("sae_dir", "stats_dir", "cache_dir", "adapter"), writes=("out_dir",),
              help="""Masking experiments: accuracy with the SAE spliced in and each class's top-k latents on or off.

    The mask of an image uses its ground-truth class (the paper's protocol). Plain CLIP's
    accuracy with the head is computed first and printed before any masking.""")
