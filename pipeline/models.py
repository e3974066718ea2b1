"""Loading CLIP models through open_clip and reading the tokens of chosen layers.

A layer is a ViT block (its residual-stream output) or a ConvNeXt stage (its output feature
map as spatial tokens); ``pipeline.towers`` defines both. Weights are never replaced by random
ones behind the user's back: random initialisation happens only with ``pretrained='none'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from timm.models import PretrainedCfg, register_model
from timm.models.convnext import _create_convnext

from cache.errors import UserError
from pipeline.towers import Tower, tower_of

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

TINY_MODEL = "tiny-vit"
"""A 4-block, width-64, 32 px open_clip CLIP registered from model_configs/ for fast tests."""


@register_model
def convnext_world(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
    """The trunk of ``tiny-convnext-clip``: a 4-stage ConvNeXt for 32 px images. With a 2-pixel stem timm
    strides stage 0 too, so the stages give 8 x 8 (the tiny ViT's grid), 4 x 4, 2 x 2 and 1 x 1 maps."""
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or PretrainedCfg()  # no weights exist to name
    return _create_convnext("convnext_world", pretrained=pretrained,
                            **dict(depths=(1, 1, 2, 1), dims=(64, 128, 256, 512), patch_size=2, **kwargs))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA GPU is visible; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"unknown --device '{device}'; use cpu, cuda, cuda:N or auto")
    return device


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.startswith(".") or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """An open_clip CLIP in eval mode with its preprocessing and where its weights came from."""

    model: Any  # open_clip.CLIP (or CustomTextCLIP)
    preprocess: Any  # the eval image transform
    name: str
    pretrained: str  # tag, absolute checkpoint path, or "none"
    checkpoint_sha256: str | None  # set when weights come from a local file
    device: str
    dtype: str

    @property
    def visual(self) -> Any:
        return self.model.visual

    @property
    def tower(self) -> Tower:
        return tower_of(self.visual)

    @property
    def n_blocks(self) -> int:
        """Layers the tower has (ViT blocks, ConvNeXt stages)."""
        return self.tower.n_blocks

    def width(self, layer: int) -> int:
        return self.tower.width(layer)

    def grid(self, layer: int) -> tuple[int, int]:
        return self.tower.grid(layer)

    def n_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token of a ViT, none for a ConvNeXt."""
        return self.tower.n_prefix_tokens

    def n_tokens(self, layer: int) -> int:
        return self.tower.n_tokens(layer)

    @property
    def image_size(self) -> int:
        return int(self.visual.image_size[0])

    def token_layout(self, layer: int) -> dict[str, Any]:
        return self.tower.token_layout(layer)

    def preprocess_cfg(self) -> dict[str, Any]:
        cfg = dict(getattr(self.visual, "preprocess_cfg", {}) or {})
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}

    def check_layers(self, layers: tuple[int, ...]) -> None:
        """Layers that exist and share one token shape (a store holds one (T, D) per image)."""
        tower = self.tower
        if not layers:
            raise UserError(f"no layers given; pass {tower.unit} indices such as --layers 1")
        bad = [layer for layer in layers if not 0 <= layer < tower.n_blocks]
        if bad:
            raise UserError(
                f"layer {bad[0]} is out of range for {self.name}, which has {tower.unit}s "
                f"0..{tower.n_blocks - 1} ({tower.layer_meaning})")
        shapes = {layer: (tower.n_tokens(layer), tower.width(layer)) for layer in layers}
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{layer}: {t} tokens x {d}" for layer, (t, d) in shapes.items())
            raise UserError(f"the layers of {self.name} differ in shape ({listing}); a store holds layers of one "
                            "shape: extract each into its own --out")

    @torch.inference_mode()
    def tap(self, images_BRHW: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """The tokens ``(B, T, D)`` of each requested layer (a ViT's class token first).

        The forward stops after the last requested layer; the text tower is not touched.
        """
        order = sorted(layers)
        return dict(zip(order, self.tower.tap(images_BRHW.to(self.device, DTYPES[self.dtype]), order)))


def _unloadable(name: str, path: str, err: Exception) -> str:
    """Why the checkpoint file ``path`` did not load, in one line; never torch's advice to retry with
    ``weights_only=False``, which would run whatever code the file holds."""
    if isinstance(err, RuntimeError) and "loading state_dict" in str(err):
        return (f"{path} holds weights of another model than {name} (its tensors do not match); pass a checkpoint "
                f"of {name}, or the --model it was saved from")
    return (f"{path} is not a PyTorch or open_clip checkpoint (neither torch.load of tensors nor safetensors can read "
            f"it); pass a state dict saved with torch.save(model.state_dict(), path) or a .safetensors file as "
            "--pretrained, an open_clip pretrained tag, or 'none' for random weights")


def names_convnext(name: str) -> bool:
    """Does the open_clip config ``name`` build a ConvNeXt image tower? Read from the config, without building the
    model (a study asks before its first stage)."""
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg") or {}
    return str(vision.get("timm_model_name") or "").startswith("convnext")


def missing_weights(name: str, pretrained: str) -> str | None:
    """Why ``pretrained`` weights of ``name`` cannot be loaded offline (None when they can), without loading them:
    a study checks every input before its first stage starts."""
    if pretrained.lower() == "none" or Path(pretrained).expanduser().is_file():
        return None
    if _looks_like_path(pretrained):
        return f"weight file {pretrained} does not exist: put the checkpoint there or change model.pretrained"
    if name not in open_clip.list_models() or pretrained not in open_clip.list_pretrained_tags_by_model(name):
        return f"model {name} has no pretrained tag '{pretrained}' in open_clip"
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if repo and any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
        return None
    url_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip" / Path(cfg.get("url", "")).name
    if cfg.get("url") and url_file.is_file():
        return None
    return (f"{name} weights '{pretrained}' are not in the local cache: on a machine with internet run `python -c "
            f"\"import open_clip; open_clip.create_model('{name}', pretrained='{pretrained}')\"` and copy "
            "~/.cache/huggingface here, or set model.pretrained to a checkpoint file")


def load_model(name: str, pretrained: str, *, device: str = "cpu", dtype: str = "float32",
               init_seed: int = 0) -> LoadedModel:
    """Build an open_clip model by name with weights from a tag, a local file, or ``none``.

    Random initialisation (``none``) is seeded with ``init_seed``, so a rerun or another
    process gets the same weights.
    """
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see `python -c 'import open_clip; print(open_clip.list_models())'`"
        raise UserError(f"unknown model '{name}'; {hint}")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    device = resolve_device(device)
    if dtype == "float16" and device == "cpu":
        raise UserError("--dtype float16 needs a GPU; use float32 or bfloat16 on the CPU")
    checkpoint_sha256 = None
    if pretrained.lower() == "none":
        log.warning("%s: random initialisation (--pretrained none); its features mean nothing", name)
        weights = None
    elif Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser().resolve()
        checkpoint_sha256 = file_sha256(path)
        weights = pretrained = str(path)
    elif _looks_like_path(pretrained):
        raise UserError(f"weight file {pretrained} does not exist; pass an existing checkpoint path, "
                        "an open_clip pretrained tag, or 'none' for random weights")
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            listing = ", ".join(tags) if tags else "none: pass a checkpoint file or 'none'"
            raise UserError(f"unknown pretrained tag '{pretrained}' for {name}; its tags are: {listing}")
        weights = pretrained
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    except Exception as err:  # noqa: BLE001 - a file that is no checkpoint fails in many of torch's ways
        if checkpoint_sha256 is not None:
            raise UserError(_unloadable(name, pretrained, err)) from None
        if not isinstance(err, RuntimeError):
            raise
        if weights is None:
            raise UserError(f"could not load {name} from {pretrained}: {str(err).splitlines()[0]}") from None
        raise UserError(
            f"pretrained weights '{pretrained}' for {name} are not in the local cache and could not be "
            "downloaded; on a machine with internet run `python -c \"import open_clip; "
            f"open_clip.create_model('{name}', pretrained='{pretrained}')\"` and copy "
            "~/.cache/huggingface here, or pass --pretrained /path/to/checkpoint") from None
    model = model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    return LoadedModel(model=model, preprocess=preprocess, name=name, pretrained=pretrained,
                       checkpoint_sha256=checkpoint_sha256, device=device, dtype=dtype)
