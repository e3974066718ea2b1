"""Pretrain a small open_clip CLIP from scratch on image–caption pairs of the synthetic world.

Training: the symmetric contrastive loss of CLIP (InfoNCE over the batch in both directions,
with the learnable logit scale) on fresh pairs every step.  Step ``s`` uses the training
split's images ``s·B … (s+1)·B − 1`` and their captions (``SyntheticWorld.partial_caption``:
a random subset of the attributes, so short zero-shot prompts are in distribution), so the
data position is the step and nothing is ever reused.  ``positives`` decides what counts as
a match: ``caption`` is standard CLIP (only an image's own caption; equal to open_clip's
``ClipLoss``), ``attributes`` (the default) counts every caption in the batch that is true of
the image (every value it names is the image's), with the target spread evenly over them.
The world knows which captions are true of which images; standard CLIP must treat "a photo
of a red circle" as a negative for every other red circle in the batch, and learns shape
more slowly for it (measured: README, "The synthetic world and the tiny CLIP").
AdamW; the learning rate rises linearly over ``warmup_steps`` then follows a cosine to 0 at
``steps``; weight decay applies to weight matrices only (not to gains, biases, embeddings
or the logit scale); the logit scale is clamped to at most 100 as in CLIP.
``held_out`` values (e.g. texture=checker) never appear in a training image or caption: the
ground for a concept-addition test downstream.  The training world uses the ``shape_colour``
task (it only decides which attributes each index's label fixes; every attribute is uniform
either way), so the evaluation task does not change the weights.

Folder ``out_dir`` (format version 1), every file written atomically (temporary file, then
``os.replace``):

- ``config.json``: ``format_version``, ``world`` (the training ``WorldConfig.to_dict()``),
  ``training`` (model, steps, batch_size, lr, warmup_steps, positives, weight_decay, seed,
  precision) — the run's identity, compared on every rerun — and package versions (informative).
- ``trainer_state.pt``: step, model and AdamW state, torch RNG state, per-step losses,
  cumulative training seconds; self-contained, used to resume.
- ``model.pt``: the model's state dict, an open_clip pretrained file:
  ``pipeline.models.load_model('tiny-clip', 'out_dir/model.pt')``.
- ``metrics.json``, ``loss.png``: written at the end (zero-shot accuracy and mean per-class
  recall on the test split, final loss, loss curve).

Rerunning the same config resumes from the last checkpoint (weights, optimizer, RNG and data
position), bit-identical to an uninterrupted run on the same device and thread count; a
finished run is not retrained.  Another config in the same folder is refused unless
``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import open_clip
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

from cache.atomic import atomic_write, write_json
from cache.errors import UserError, require_integers, require_threads
from pipeline import livelog, runfiles, training, zeroshot
from pipeline.configs import Stage
from pipeline.groundtruth import patch_object_masks
from pipeline.models import file_sha256, load_model, resolve_device
from pipeline.progress import Progress, announce, next_steps
from pipeline.runfiles import plot_losses
from pipeline.threads import sized
from pipeline.world import TASKS, SyntheticWorld, WorldConfig, caption_for, parse_held_out

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = runfiles.CONFIG_NAME
TRAINER_NAME = runfiles.TRAINER_NAME
MODEL_NAME = "model.pt"
METRICS_NAME = "metrics.json"
PLOT_NAME = "loss.png"
TRAIN_TASK = "shape_colour"  # task of the training world (see the module docstring)
WORLDS = ("synthetic",)
LOG_EVERY = 10  # steps between progress-bar loss updates
FINAL_LOSS_STEPS = 10  # final loss = mean loss of this many last steps
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) to 100
POSITIVES = ("attributes", "caption")  # what counts as a match in the contrastive loss (module docstring)
PRECISIONS = ("bfloat16", "float32")  # autocast dtype of the encoders (``contrastive_loss``)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """A pretraining run; fields marked 'identity' must match to resume a folder."""

    out_dir: Path  # run folder to create or resume: model.pt, trainer_state.pt, config.json, metrics.json, loss.png
    live_dir: Path | None = None  # dvclive folder of the loss curve (default: OUT/dvclive)
    world: Literal["synthetic"] = "synthetic"  # identity: source of image-caption pairs (the generated world, offline)
    seed: int = 0  # identity: world seed (train and test images) and weight-init seed
    model: str = "tiny-clip"  # identity: open_clip model name (a registered config); image size is read from it
    steps: int = 800  # identity: optimizer steps (batch_size fresh pairs each)
    batch_size: int = 128  # identity: image–caption pairs per step (the contrastive batch; 128 spreads a
                           # step's fixed costs over twice the pairs of 64 and learns more per pair seen)
    lr: float = 2e-3  # identity: peak learning rate of AdamW
    warmup_steps: int = 30  # identity: linear warm-up steps, then cosine decay to 0 at `steps`
    positives: Literal["attributes", "caption"] = "attributes"  # identity: matches in the contrastive loss: every
                                                                # caption true of the image (attributes) or only its
                                                                # own caption (caption, standard CLIP)
    weight_decay: float = 0.1  # identity: AdamW decoupled weight decay on weight matrices
    precision: Literal["bfloat16", "float32"] = "bfloat16"  # identity: the encoders' autocast dtype; a bfloat16 step
                                                            # takes 0.65 of float32's time on a CPU with AMX; use
                                                            # float32 on CPUs without bfloat16 units (not measured)
    patch_loss: float = 0.0  # identity: weight of the per-patch term (ViT towers): every object patch's final token,
                             # projected like the pooled one, against the batch's captions (0 = CLIP's loss only)
    held_out: tuple[tuple[str, str], ...] = ()  # identity: never show this attribute value in pretraining, e.g.
                                                # texture=checker
    task: str = "shape_colour"  # evaluation: classes of the zero-shot test (a key of pipeline.world.TASKS)
    templates: Literal["world", "openai"] = "world"  # evaluation: prompt set, 'world' or 'openai' (pipeline.zeroshot.TEMPLATE_SETS)
    eval_images: int = 1000  # evaluation: test-split images for zero-shot accuracy
    checkpoint_every: int = 50  # steps between checkpoints (the last step is always saved)
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (GPU when present)
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use
    workers: int = 1  # processes rendering batches ahead of the training loop (0 = in the loop)
    overwrite: bool = False  # replace a run folder that was written with another identity
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "live_dir", Path(self.live_dir or self.out_dir / livelog.LIVE_DIR))
        if self.world not in WORLDS:
            raise UserError(f"unknown --world '{self.world}'; choose one of: {', '.join(WORLDS)}")
        if self.model not in open_clip.list_models():
            raise UserError(f"unknown model '{self.model}'; register its open_clip JSON config in "
                            "pipeline/model_configs/ (e.g. tiny-clip)")
        require_integers(self, "seed", "steps", "batch_size", "warmup_steps", "eval_images", "checkpoint_every",
                         "workers")
        if self.seed < 0:
            raise UserError(f"--seed must be a non-negative integer (got {self.seed})")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {self.steps})")
        if self.batch_size < 2:
            raise UserError(f"--batch-size must be at least 2: a contrastive batch needs negatives (got {self.batch_size})")
        if self.positives not in POSITIVES:
            raise UserError(f"unknown --positives '{self.positives}'; choose one of: {', '.join(POSITIVES)}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive (got {self.lr})")
        if not 0 <= self.warmup_steps < self.steps:
            raise UserError(f"--warmup-steps must be in [0, steps) = [0, {self.steps}) (got {self.warmup_steps})")
        if not (math.isfinite(self.patch_loss) and self.patch_loss >= 0):
            raise UserError(f"--patch-loss must be a finite number, 0 or more (got {self.patch_loss})")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be 0 or more (got {self.weight_decay})")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown --precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}")
        object.__setattr__(self, "held_out", parse_held_out(self.held_out))
        if self.task not in TASKS:
            raise UserError(f"unknown --task '{self.task}'; choose one of: {', '.join(TASKS)}")
        unseen = [f"{a}={v}" for a, v in self.held_out if a in TASKS[self.task]]
        if unseen:
            raise UserError(f"--task {self.task} has classes with held-out {unseen[0]}, which pretraining never "
                            "shows, so zero-shot on it measures nothing; evaluate another --task")
        if self.templates not in zeroshot.TEMPLATE_SETS:
            raise UserError(f"unknown --templates '{self.templates}'; choose one of: "
                            f"{', '.join(zeroshot.TEMPLATE_SETS)}")
        if self.eval_images < 1:
            raise UserError(f"--eval-images must be at least 1 (got {self.eval_images})")
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})")
        require_threads(self.threads)
        if self.workers < 0:
            raise UserError(f"--workers must be 0 or more (got {self.workers})")


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a run wrote, for the CLI summary and DVC."""

    out_dir: Path
    model_path: Path  # open_clip pretrained file (state dict)
    trainer_state_path: Path
    config_path: Path
    metrics_path: Path
    plot_path: Path
    live_dir: Path  # the loss curve as dvclive writes it
    steps: int  # steps of the finished run
    start_step: int  # step this call started from (0 = fresh, steps = nothing left to train)
    final_loss: float  # mean contrastive loss of the last FINAL_LOSS_STEPS steps
    accuracy: float  # zero-shot top-1 accuracy on the test split, fraction in [0, 1]
    mean_recall: float  # zero-shot mean per-class recall (balanced accuracy) on the same images
    n_classes: int
    train_seconds: float  # training wall time summed over every call that trained this run
    seconds: float  # wall time of this call


# ---------------------------------------------------------------------------------------
# Data


class PairBatches(Dataset):
    """Item ``s`` is training step ``s``'s batch: ``(images_BRHW float32 normalised, tokens_BQ int64,
    true_BB bool, object_BP bool)``, ``true_BB[i, j]`` = caption j is true of image i (its diagonal is
    all true), ``object_BP[i, p]`` = patch p (row-major on the ``grid`` of patches, rows x columns) is at
    least half object pixels (P = 0 without a grid).

    Images ``s·B … (s+1)·B − 1`` of ``world`` and their tokenised captions (``world.partial_caption``).
    Pixels are scaled to [0, 1] and normalised with the model's mean and std, which equals
    the model's eval transform when the world renders at the model's input size (checked in
    the tests).
    """

    def __init__(self, world: SyntheticWorld, batch_size: int, tokenizer: Callable,
                 mean: tuple[float, ...], std: tuple[float, ...], grid: tuple[int, int] | None = None):
        self.world, self.batch_size, self.tokenizer, self.grid = world, batch_size, tokenizer, grid
        self.mean_R11 = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std_R11 = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self._token_rows: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.world) // self.batch_size

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        drawn = [self.world.draw(i) for i in range(step * self.batch_size, (step + 1) * self.batch_size)]
        scenes = [scene for scene, _, _ in drawn]
        images_BRHW = torch.from_numpy(np.stack([pixels_HWR for _, pixels_HWR, _ in drawn]))
        images_BRHW = images_BRHW.permute(0, 3, 1, 2).float().div_(255.0)
        images_BRHW = (images_BRHW - self.mean_R11) / self.std_R11
        named = [self.world.partial_caption_values(step * self.batch_size + b, scene)  # what each caption says
                 for b, scene in enumerate(scenes)]
        tokens_BQ = torch.stack([self._tokens(caption_for(values)) for values in named])
        true_BB = torch.tensor([[all(scene[a] == v for a, v in values.items()) for values in named]
                                for scene in scenes])
        object_BP = torch.from_numpy(  # the masks are stacked only when the patch term needs them
            patch_object_masks(np.stack([mask_HW for _, _, mask_HW in drawn]), self.grid, 0.5) if self.grid
            else np.zeros((len(drawn), 0), bool))
        return images_BRHW, tokens_BQ, true_BB, object_BP

    def _tokens(self, caption: str) -> torch.Tensor:
        """The caption's token row, tokenised once: the world has a few thousand captions and
        the tokenizer (ftfy, regex, BPE) cost a fifth of a batch's preparation."""
        if caption not in self._token_rows:
            self._token_rows[caption] = self.tokenizer([caption])[0]
        return self._token_rows[caption]


def train_world(cfg: Config, image_size: int) -> WorldConfig:
    """The training world's config (recorded in config.json): task ``shape_colour`` unless a
    held-out value is a shape or colour, then the first task whose classes avoid held-out attributes."""
    touched = {attribute for attribute, _ in cfg.held_out}
    task = next((t for t in (TRAIN_TASK, *TASKS) if not touched & set(TASKS[t])), None)
    if task is None:
        raise UserError("held_out touches every attribute; keep at least one attribute whole")
    return WorldConfig(seed=cfg.seed, image_size=image_size, task=task, held_out=cfg.held_out)


# ---------------------------------------------------------------------------------------
# Optimisation


def lr_at(step: int, cfg: Config) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to 0."""
    return training.Schedule(lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                             ratio_first_cosine=True).lr_at(step)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices; none on gains, biases, embeddings, logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_embedding = "embedding" in name  # token, positional and class embeddings
        (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over ``_param_groups``, fused: one kernel for the whole update (steps 10 % faster on 2 CPU cores)."""
    return torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=True)


def contrastive_loss(model: torch.nn.Module, images_BRHW: torch.Tensor, tokens_BQ: torch.Tensor,
                     positive_BB: torch.Tensor, precision: str = "float32", object_BP: torch.Tensor | None = None,
                     patch_weight: float = 0.0) -> torch.Tensor:
    """CLIP's symmetric InfoNCE of one batch with the model's learnable logit scale; image i's
    target is spread evenly over the captions j with ``positive_BB[i, j]``, caption j's over
    those images (with the identity it is CLIP's own loss).

    ``patch_weight`` > 0 adds that multiple of a per-patch term: each object patch of image i
    (``object_BP``), its final token through ``ln_post`` and the projection like the pooled token,
    is scored against every caption of the batch with image i's targets. CLIP's loss reaches a
    patch only through attention into the class token, so the patches need not say what the
    object is; this term asks each of them to, which is what a per-token SAE can then find.

    ``precision`` bfloat16 runs the encoders under autocast; the embeddings are normalised and
    the loss computed in float32 all the same (logits up to 100 would lose their decimals).
    """
    with _autocast(precision, positive_BB.device.type):
        if patch_weight:
            image_BE, patches_BPE = _image_and_patch_embeddings(model.visual, images_BRHW)
        else:
            image_BE = model.encode_image(images_BRHW, normalize=False)
        text_BE = model.encode_text(tokens_BQ, normalize=False)
    image_BE = torch.nn.functional.normalize(image_BE.float(), dim=-1)
    text_BE = torch.nn.functional.normalize(text_BE.float(), dim=-1)
    scale = model.logit_scale.exp()
    logits_BB = scale * image_BE @ text_BE.T
    image_loss = _soft_cross_entropy(logits_BB, positive_BB)
    text_loss = _soft_cross_entropy(logits_BB.T, positive_BB.T)
    loss = (image_loss + text_loss) / 2
    if patch_weight and object_BP.any():
        owner_N = object_BP.nonzero()[:, 0]
        patches_NE = torch.nn.functional.normalize(patches_BPE[object_BP].float(), dim=-1)
        loss = loss + patch_weight * _soft_cross_entropy(scale * patches_NE @ text_BE.T, positive_BB[owner_N])
    return loss


def _soft_cross_entropy(logits_NB: torch.Tensor, positive_NB: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row against the uniform target over its positives."""
    target_NB = positive_NB.float()
    return -(target_NB / target_NB.sum(1, keepdim=True) * logits_NB.log_softmax(1)).sum(1).mean()


def _image_and_patch_embeddings(visual: torch.nn.Module, images_BRHW: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """open_clip's ViT forward, keeping the patch tokens: pooled ``(B, E)`` and patches ``(B, P, E)``, both
    after ``ln_post`` and the projection (the pooled one equals ``encode_image``)."""
    pooled_BD, patches_BPD = visual._pool(visual.transformer(visual._embeds(images_BRHW)))
    return pooled_BD @ visual.proj, patches_BPD @ visual.proj


@contextlib.contextmanager
def _autocast(precision: str, device_type: str) -> Iterator[None]:
    """bfloat16 autocast for ``precision`` bfloat16. On CPU attention takes the math kernel: the
    fused (flash) kernel's bfloat16 backward took 8x its float32 time, and a step with it 1.07x
    the float32 step; with the math kernel 0.63x (1 thread, AMX CPU)."""
    if precision == "float32":
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
        if device_type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


# ---------------------------------------------------------------------------------------
# Files


def _identity(cfg: Config, world: WorldConfig) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "world": world.to_dict(),
            "training": {"model": cfg.model, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                         "warmup_steps": cfg.warmup_steps, "positives": cfg.positives,
                         "weight_decay": cfg.weight_decay, "seed": cfg.seed,
                         "precision": cfg.precision,
                         **({"patch_loss": cfg.patch_loss} if cfg.patch_loss else {})}}  # older runs keep theirs


def _save_checkpoint(run: runfiles.RunFolder, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     losses: list[float], train_seconds: float) -> None:
    """trainer_state.pt first (resume reads only it), then the exported model.pt."""
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    run.save_state({"step": step, "model": weights, "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(), "losses": list(losses), "train_seconds": train_seconds})
    atomic_write(run.out_dir / MODEL_NAME, lambda tmp: torch.save(weights, tmp))


# ---------------------------------------------------------------------------------------
# Evaluation


def eval_record(cfg: Config, image_size: int, model_path: Path) -> dict[str, Any]:
    """What a zero-shot evaluation depends on (stored in metrics.json as 'eval')."""
    world = WorldConfig(seed=cfg.seed, image_size=image_size, task=cfg.task, held_out=cfg.held_out)
    return {"world": world.to_dict(), "split": "test", "n_images": cfg.eval_images,
            "templates": cfg.templates, "checkpoint_sha256": file_sha256(model_path)}


def evaluate(cfg: Config, model_path: Path, device: str) -> dict[str, Any]:
    """Zero-shot accuracy and mean per-class recall of the checkpoint on ``cfg.eval_images`` test-split images."""
    loaded = load_model(cfg.model, str(model_path), device=device)
    world = WorldConfig(seed=cfg.seed, image_size=loaded.image_size, task=cfg.task, held_out=cfg.held_out)
    images = SyntheticWorld(world, n_images=cfg.eval_images, split="test", transform=loaded.preprocess)
    templates = zeroshot.TEMPLATE_SETS[cfg.templates]
    result = zeroshot.zero_shot_scores(loaded, images, images.class_names, templates, batch_size=256)
    return {**result, "n_classes": images.n_classes, "chance": 1.0 / images.n_classes,
            "eval": eval_record(cfg, loaded.image_size, model_path)}


# ---------------------------------------------------------------------------------------
# The stage


@sized
def run(cfg: Config) -> Outputs:
    """Train (or finish training) the run in ``cfg.out_dir``, then evaluate it zero-shot."""
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model(cfg.model, pretrained=None)
    if cfg.patch_loss and not (hasattr(model.visual, "transformer") and model.visual.proj is not None):
        raise UserError(f"--patch-loss needs an open_clip ViT image tower with a projection (e.g. tiny-clip), not "
                        f"{cfg.model}'s; set it to 0 for this model")
    image_size = int(model.visual.image_size[0])
    world = train_world(cfg, image_size)
    with runfiles.RunFolder(cfg.out_dir, _identity(cfg, world), kind="pretraining", overwrite=cfg.overwrite,
                            our_files=(MODEL_NAME, METRICS_NAME, PLOT_NAME, livelog.LIVE_DIR),
                            format_version=FORMAT_VERSION) as run:
        return _run_locked(cfg, run, model.to(device).train(), world, device, started)


def _run_locked(cfg: Config, run: runfiles.RunFolder, model: torch.nn.Module, world: WorldConfig, device: str,
                started: float) -> Outputs:
    out_dir = cfg.out_dir
    image_size = world.image_size
    optimizer = make_optimizer(model, cfg)
    start_step, losses, train_seconds = 0, [], 0.0
    rng_state = torch.Generator().manual_seed(cfg.seed).get_state()  # the process's own default seed is random
    trainer_path = out_dir / TRAINER_NAME
    state = run.load_state(device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, losses, train_seconds = int(state["step"]), list(state["losses"]), float(state["train_seconds"])
        rng_state = state["torch_rng"].cpu()
        log.info("resuming %s from step %d of %d", out_dir, start_step, cfg.steps)
    torch.set_rng_state(rng_state)

    if start_step < cfg.steps:
        announce("pretrain",
                 f"a {cfg.model} CLIP on the {cfg.world} world: {cfg.steps - start_step:,} of {cfg.steps:,} steps to "
                 f"go, {cfg.batch_size} image-caption pairs each",
                 f"then zero-shot accuracy on {cfg.eval_images:,} test images; into {out_dir}")
        train_seconds = _train(cfg, run, model, optimizer, world, device, start_step, losses, train_seconds)
    else:
        log.info("%s: training already finished (%d steps)", out_dir, cfg.steps)
    del model, optimizer

    metrics_path = out_dir / METRICS_NAME
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    final_loss = float(np.mean(losses[-FINAL_LOSS_STEPS:]))
    if (start_step < cfg.steps or metrics.get("eval") != eval_record(cfg, image_size, out_dir / MODEL_NAME)
            or "mean_recall" not in metrics):  # a run evaluated before mean recall was reported
        eval_started = time.perf_counter()
        result = evaluate(cfg, out_dir / MODEL_NAME, device)
        eval_seconds = time.perf_counter() - eval_started
        metrics = {"accuracy": result["accuracy"], "mean_recall": result["mean_recall"],
                   "n_classes": result["n_classes"], "chance": result["chance"],
                   "final_loss": final_loss, "first_loss": losses[0], "steps": cfg.steps,
                   "images_seen": cfg.steps * cfg.batch_size, "seconds": train_seconds + eval_seconds,
                   "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                   "threads": torch.get_num_threads(), "device": device, "eval": result["eval"]}
        run.start()
        write_json(metrics_path, metrics)
        plot_losses(out_dir / PLOT_NAME, losses,
                    f"{cfg.model} on the synthetic world: batch {cfg.batch_size}, lr {cfg.lr:g}, "
                    f"positives: {cfg.positives}, zero-shot {100 * result['accuracy']:.1f}%",
                    ylabel="contrastive loss", window=FINAL_LOSS_STEPS)
    log.info("zero-shot accuracy %.1f%% (mean per-class recall %.1f%%) on %d test images (%d classes, chance %.1f%%)",
             100 * metrics["accuracy"], 100 * metrics["mean_recall"], cfg.eval_images, metrics["n_classes"],
             100 * metrics["chance"])
    return Outputs(out_dir=out_dir, model_path=out_dir / MODEL_NAME, trainer_state_path=trainer_path,
                   config_path=out_dir / CONFIG_NAME, metrics_path=metrics_path, plot_path=out_dir / PLOT_NAME,
                   live_dir=cfg.live_dir,
                   steps=cfg.steps, start_step=start_step, final_loss=final_loss,
                   accuracy=float(metrics["accuracy"]), mean_recall=float(metrics["mean_recall"]),
                   n_classes=int(metrics["n_classes"]),
                   train_seconds=train_seconds, seconds=time.perf_counter() - started)


def _train(cfg: Config, run: runfiles.RunFolder, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           world: WorldConfig, device: str, start_step: int, losses: list[float], train_seconds: float) -> float:
    """Steps ``start_step … cfg.steps − 1``; appends to ``losses``; returns cumulative seconds."""
    mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
    pairs = PairBatches(SyntheticWorld(world, n_images=cfg.steps * cfg.batch_size, split="train"),
                        cfg.batch_size, open_clip.get_tokenizer(cfg.model), mean, std,
                        grid=tuple(model.visual.grid_size) if cfg.patch_loss else None)
    loader = DataLoader(pairs, batch_size=None, sampler=range(start_step, cfg.steps),
                        num_workers=cfg.workers, pin_memory=device.startswith("cuda"))
    bar = Progress(total=cfg.steps, initial=start_step, desc=f"pretrain {cfg.model}", unit="step",
                   enabled=cfg.progress)
    resumed = time.perf_counter()
    run.start()  # before the curve: replacing another run's folder deletes its files
    live = livelog.open_live(cfg.live_dir, start_step or None)
    logged = [start_step]

    def step(i: int, batch: tuple[torch.Tensor, ...]) -> training.Metrics:
        images_BRHW, tokens_BQ, true_BB, object_BP = batch
        training.set_lr(optimizer, lr_at(i, cfg))
        positive_BB = true_BB if cfg.positives == "attributes" else torch.eye(len(true_BB), dtype=torch.bool)
        loss = contrastive_loss(model, images_BRHW.to(device), tokens_BQ.to(device), positive_BB.to(device),
                                cfg.precision, object_BP.to(device), cfg.patch_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        bar.update(1)
        return {"loss": loss.detach()}

    def record(metrics: list[dict[str, float]]) -> None:
        losses.extend(m["loss"] for m in metrics)
        if not math.isfinite(losses[-1]):
            raise UserError(f"the contrastive loss became {losses[-1]} at step {len(losses)}; lower --lr "
                            "(the last checkpoint is kept)")

    def on_log(n: int) -> None:
        livelog.log_step(live, n, {"loss": float(np.mean(losses[logged[0]:n])), "lr": lr_at(n - 1, cfg)})
        logged[0] = n
        bar.set_postfix(loss=f"{np.mean(losses[-LOG_EVERY:]):.3f}", lr=f"{lr_at(n - 1, cfg):.2g}")

    def save(n: int) -> None:
        _save_checkpoint(run, model, optimizer, n, losses, train_seconds + time.perf_counter() - resumed)
        log.debug("checkpoint at step %d", n)

    training.fit(loader, step, start_step=start_step, log_every=LOG_EVERY, checkpoint_every=cfg.checkpoint_every,
                 record=record, on_log=on_log, save=save)
    live.end()
    bar.close()
    return train_seconds + time.perf_counter() - resumed


__all__ = ["Config", "Outputs", "run", "PairBatches", "lr_at", "make_optimizer", "contrastive_loss", "evaluate",
           "eval_record", "train_world"]


def summary(out: Outputs) -> str:
    resumed = f" (resumed at step {out.start_step})" if 0 < out.start_step < out.steps else ""
    if out.start_step == out.steps:
        resumed = " (already trained)"
    return (f"trained {out.steps} steps{resumed}: final loss {out.final_loss:.3f}, "
            f"zero-shot accuracy {100 * out.accuracy:.1f}% (mean per-class recall {100 * out.mean_recall:.1f}%) "
            f"on {out.n_classes} classes "
            f"(chance {100 / out.n_classes:.1f}%), training {out.train_seconds:.1f} s, this run {out.seconds:.1f} s\n"
            f"  checkpoint {out.model_path}  (metrics {out.metrics_path.name}, curve {out.plot_path.name})\n"
            + next_steps(f"pipeline extract --dataset synthetic --model MODEL --pretrained {out.model_path} "
                         "--layers L --out STORE"))


STAGE = Stage(name="pretrain", config=Config, run=run, summary=summary, reads=(), writes=("out_dir",),
              cached=False,
              logs=("live_dir",), persist=True,
              help="""Pretrain a tiny CLIP from scratch on the synthetic world's image-caption pairs.

    Rerunning the same command resumes from the last checkpoint; other settings in the same
    --out are refused unless --overwrite. Ends with zero-shot accuracy on the test split.""")
