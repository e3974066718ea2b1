"""Sparse autoencoders: architectures, losses, metrics, checkpoints and the trainer.

Importing this package registers every architecture ("relu", "topk", "batchtopk"), each with
its config class.
"""

from pipeline.sae.base import (
    SAE,
    Codes,
    SAEConfig,
    arch_class,
    build,
    config_class,
    estimate_norm_scale,
    register,
    registered_archs,
)
from pipeline.sae.geometry import (
    geometric_median,
    init_b_dec_,
    normalize_decoder_,
    remove_parallel_grad_,
)
from pipeline.sae.io import (
    FORMAT_VERSION,
    load_sae,
    load_trainer,
    read_sae_config,
    save_sae,
    save_training_state,
)
from pipeline.sae.losses import (
    auxk_loss,
    ghost_grads_loss,
    l1_penalty,
    mse,
    recon_loss_token_norm,
    squared_errors,
    token_norm_errors,
)
from pipeline.sae.metrics import DENSE_THRESHOLD, FiringCounter, RunningMetrics, evaluate, mean_error
from pipeline.sae.relu import ReLUConfig, ReLUSAE
from pipeline.sae.topk import BatchTopKConfig, BatchTopKSAE, TopKConfig, TopKSAE
from pipeline.sae.trainer import NonFiniteLossError, TrainConfig, Trainer

__all__ = [
    "SAE", "Codes", "SAEConfig", "arch_class", "build", "config_class", "estimate_norm_scale",
    "register", "registered_archs", "ReLUConfig", "ReLUSAE", "TopKConfig", "TopKSAE",
    "BatchTopKConfig", "BatchTopKSAE", "geometric_median",
    "init_b_dec_", "normalize_decoder_", "remove_parallel_grad_", "auxk_loss",
    "ghost_grads_loss", "l1_penalty", "mse", "recon_loss_token_norm", "squared_errors",
    "token_norm_errors", "DENSE_THRESHOLD",
    "FiringCounter", "RunningMetrics", "evaluate", "mean_error", "NonFiniteLossError", "Trainer",
    "TrainConfig", "FORMAT_VERSION", "load_sae", "load_trainer", "read_sae_config",
    "save_sae", "save_training_state",
]
