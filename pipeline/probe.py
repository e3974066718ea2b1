"""A linear probe: multinomial logistic regression on CLIP image embeddings, in torch.

Shape letters as in CONTRIBUTING.md; E is the (joint) image embedding width.

Definition. Each embedding is L2-normalised (CLIP compares embeddings by cosine), then
standardised with the training set's per-dimension mean and standard deviation; logits
are ``z W + b``. Classes without training images get no parameters and a fixed logit of
-10⁴ (never predicted). The fit minimises the mean cross-entropy plus ``l2 / 2 · ‖W‖²`` (the bias
is not penalised) with full-batch L-BFGS (strong-Wolfe line search) from zero weights, in
float64. There is no sampling inside the fit, so it is deterministic: the seed only enters
through the choice of training images, which the caller makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cache.errors import UserError
from pipeline.threads import use_threads

log = logging.getLogger(__name__)

UNSEEN_LOGIT = -1e4  # logit of a class without training images: never predicted
SMALL_PROBLEM = 50_000_000  # N x E x C below which the fit runs on one thread


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """How to fit the probe."""

    l2: float = 1e-3  # weight of l2/2 · ‖W‖² added to the mean cross-entropy
    max_iter: int = 300  # L-BFGS iterations (full batch)
    tolerance: float = 1e-5  # L-BFGS stops when the gradient's largest entry is below this

    def __post_init__(self) -> None:
        if not (isinstance(self.l2, (int, float)) and math.isfinite(self.l2) and self.l2 >= 0):
            raise UserError(f"probe l2 must be a finite number >= 0 (got {self.l2!r})")
        if self.max_iter < 1:
            raise UserError(f"probe max_iter must be at least 1 (got {self.max_iter})")
        if not self.tolerance > 0:
            raise UserError(f"probe tolerance must be > 0 (got {self.tolerance})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearProbe:
    """A fitted probe; ``logits`` maps raw image embeddings ``(B, E)`` to ``(B, C)`` float32."""

    mean_E: Tensor  # float64, of the L2-normalised training embeddings
    std_E: Tensor  # float64, clamped away from 0
    W_EC: Tensor  # float64
    b_C: Tensor  # float64
    train_accuracy: float
    n_train: int
    config: ProbeConfig

    @property
    def n_classes(self) -> int:
        return int(self.W_EC.shape[1])

    def _standardise(self, features_BE: Tensor) -> Tensor:
        z = F.normalize(features_BE.to(self.W_EC.device, torch.float64), dim=-1)
        return (z - self.mean_E) / self.std_E

    def logits(self, features_BE: Tensor) -> Tensor:
        return (self._standardise(features_BE) @ self.W_EC + self.b_C).to(torch.float32)

    def to_dict(self) -> dict:
        """Everything needed to rebuild the probe, as plain lists (JSON-able)."""
        return {"mean_E": self.mean_E.tolist(), "std_E": self.std_E.tolist(), "W_EC": self.W_EC.tolist(),
                "b_C": self.b_C.tolist(), "train_accuracy": self.train_accuracy, "n_train": self.n_train,
                "config": dataclasses.asdict(self.config)}


def fit_linear_probe(features_NE: Tensor, labels_N: Tensor, n_classes: int,
                     config: ProbeConfig | None = None) -> LinearProbe:
    """Fit multinomial logistic regression on embeddings (see the module docstring)."""
    config = config or ProbeConfig()
    if features_NE.ndim != 2 or features_NE.shape[0] != labels_N.shape[0]:
        raise ValueError(f"features (N, E) and labels (N,) disagree: {tuple(features_NE.shape)} vs "
                         f"{tuple(labels_N.shape)}")
    n = features_NE.shape[0]
    if n < 2:
        raise UserError(f"the linear probe needs at least 2 training images (got {n}); raise --probe-images")
    labels_N = labels_N.to(torch.long).cpu()
    if labels_N.min() < 0 or labels_N.max() >= n_classes:
        raise ValueError("probe labels must index the classes")
    seen = torch.bincount(labels_N, minlength=n_classes)
    if (seen == 0).any():
        log.warning("the probe's training images miss %d of %d classes; it never predicts them",
                    int((seen == 0).sum()), n_classes)
    small = n * features_NE.shape[1] * n_classes < SMALL_PROBLEM
    # thread start-up dominates tiny matmuls (and stalls badly on a busy machine)
    with use_threads(1) if small else contextlib.nullcontext(), torch.inference_mode(False):
        return _fit(features_NE.detach().cpu().to(torch.float64).clone(), labels_N.clone(), n_classes, config)


def _fit(x_NE: Tensor, labels_N: Tensor, n_classes: int, config: ProbeConfig) -> LinearProbe:
    n = x_NE.shape[0]
    z = F.normalize(x_NE, dim=-1)
    mean_E = z.mean(0)
    std_E = z.std(0, unbiased=False).clamp_min(1e-6)
    z = (z - mean_E) / std_E
    # Only classes with training images get parameters: an unseen class's unpenalised bias
    # would run off to -inf and keep L-BFGS from converging. Unseen classes get logit UNSEEN_LOGIT.
    seen_C = torch.bincount(labels_N, minlength=n_classes) > 0
    local_N = torch.cumsum(seen_C.long(), 0)[labels_N] - 1
    m = int(seen_C.sum())
    W = torch.zeros(z.shape[1], m, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=config.max_iter, tolerance_grad=config.tolerance,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, local_N) + 0.5 * config.l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W_EC = torch.zeros(z.shape[1], n_classes, dtype=torch.float64)
    b_C = torch.full((n_classes,), UNSEEN_LOGIT, dtype=torch.float64)
    W_EC[:, seen_C] = W.detach()
    b_C[seen_C] = b.detach()
    train_acc = float(((z @ W_EC + b_C).argmax(1) == labels_N).double().mean())
    log.debug("linear probe: %d images, %d classes, train accuracy %.4f", n, n_classes, train_acc)
    return LinearProbe(mean_E=mean_E, std_E=std_E, W_EC=W_EC, b_C=b_C, train_accuracy=train_acc, n_train=n,
                       config=config)
