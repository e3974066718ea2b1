"""Adapt a frozen CLIP to a dataset with MaPLe prompts trained few-shot (SCIENCE.md, "Adaptation analysis").

The adapted model is the input of the adaptation study: ``pipeline extract --adapter DIR``
stores its activations so that the base model's SAE encodes both (pipeline/maple.py).

Few-shot split: ``shots`` images of every class from the training split (EuroSAT: CoOp's
split file), drawn uniformly without replacement with ``seed`` (``pipeline.datasets.
few_shot_indices``). Images go through the model's eval transform (no augmentation, so a
run is deterministic).

Training (the official recipe where it is fixed: 2 context tokens, depth 9, "a photo of a",
SGD with momentum 0.9 and weight decay 5e-4, lr 0.0035, batch 4, 5 epochs): cross-entropy of
``logit_scale · cosine(image, class prompt)`` over every class, CLIP frozen, only the prompts
learn. Epoch ``e`` visits the few-shot images in the order of a permutation seeded with
``(seed, e)``, so the data position is the step. The learning rate is ``warmup_lr`` for
``warmup_epochs``, then a cosine from ``lr`` to 0 at the last step.

Instead of training, ``weights`` loads existing prompts: an adapter folder, its
``prompts.safetensors``, or an official MaPLe checkpoint (``prompt_learner.*`` keys) whose
shapes fit the model.

Folder ``out_dir`` (format version 1), every file written atomically:

- ``config.json``: ``format_version``, ``adapter`` (method, n_ctx, depth, ctx_init, class
  names and the names the prompts use (``class_prompts``), base model: name, pretrained,
  checkpoint sha256), ``data`` (dataset, root, split,
  shots, seed, sha256 of the few-shot image ids) and ``training`` (recipe, or the sha256 of
  loaded weights): the run's identity, compared on every rerun; package versions.
- ``trainer_state.pt``: step, prompts, SGD state, per-step losses, training seconds (resume).
- ``prompts.safetensors``: the trained prompts (written when training has finished).
- ``metrics.json``: accuracy and mean per-class recall on the test split of the base model zero-shot (prompt
  templates), of a linear probe on the base model's few-shot embeddings, and of the adapted
  model; ``loss.png``: the training loss curve.

Rerunning the same config resumes from the last checkpoint, bit-identical to an
uninterrupted run on the same device and thread count; a finished run is not retrained.
Another config in the same folder is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cache.atomic import write_json
from cache.errors import UserError, require_integers, require_threads
from pipeline import livelog, maple, runfiles, scores, training, zeroshot
from pipeline.configs import Option, Stage
from pipeline.datasets import DATASET_NAMES, ImageSet, dataset_labels, few_shot_indices, open_dataset
from pipeline.models import LoadedModel, file_sha256, load_model, resolve_device
from pipeline.probe import fit_linear_probe
from pipeline.progress import Progress, announce, next_steps
from pipeline.runfiles import plot_losses
from pipeline.threads import sized
from pipeline.world import TASKS, held_out_of

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = maple.CONFIG_NAME
PROMPTS_NAME = maple.PROMPTS_NAME
TRAINER_NAME = runfiles.TRAINER_NAME
METRICS_NAME = "metrics.json"
PLOT_NAME = "loss.png"
OUR_FILES = (CONFIG_NAME, PROMPTS_NAME, TRAINER_NAME, METRICS_NAME, PLOT_NAME, livelog.LIVE_DIR)
LOG_EVERY = 10  # steps between progress-bar loss updates
FINAL_LOSS_STEPS = 10  # final loss = mean loss of this many last steps
TEMPLATE_CHOICES = ("auto", *zeroshot.TEMPLATE_SETS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """One adaptation run; fields marked 'identity' must match to resume a folder."""

    OPTIONS: ClassVar = {"synthetic_task": Option("--task")}

    dataset: str  # identity: dataset to adapt to (see `pipeline extract --help`), e.g. eurosat
    out_dir: Path  # adapter folder to create or resume: prompts.safetensors, config.json, trainer_state.pt,
                   # metrics.json, loss.png
    live_dir: Path | None = None  # dvclive folder of the loss curve (default: OUT/dvclive)
    root: str | None = None  # identity: local dataset folder (nothing is downloaded; not needed for synthetic)
    model: str = "ViT-B-16"  # identity: open_clip model name (frozen)
    pretrained: str = "openai"  # identity: open_clip pretrained tag, a local checkpoint file, or 'none' for random
                                # weights
    shots: int = 16  # identity: training images per class (seeded draw)
    seed: int = 0  # identity: few-shot draw, prompt init, batch order (and random init with --pretrained none)
    train_split: str = "train"  # identity: split the few-shot images are drawn from
    synthetic_task: str = "shape_colour"  # identity: synthetic dataset only: which attributes make the classes
                                          # (shape_colour, shape, colour, size, texture, background)
    allow_held_out: bool = False  # identity: synthetic dataset only: allow values the model's pretraining held out
                                  # (its config.json says which), e.g. for a concept-addition test
    n_ctx: int = 2  # identity: learnable context tokens per prompted layer
    depth: int = 9  # identity: prompted layers of each tower, layer 0 included (at most the towers' depth)
    ctx_init: str | None = "a photo of a"  # identity: prompt prefix whose first --n-ctx tokens initialise the context
                                           # ('none': 'X X' and random)
    class_prompts: Path | None = None  # identity: JSON list of class names for the prompts (or {class: name}), e.g.
                                       # 'annual crop land' for AnnualCrop
    epochs: int = 5  # identity: passes over the few-shot images
    batch_size: int = 4  # identity: images per step
    lr: float = 0.0035  # identity: peak SGD learning rate (cosine to 0)
    momentum: float = 0.9  # identity: SGD momentum
    weight_decay: float = 5e-4  # identity: SGD weight decay
    warmup_epochs: int = 1  # identity: epochs at the constant warmup_lr before the cosine
    warmup_lr: float = 1e-5  # identity: learning rate of the warm-up epochs
    weights: Path | None = None  # identity: load these MaPLe prompts instead of training: an adapter folder, its
                                 # prompts.safetensors, or an official MaPLe checkpoint
    test_split: str = "test"  # evaluation: split the accuracies are measured on
    test_limit: int | None = None  # evaluation: seeded subset of the test split (None: all of it)
    templates: str = "auto"  # evaluation: base zero-shot prompts: auto (the dataset's own, else openai), openai,
                             # world, or a dataset name
    eval_batch_size: int = 64  # evaluation: images per forward
    checkpoint_every: int = 50  # steps between checkpoints (the last step is always saved)
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (GPU when present)
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use
    workers: int = 0  # image-decoding processes (0 = main process)
    overwrite: bool = False  # replace a folder written with another identity
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "live_dir", Path(self.live_dir or self.out_dir / livelog.LIVE_DIR))
        for name in ("weights", "class_prompts"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.dataset not in DATASET_NAMES:
            raise UserError(f"unknown dataset '{self.dataset}'; choose one of: {', '.join(DATASET_NAMES)}")
        require_integers(self, "shots", "seed", "epochs", "batch_size", "warmup_epochs", "eval_batch_size",
                         "checkpoint_every", "workers")
        if self.shots < 1:
            raise UserError(f"--shots must be at least 1 (got {self.shots})")
        if self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer (got {self.seed})")
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1 (got {self.epochs})")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(f"--warmup-epochs must be in [0, epochs) = [0, {self.epochs}) (got {self.warmup_epochs})")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise UserError("--batch-size and --eval-batch-size must be at least 1")
        if not self.lr > 0 or not self.warmup_lr > 0:
            raise UserError(f"--lr and --warmup-lr must be positive (got {self.lr}, {self.warmup_lr})")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1) (got {self.momentum})")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be 0 or more (got {self.weight_decay})")
        if self.synthetic_task not in TASKS:
            raise UserError(f"unknown --task '{self.synthetic_task}'; choose one of: {', '.join(TASKS)}")
        if self.templates not in TEMPLATE_CHOICES:
            raise UserError(f"unknown --templates '{self.templates}'; choose one of: {', '.join(TEMPLATE_CHOICES)}")
        if self.test_limit is not None and self.test_limit < 1:
            raise UserError(f"--test-limit must be at least 1 (got {self.test_limit})")
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})")
        require_threads(self.threads)
        if self.workers < 0:
            raise UserError(f"--workers must be 0 or more (got {self.workers})")
        if self.n_ctx < 1:
            raise UserError(f"--n-ctx must be at least 1 to have prompts to learn (got {self.n_ctx})")
        self.maple_config  # validates n_ctx, depth, ctx_init

    @property
    def maple_config(self) -> maple.MapleConfig:
        return maple.MapleConfig(n_ctx=self.n_ctx, depth=self.depth, ctx_init=self.ctx_init)

    @property
    def template_set(self) -> str:
        if self.templates != "auto":
            return self.templates
        if self.dataset == "synthetic":
            return "world"
        return self.dataset if self.dataset in zeroshot.DATASET_TEMPLATES else "openai"


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a run wrote, for the CLI summary and DVC."""

    out_dir: Path
    prompts_path: Path
    config_path: Path
    metrics_path: Path
    plot_path: Path | None  # None when the prompts were loaded, not trained
    live_dir: Path  # the loss curve as dvclive writes it (empty when the prompts were loaded)
    steps: int  # steps of the finished run (0 when loaded)
    start_step: int  # step this call started from (steps = nothing left to train)
    final_loss: float | None  # mean loss of the last FINAL_LOSS_STEPS steps (None when loaded)
    base_accuracy: float  # base model zero-shot, test split, fraction in [0, 1]
    probe_accuracy: float  # linear probe on the base model's few-shot embeddings
    adapted_accuracy: float  # the adapted model
    base_mean_recall: float  # mean per-class recall (balanced accuracy) of the same three, same predictions
    probe_mean_recall: float
    adapted_mean_recall: float
    n_classes: int
    n_train_images: int
    n_test_images: int
    seconds: float  # wall time of this call


class _Images(Dataset):
    """``(image, label)`` of chosen rows of a dataset."""

    def __init__(self, data: Dataset, rows: np.ndarray):
        self.data, self.rows = data, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.data[int(self.rows[i])]
        return image, int(label)


# ---------------------------------------------------------------------------------------
# Schedule and batches


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    return -(-n_train // cfg.batch_size)


def lr_at(step: int, cfg: Config, n_train: int) -> float:
    """Learning rate of step ``step`` (0-based): constant warm-up, then cosine from ``lr`` to 0."""
    per_epoch = steps_per_epoch(cfg, n_train)
    return training.Schedule(lr=cfg.lr, warmup_steps=cfg.warmup_epochs * per_epoch, warmup_lr=cfg.warmup_lr,
                             total_steps=cfg.epochs * per_epoch).lr_at(step)


def batches_from(start_step: int, cfg: Config, n_train: int) -> list[list[int]]:
    """Positions in the few-shot set of every step's images from ``start_step`` on (epoch ``e``: the
    order of a permutation seeded with ``(seed, e)``, cut into batches; the last one may be short)."""
    per_epoch = steps_per_epoch(cfg, n_train)
    batches = []
    for epoch in range(start_step // per_epoch, cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
        first = max(start_step - epoch * per_epoch, 0)
        batches += [order[b * cfg.batch_size:(b + 1) * cfg.batch_size].tolist() for b in range(first, per_epoch)]
    return batches


# ---------------------------------------------------------------------------------------
# Folder


def _identity(cfg: Config, model: LoadedModel, train: ImageSet, shot_rows: np.ndarray,
              names: list[str]) -> dict[str, Any]:
    ids = [train.image_ids[r] for r in shot_rows.tolist()]
    data = {"dataset": train.name, "root": train.root, "split": train.split, "shots": cfg.shots, "seed": cfg.seed,
            "n_images": len(ids), "image_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}
    if train.world is not None:
        data["world"] = train.world
    if cfg.weights is not None:
        training = {"source": "weights", "weights_sha256": file_sha256(_weights_file(cfg))}
    else:
        training = {"source": "trained", "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                    "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "warmup_epochs": cfg.warmup_epochs,
                    "warmup_lr": cfg.warmup_lr, "seed": cfg.seed, "dtype": model.dtype}
    adapter = maple.adapter_record(cfg.maple_config, model, train.class_names, names)
    return {"format_version": FORMAT_VERSION, "adapter": adapter, "data": data, "training": training}


# ---------------------------------------------------------------------------------------
# The stage


@sized
def run(cfg: Config) -> Outputs:
    """Train (or finish training, or load) the prompts in ``cfg.out_dir``, then evaluate base vs adapted."""
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    return _run_threaded(cfg, device, started)


def _open_data(cfg: Config, model: LoadedModel) -> tuple[ImageSet, np.ndarray, ImageSet]:
    kwargs = dict(root=cfg.root, transform=model.preprocess, seed=cfg.seed, image_size=model.image_size,
                  synthetic_task=cfg.synthetic_task, held_out=held_out_of(cfg.pretrained),
                  allow_held_out=cfg.allow_held_out)
    train = open_dataset(cfg.dataset, split=cfg.train_split, **kwargs)
    shot_rows = few_shot_indices(dataset_labels(train.dataset), cfg.shots, cfg.seed)
    test = open_dataset(cfg.dataset, split=cfg.test_split, limit=cfg.test_limit, **kwargs)
    if test.class_names != train.class_names:
        raise UserError(f"the {cfg.test_split} split has other classes than the {cfg.train_split} split; pick splits "
                        "of the same dataset")
    return train, shot_rows, test


def _run_threaded(cfg: Config, device: str, started: float) -> Outputs:
    out_dir = cfg.out_dir
    model = load_model(cfg.model, cfg.pretrained, device=device, init_seed=cfg.seed)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    maple.check_fits(cfg.maple_config, model.model)
    if cfg.weights is not None:
        prompts = _load_weights(cfg).to(device)
    else:
        prompts = maple.new_prompts(cfg.maple_config, model.model, tokenizer, cfg.seed)
    adapted = maple.AdaptedCLIP(model.model, tokenizer, prompts, cfg.maple_config)
    train, shot_rows, test = _open_data(cfg, model)
    names = zeroshot.read_class_prompts(cfg.class_prompts, train.class_names)
    with runfiles.RunFolder(out_dir, _identity(cfg, model, train, shot_rows, names), kind="adaptation",
                            overwrite=cfg.overwrite, our_files=OUR_FILES, format_version=FORMAT_VERSION) as run:
        return _run_locked(cfg, run, model, adapted, prompts, train, shot_rows, test, names, device, started)


def _run_locked(cfg: Config, run: runfiles.RunFolder, model: LoadedModel, adapted: maple.AdaptedCLIP,
                prompts: maple.Prompts, train: ImageSet, shot_rows: np.ndarray, test: ImageSet, names: list[str],
                device: str, started: float) -> Outputs:
    out_dir = cfg.out_dir
    prompts_path = out_dir / PROMPTS_NAME

    losses: list[float] = []
    start_step = total = 0
    if cfg.weights is not None:
        if not prompts_path.is_file():
            run.start()
            maple.save_prompts(prompts_path, prompts)
    else:
        optimizer = torch.optim.SGD(prompts.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        n_train = len(shot_rows)
        total = cfg.epochs * steps_per_epoch(cfg, n_train)
        train_seconds = 0.0
        state = run.load_state(device)
        if state is not None:
            prompts.load_state_dict(state["prompts"])
            optimizer.load_state_dict(state["optimizer"])
            start_step, losses, train_seconds = int(state["step"]), list(state["losses"]), float(state["train_seconds"])
            log.info("resuming %s from step %d of %d", out_dir, start_step, total)
        if start_step < total:
            announce("adapt",
                     f"MaPLe prompts for {cfg.model} ({cfg.pretrained}) on {cfg.dataset}: {len(names)} classes x "
                     f"{cfg.shots} shots = {n_train} images, {total - start_step:,} of {total:,} steps to go "
                     f"({cfg.epochs} epochs of batch {cfg.batch_size})",
                     f"into {out_dir}")
            _train(cfg, run, adapted, optimizer, train, shot_rows, names, device, start_step, total, losses,
                   train_seconds)
        else:
            log.info("%s: training already finished (%d steps)", out_dir, total)
        if start_step < total or not prompts_path.is_file():
            maple.save_prompts(prompts_path, prompts)
            plot_losses(out_dir / PLOT_NAME, losses,
                        f"MaPLe on {cfg.dataset}, {cfg.shots} shots, {cfg.model}: batch {cfg.batch_size}, "
                        f"lr {cfg.lr:g}", ylabel="cross-entropy", window=FINAL_LOSS_STEPS)
    prompts.requires_grad_(False)

    metrics_path = out_dir / METRICS_NAME
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    record = _eval_record(cfg, test, prompts_path)
    if metrics.get("eval") != record or "base_mean_recall" not in metrics:  # or evaluated before mean recall
        eval_started = time.perf_counter()
        result = evaluate(cfg, model, adapted, train, shot_rows, test, names)
        metrics = {**result, "shots": cfg.shots, "n_train_images": int(len(shot_rows)),
                   "steps": total, "first_loss": losses[0] if losses else None,
                   "final_loss": float(np.mean(losses[-FINAL_LOSS_STEPS:])) if losses else None,
                   "train_seconds": _train_seconds(out_dir), "eval_seconds": time.perf_counter() - eval_started,
                   "threads": torch.get_num_threads(), "device": device, "eval": record}
        run.start()
        write_json(metrics_path, metrics)
    log.info("test accuracy on %d images: base zero-shot %.1f%%, base %d-shot probe %.1f%%, adapted %.1f%% "
             "(mean per-class recall %.1f%%, %.1f%%, %.1f%%)", metrics["n_test_images"],
             100 * metrics["base_accuracy"], cfg.shots, 100 * metrics["probe_accuracy"],
             100 * metrics["adapted_accuracy"], 100 * metrics["base_mean_recall"], 100 * metrics["probe_mean_recall"],
             100 * metrics["adapted_mean_recall"])
    return Outputs(out_dir=out_dir, prompts_path=prompts_path, config_path=out_dir / CONFIG_NAME,
                   metrics_path=metrics_path, plot_path=out_dir / PLOT_NAME if cfg.weights is None else None,
                   live_dir=cfg.live_dir,
                   steps=total, start_step=start_step, final_loss=metrics["final_loss"],
                   base_accuracy=metrics["base_accuracy"], probe_accuracy=metrics["probe_accuracy"],
                   adapted_accuracy=metrics["adapted_accuracy"], base_mean_recall=metrics["base_mean_recall"],
                   probe_mean_recall=metrics["probe_mean_recall"], adapted_mean_recall=metrics["adapted_mean_recall"],
                   n_classes=metrics["n_classes"],
                   n_train_images=int(len(shot_rows)), n_test_images=metrics["n_test_images"],
                   seconds=time.perf_counter() - started)


def _train_seconds(out_dir: Path) -> float | None:
    path = out_dir / TRAINER_NAME
    return float(torch.load(path, weights_only=True)["train_seconds"]) if path.is_file() else None


def _weights_file(cfg: Config) -> Path:
    return cfg.weights / PROMPTS_NAME if cfg.weights.is_dir() else cfg.weights


def _load_weights(cfg: Config) -> maple.Prompts:
    """Prompts from ``cfg.weights``; their n_ctx and depth must be the config's."""
    path = _weights_file(cfg)
    prompts = maple.prompts_from_state(maple.read_prompts_file(path), path)
    if (prompts.n_ctx, prompts.depth) != (cfg.n_ctx, cfg.depth):
        raise UserError(f"{path} holds prompts with n_ctx {prompts.n_ctx} and depth {prompts.depth}; pass "
                        f"--n-ctx {prompts.n_ctx} --depth {prompts.depth}")
    return prompts


def _train(cfg: Config, run: runfiles.RunFolder, adapted: maple.AdaptedCLIP, optimizer: torch.optim.Optimizer,
           train: ImageSet, shot_rows: np.ndarray, names: list[str], device: str, start_step: int, total: int,
           losses: list[float], train_seconds: float) -> None:
    """Steps ``start_step … total − 1``; appends to ``losses``; checkpoints as it goes."""
    n_train = len(shot_rows)
    loader = DataLoader(_Images(train.dataset, shot_rows), batch_sampler=batches_from(start_step, cfg, n_train),
                        num_workers=cfg.workers, pin_memory=device.startswith("cuda"))
    bar = Progress(total=total, initial=start_step, desc=f"adapt {cfg.dataset}", unit="step",
                   enabled=cfg.progress)
    resumed = time.perf_counter()
    run.start()  # before the curve: replacing another run's folder deletes its files
    live = livelog.open_live(cfg.live_dir, start_step or None)
    logged = [start_step]

    def step(i: int, batch: tuple[torch.Tensor, torch.Tensor]) -> training.Metrics:
        images_BRHW, labels_B = batch
        training.set_lr(optimizer, lr_at(i, cfg, n_train))
        logits_BC = adapted.logits(images_BRHW, adapted.encode_text(names))
        loss = F.cross_entropy(logits_BC.float(), labels_B.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        return {"loss": loss.detach()}

    def record(metrics: list[dict[str, float]]) -> None:
        losses.extend(m["loss"] for m in metrics)
        if not math.isfinite(losses[-1]):
            raise UserError(f"the loss became {losses[-1]} at step {len(losses)}; lower --lr "
                            "(the last checkpoint is kept)")

    def on_log(n: int) -> None:
        livelog.log_step(live, n, {"loss": float(np.mean(losses[logged[0]:n])), "lr": lr_at(n - 1, cfg, n_train)})
        logged[0] = n
        bar.set_postfix(loss=f"{np.mean(losses[-LOG_EVERY:]):.3f}")

    def save(n: int) -> None:
        run.save_state({"step": n, "prompts": {k: v.detach().cpu().clone() for k, v in adapted.prompts.state_dict().items()},
                        "optimizer": optimizer.state_dict(), "losses": list(losses),
                        "train_seconds": train_seconds + time.perf_counter() - resumed})

    training.fit(loader, step, start_step=start_step, log_every=LOG_EVERY, checkpoint_every=cfg.checkpoint_every,
                 record=record, on_log=on_log, save=save)
    live.end()
    bar.close()


# ---------------------------------------------------------------------------------------
# Evaluation


def _eval_record(cfg: Config, test: ImageSet, prompts_path: Path) -> dict[str, Any]:
    """What the accuracies depend on besides the identity (stored in metrics.json as 'eval')."""
    return {"split": test.split, "limit": cfg.test_limit, "n_images": len(test), "templates": cfg.template_set,
            "prompts_sha256": file_sha256(prompts_path)}


@torch.inference_mode()
def _base_features(model: LoadedModel, data: Dataset, batch_size: int, workers: int) -> tuple[torch.Tensor, ...]:
    feats, labels = [], []
    for images_BRHW, labels_B in DataLoader(data, batch_size=batch_size, num_workers=workers):
        feats.append(model.model.encode_image(images_BRHW.to(model.device)).float().cpu())
        labels.append(labels_B)
    return torch.cat(feats), torch.cat(labels)


@torch.inference_mode()
def evaluate(cfg: Config, model: LoadedModel, adapted: maple.AdaptedCLIP, train: ImageSet, shot_rows: np.ndarray,
             test: ImageSet, names: list[str]) -> dict[str, Any]:
    """Test accuracy and mean per-class recall of the base model (zero-shot and few-shot probe) and of the adapted
    model.

    ``names`` are the class names as the prompts say them (both zero-shot heads use them).
    """
    zeroshot.warn_if_world_differs(model.pretrained, cfg.dataset, cfg.seed, model.image_size)
    W_CE = zeroshot.cached_text_classifier(model, names, zeroshot.TEMPLATE_SETS[cfg.template_set])
    adapted_CE = adapted.encode_text(names, normalize=True).float()
    shot_feats, shot_labels = _base_features(model, _Images(train.dataset, shot_rows), cfg.eval_batch_size,
                                             cfg.workers)
    probe = fit_linear_probe(shot_feats, shot_labels, len(names))
    correct_by_model = torch.zeros(3, len(names), dtype=torch.int64)  # (base/probe/adapted, C true class)
    seen_C = torch.zeros(len(names), dtype=torch.int64)
    all_rows = np.arange(len(test))
    bar = Progress(total=len(test), desc="evaluate", unit="img", enabled=cfg.progress)
    for images_BRHW, labels_B in DataLoader(_Images(test.dataset, all_rows), batch_size=cfg.eval_batch_size,
                                            num_workers=cfg.workers):
        base_BE = model.model.encode_image(images_BRHW.to(model.device)).float()
        adapted_BE = adapted.encode_image(images_BRHW).float()
        predictions = {"base": zeroshot.zero_shot_logits(base_BE, W_CE), "probe": probe.logits(base_BE.cpu()),
                       "adapted": F.normalize(adapted_BE, dim=-1) @ adapted_CE.T}
        for k, logits_BC in enumerate(predictions.values()):
            hit_B = (logits_BC.argmax(-1).cpu() == labels_B).long()
            correct_by_model[k].index_add_(0, labels_B, hit_B)
        seen_C += torch.bincount(labels_B, minlength=len(names))
        bar.update(len(labels_B))
    bar.close()
    n = len(test)
    correct = dict(zip(("base", "probe", "adapted"), correct_by_model.sum(1).tolist()))
    recall = {key: scores.mean_recall(correct_by_model[k].numpy(), seen_C.numpy())
              for k, key in enumerate(("base", "probe", "adapted"))}
    per_class = {name: {key: (int(correct_by_model[k, c]) / int(seen_C[c]) if seen_C[c] else None)
                        for k, key in enumerate(("base", "probe", "adapted"))} | {"n_images": int(seen_C[c])}
                 for c, name in enumerate(test.class_names)}
    return {"base_accuracy": correct["base"] / n, "probe_accuracy": correct["probe"] / n,
            "adapted_accuracy": correct["adapted"] / n, "base_mean_recall": recall["base"],
            "probe_mean_recall": recall["probe"], "adapted_mean_recall": recall["adapted"], "n_test_images": n,
            "n_classes": len(names),
            "chance": 1.0 / len(names), "per_class": per_class,
            "definitions": {"base_accuracy": f"base model zero-shot, templates '{cfg.template_set}'",
                            "probe_accuracy": "linear probe (pipeline.probe) on the base model's embeddings of the "
                                              "few-shot training images",
                            "adapted_accuracy": "MaPLe-adapted model, its learned prompt per class",
                            "mean_recall": "each head's mean over classes of its per_class accuracy (balanced "
                                           "accuracy), from the same predictions",
                            "per_class": "accuracy of each head on the test images of one true class"}}


__all__ = ["Config", "Outputs", "run", "evaluate", "lr_at", "batches_from", "steps_per_epoch"]


def summary(out: Outputs) -> str:
    if out.plot_path is None:
        how = "prompts loaded"
    elif out.start_step == out.steps:
        how = f"{out.steps} steps (already trained)"
    else:
        how = f"{out.steps} steps" + (f" (resumed at step {out.start_step})" if out.start_step else "")
        how += f", final loss {out.final_loss:.3f}"
    return (f"MaPLe on {out.n_train_images} images ({out.n_classes} classes): {how}\n"
            f"  test accuracy on {out.n_test_images} images: base zero-shot {100 * out.base_accuracy:.1f}%, "
            f"base few-shot probe {100 * out.probe_accuracy:.1f}%, adapted {100 * out.adapted_accuracy:.1f}% "
            f"(chance {100 / out.n_classes:.1f}%)\n"
            f"  mean per-class recall: base zero-shot {100 * out.base_mean_recall:.1f}%, base few-shot probe "
            f"{100 * out.probe_mean_recall:.1f}%, adapted {100 * out.adapted_mean_recall:.1f}%\n"
            f"  adapter {out.out_dir}  (prompts {out.prompts_path.name}, metrics {out.metrics_path.name}"
            + (f", curve {out.plot_path.name})" if out.plot_path else ")") + "\n"
            + next_steps(f"pipeline extract ... --adapter {out.out_dir} --out ADAPTED_STORE",
                         f"pipeline mask ... --adapter {out.out_dir} --out ADAPTED_MASK_DIR"))


STAGE = Stage(name="adapt", config=Config, run=run, summary=summary, reads=("class_prompts", "weights"),
              writes=("out_dir",), logs=("live_dir",), persist=True,
              help="""Adapt a frozen CLIP with MaPLe prompts trained few-shot; report base vs adapted accuracy.

    Rerunning the same command resumes from the last checkpoint; other settings in the same
    --out are refused unless --overwrite. `pipeline extract --adapter OUT` then stores the
    adapted model's activations.""")
