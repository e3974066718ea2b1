"""SAE trainer, separate from data loading: it takes any iterator of x_BD batches.

The loop, the learning-rate schedule and the checkpoint cadence are the shared ones of
``pipeline.training``; this module supplies the SAE's step. The loss is a list of
``Objective`` terms (``objectives``), each a loss of ``pipeline.sae.losses``' one signature
with an optional weight, summed in order. One step (``Trainer.step``), in normalised units
(x̃ = x / norm_scale):

    loss = recon(x̃, x̂) + λ·L1(f) + revival term
    recon   "token_norm" (reference, default): see ``losses.recon_loss_token_norm``;
            "mse": mean squared error
    L1      Σ_s |f_s| averaged over tokens, λ = ``SAEConfig.l1``
    revival "ghost_grads" (relu default, the PatchSAE reference's method) adds
            ``losses.ghost_grads_loss``; "auxk" (TopK-family default) adds
            ``TopKConfig.aux_coef`` × ``losses.auxk_loss`` with ``TopKConfig.aux_k``;
            "none" adds nothing. Dead = not fired in ``SAEConfig.dead_window_tokens``
            tokens, so revival starts only after one window of training.

then: non-finite loss → ``NonFiniteLossError`` before anything changes; backward; the
gradient parallel to each decoder row is removed; Adam step (learning rate warmed up
linearly over ``warmup_steps``, then constant); decoder rows renormalised; firing counters
and the architecture's running statistics (BatchTopK threshold) updated.

Micro-batches: a batch of B tokens is run in parts of at most ``micro_batch_tokens`` tokens
(automatic: parts whose (tokens × latents) tensors stay near ``MICRO_BATCH_BYTES``). Every loss
is a mean over tokens, so part c's loss is weighted by B_c / B and its gradients accumulate to
the whole batch's; everything judged over the batch stays whole-batch: the dead mask (read
before the step), AuxK's residual variance (a no-grad pass over the parts first, only while
latents are dead), BatchTopK's k·B budget (``SAE.batch_context``, a no-grad pass first), the
firing counters (the parts' counts are added as one batch), θ, and the logged L0 and FVU. The
update equals the one-part step up to float rounding (summation order); BatchTopK keeps every
value tied with its cut either way.

bf16: ``TrainConfig.dtype="bfloat16"`` runs the SAE forward under ``torch.autocast`` with
float32 master weights and float32 losses; there is no gradient scaler (bf16 needs none),
so every step is applied.

The one host sync per step is the finiteness check of the loss (plus a check for dead
latents while revival is on); metrics are returned as tensors and turned into floats only
at log steps and checkpoints (``pipeline.training.fit``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from cache.errors import UserError
from pipeline import training
from pipeline.sae import losses
from pipeline.sae.base import SAE, check_int, check_number
from pipeline.sae.geometry import init_b_dec_, normalize_decoder_, remove_parallel_grad_
from pipeline.sae.metrics import FiringCounter
from pipeline.sae.topk import TopKConfig

logger = logging.getLogger(__name__)

TRAIN_STATE_VERSION = 2  # 2: the version is stored as format_version (pipeline.runfiles.save_state)
REVIVALS = ("auto", "ghost_grads", "auxk", "none")
MICRO_BATCH_BYTES = 2 * 2**30
"""Automatic micro-batches keep one part's (tokens × latents) float32 tensors near this size."""
DENSE_COPIES = 8
"""(tokens × latents) tensors a step holds at its peak (pre-activations, codes, their
gradients, ghost-grad terms), rounded up: the automatic part size divides by it."""
RECON_LOSSES = {"token_norm": losses.recon_loss_token_norm, "mse": losses.mse}
RECON_ERRORS = {"token_norm": losses.token_norm_errors, "mse": losses.squared_errors}
"""The per-element errors each reconstruction loss averages (ghost grads rescale to them)."""


class NonFiniteLossError(UserError):
    """The loss of a step was NaN or inf; the step was not applied.

    ``step`` is the index of the failed step (= the number of steps applied before it), so
    the last good checkpoint is the latest one at or before it.
    """

    def __init__(self, step: int):
        self.step = step
        super().__init__(
            f"SAE loss became NaN/inf at step {step}; the step was not applied: resume from "
            "the last checkpoint with a lower lr, or check the activations for NaN "
            "(`pipeline verify`)"
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train an SAE (its shape and sparsity live in its architecture's config)."""

    lr: float = 4e-4
    """Adam learning rate after warm-up (paper: 4e-4)."""
    warmup_steps: int = 500
    """Steps of linear warm-up: step i (0-based) uses lr·min(1, (i+1)/warmup_steps)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    seed: int = 0
    """Seed of the trainer's torch.Generator (saved and restored with the state)."""
    log_every: int = 100
    """fit: call on_log (and log) every this many steps."""
    checkpoint_every: int = 1000
    """fit: call on_checkpoint every this many steps, and once at the end."""
    total_tokens: int | None = None
    """fit: stop after this many tokens in total (counting resumed ones); None = until the
    iterator ends."""
    batch_tokens: int = 128 * 197
    """Tokens per step; every batch must have exactly this many rows (paper: 128 images ×
    197 tokens). BatchTopK budgets and the lr depend on it."""
    device: str = "cpu"
    """Torch device to train on ("cpu", "cuda", "cuda:1", ...)."""
    dtype: str = "float32"
    """"float32", or "bfloat16" for autocast mixed precision (float32 master weights)."""
    revival: str = "auto"
    """Dead-latent revival: "auto" (ghost_grads for relu, auxk for TopK family),
    "ghost_grads", "auxk" (TopK family only) or "none"."""
    recon_loss: str = "token_norm"
    """Reconstruction term: "token_norm" (PatchSAE reference) or "mse"."""
    micro_batch_tokens: int | None = None
    """Tokens per micro-batch (the update is the whole batch's); None = automatic, from
    ``MICRO_BATCH_BYTES`` and the SAE's width (one part when the batch fits)."""

    def __post_init__(self) -> None:
        check_number("train lr", self.lr, strict=True)
        check_number("train adam_eps", self.adam_eps, strict=True)
        check_int("train warmup_steps", self.warmup_steps, minimum=0)
        check_int("train seed", self.seed, minimum=0)
        for name in ("log_every", "checkpoint_every", "batch_tokens"):
            check_int(f"train {name}", getattr(self, name), minimum=1)
        if self.total_tokens is not None:
            check_int("train total_tokens", self.total_tokens, minimum=1)
        if self.micro_batch_tokens is not None:
            check_int("train micro_batch_tokens", self.micro_batch_tokens, minimum=1)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"train betas must be two numbers in [0, 1), got {self.betas}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UserError(f"train dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.revival not in REVIVALS:
            raise UserError(f"unknown revival {self.revival!r}: use one of {', '.join(REVIVALS)}")
        if self.recon_loss not in RECON_LOSSES:
            raise UserError(
                f"unknown recon_loss {self.recon_loss!r}: use one of {', '.join(RECON_LOSSES)}"
            )
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise UserError(f"unknown train device {self.device!r}: use cpu, cuda or cuda:N") from exc

    def part_tokens(self, d_sae: int) -> int:
        """Tokens per micro-batch for an SAE of ``d_sae`` latents."""
        if self.micro_batch_tokens is not None:
            return self.micro_batch_tokens
        return max(1, MICRO_BATCH_BYTES // (DENSE_COPIES * 4 * d_sae))

    @property
    def schedule(self) -> training.Schedule:
        """Linear warm-up over ``warmup_steps``, then constant ``lr``."""
        return training.Schedule(lr=self.lr, warmup_steps=self.warmup_steps, ratio_first_ramp=True)


@dataclass(frozen=True)
class Objective:
    """One term of the training loss: ``weight · loss(f)`` (``weight`` None: the loss as is)."""

    name: str  # its metric: "recon" → recon_loss, "l1" → l1, "aux" → aux_loss
    loss: Callable[[losses.Forward], Tensor]
    weight: float | None = None
    needs_dead: bool = False  # the loss reads Forward.dead_S
    needs_residual_var: bool = False  # split into micro-batches, the loss reads Forward.residual_var


def objectives(sae: SAE, cfg: TrainConfig) -> list[Objective]:
    """The terms an SAE trains with: reconstruction, L1 when λ ≠ 0, then the revival term."""
    recon = RECON_LOSSES[cfg.recon_loss]
    terms = [Objective("recon", recon)]
    if sae.config.l1:
        terms.append(Objective("l1", losses.l1_penalty, sae.config.l1))
    revival = sae.default_revival if cfg.revival == "auto" else cfg.revival
    if revival == "auxk":
        if not isinstance(sae.config, TopKConfig):
            raise UserError(
                f"revival 'auxk' needs a TopK-family SAE (a dead {sae.arch} latent has no "
                "positive pre-activation to learn from): use revival 'ghost_grads' or 'auto'"
            )
        aux = functools.partial(losses.auxk_loss, aux_k=sae.config.aux_k)
        terms.append(Objective("aux", aux, sae.config.aux_coef, needs_dead=True, needs_residual_var=True))
    elif revival == "ghost_grads":
        ghost = functools.partial(losses.ghost_grads_loss, match=RECON_ERRORS[cfg.recon_loss])
        terms.append(Objective("aux", ghost, needs_dead=True))
    return terms


class Trainer:
    """Owns the optimiser, LR schedule, firing counters, step count and resume state.

    ``terms`` default to ``objectives(sae, cfg)``. Resume: ``trainer.load_state_dict(state)``
    on a Trainer built around an SAE of the same config restores weights, Adam state, step,
    tokens seen, firing counters and RNG; the data stream's position is the caller's
    (``tokens_seen`` says how far training got).
    """

    def __init__(self, sae: SAE, cfg: TrainConfig, terms: list[Objective] | None = None):
        if sae.W_enc.dtype not in (torch.float32, torch.float64):
            raise UserError(
                f"SAE parameters are {sae.config.dtype}; train with float32 parameters "
                "(SAEConfig dtype='float32') and TrainConfig dtype='bfloat16' for mixed precision"
            )
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.sae = sae.to(self.device)
        self.terms = objectives(sae, cfg) if terms is None else terms
        self.schedule = cfg.schedule
        self.optimizer = torch.optim.Adam(
            self.sae.parameters(), lr=self.schedule.lr_at(0), betas=cfg.betas, eps=cfg.adam_eps, fused=True
        )
        self.firing = FiringCounter(
            sae.config.d_sae, window_tokens=sae.config.dead_window_tokens, device=self.device
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.n_steps = 0
        self.tokens_seen = 0

    # -- initialisation ----------------------------------------------------------------
    def init_from_sample(self, x_ND: Tensor) -> None:
        """Set b_dec to the geometric median of a raw-unit activation sample (before step 0)."""
        if self.n_steps:
            raise RuntimeError("init_from_sample must be called before the first step")
        init_b_dec_(self.sae, x_ND.to(self.device))

    # -- one step ----------------------------------------------------------------------
    def step(self, x_BD: Tensor) -> dict[str, Tensor]:
        """One optimiser step on a raw-unit batch; returns detached 0-dim metric tensors.

        Keys: loss, recon_loss, l1, aux_loss (revival term, already weighted), l0, fvu
        (batch estimate, normalised units), lr, dead_fraction, dense_fraction.
        Raises NonFiniteLossError (nothing changed) if the loss is NaN/inf.
        """
        sae, cfg = self.sae, self.sae.config
        if x_BD.ndim != 2 or x_BD.shape[1] != cfg.d_in:
            raise UserError(
                f"training batch has shape {tuple(x_BD.shape)} but the SAE expects (B, {cfg.d_in}):"
                " train on activations of the width the SAE was built for"
            )
        if x_BD.shape[0] != self.cfg.batch_tokens:
            raise UserError(
                f"training batch has {x_BD.shape[0]} tokens but batch_tokens="
                f"{self.cfg.batch_tokens}: make the loader yield full batches of that size"
            )
        sae.train()
        lr = self.schedule.lr_at(self.n_steps)
        training.set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)

        xn_BD = sae.to_normed(x_BD.to(self.device, non_blocking=True))
        parts = xn_BD.split(self.cfg.part_tokens(cfg.d_sae))
        n = xn_BD.shape[0]
        dead_S = self.firing.dead_mask() if any(t.needs_dead for t in self.terms) else None
        context = residual_var = None
        if len(parts) > 1 and sae.batch_wide:
            with torch.no_grad(), self._autocast():
                context = sae.batch_context((sae.pre_acts(xn_MD) for xn_MD in parts), n)
        if len(parts) > 1 and any(t.needs_residual_var for t in self.terms) and bool(dead_S.any()):
            residual_var = self._residual_var(parts, context)

        sums: dict[str, Tensor] = {}
        counts_S = err = l0 = kept = None
        for xn_MD in parts:
            with self._autocast():
                pre_MS = sae.pre_acts(xn_MD)
                codes = sae.activate_part(pre_MS, context)
                xn_hat_MD = sae.decode_normed(codes)
            f = losses.Forward(xn_MD, xn_hat_MD, pre_MS, codes, sae.W_dec, dead_S, residual_var)
            raw = {term.name: term.loss(f) for term in self.terms}
            values = {t.name: raw[t.name] if t.weight is None else t.weight * raw[t.name] for t in self.terms}
            first, *rest = values.values()
            loss = sum(rest, first)
            share = xn_MD.shape[0] / n
            (loss * share).backward()
            with torch.no_grad():
                values.update(loss=loss, l1_raw=raw["l1"] if "l1" in raw else losses.l1_penalty(f))
                for name, value in values.items():
                    sums[name] = sums.get(name, 0) + value.detach() * share
                codes = codes.detach()
                part_err = (xn_MD.float() - xn_hat_MD.float()).pow(2).sum()
                part_counts_S = codes.fire_counts()
                counts_S = part_counts_S if counts_S is None else counts_S + part_counts_S
                err = part_err if err is None else err + part_err
                l0 = part_counts_S.sum() if l0 is None else l0 + part_counts_S.sum()  # Σ_b L0_b
            kept = codes if len(parts) == 1 else None
            del f, raw, values, loss, codes, pre_MS, xn_hat_MD
        if not torch.isfinite(sums["loss"]):
            raise NonFiniteLossError(self.n_steps)

        remove_parallel_grad_(sae)
        self.optimizer.step()
        normalize_decoder_(sae)
        self.firing.add(counts_S, n)
        sae.update_running_stats_(kept, context)
        self.n_steps += 1
        self.tokens_seen += n

        with torch.no_grad():
            var = (xn_BD.float() - xn_BD.float().mean(dim=0)).pow(2).sum()
            return {
                "loss": sums["loss"],
                "recon_loss": sums["recon"],
                "l1": sums["l1_raw"],
                "aux_loss": sums.get("aux", torch.zeros((), device=self.device)),
                "l0": l0 / n,
                "fvu": err / var.clamp_min(1e-12),
                "lr": torch.tensor(lr),
                "dead_fraction": self.firing.dead_fraction(),
                "dense_fraction": self.firing.dense_fraction(),
            }

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cfg.dtype == "bfloat16"
        )

    @torch.no_grad()
    def _residual_var(self, parts: tuple[Tensor, ...], context) -> Tensor:
        """mean_b ‖e_b − ē‖² of the residual e = x̃ − x̂ over the whole batch (float64 sums over the parts)."""
        sum_D = sq = None
        for xn_MD in parts:
            with self._autocast():
                xn_hat_MD = self.sae.decode_normed(self.sae.activate_part(self.sae.pre_acts(xn_MD), context))
            e_MD = (xn_MD.float() - xn_hat_MD.float()).double()
            sum_D = e_MD.sum(dim=0) if sum_D is None else sum_D + e_MD.sum(dim=0)
            sq = e_MD.pow(2).sum() if sq is None else sq + e_MD.pow(2).sum()
        n = sum(len(p) for p in parts)
        return ((sq - sum_D.pow(2).sum() / n) / n).float()

    # -- loop --------------------------------------------------------------------------
    def fit(
        self,
        batches: Iterable[Tensor],
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        on_checkpoint: Callable[["Trainer"], None] | None = None,
    ) -> dict[str, float]:
        """Train on ``batches`` until ``total_tokens`` or the iterator ends (``pipeline.training.fit``).

        Every ``log_every`` steps and after the last: metrics become floats, are logged and
        passed to ``on_log(step, metrics)`` (step = number of steps applied). Every
        ``checkpoint_every`` steps and after the last: ``on_checkpoint(trainer)``. A resumed
        trainer continues its step and token counts; the iterator must resume the data.
        Returns the last metrics as floats ({} if no step ran).
        """
        total = self.cfg.total_tokens
        last: dict[str, float] = {}

        def log(step: int) -> None:
            last.update(self._log(last))
            if on_log is not None:
                on_log(step, dict(last))

        training.fit(
            training.steps_until(batches, lambda: total is not None and self.tokens_seen >= total),
            lambda _, x_BD: self.step(x_BD),
            start_step=self.n_steps, log_every=self.cfg.log_every, checkpoint_every=self.cfg.checkpoint_every,
            record=lambda metrics: last.update(metrics[-1]), on_log=log,
            save=None if on_checkpoint is None else lambda _: on_checkpoint(self),
        )
        if total is not None and self.tokens_seen < total:
            logger.warning(
                "batches ran out after %d of %d tokens (step %d)", self.tokens_seen, total, self.n_steps
            )
        return last

    def _log(self, metrics: dict[str, float]) -> dict[str, float]:
        metrics = {**metrics, "tokens_seen": float(self.tokens_seen)}
        logger.info(
            "step %d tokens %d loss %.4g recon %.4g l1 %.4g aux %.4g l0 %.1f fvu %.4f dead %.3f",
            self.n_steps, self.tokens_seen, metrics["loss"], metrics["recon_loss"], metrics["l1"],
            metrics["aux_loss"], metrics["l0"], metrics["fvu"], metrics["dead_fraction"],
        )
        return metrics

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A snapshot of everything needed to resume bit-for-bit (given the same batches)."""
        return {
            "sae_config": self.sae.config.to_dict(),
            "sae": {k: v.detach().clone() for k, v in self.sae.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "firing": self.firing.state_dict(),
            "rng": self.generator.get_state(),
            "n_steps": self.n_steps,
            "tokens_seen": self.tokens_seen,
            "train_config": dataclasses.asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; the SAE must have the same config."""
        if state["sae_config"] != self.sae.config.to_dict():
            diff = sorted(
                k for k in state["sae_config"]
                if state["sae_config"][k] != self.sae.config.to_dict().get(k)
            )
            raise UserError(
                f"trainer state was saved for a different SAE config (fields {', '.join(diff)}):"
                " resume with the SAE config the run started with"
            )
        changed = sorted(
            k for k, v in state["train_config"].items()
            if dataclasses.asdict(self.cfg).get(k) != (tuple(v) if isinstance(v, list) else v)
        )
        if changed:
            logger.warning("resuming with changed train settings: %s", ", ".join(changed))
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.firing.load_state_dict(state["firing"])
        self.generator.set_state(state["rng"])
        self.n_steps = int(state["n_steps"])
        self.tokens_seen = int(state["tokens_seen"])
