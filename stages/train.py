"""Stage two (a): train a sparse autoencoder on one layer of an activation store.

Resumable: a checkpoint (weights, optimiser, step, firing counters, RNG) is written every
``checkpoint_every`` steps; the token stream is a pure function of the start token, so a
rerun after a kill continues with exactly the batches the uninterrupted run would have seen.
Metrics are computed in the store's original units on held-out images. The SAE's mean
reconstruction error E[x − x̂] on training tokens is stored with it (``mean_error.safetensors``)
for the masking stage's splice correction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from cache import space
from cache.atomic import write_json
from cache.errors import UserError, require_threads
from cache.jsonfile import Undefined
from cache.loader import LoaderConfig, TokenLoader, token_indices
from cache.store import ActivationStore, config_sha256
from pipeline import livelog, runfiles
from pipeline.configs import Option, Stage, identity_fields
from pipeline.models import resolve_device
from pipeline.plots import plot_curves
from pipeline.progress import Progress, announce, next_steps
from pipeline.sae import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    build,
    config_class,
    estimate_norm_scale,
    evaluate,
    load_trainer,
    mean_error,
    save_sae,
    save_training_state,
)
from pipeline.sae.io import CONFIG_NAME as SAE_CONFIG_NAME
from pipeline.sae.io import (
    MEAN_ERROR_NAME,
    TRAINER_NAME,
    WEIGHTS_NAME,
    MeanError,
    save_mean_error,
)
from pipeline.sae.trainer import TRAIN_STATE_VERSION
from pipeline.threads import sized

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
CURVES_FILE = "curves.png"
SAE_FILES = (SAE_CONFIG_NAME, WEIGHTS_NAME, MEAN_ERROR_NAME)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """One SAE training run; every field except the last group defines the run's identity."""

    OPTIONS: ClassVar = {"total_tokens": Option("--tokens")}

    cache_dir: Path  # identity: activation store to train on
    layer: int  # identity: block index inside the store (0-based, residual output)
    out_dir: Path  # SAE folder: final weights, checkpoint/, metrics, plots
    live_dir: Path | None = None  # dvclive folder of the training curves (default: OUT/dvclive)
    arch: Literal["relu", "topk", "batchtopk"] = "relu"  # identity: relu = the paper's ReLU + L1; topk/batchtopk keep
                                                         # k latents per token
    expansion: float = 64.0  # identity: d_sae = expansion x d_model (paper: 64)
    k: int | None = None  # identity: active latents per token (topk, batchtopk)
    l1: float | None = None  # identity: L1 coefficient; None = 8e-5 for relu (paper), 0 for TopK family
    token_kind: Literal["all", "patches", "cls"] = "all"  # identity: train on all tokens, patches only, or class tokens only
    total_tokens: int = 2_000_000  # identity: token budget of the whole run
    batch_images: int = 128  # identity: images' worth of tokens per step (paper: 128 images x 197 tokens)
    lr: float = 4e-4  # identity: Adam learning rate after warm-up (paper: 4e-4)
    warmup_steps: int = 500  # identity: linear warm-up steps (paper: 500)
    normalize: bool = False  # identity: scale activations to unit mean norm x sqrt(D) (the scale is stored with the SAE)
    revival: Literal["auto", "ghost_grads", "auxk", "none"] = "auto"  # identity: dead-latent revival (auto: ghost grads
                                                                      # for relu, AuxK for the TopK family)
    init: Literal["auto", "tied", "reference"] = "auto"  # identity: initial weights: tied W_enc = W_dec^T (auto, every
                                                         # arch) or reference (PatchSAE's independent Kaiming-uniform)
    dead_window_tokens: int = 1_000_000  # identity: a latent is dead if silent for this many tokens
    val_fraction: float = 0.05  # identity: images held out for validation metrics and early stopping
    window_chunks: int = 64  # identity: chunks shuffled together by the loader
    seed: int = 0  # identity: seed of the initial weights, the validation split and the token stream
    dtype: Literal["float32", "bfloat16"] = "float32"  # identity: float32, or bfloat16 autocast (no gradient scaler)
    # -- not part of the identity: how the run is executed and reported
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (GPU when present)
    log_every: int = 50  # steps between metric records
    checkpoint_every: int = 500  # steps between checkpoints
    early_stop_patience: int | None = None  # stop after this many logs without validation FVU gain
    max_val_tokens: int = 200_000  # tokens used for each validation
    mean_error_tokens: int = 200_000  # training tokens the stored mean reconstruction error is measured on
    overwrite: bool = False  # replace an SAE folder trained with other settings
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use
    micro_batch_tokens: int | None = None  # tokens per micro-batch of a step (the update is the whole batch's);
                                           # default: parts of about 2 GiB of (tokens x latents) tensors
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        require_threads(self.threads)
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "live_dir", Path(self.live_dir or self.out_dir / livelog.LIVE_DIR))
        if self.total_tokens < 1 or self.batch_images < 1:
            raise UserError("--tokens and --batch-images must be at least 1")
        if self.expansion <= 0:
            raise UserError(f"--expansion must be positive (got {self.expansion})")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise UserError(f"--micro-batch-tokens must be at least 1 (got {self.micro_batch_tokens}); "
                            "leave it out for the automatic size")
        if self.max_val_tokens < 1:  # checked here: validation runs only after the whole training
            raise UserError(f"--max-val-tokens must be at least 1 (got {self.max_val_tokens})")
        if self.mean_error_tokens < 1:
            raise UserError(f"--mean-error-tokens must be at least 1 (got {self.mean_error_tokens})")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise UserError(f"--early-stop-patience must be at least 1 (got {self.early_stop_patience}); "
                            "leave it out to train the whole --tokens budget")

    def identity(self) -> dict[str, Any]:
        """The fields marked 'identity', in declaration order."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
                if k in identity_fields(Config)}


@dataclasses.dataclass(frozen=True)
class Outputs:
    sae_dir: Path
    metrics_path: Path
    plot_path: Path
    history_path: Path  # the loss curve's records, one per log interval
    live_dir: Path  # the same curves as dvclive writes them
    metrics: dict[str, float]
    steps: int
    resumed_from_step: int
    seconds: float


def _on_device(batches: Iterator[torch.Tensor], device: str, max_tokens: float = math.inf) -> Iterator[torch.Tensor]:
    """float32 batches on ``device`` (the loader yields float16 on the host), up to ``max_tokens``."""
    seen = 0
    for x in batches:
        if seen >= max_tokens:
            return
        seen += len(x)
        yield x.to(device, non_blocking=True).float()


@sized
def run(cfg: Config) -> Outputs:
    """Train (or resume training) the SAE described by ``cfg``."""
    started = time.perf_counter()
    store = ActivationStore(cfg.cache_dir, mode="r")
    store.acts(cfg.layer)  # refuses a layer the store does not hold
    store.require_complete()
    device = resolve_device(cfg.device)
    tokens_per_image = len(range(store.n_tokens)[token_indices(store, cfg.token_kind)])
    loader_cfg = LoaderConfig(layer=cfg.layer, batch_tokens=cfg.batch_images * tokens_per_image,
                              token_kind=cfg.token_kind, window_chunks=cfg.window_chunks,
                              val_fraction=cfg.val_fraction, seed=cfg.seed)
    train_loader = TokenLoader(store, loader_cfg, split="train")
    val_loader = TokenLoader(store, loader_cfg, split="val") if cfg.val_fraction > 0 else train_loader
    identity = {"identity": cfg.identity(),
                "identity_sha256": config_sha256({**cfg.identity(), "store": store.config_sha256})}
    with runfiles.RunFolder(cfg.out_dir, identity, kind="SAE training", overwrite=cfg.overwrite,
                            identity_name=RUN_FILE, state_name=f"{CHECKPOINT_DIR}/{TRAINER_NAME}",
                            our_files=(CHECKPOINT_DIR, HISTORY_FILE, METRICS_FILE, CURVES_FILE, livelog.LIVE_DIR,
                                       *SAE_FILES),
                            format_version=TRAIN_STATE_VERSION) as run:
        return _run_locked(cfg, run, store, device, loader_cfg, train_loader, val_loader, started)


def _run_locked(cfg: Config, run: runfiles.RunFolder, store: ActivationStore, device: str, loader_cfg: LoaderConfig,
                train_loader: TokenLoader, val_loader: TokenLoader, started: float) -> Outputs:
    train_cfg = TrainConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed, log_every=cfg.log_every,
                            checkpoint_every=cfg.checkpoint_every, total_tokens=cfg.total_tokens,
                            batch_tokens=loader_cfg.batch_tokens, device=device, dtype=cfg.dtype,
                            revival=cfg.revival, micro_batch_tokens=cfg.micro_batch_tokens)
    ckpt_dir = cfg.out_dir / CHECKPOINT_DIR
    history: list[dict[str, float]] = []
    if run.resumes and (ckpt_dir / TRAINER_NAME).exists():
        trainer = load_trainer(ckpt_dir, train_cfg)
        history_path = cfg.out_dir / HISTORY_FILE
        if history_path.exists():
            history = [h for h in json.loads(history_path.read_text()) if h["step"] <= trainer.n_steps]
        log.info("resuming %s from step %d (%d tokens)", cfg.out_dir, trainer.n_steps, trainer.tokens_seen)
    else:
        sample_ND = next(train_loader.batches(0)).float()
        norm_scale = estimate_norm_scale(sample_ND) if cfg.normalize else 1.0
        given = {name: value for name, value in (("k", cfg.k), ("l1", cfg.l1)) if value is not None}
        sae_cfg = config_class(cfg.arch).from_expansion(
            d_in=store.d_model, expansion=cfg.expansion, norm_scale=norm_scale,
            dead_window_tokens=cfg.dead_window_tokens, dtype="float32",
            model=f"{store.attrs['model']['name']}/{store.attrs['model']['pretrained']}", layer=cfg.layer,
            token_kind=cfg.token_kind, cache_config_sha256=store.config_sha256, **given)
        trainer = Trainer(build(sae_cfg, seed=cfg.seed, init=cfg.init).to(device), train_cfg)
        trainer.init_from_sample(sample_ND.to(device))
    resumed_from = trainer.n_steps
    n_steps_total = math.ceil(cfg.total_tokens / loader_cfg.batch_tokens)
    sae_cfg = trainer.sae.config
    announce("train",
             f"a {sae_cfg.arch} SAE {sae_cfg.d_in} -> {sae_cfg.d_sae:,} on {_unit(store)} {cfg.layer} of {store.path} "
             f"({train_loader.tokens_per_epoch:,} training tokens)",
             f"{n_steps_total - trainer.n_steps:,} of {n_steps_total:,} steps to go, {loader_cfg.batch_tokens:,} "
             f"tokens each ({cfg.total_tokens:,} tokens in all), into {cfg.out_dir}")

    best = {"fvu": math.inf, "evals_since": 0, "stop": False}
    clock = {"t": time.perf_counter(), "tokens": trainer.tokens_seen}

    n_val_tokens = min(cfg.max_val_tokens, val_loader.tokens_per_epoch)  # at most one pass

    def validate() -> dict[str, float]:
        return evaluate(trainer.sae, _on_device(val_loader.batches(0), device, n_val_tokens),
                        window_tokens=n_val_tokens)

    def on_log(step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        record = {"step": step, **_windowed(metrics, trainer.firing.n_tokens, cfg.dead_window_tokens, "run"),
                  "lr": train_cfg.schedule.lr_at(step - 1),
                  "tokens_per_s": (trainer.tokens_seen - clock["tokens"]) / max(now - clock["t"], 1e-9)}
        clock.update(t=now, tokens=trainer.tokens_seen)
        if cfg.early_stop_patience is not None:
            val_fvu = validate()["fvu"]
            record["val_fvu"] = val_fvu
            if val_fvu < best["fvu"] - 1e-4:
                best.update(fvu=val_fvu, evals_since=0)
            else:
                best["evals_since"] += 1
                best["stop"] = best["evals_since"] >= cfg.early_stop_patience
        history.append(record)
        livelog.log_step(live, step, {k: v for k, v in record.items() if k != "step"})
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", l0=f"{metrics['l0']:.1f}", fvu=f"{metrics['fvu']:.3f}")

    def on_checkpoint(t: Trainer) -> None:
        run.start()
        save_training_state(t, ckpt_dir)
        write_json(cfg.out_dir / HISTORY_FILE, history)

    def stream() -> Iterator[torch.Tensor]:
        for x_BD in _on_device(train_loader.batches(trainer.tokens_seen), device):
            if best["stop"]:
                log.info("early stop: validation FVU has not improved for %d evaluations", cfg.early_stop_patience)
                return
            bar.update(trainer.n_steps - bar.n)
            yield x_BD

    bar = Progress(total=n_steps_total, initial=trainer.n_steps, unit="step", desc=f"train {cfg.out_dir.name}",
                   enabled=cfg.progress)
    with space.room_for(cfg.out_dir, _run_nbytes(trainer.sae), resumes="the last checkpoint"):
        try:
            run.start()  # before the curves: replacing another run's folder deletes its files
            live = livelog.open_live(cfg.live_dir, resumed_from or None)
            trainer.fit(stream(), on_log=on_log, on_checkpoint=on_checkpoint)
        except NonFiniteLossError as err:
            last = json.loads((ckpt_dir / "config.json").read_text()) if (ckpt_dir / "config.json").exists() else None
            kept = "the last good checkpoint is in " + str(ckpt_dir) if last else "no checkpoint was written yet"
            raise UserError(f"training stopped at step {err.step}: the loss became NaN/inf; {kept}; "
                            "lower --lr or check the store with `pipeline verify`") from None
        finally:
            bar.close()
        live.end()
        on_checkpoint(trainer)
        save_sae(trainer.sae, cfg.out_dir)
        n_err_tokens = min(cfg.mean_error_tokens, train_loader.tokens_per_epoch)
        err_D, n_err = mean_error(trainer.sae, _on_device(train_loader.batches(0), device, n_err_tokens))
        save_mean_error(cfg.out_dir, MeanError(mean_error_D=err_D, n_tokens=n_err, token_kind=cfg.token_kind,
                                               cache_config_sha256=store.config_sha256))
        final = validate()
        train_dead = _windowed({"dead_fraction": float(trainer.firing.dead_fraction())}, trainer.firing.n_tokens,
                               cfg.dead_window_tokens, "run")["dead_fraction"]
        final.update({"steps": trainer.n_steps, "tokens_seen": trainer.tokens_seen,
                      "train_dead_fraction": train_dead,
                      "train_dead_window_tokens": cfg.dead_window_tokens,
                      "lr": train_cfg.schedule.lr_at(trainer.n_steps - 1),
                      "tokens_per_s": history[-1]["tokens_per_s"] if history else Undefined("no step was logged"),
                      "eval_split": "val" if cfg.val_fraction > 0 else "train"})
        metrics_path = cfg.out_dir / METRICS_FILE
        write_json(metrics_path, final)
        plot_path = plot_curves(history, cfg.out_dir / CURVES_FILE,
                                panels=[("loss", "training loss"), ("l0", "L0 (active latents / token)"),
                                        ("fvu", "FVU (batch)")],
                                title=f"{cfg.arch} SAE, layer {cfg.layer}, x{cfg.expansion:g}")
    return Outputs(sae_dir=cfg.out_dir, metrics_path=metrics_path, plot_path=plot_path,
                   history_path=cfg.out_dir / HISTORY_FILE, live_dir=cfg.live_dir, metrics=final,
                   steps=trainer.n_steps, resumed_from_step=resumed_from, seconds=time.perf_counter() - started)


def _unit(store: ActivationStore) -> str:
    """What a layer of the store's model is called: a ConvNeXt's stage, a ViT's block."""
    return "stage" if (store.attrs.get("model") or {}).get("tower") == "convnext" else "block"


def _windowed(metrics: dict[str, Any], n_tokens: int, window_tokens: int, what: str) -> dict[str, Any]:
    """``metrics`` with the dead and dense fractions undefined, and saying why, before one full window."""
    if n_tokens >= window_tokens:
        return metrics
    why = Undefined(f"{what} shorter than the dead-latent window ({n_tokens} of {window_tokens} tokens)")
    return {k: why if k in ("dead_fraction", "dense_fraction") else v for k, v in metrics.items()}


def _run_nbytes(sae: torch.nn.Module) -> int:
    """What the run folder holds at its fullest: the SAE's weights twice (final and checkpoint), the trainer state
    (weights and Adam's two moments) and its next version, written before the old one is replaced."""
    return 8 * sum(t.numel() * t.element_size() for t in sae.state_dict().values())


def summary(out: Outputs) -> str:
    m = out.metrics
    dead = m["train_dead_fraction"]
    dead = dead.why if isinstance(dead, Undefined) else f"{dead:.3f}"
    resumed = f" (resumed at step {out.resumed_from_step})" if out.resumed_from_step else ""
    return (f"trained {out.steps} steps{resumed} in {out.seconds:.1f} s -> {out.sae_dir}\n"
            f"  {m['eval_split']} metrics: MSE {m['mse']:.4g}  FVU {m['fvu']:.4f}  L0 {m['l0']:.1f}  "
            f"L1 {m['l1']:.3g}  dead {dead}  ({out.metrics_path}, {out.plot_path}, curves {out.live_dir})\n"
            + next_steps(f"pipeline encode --cache STORE --sae {out.sae_dir} --out CODES_DIR"))


STAGE = Stage(name="train", config=Config, run=run, summary=summary, reads=("cache_dir",), writes=("out_dir",), cached=False,
              logs=("live_dir",), persist=True,
              help="Train a sparse autoencoder on one layer of a store; rerun the same command to resume.")
