"""SAEs in and out: SAELens folders and PatchSAE (reference) checkpoints.

Formats (none of them needs the other project installed; ``sae_lens`` is only a test extra):

- **SAELens** (v6): a folder with ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``dtype``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``k`` and
  ``rescale_acts_by_decoder_norm`` for topk, ``metadata`` with ``hook_name`` and ``model_name``)
  and ``sae_weights.safetensors`` (``W_enc`` (D, S), ``b_enc``, ``W_dec`` (S, D), ``b_dec``,
  jumprelu's ``threshold`` (S,)). SAELens SAEs take raw activations.
- **PatchSAE** (dynamical-inference/patchsae): one ``torch.save`` file ``{"cfg": ViTSAERunnerConfig
  or dict, "state_dict": {W_enc, b_enc, W_dec, b_dec}}`` (``"config"`` instead of ``"cfg"`` also
  occurs). A ReLU SAE on raw activations, ``x - b_dec`` before the encoder; ``block_layer`` is the
  index into ``vision_model.encoder.layers`` (residual output; negative counts from the end) and
  ``module_name`` is ``"resid"``. It is read with ``torch.load(weights_only=True)``: the config
  object is rebuilt as plain attributes, no code of the file runs.

Mapping (ours ↔ SAELens): relu ↔ standard, topk ↔ topk, batchtopk ↔ jumprelu with every
threshold equal to θ (SAELens saves its BatchTopK SAEs as jumprelu too). Our ``norm_scale`` s
is folded into the exported weights (W_enc / s, W_dec · s, b_dec · s), so SAELens encodes raw
activations to the same codes and decodes to the same reconstruction; the export's metadata
keeps our config (``metadata.patchsae_pipeline``), so importing it back restores s and every
field. Our layer L is ``blocks.L.hook_resid_post``; ``blocks.L.hook_resid_pre`` is imported as
layer L − 1 (the residual output of the block before). Anything else is refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cache.atomic import write_json
from cache.errors import UserError
from cache.schema import LOCK_FILE
from cache.store import ActivationStore, StoreLock
from pipeline.sae.base import DTYPES, SAE, build, config_class
from pipeline.sae.io import FORMAT_VERSION, load_sae, save_sae
from pipeline.tensorfile import save_tensors

log = logging.getLogger(__name__)

FORMATS = ("saelens", "patchsae")
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"
"""The SAELens format version written into exports (v6 layout: hook and model under ``metadata``)."""
OURS_KEY = "patchsae_pipeline"
"""Key of ``metadata`` under which an export keeps our config (format_version + ``SAEConfig.to_dict``)."""
TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}
HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")
HF_CLIP = {  # PatchSAE's Hugging Face model names: open_clip name/pretrained, number of blocks
    "openai/clip-vit-base-patch16": ("ViT-B-16/openai", 12),
    "openai/clip-vit-base-patch32": ("ViT-B-32/openai", 12),
    "openai/clip-vit-large-patch14": ("ViT-L-14/openai", 24),
}


# ---------------------------------------------------------------------------------------
# Export


def export_sae(sae_dir: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str = "saelens") -> Path:
    """Write the checkpoint folder ``sae_dir`` as a SAELens folder ``out_dir``; returns it."""
    if fmt != "saelens":
        raise UserError(f"cannot export to format {fmt!r}: export-sae writes --format saelens only")
    sae = load_sae(sae_dir)
    c = sae.config
    if c.layer is None:
        raise UserError(f"the SAE in {sae_dir} does not record its layer, so it has no SAELens hook_name; "
                        "train it from a store (which records the layer) before exporting")
    with StoreLock(Path(out_dir)):
        _write_saelens(sae, _new_folder(out_dir))
    return Path(out_dir)


def _write_saelens(sae: SAE, out_dir: Path) -> None:
    c = sae.config
    s = c.norm_scale
    weights = {name: p.detach().cpu() for name, p in sae.named_parameters()}
    weights["W_enc"] = weights["W_enc"] / s  # raw units in, the same codes out (module docstring)
    weights["W_dec"] = weights["W_dec"] * s
    weights["b_dec"] = weights["b_dec"] * s
    cfg: dict[str, Any] = {"architecture": TO_SAELENS[c.arch], "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype,
                           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                           "reshape_activations": "none"}
    if c.arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if c.arch == "batchtopk":
        weights["threshold"] = torch.full((c.d_sae,), sae.inference_threshold(), dtype=c.torch_dtype)
    cfg["metadata"] = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
                       "model_name": c.model, "hook_name": f"blocks.{c.layer}.hook_resid_post",
                       "hook_head_index": None, "prepend_bos": False,
                       OURS_KEY: {"format_version": FORMAT_VERSION, **c.to_dict(),
                                  "inference_threshold": sae.inference_threshold()}}
    tensors = {k: v.to(c.torch_dtype).contiguous() for k, v in weights.items()}
    save_tensors(out_dir / SAELENS_WEIGHTS, tensors, {"format": "pt"})
    write_json(out_dir / SAELENS_CONFIG, cfg)


# ---------------------------------------------------------------------------------------
# Import


def import_sae(source: str | os.PathLike, out_dir: str | os.PathLike, *, fmt: str, layer: int | None = None,
               model: str | None = None, k: int | None = None,
               cache_dir: str | os.PathLike | None = None) -> Path:
    """Read ``source`` (format ``fmt``) and save it as our checkpoint folder ``out_dir``; returns it.

    ``layer``: the block the user expects; refused if the file says another (e.g. off by one).
    ``model``: our ``name/pretrained`` of the model, when the file does not say it in that form.
    ``k``: the training budget of a thresholded (jumprelu) SAE, imported as batchtopk.
    ``cache_dir``: an activation store to check width and layer against; it also sets the
    provenance (model, store config) of the import.
    """
    source = Path(source)
    if fmt == "saelens":
        fields, tensors = _read_saelens(source, k)
    elif fmt == "patchsae":
        fields, tensors = _read_patchsae(source)
    else:
        raise UserError(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    fields = _check_layer(fields, layer, source)
    if model is not None:
        fields["model"] = model
    if cache_dir is not None:
        fields = _fit_store(fields, Path(cache_dir))
    fields.setdefault("layer", None)
    if fields["layer"] is None:
        raise UserError(f"{source} does not say which block it reads: pass --layer N (block index, 0-based, "
                        "residual output)")
    sae = _build(fields, tensors, source)
    with StoreLock(Path(out_dir)):
        save_sae(sae, _new_folder(out_dir))
    return Path(out_dir)


def _build(fields: dict[str, Any], tensors: dict[str, torch.Tensor], source: Path) -> SAE:
    """Our SAE from config fields and W_enc, b_enc, W_dec, b_dec (+ θ), checking the shapes."""
    arch = fields.pop("arch")
    threshold = fields.pop("inference_threshold", None)
    config = config_class(arch).from_fields(**fields)
    sae = build(config)
    dtype = config.torch_dtype
    want = {"W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,), "W_dec": (config.d_sae, config.d_in),
            "b_dec": (config.d_in,)}
    for name, shape in want.items():
        if name not in tensors:
            raise UserError(f"{source} has no tensor {name}: it is not a {arch} SAE checkpoint")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{source}: {name} is {tuple(tensors[name].shape)} but d_in={config.d_in}, "
                            f"d_sae={config.d_sae} need {shape}; the config and the weights do not belong together")
        if not torch.isfinite(tensors[name]).all():
            raise UserError(f"{source}: {name} holds NaN or inf; the SAE is damaged, use another checkpoint")
    with torch.no_grad():
        for name in want:
            getattr(sae, name).copy_(tensors[name].to(dtype))
        if arch == "batchtopk":
            sae.threshold.fill_(float(threshold))
            sae.n_threshold_updates.fill_(1)
    return sae.eval()


def _check_layer(fields: dict[str, Any], layer: int | None, source: Path) -> dict[str, Any]:
    """Refuse a --layer that is not the one the file names (the message says what the hook means)."""
    found = fields.get("layer")
    if layer is not None and layer < 0:
        raise UserError(f"--layer must be a block index >= 0, got {layer}")
    if layer is not None and found is not None and layer != found:
        where = fields.get("_hook", "the checkpoint")
        raise UserError(f"{source}: {where} is the residual output of block {found}, not block {layer} (layers are "
                        f"block indices, 0-based, residual output); import it as --layer {found} or use the SAE "
                        f"of block {layer}")
    fields.pop("_hook", None)
    if found is None:
        fields["layer"] = layer
    return fields


def _fit_store(fields: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """Check width and layer against an activation store and take its model and config as provenance."""
    store = ActivationStore(cache_dir, mode="r")
    if fields["d_in"] != store.d_model:
        raise UserError(f"the SAE reads width {fields['d_in']} but {cache_dir} holds width {store.d_model}; "
                        "use the store of the SAE's model")
    if fields.get("layer") is not None and fields["layer"] not in store.layers:
        raise UserError(f"the SAE reads the output of block {fields['layer']}, which {cache_dir} does not hold "
                        f"(layers {list(store.layers)}); check the hook's block or extract --layers {fields['layer']}")
    m = store.attrs.get("model") or {}
    base = f"{m.get('name')}/{m.get('pretrained')}"
    if fields.get("model") and fields["model"].lower() != base.lower():
        raise UserError(f"the SAE was trained on {fields['model']} but {cache_dir} holds activations of {base}; "
                        "pass --model to correct the SAE's model or use a store of its model")
    return {**fields, "model": base, "cache_config_sha256": store.config_sha256}


def _new_folder(out_dir: str | os.PathLike) -> Path:
    """``out_dir``, empty but for the writer's lock (taken by the caller before the first byte)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(p.name != LOCK_FILE for p in out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty folder: choose a new output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


# ---------------------------------------------------------------------------------------
# SAELens


def _read_saelens(source: Path, k: int | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, weights_path = source / SAELENS_CONFIG, source / SAELENS_WEIGHTS
    if not (cfg_path.is_file() and weights_path.is_file()):
        raise UserError(f"{source} is not a SAELens SAE folder (it needs {SAELENS_CONFIG} and {SAELENS_WEIGHTS}); "
                        "save it with sae.save_model(folder)")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(weights_path)
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise UserError(f"{source} is unreadable ({exc}): save it again with sae.save_model(folder)") from exc
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg  # before v6: at the top level
    arch = cfg.get("architecture", "standard")
    if arch not in TO_SAELENS.values():
        raise UserError(f"{source} is a SAELens {arch!r} SAE; this pipeline has relu, topk and batchtopk SAEs "
                        "(SAELens standard, topk, and jumprelu with one threshold): it cannot be carried over")
    for key, ok in (("normalize_activations", ("none", False, None)), ("reshape_activations", ("none", None)),
                    ("hook_head_index", (None,))):
        value = cfg.get(key, meta.get(key))
        if value not in ok:
            fix = (" (fold the scaling factor into the weights: sae.fold_activation_norm_scaling_factor(f), "
                   "then save it again)" if value == "expected_average_only_in" else "")
            raise UserError(f"{source} has {key}={value!r}, which this pipeline's SAEs cannot reproduce{fix}; "
                            "only SAEs on whole raw residual activations can be imported")
    if cfg.get("finetuning_scaling_factor") or "scaling_factor" in tensors:
        raise UserError(f"{source} has a finetuning scaling factor: load it in SAELens and save it again without it")
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"{source} has dtype {cfg.get('dtype')!r}: use one of {', '.join(DTYPES)}")
    tensors = {name: t.to(torch.float64) for name, t in tensors.items()}
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    if set(tensors) != expected:
        raise UserError(f"{source} holds tensors {sorted(tensors)}, not {sorted(expected)} of a SAELens {arch} SAE: "
                        "save it again with sae.save_model(folder)")
    if not cfg.get("apply_b_dec_to_input", True):  # pre = x W_enc + b_enc = (x - b_dec) W_enc + (b_enc + b_dec W_enc)
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):  # pre · ‖W_dec‖ and decoder rows of norm 1: fold the norms
        norms_S = tensors["W_dec"].norm(dim=1).clamp_min(1e-8)
        tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norms_S, tensors["b_enc"] * norms_S
        tensors["W_dec"] = tensors["W_dec"] / norms_S[:, None]
    fields: dict[str, Any] = {"d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "dtype": dtype}
    ours = meta.get(OURS_KEY) if isinstance(meta.get(OURS_KEY), dict) else None
    if arch == "standard":
        fields["arch"] = "relu"
    elif arch == "topk":
        fields.update(arch="topk", k=cfg.get("k"))
    else:
        thresholds_S = tensors.pop("threshold")
        theta = float(thresholds_S[0]) if len(thresholds_S) else 0.0
        if not (bool((thresholds_S == theta).all()) and theta >= 0):
            raise UserError(f"{source} is a jumprelu SAE with a threshold per latent; this pipeline's thresholded SAE "
                            "(batchtopk) has one threshold >= 0 for all latents, so it cannot be carried over")
        k = k if k is not None else (ours or {}).get("k")
        if k is None:
            raise UserError(f"{source} is a jumprelu SAE with one threshold, imported as batchtopk, which needs its "
                            "training budget: pass --k K")
        fields.update(arch="batchtopk", k=k, inference_threshold=theta)
    fields.update(_saelens_hook(meta.get("hook_name") or meta.get("hook_point"), source))
    if meta.get("model_name"):
        fields["model"] = str(meta["model_name"])
    if ours is not None:  # our own export: restore norm_scale and every field
        fields = _restore_ours(fields, ours, tensors, source)
    return fields, tensors


def _saelens_hook(hook: str | None, source: Path) -> dict[str, Any]:
    """Our layer from a TransformerLens-style hook name (see the module docstring)."""
    if hook is None:
        return {}
    m = HOOK_RE.match(str(hook))
    if m is None:
        raise UserError(f"{source} reads hook {hook!r}, which is not the residual stream after a block "
                        "(blocks.L.hook_resid_post); only residual-stream SAEs can be imported")
    block = int(m.group(1))
    if m.group(2) == "pre":
        if block == 0:
            raise UserError(f"{source} reads {hook}, the embeddings before the first block, which no store holds; "
                            "only residual outputs of blocks can be imported")
        log.info("%s: %s is the residual output of block %d", source, hook, block - 1)
        block -= 1
    return {"layer": block, "_hook": f"hook {hook}"}


def _restore_ours(fields: dict[str, Any], ours: dict[str, Any], tensors: dict[str, torch.Tensor],
                  source: Path) -> dict[str, Any]:
    """Undo the export's folding of norm_scale and take back every field of our config."""
    ours = dict(ours)
    if ours.pop("format_version", None) != FORMAT_VERSION or ours.get("arch") != fields["arch"]:
        raise UserError(f"{source}: metadata.{OURS_KEY} does not match the SAE (another version or edited); "
                        f"remove metadata.{OURS_KEY} from {SAELENS_CONFIG} to import it as a plain SAELens SAE")
    s = float(ours["norm_scale"])
    tensors["W_enc"], tensors["W_dec"], tensors["b_dec"] = tensors["W_enc"] * s, tensors["W_dec"] / s, tensors["b_dec"] / s
    names = set(config_class(fields["arch"]).__dataclass_fields__)
    restored = {key: value for key, value in ours.items() if key in names}
    restored.update({key: fields[key] for key in ("d_in", "d_sae", "dtype", "layer", "model") if key in fields})
    restored["arch"] = fields["arch"]
    for key in ("_hook", "inference_threshold"):
        if key in fields:
            restored[key] = fields[key]
    return restored


# ---------------------------------------------------------------------------------------
# PatchSAE (reference)


class _RunnerConfig:
    """Stands in for the reference's config classes when its checkpoint is unpickled (attributes only)."""


def _stub(name: str) -> type:
    return type(name, (_RunnerConfig,), {"__module__": "src.sae_training.config", "__qualname__": name})


_STUBS = [_stub("ViTSAERunnerConfig"), _stub("Config")]


def _read_patchsae(source: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not source.is_file():
        raise UserError(f"{source} is not a file: pass the PatchSAE checkpoint (.pt) written by its save_model")
    try:
        with torch.serialization.safe_globals(_STUBS):
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        reason = f"it pickles {unsafe.group(1)}" if unsafe else f"{type(exc).__name__}"
        raise UserError(f"{source} is not a PatchSAE checkpoint that can be read safely ({reason}); in PatchSAE, save "
                        "it as {'cfg': vars(cfg), 'state_dict': sae.state_dict()} with torch.save") from exc
    cfg = ckpt.get("cfg", ckpt.get("config")) if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if isinstance(cfg, _RunnerConfig):
        cfg = vars(cfg)
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise UserError(f"{source} lacks 'cfg' (or 'config') and 'state_dict': it is not a PatchSAE checkpoint")
    if cfg.get("gated_sae"):
        raise UserError(f"{source} is a gated PatchSAE SAE, which its own code does not run and this pipeline "
                        "has not: it cannot be carried over")
    if cfg.get("module_name", "resid") != "resid":
        raise UserError(f"{source} reads module {cfg.get('module_name')!r}, not 'resid' (the residual output of a "
                        "block); only residual-stream SAEs can be imported")
    extra = sorted(set(state) - {"W_enc", "b_enc", "W_dec", "b_dec"})
    if extra:
        raise UserError(f"{source} holds tensors {extra} beyond W_enc, b_enc, W_dec, b_dec: it is not a plain "
                        "PatchSAE ReLU SAE and cannot be carried over")
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in DTYPES:
        raise UserError(f"{source} has dtype {cfg.get('dtype')!r}: use one of {', '.join(DTYPES)}")
    d_in = cfg.get("d_in")
    d_sae = cfg.get("d_sae") or (d_in * cfg["expansion_factor"] if d_in and cfg.get("expansion_factor") else None)
    fields: dict[str, Any] = {"arch": "relu", "d_in": d_in, "d_sae": d_sae, "dtype": dtype,
                              "token_kind": "cls" if cfg.get("class_token") else "all"}
    if cfg.get("l1_coefficient") is not None:
        fields["l1"] = float(cfg["l1_coefficient"])
    model_name = str(cfg.get("model_name") or "")
    ours_model, n_blocks = HF_CLIP.get(model_name.lower(), (None, None))
    if ours_model:
        fields["model"] = ours_model
    block = cfg.get("block_layer")
    if isinstance(block, int) and not isinstance(block, bool):
        if block < 0 and n_blocks is None:
            raise UserError(f"{source} reads block {block} counted from the end of {model_name!r}, whose depth this "
                            "pipeline does not know: pass --layer N (block index, 0-based, residual output)")
        where = f"block_layer {block}" + (f" of {model_name}" if block < 0 else "")
        fields.update(layer=block % n_blocks if block < 0 else block, _hook=where)
    tensors = {name: torch.as_tensor(t).to(torch.float64) for name, t in state.items()}
    return fields, tensors
