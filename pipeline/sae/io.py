"""SAE checkpoints: a folder with ``config.json`` + ``weights.safetensors`` (+ ``trainer.pt``).

Format version 1:

- ``config.json``: ``format_version`` (1), then ``SAEConfig.to_dict()`` of the architecture's
  config: ``arch`` and every field under its own name (d_in, d_sae, l1, dead_window_tokens,
  norm_scale, dtype, model, layer — block index, 0-based, residual output —, token_kind,
  cache_config_sha256; TopK and BatchTopK add k, aux_k, aux_coef; BatchTopK threshold_lr),
  in ``base.RECORD_ORDER``. Every relu and topk file also holds the keys of the other two
  first architectures at fixed values (``format1_fill``: relu k null, aux_k min(512, d_sae),
  aux_coef 1/32, threshold_lr 0.01; topk threshold_lr 0.01); they are read and ignored.
  Last, ``inference_threshold`` (BatchTopK's θ, else null).
- ``weights.safetensors``: the module's state dict (W_enc (D, S), b_enc (S,), W_dec (S, D),
  b_dec (D,), plus buffers such as BatchTopK's ``threshold``), in ``dtype``, normalised
  units. Its metadata repeats ``format_version`` and ``arch``.
- ``mean_error.safetensors`` (optional, ``save_mean_error``; written by ``pipeline train``):
  one tensor ``mean_error`` (D,) float32, the mean over training tokens of x − x̂ per
  dimension in raw (cache) units, for the masking stage's ``mean_error`` splice correction.
  Metadata: ``format_version``, ``weights_sha256`` (the sha256 of the ``weights.safetensors``
  it was measured with; another is refused as stale), ``n_tokens``, ``token_kind``,
  ``cache_config_sha256`` (the store it was measured on). Folders without it stay valid:
  ``pipeline mask`` then measures it on its ``--cache`` store. Readers of an older version
  of this list ignore the file.
- ``trainer.pt`` (optional, ``save_training_state``): ``Trainer.state_dict()`` as a
  ``pipeline.runfiles`` trainer state (format ``TRAIN_STATE_VERSION``), self-contained
  (holds its own copy of the weights), for resuming.

Every file is written with ``cache.atomic.atomic_write`` (fsync'd temporary file moved into
place), so a crash leaves either the old or the new file, never half of one.
Changing any of the above bumps ``FORMAT_VERSION``; other versions are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from cache.atomic import write_json
from cache.errors import UserError
from pipeline import runfiles
from pipeline.sae.base import SAE, SAEConfig, build, config_class
from pipeline.sae.trainer import TRAIN_STATE_VERSION, TrainConfig, Trainer
from pipeline.tensorfile import save_tensors

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
TRAINER_NAME = "trainer.pt"
MEAN_ERROR_NAME = "mean_error.safetensors"


@dataclasses.dataclass(frozen=True)
class MeanError:
    """The SAE's mean reconstruction error E[x − x̂] per dimension (raw units) and where it was measured."""

    mean_error_D: torch.Tensor
    n_tokens: int
    token_kind: str
    cache_config_sha256: str


def weights_sha256(dir_path: str | os.PathLike) -> str:
    """sha256 of a checkpoint folder's weights file (the identity a mean error is measured with)."""
    digest = hashlib.sha256()
    with open(Path(dir_path) / WEIGHTS_NAME, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_mean_error(dir_path: str | os.PathLike, mean: MeanError) -> Path:
    """Write ``mean_error.safetensors`` beside the weights it was measured with."""
    dir_path = Path(dir_path)
    metadata = {"format_version": str(FORMAT_VERSION), "weights_sha256": weights_sha256(dir_path),
                "n_tokens": str(mean.n_tokens), "token_kind": mean.token_kind,
                "cache_config_sha256": mean.cache_config_sha256}
    save_tensors(dir_path / MEAN_ERROR_NAME, {"mean_error": mean.mean_error_D.detach().float().cpu().contiguous()},
                 metadata)
    return dir_path / MEAN_ERROR_NAME


def load_mean_error(dir_path: str | os.PathLike) -> MeanError | None:
    """The folder's stored mean error, or None when it has none; refuses one measured with other weights."""
    path = Path(dir_path) / MEAN_ERROR_NAME
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensor = f.get_tensor("mean_error")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is unreadable ({exc}): delete it; `pipeline mask --cache` measures it again") from exc
    if meta.get("weights_sha256") != weights_sha256(dir_path):
        raise UserError(f"{path} was measured with other weights than {dir_path / WEIGHTS_NAME}: delete it, "
                        "`pipeline mask --cache` measures it again")
    return MeanError(mean_error_D=tensor, n_tokens=int(meta["n_tokens"]), token_kind=meta["token_kind"],
                     cache_config_sha256=meta["cache_config_sha256"])


def save_sae(sae: SAE, dir_path: str | os.PathLike) -> Path:
    """Write ``sae`` to the folder ``dir_path`` (created if needed); returns the folder."""
    dir_path = Path(dir_path)
    dir_path.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, **sae.config.to_dict()}
    config["inference_threshold"] = sae.inference_threshold()
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    metadata = {"format_version": str(FORMAT_VERSION), "arch": sae.config.arch}
    save_tensors(dir_path / WEIGHTS_NAME, tensors, metadata)
    write_json(dir_path / CONFIG_NAME, config)
    return dir_path


def read_sae_config(dir_path: str | os.PathLike) -> SAEConfig:
    """The ``SAEConfig`` of a checkpoint folder, checking its format version and fields."""
    return _read_config_json(Path(dir_path))[0]


def _read_config_json(dir_path: Path) -> tuple[SAEConfig, float | None]:
    """(config, inference_threshold) from a checkpoint folder's config.json."""
    if not dir_path.is_dir():
        raise UserError(
            f"SAE checkpoint folder {dir_path} does not exist: pass a folder written by save_sae"
        )
    config_path = dir_path / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(f"SAE checkpoint {dir_path} has no {CONFIG_NAME}: re-save or re-train it")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc}): re-save the SAE") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{config_path} does not hold a JSON object: re-save the SAE")
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise UserError(
            f"SAE checkpoint {dir_path} has format_version {version!r} but this code reads "
            f"version {FORMAT_VERSION}: use the pipeline version that wrote it, or re-train"
        )
    threshold = raw.pop("inference_threshold", None)
    cls = config_class(raw.get("arch"))
    fields = {f.name for f in dataclasses.fields(cls)}
    config = cls.from_fields(**{key: value for key, value in raw.items() if key in fields})
    record = config.to_dict()
    unknown, missing = sorted(set(raw) - set(record)), sorted(set(record) - set(raw))
    if unknown or missing:
        raise UserError(
            f"{config_path} has unknown fields {unknown} / lacks fields {missing}: "
            "the file was edited or written by other code; re-save the SAE"
        )
    return config, threshold


def load_sae(dir_path: str | os.PathLike, *, device: str | torch.device = "cpu") -> SAE:
    """Load a checkpoint folder as the architecture it was saved as, in eval mode."""
    dir_path = Path(dir_path)
    config, threshold = _read_config_json(dir_path)
    weights_path = dir_path / WEIGHTS_NAME
    if not weights_path.is_file():
        raise UserError(f"SAE checkpoint {dir_path} has no {WEIGHTS_NAME}: re-save or re-train it")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights_path} is unreadable ({exc}): re-save or re-train the SAE") from exc
    sae = build(config)
    expected = sae.state_dict()
    unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise UserError(
            f"{weights_path} has unknown tensors {unknown} / lacks tensors {missing} for arch "
            f"{config.arch!r}: config.json and the weights do not belong together; re-save"
        )
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise UserError(
                f"{weights_path}: tensor {name} is {got.dtype} {tuple(got.shape)} but the config "
                f"says {want.dtype} {tuple(want.shape)}: config.json and the weights do not "
                "belong together; re-save"
            )
    sae.load_state_dict(tensors)
    have = sae.inference_threshold()
    if (threshold is None) != (have is None) or (
        have is not None and not math.isclose(threshold, have, rel_tol=1e-6, abs_tol=0.0)
    ):
        raise UserError(
            f"{dir_path}: inference_threshold {threshold} in {CONFIG_NAME} does not match the "
            f"weights' {have}: the files come from different saves; re-save the SAE"
        )
    return sae.to(device).eval()


def save_training_state(trainer: Trainer, dir_path: str | os.PathLike) -> Path:
    """Write a resumable checkpoint: ``save_sae`` files plus ``trainer.pt``."""
    dir_path = save_sae(trainer.sae, dir_path)
    runfiles.save_state(dir_path / TRAINER_NAME, trainer.state_dict(), TRAIN_STATE_VERSION)
    return dir_path


def load_trainer(
    dir_path: str | os.PathLike, train_cfg: TrainConfig
) -> Trainer:
    """Rebuild a Trainer from ``save_training_state`` output, ready to continue ``fit``."""
    dir_path = Path(dir_path)
    config = read_sae_config(dir_path)
    state = runfiles.load_state(dir_path / TRAINER_NAME, TRAIN_STATE_VERSION)
    if state is None:
        raise UserError(
            f"{dir_path} has no {TRAINER_NAME} to resume from: it was saved with save_sae only;"
            " start a new run or point at a training checkpoint"
        )
    trainer = Trainer(build(config), train_cfg)
    trainer.load_state_dict(state)
    return trainer
