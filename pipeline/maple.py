"""MaPLe, multi-modal prompt learning (Khattak et al., CVPR 2023), on a frozen open_clip CLIP.

Why it lives here: the adaptation study (SCIENCE.md) encodes the base and the adapted model
with the same SAE, so the adapted forward must be open_clip's forward plus prompts and
nothing else (with no prompts it equals the base model; tested).

Prompts: ``n_ctx`` tokens in layers ``0 … depth − 1`` of both towers. Shape letters as in
CONTRIBUTING.md: X (context tokens), E (joint embedding width), Q (text tokens).

- text, layer 0: the prompt ``"<prefix> {class name}."`` is tokenised and the embeddings of
  the ``n_ctx`` tokens after SOS are replaced by the learnable ``ctx``. The prefix is
  ``ctx_init`` (its first ``n_ctx`` token embeddings initialise ``ctx``, the official
  recipe: "a photo of a") or ``"X X"`` (``ctx`` drawn from N(0, 0.02²));
- text, layer i in 1 … depth − 1: before block i, the residuals at those positions are
  replaced by ``compound_prompts_text[i − 1]`` (shared by every class);
- vision, layer 0: ``proj(ctx)`` is appended after the patch tokens, after the positional
  embedding and before ``ln_pre``;
- vision, layer i in 1 … depth − 1: before block i, the last ``n_ctx`` tokens are replaced
  by ``compound_prompt_projections[i − 1](compound_prompts_text[i − 1])``: the vision
  prompts are linear projections (coupling functions) of the language prompts.

After block ``depth − 1`` the prompt tokens go through the remaining blocks like any token.
Only the prompts are trained; their names are those of the official implementation, so
its checkpoints (``prompt_learner.ctx`` …) load by name when the shapes fit.

Taps of the adapted model return the base model's token positions (class token, then the
patches in row-major order) and either drop the appended vision prompt tokens (a store of
the base layout) or keep them after the patches (``keep_prompts``: the paper's reference
encodes, counts and masks them like every other token, 197 + 2 = 199 for ViT-B/16 with
n_ctx 2; ``token_layout`` records where they are). The base model's SAE encodes both.

Adapter folder (written by ``pipeline adapt``): ``config.json`` whose ``adapter`` section
records the method, ``n_ctx``, ``depth``, ``ctx_init``, the class names, the names the prompts
use for them, and the base model
(name, pretrained, checkpoint sha256); ``prompts.safetensors`` holds the prompt parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from cache.errors import UserError, require_integers
from cache.layout import with_prompt_tokens
from pipeline.models import LoadedModel, file_sha256
from pipeline.tensorfile import save_tensors

log = logging.getLogger(__name__)

METHOD = "maple"
PROMPTS_NAME = "prompts.safetensors"
CONFIG_NAME = "config.json"
OFFICIAL_PREFIX = "prompt_learner."  # key prefix in the official implementation's checkpoints
INIT_STD = 0.02  # std of randomly initialised context vectors (official)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MapleConfig:
    """Where the prompts go; their values live in ``MaplePrompts``."""

    n_ctx: int = 2  # learnable context tokens per prompted layer; 0 = no prompts (the base model)
    depth: int = 9  # prompted layers of each tower, layer 0 included (at most the towers' depth)
    ctx_init: str | None = "a photo of a"  # text prefix; its first n_ctx tokens initialise ctx (None: "X X", random)

    def __post_init__(self) -> None:
        require_integers(self, "n_ctx", "depth")
        if self.n_ctx < 0:
            raise UserError(f"--n-ctx must be 0 or more (got {self.n_ctx})")
        if self.depth < 1:
            raise UserError(f"--depth must be at least 1: layer 0 holds the first prompts (got {self.depth})")
        if self.ctx_init is not None and (not isinstance(self.ctx_init, str) or not self.ctx_init.strip()):
            raise UserError(f"--ctx-init must be a non-empty phrase such as 'a photo of a' (got {self.ctx_init!r})")

    @property
    def prefix(self) -> str:
        """The words before the class name; the first n_ctx tokens after SOS are the context."""
        return self.ctx_init.strip() if self.ctx_init else " ".join(["X"] * self.n_ctx)

    @property
    def template(self) -> str:
        """The text prompt with one ``{}`` for the class name."""
        return f"{self.prefix} {{}}." if self.prefix else "{}."

    def to_dict(self) -> dict[str, Any]:
        return {"n_ctx": self.n_ctx, "depth": self.depth, "ctx_init": self.ctx_init}


class MaplePrompts(nn.Module):
    """The learnable prompts: layer-0 text context, deep text prompts and their vision couplings."""

    def __init__(self, n_ctx: int, depth: int, d_text: int, d_vision: int):
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(n_ctx, d_text))
        nn.init.normal_(self.ctx, std=INIT_STD)
        self.proj = nn.Linear(d_text, d_vision)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n_ctx, d_text), std=INIT_STD)) for _ in range(depth - 1)])
        coupling = nn.Linear(d_text, d_vision)  # official: the deep couplings start as copies of one layer
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(coupling) for _ in range(depth - 1)])

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    @property
    def depth(self) -> int:
        return 1 + len(self.compound_prompts_text)

    def text_prompts(self) -> list[Tensor]:
        """Per prompted layer, the ``(X, D_text)`` text prompt (layer 0: ``ctx``)."""
        return [self.ctx, *self.compound_prompts_text]

    def vision_prompts(self) -> list[Tensor]:
        """Per prompted layer, the ``(X, D_vision)`` vision prompt projected from that layer's text prompt."""
        return [self.proj(self.ctx),
                *(couple(text_XD) for couple, text_XD in zip(self.compound_prompt_projections,
                                                             self.compound_prompts_text))]


def check_fits(config: MapleConfig, clip: Any) -> None:
    """Refuse prompt layouts the model cannot hold, and models whose forward we do not mirror."""
    if not hasattr(clip, "token_embedding") or not hasattr(clip.visual, "conv1"):
        raise UserError(f"MaPLe needs an open_clip CLIP with a ViT image tower and a built-in text tower "
                        f"(got a {type(clip).__name__} with a {type(clip.visual).__name__} image tower)")
    visual = clip.visual
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise UserError("MaPLe needs a ViT that pools its class token (the appended prompts must not be pooled)")
    n_text, n_vision = len(clip.transformer.resblocks), len(visual.transformer.resblocks)
    if config.n_ctx and config.depth > min(n_text, n_vision):
        raise UserError(f"prompt depth {config.depth} exceeds the model's towers ({n_text} text and {n_vision} "
                        f"vision blocks); use --depth {min(n_text, n_vision)} or less")


def new_prompts(config: MapleConfig, clip: Any, tokenizer: Any, seed: int) -> MaplePrompts:
    """Freshly initialised prompts (seeded); ``ctx`` from the ``ctx_init`` tokens when given."""
    check_fits(config, clip)
    d_text, d_vision = int(clip.token_embedding.weight.shape[1]), int(clip.visual.transformer.width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prompts = MaplePrompts(config.n_ctx, config.depth, d_text, d_vision)
    if config.ctx_init and config.n_ctx:
        tokens_1Q = tokenizer([config.ctx_init])
        n_words = int((tokens_1Q[0] != 0).sum()) - 2  # between SOS and EOT
        if n_words < config.n_ctx:
            raise UserError(f"--ctx-init '{config.ctx_init}' has {n_words} tokens, fewer than --n-ctx "
                            f"{config.n_ctx}; give a longer phrase or fewer context tokens")
        with torch.no_grad():
            embedding = clip.token_embedding(tokens_1Q.to(clip.token_embedding.weight.device))
            prompts.ctx.copy_(embedding[0, 1:1 + config.n_ctx].float())
    return prompts.to(clip.token_embedding.weight.device)


def _block(block: nn.Module, x: Tensor, batch_first: bool, attn_mask: Tensor | None = None) -> Tensor:
    if batch_first:
        return block(x, attn_mask=attn_mask)
    return block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)


class AdaptedCLIP:
    """A frozen open_clip CLIP with MaPLe prompts; only ``prompts`` has trainable parameters."""

    def __init__(self, clip: Any, tokenizer: Any, prompts: MaplePrompts, config: MapleConfig):
        check_fits(config, clip)
        if (prompts.n_ctx, prompts.depth if prompts.n_ctx else config.depth) != (config.n_ctx, config.depth):
            raise UserError(f"the prompts have n_ctx {prompts.n_ctx} and depth {prompts.depth}, the config "
                            f"{config.n_ctx} and {config.depth}; pass matching --n-ctx/--depth")
        d_text, d_vision = int(clip.token_embedding.weight.shape[1]), int(clip.visual.transformer.width)
        if prompts.ctx.shape[1] != d_text or prompts.proj.out_features != d_vision:
            raise UserError(f"the prompts are for widths {prompts.ctx.shape[1]} (text) / {prompts.proj.out_features} "
                            f"(vision), the model has {d_text} / {d_vision}; use prompts trained on this model")
        self.clip, self.tokenizer, self.prompts, self.config = clip, tokenizer, prompts, config

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    # -- text ----------------------------------------------------------------------------------

    def encode_text(self, class_names: Sequence[str], *, normalize: bool = False) -> Tensor:
        """Class embeddings ``(C, E)`` of the prompted text tower (differentiable in the prompts)."""
        clip, n = self.clip, self.n_ctx
        device = clip.token_embedding.weight.device
        tokens_CQ = self.tokenizer([self.config.template.format(name) for name in class_names]).to(device)
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens_CQ).to(cast)
        text_prompts = self.prompts.text_prompts() if n else []
        c = x.shape[0]
        if text_prompts:
            x = torch.cat([x[:, :1], text_prompts[0].to(cast).expand(c, -1, -1), x[:, 1 + n:]], dim=1)
        x = x + clip.positional_embedding.to(cast)
        batch_first = getattr(clip.transformer, "batch_first", True)
        for i, block in enumerate(clip.transformer.resblocks):
            if 0 < i < len(text_prompts):
                x = torch.cat([x[:, :1], text_prompts[i].to(cast).expand(c, -1, -1), x[:, 1 + n:]], dim=1)
            x = _block(block, x, batch_first, clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, tokens_CQ, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    # -- vision --------------------------------------------------------------------------------

    def _embed(self, images_BRHW: Tensor, vision_prompts: list[Tensor]) -> Tensor:
        """Patch and class tokens with positions, the layer-0 vision prompts appended, then ``ln_pre``."""
        visual = self.clip.visual
        param = visual.conv1.weight
        x = visual.conv1(images_BRHW.to(param.device, param.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = visual.patch_dropout(x + visual.positional_embedding.to(x.dtype))
        if vision_prompts:
            x = torch.cat([x, vision_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return visual.ln_pre(x)

    def _blocks(self, x: Tensor, start: int, stop: int, vision_prompts: list[Tensor],
                taps: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """Vision blocks ``start … stop − 1`` with the deep prompts; residuals after the ``taps`` blocks."""
        n, out = self.n_ctx, {}
        transformer = self.clip.visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        for i in range(start, stop):
            if 0 < i < len(vision_prompts):
                x = torch.cat([x[:, :-n], vision_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            x = _block(transformer.resblocks[i], x, batch_first)
            if i in taps:
                out[i] = x
        return x, out

    def _head(self, x: Tensor) -> Tensor:
        visual = self.clip.visual
        pooled_BE, _ = visual._pool(x)  # ln_post + the class token (prompt tokens are never pooled)
        return pooled_BE @ visual.proj if visual.proj is not None else pooled_BE

    def encode_image(self, images_BRHW: Tensor, *, normalize: bool = False) -> Tensor:
        """Image embeddings ``(B, E)`` of the prompted vision tower."""
        vision_prompts = self.prompts.vision_prompts() if self.n_ctx else []
        x = self._embed(images_BRHW, vision_prompts)
        x, _ = self._blocks(x, 0, len(self.clip.visual.transformer.resblocks), vision_prompts)
        features_BE = self._head(x)
        return F.normalize(features_BE, dim=-1) if normalize else features_BE

    def logits(self, images_BRHW: Tensor, text_CE: Tensor) -> Tensor:
        """CLIP's ``logit_scale · cosine`` of every image with every class embedding: ``(B, C)``."""
        image_BE = self.encode_image(images_BRHW, normalize=True)
        return self.clip.logit_scale.exp() * image_BE @ F.normalize(text_CE, dim=-1).T

    @torch.inference_mode()
    def tap(self, images_BRHW: Tensor, layers: Sequence[int], *, keep_prompts: bool = False) -> dict[int, Tensor]:
        """Residual stream after each requested block at the base model's positions, ``(B, T, D)``, then,
        with ``keep_prompts``, the vision prompt tokens (``(B, T + X, D)``); without, they are dropped.

        The forward stops after the last block asked.
        """
        full = self.tap_with_prompts(images_BRHW, layers)
        if keep_prompts:
            return {layer: torch.cat([x_BTD, prompts_BXD], dim=1) for layer, (x_BTD, prompts_BXD) in full.items()}
        return {layer: x_BTD for layer, (x_BTD, _) in full.items()}

    @torch.inference_mode()
    def tap_with_prompts(self, images_BRHW: Tensor, layers: Sequence[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """Per requested block, ``(x_BTD, prompts_BXD)``: base positions and the prompt tokens after it."""
        vision_prompts = self.prompts.vision_prompts() if self.n_ctx else []
        x = self._embed(images_BRHW, vision_prompts)
        _, taps = self._blocks(x, 0, max(layers) + 1, vision_prompts, taps=tuple(layers))
        t = x.shape[1] - self.n_ctx
        return {layer: (taps[layer][:, :t], taps[layer][:, t:]) for layer in sorted(layers)}

    @torch.inference_mode()
    def finish(self, x_BTD: Tensor, prompts_BXD: Tensor, layer: int) -> Tensor:
        """Image embeddings ``(B, E)`` from the residual stream after block ``layer`` (base positions and
        prompt tokens, as ``tap_with_prompts`` returns them): the adapted twin of ``splice.finish_forward``."""
        vision_prompts = self.prompts.vision_prompts() if self.n_ctx else []
        param = self.clip.visual.conv1.weight
        x = torch.cat([x_BTD.to(param.device, param.dtype), prompts_BXD.to(param.device, param.dtype)], dim=1)
        x, _ = self._blocks(x, layer + 1, len(self.clip.visual.transformer.resblocks), vision_prompts)
        return self._head(x)


# ---------------------------------------------------------------------------------------
# Files


def base_record(model: LoadedModel) -> dict[str, Any]:
    """What identifies the base model of an adapter."""
    return {"name": model.name, "pretrained": model.pretrained, "checkpoint_sha256": model.checkpoint_sha256}


def adapter_record(config: MapleConfig, model: LoadedModel, class_names: Sequence[str],
                   prompt_names: Sequence[str]) -> dict[str, Any]:
    """The ``adapter`` section of an adapter folder's config.json (prompt names: what the prompts say per class)."""
    return {"method": METHOD, **config.to_dict(), "class_names": list(class_names),
            "prompt_names": list(prompt_names), "base_model": base_record(model)}


def save_prompts(path: Path, prompts: MaplePrompts) -> None:
    """The prompt parameters as safetensors (official names without ``prompt_learner.``), atomically."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in prompts.state_dict().items()}
    save_tensors(path, tensors)


def _prompt_shapes(state: dict[str, Tensor]) -> tuple[int, int, int, int]:
    """(n_ctx, depth, d_text, d_vision) of a prompts state dict; refuses one that is not MaPLe's."""
    if "ctx" not in state or "proj.weight" not in state:
        raise UserError("not MaPLe prompts: no ctx / proj.weight (expected the official prompt_learner.* keys "
                        "or a prompts.safetensors written by pipeline adapt)")
    n_ctx, d_text = state["ctx"].shape
    depth = 1 + sum(1 for k in state if k.startswith("compound_prompts_text."))
    return int(n_ctx), depth, int(d_text), int(state["proj.weight"].shape[0])


def prompts_from_state(state: dict[str, Tensor], source: Path) -> MaplePrompts:
    """``MaplePrompts`` holding ``state`` (float32); the shapes must be consistent."""
    n_ctx, depth, d_text, d_vision = _prompt_shapes(state)
    prompts = MaplePrompts(n_ctx, depth, d_text, d_vision)
    try:
        prompts.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as err:
        raise UserError(f"{source} holds MaPLe prompts of inconsistent shapes ({str(err).splitlines()[-1].strip()})"
                        ) from None
    return prompts.requires_grad_(False)


def read_official(path: Path) -> dict[str, Tensor]:
    """The prompt parameters of an official MaPLe checkpoint (``{'state_dict': {'prompt_learner.ctx': …}}``),
    or of a torch-saved ``MaplePrompts`` state dict.

    The class-specific buffers (``token_prefix``/``token_suffix``) are dropped: the prompt text
    is rebuilt from the class names here.
    """
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is the same user error; torch's text would advise
        # weights_only=False, which runs whatever code the file holds
        raise UserError(f"{path} is not a PyTorch checkpoint of tensors; pass an official MaPLe checkpoint or an "
                        "adapter folder written by pipeline adapt") from None
    state = record.get("state_dict", record) if isinstance(record, dict) else {}
    prompts = {k[len(OFFICIAL_PREFIX):]: v for k, v in state.items()
               if k.startswith(OFFICIAL_PREFIX) and not k.endswith(("token_prefix", "token_suffix"))}
    if not prompts and "ctx" in state:  # a plain torch state dict of MaplePrompts
        prompts = dict(state)
    if not prompts:
        raise UserError(f"{path} has no prompt_learner.* tensors; pass an official MaPLe checkpoint or an adapter "
                        "folder written by pipeline adapt")
    return prompts


def read_prompts_file(path: Path) -> dict[str, Tensor]:
    """Prompt tensors from our safetensors file or an official checkpoint, by file content."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"MaPLe weights {path} do not exist; pass an adapter folder, its {PROMPTS_NAME}, or an "
                        "official MaPLe checkpoint")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read {path} ({str(err).splitlines()[0]})") from None
    return read_official(path)


def _same_base(recorded: dict[str, Any], model: LoadedModel) -> bool:
    if recorded.get("name") != model.name:
        return False
    if recorded.get("checkpoint_sha256") or model.checkpoint_sha256:
        return recorded.get("checkpoint_sha256") == model.checkpoint_sha256
    return str(recorded.get("pretrained", "")).lower() == model.pretrained.lower()


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The ``adapter`` section of an adapter folder; refuses a folder without finished prompts."""
    adapter_dir = Path(adapter_dir)
    config_path, prompts_path = adapter_dir / CONFIG_NAME, adapter_dir / PROMPTS_NAME
    if not config_path.is_file():
        raise UserError(f"{adapter_dir} is not an adapter folder (no {CONFIG_NAME}); create it with pipeline adapt")
    record = json.loads(config_path.read_text()).get("adapter") or {}
    if record.get("method") != METHOD:
        raise UserError(f"{config_path} describes no MaPLe adapter; create the folder with pipeline adapt")
    if not prompts_path.is_file():
        raise UserError(f"{adapter_dir} has no {PROMPTS_NAME} yet (training unfinished); rerun pipeline adapt "
                        "with the same options to finish it")
    return record


def load_adapter(adapter_dir: Path, model: LoadedModel) -> AdaptedCLIP:
    """The adapter folder's prompts on ``model``; refuses an adapter trained on another base model."""
    import open_clip

    record = read_adapter_config(adapter_dir)
    base = record.get("base_model") or {}
    if not _same_base(base, model):
        raise UserError(f"the adapter in {adapter_dir} was trained on {base.get('name')}/{base.get('pretrained')}, "
                        f"not {model.name}/{model.pretrained}; pass that --model/--pretrained or an adapter of this "
                        "model")
    config = MapleConfig(n_ctx=record["n_ctx"], depth=record["depth"], ctx_init=record.get("ctx_init"))
    prompts_path = Path(adapter_dir) / PROMPTS_NAME
    prompts = prompts_from_state(read_prompts_file(prompts_path), prompts_path)
    prompts = prompts.to(device=model.device)
    return AdaptedCLIP(model.model, open_clip.get_tokenizer(model.name), prompts, config)


def token_layout(model: LoadedModel, n_ctx: int, *, keep_prompts: bool) -> dict[str, Any]:
    """The stored token layout of the adapted model: the base model's, plus the kept prompt tokens."""
    layout = model.token_layout(0)  # a ViT's: every block has the same tokens
    return with_prompt_tokens(layout, n_ctx) if keep_prompts else layout


def adapter_identity(adapter_dir: Path) -> dict[str, Any]:
    """What an activation store of the adapted model records about the adapter (part of its config)."""
    record = read_adapter_config(adapter_dir)
    return {"method": METHOD, "n_ctx": record["n_ctx"], "depth": record["depth"],
            "prompts_sha256": file_sha256(Path(adapter_dir) / PROMPTS_NAME)}
