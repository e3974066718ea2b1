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

**ConvNeXt image towers** (method ``maple-stage-offsets``). A ConvNeXt has no tokens to append
prompts to, so the text side stays exactly as above and the vision side of prompted layer
i in 0 … depth − 1 (ConvNeXt stage i) is a channel offset: ``stage_offsets[i]``, a linear
coupling like MaPLe's, maps the mean of layer i's text prompt (``ctx`` for 0,
``compound_prompts_text[i − 1]`` after) to a ``(D_i,)`` vector that is added at every position
of stage i's own residual stream, after its downsample and before its blocks
(``ConvNeXtTower.run_stages``). Why there: it is what a prompt token is to a ViT block, a
signal every position of the stage reads, and as the stream its blocks read and write it
reaches the stage's output through their shortcuts and is mixed by their convolutions and
MLPs; added before the downsample it would first meet the downsample's LayerNorm, which
removes its channel mean at every position. Projecting each prompt token and averaging, MaPLe's
coupling pooled over the missing token slots, is the same as projecting the mean. The couplings
start at zero, so training starts from the base model read with the ``ctx_init`` prompt, and with
zero couplings or no prompts the adapted model is the base model. A stage's tap is its output
map as the base model's spatial tokens; there are no prompt tokens to keep.

Adapter folder (written by ``pipeline adapt``): ``config.json`` whose ``adapter`` section
records the method (``maple`` for a ViT, ``maple-stage-offsets`` for a ConvNeXt: an adapter
loads only onto a model whose tower takes its method), ``n_ctx``, ``depth``, ``ctx_init``, the
class names, the names the prompts use for them, and the base model
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
from pipeline.towers import ConvNeXtTower, Tower, tower_of
from pipeline.tensorfile import save_tensors

log = logging.getLogger(__name__)

METHOD = "maple"  # a ViT's adapters: vision prompt tokens
OFFSETS_METHOD = "maple-stage-offsets"  # a ConvNeXt's adapters: per-stage channel offsets
PROMPTS_NAME = "prompts.safetensors"
CONFIG_NAME = "config.json"
OFFICIAL_PREFIX = "prompt_learner."  # key prefix in the official implementation's checkpoints
INIT_STD = 0.02  # std of randomly initialised context vectors (official)
KEEP_REFUSED = ("--prompt-tokens keep needs a ViT: a ConvNeXt's MaPLe prompts are channel offsets, not tokens, so its "
                "adapted taps hold the base model's tokens only; use --prompt-tokens drop")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MapleConfig:
    """Where the prompts go; their values live in ``Prompts``."""

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


class Prompts(nn.Module):
    """The learnable prompts of either method: the text side (``ctx``, ``compound_prompts_text``) is MaPLe's in both."""

    method: str  # the adapter method these prompts belong to
    description: str  # the method in words, for messages
    tower_name: str  # the image tower the method is for
    sized_per_layer: bool  # vision couplings sized per prompted layer: the depth must fit even without prompts
    ctx: nn.Parameter
    compound_prompts_text: nn.ParameterList

    def __init__(self, n_ctx: int, d_text: int):
        super().__init__()
        self.ctx = nn.Parameter(torch.empty(n_ctx, d_text))
        nn.init.normal_(self.ctx, std=INIT_STD)

    def _add_deep_text(self, depth: int) -> None:
        """The text prompts of layers 1 … depth − 1 (a step of its own: the seeded draws keep the official order)."""
        n_ctx, d_text = self.ctx.shape
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(nn.init.normal_(torch.empty(n_ctx, d_text), std=INIT_STD)) for _ in range(depth - 1)])

    @staticmethod
    def widths_on(tower: Tower, depth: int) -> tuple[int, ...]:
        """The vision widths prompts of ``depth`` layers need on ``tower``."""
        raise NotImplementedError

    @staticmethod
    def check_visual(visual: Any) -> None:
        """Refuse an image tower of the right kind whose forward the vision side does not mirror."""

    def vision_side(self, tower: Tower) -> _PromptTokens | _StageOffsets:
        """The prompted vision forward these prompts drive on ``tower``."""
        raise NotImplementedError

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    @property
    def depth(self) -> int:
        return 1 + len(self.compound_prompts_text)

    @property
    def vision_widths(self) -> tuple[int, ...]:
        """The vision widths the prompts were made for (a ViT's one, or a ConvNeXt's per prompted stage)."""
        raise NotImplementedError

    def text_prompts(self) -> list[Tensor]:
        """Per prompted layer, the ``(X, D_text)`` text prompt (layer 0: ``ctx``)."""
        return [self.ctx, *self.compound_prompts_text]

    def vision_prompts(self) -> list[Tensor]:
        """Per prompted layer, what the vision tower receives, coupled from that layer's text prompt."""
        raise NotImplementedError


class MaplePrompts(Prompts):
    """A ViT's prompts: layer-0 text context, deep text prompts and their vision couplings."""

    method, description, tower_name = METHOD, "vision prompt tokens, for a ViT", "ViT"
    sized_per_layer = False  # one coupling width for every layer: without prompts, no depth to fit

    def __init__(self, n_ctx: int, depth: int, d_text: int, widths: Sequence[int]):
        super().__init__(n_ctx, d_text)
        (d_vision,) = widths  # one width: every prompt token lives in the ViT's residual stream
        self.proj = nn.Linear(d_text, d_vision)
        self._add_deep_text(depth)
        coupling = nn.Linear(d_text, d_vision)  # official: the deep couplings start as copies of one layer
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(coupling) for _ in range(depth - 1)])

    @property
    def vision_widths(self) -> tuple[int, ...]:
        return (self.proj.out_features,)

    @staticmethod
    def widths_on(tower: Tower, depth: int) -> tuple[int, ...]:
        return (tower.width(0),)

    @staticmethod
    def check_visual(visual: Any) -> None:
        if not hasattr(visual, "conv1"):
            raise UserError(f"MaPLe needs an open_clip ViT image tower (got a {type(visual).__name__})")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise UserError("MaPLe needs a ViT that pools its class token (the appended prompts must not be pooled)")

    def vision_side(self, tower: Tower) -> _PromptTokens:
        return _PromptTokens(tower.visual, self.n_ctx)

    def vision_prompts(self) -> list[Tensor]:
        """Per prompted layer, the ``(X, D_vision)`` vision prompt projected from that layer's text prompt."""
        return [self.proj(self.ctx),
                *(couple(text_XD) for couple, text_XD in zip(self.compound_prompt_projections,
                                                             self.compound_prompts_text))]


class StageOffsetPrompts(Prompts):
    """A ConvNeXt's prompts: MaPLe's text prompts and, per prompted stage, a coupling of that layer's text prompt to
    the stage's channel offset (module docstring)."""

    method, description, tower_name = OFFSETS_METHOD, "per-stage channel offsets, for a ConvNeXt", "ConvNeXt"
    sized_per_layer = True

    def __init__(self, n_ctx: int, depth: int, d_text: int, widths: Sequence[int]):
        if len(widths) != depth:
            raise ValueError(f"one width per prompted stage: depth {depth}, widths {list(widths)}")
        super().__init__(n_ctx, d_text)
        self._add_deep_text(depth)
        self.stage_offsets = nn.ModuleList([nn.Linear(d_text, d) for d in widths])
        for couple in self.stage_offsets:  # start at the base model: the offsets move only as training moves them
            nn.init.zeros_(couple.weight)
            nn.init.zeros_(couple.bias)

    @property
    def vision_widths(self) -> tuple[int, ...]:
        return tuple(couple.out_features for couple in self.stage_offsets)

    @staticmethod
    def widths_on(tower: Tower, depth: int) -> tuple[int, ...]:
        return tuple(tower.width(i) for i in range(depth))

    def vision_side(self, tower: ConvNeXtTower) -> _StageOffsets:
        return _StageOffsets(tower)

    def vision_prompts(self) -> list[Tensor]:
        """Per prompted stage, the ``(D,)`` offset coupled from the mean of that layer's text prompt."""
        return [couple(text_XD.mean(0)) for couple, text_XD in zip(self.stage_offsets, self.text_prompts())]


PROMPTS: dict[str, type[Prompts]] = {"vit": MaplePrompts, "convnext": StageOffsetPrompts}  # by Tower.kind
BY_METHOD: dict[str, type[Prompts]] = {cls.method: cls for cls in PROMPTS.values()}


def prompts_class(tower: Tower) -> type[Prompts]:
    """The prompts an image tower takes (a ViT's tokens, a ConvNeXt's stage offsets)."""
    return PROMPTS[tower.kind]


def check_fits(config: MapleConfig, clip: Any) -> None:
    """Refuse prompt layouts the model cannot hold, and models whose forward we do not mirror."""
    if not hasattr(clip, "token_embedding"):
        raise UserError(f"MaPLe needs an open_clip CLIP with a built-in text tower (got a {type(clip).__name__}); "
                        "use a model such as ViT-B-16 or convnext_base")
    tower = tower_of(clip.visual)
    kind = prompts_class(tower)
    kind.check_visual(clip.visual)
    n_text, n_vision = len(clip.transformer.resblocks), tower.n_blocks
    if (config.n_ctx or kind.sized_per_layer) and config.depth > min(n_text, n_vision):
        raise UserError(f"prompt depth {config.depth} exceeds the model's towers ({n_text} text and {n_vision} "
                        f"vision {tower.unit}s); use --depth {min(n_text, n_vision)} or less")


def new_prompts(config: MapleConfig, clip: Any, tokenizer: Any, seed: int) -> Prompts:
    """Freshly initialised prompts (seeded) of the tower's method; ``ctx`` from the ``ctx_init`` tokens when given."""
    check_fits(config, clip)
    tower = tower_of(clip.visual)
    kind = prompts_class(tower)
    d_text, widths = int(clip.token_embedding.weight.shape[1]), kind.widths_on(tower, config.depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prompts = kind(config.n_ctx, config.depth, d_text, widths)
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


class _PromptTokens:
    """A ViT's prompted vision forward: prompt tokens appended after the patches, replaced before the deep blocks."""

    has_tokens = True

    def __init__(self, visual: Any, n_ctx: int):
        self.visual, self.n_ctx = visual, n_ctx

    def _embed(self, images_BRHW: Tensor, vision_prompts: list[Tensor]) -> Tensor:
        """Patch and class tokens with positions, the layer-0 vision prompts appended, then ``ln_pre``."""
        visual = self.visual
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
        transformer = self.visual.transformer
        batch_first = getattr(transformer, "batch_first", True)
        for i in range(start, stop):
            if 0 < i < len(vision_prompts):
                x = torch.cat([x[:, :-n], vision_prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            x = _block(transformer.resblocks[i], x, batch_first)
            if i in taps:
                out[i] = x
        return x, out

    def _head(self, x: Tensor) -> Tensor:
        visual = self.visual
        pooled_BE, _ = visual._pool(x)  # ln_post + the class token (prompt tokens are never pooled)
        return pooled_BE @ visual.proj if visual.proj is not None else pooled_BE

    def encode(self, images_BRHW: Tensor, vision_prompts: list[Tensor]) -> Tensor:
        x = self._embed(images_BRHW, vision_prompts)
        x, _ = self._blocks(x, 0, len(self.visual.transformer.resblocks), vision_prompts)
        return self._head(x)

    def tap(self, images_BRHW: Tensor, layers: Sequence[int],
            vision_prompts: list[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
        x = self._embed(images_BRHW, vision_prompts)
        _, taps = self._blocks(x, 0, max(layers) + 1, vision_prompts, taps=tuple(layers))
        t = x.shape[1] - self.n_ctx
        return {layer: (taps[layer][:, :t], taps[layer][:, t:]) for layer in sorted(layers)}

    def finish(self, x_BTD: Tensor, prompts_BXD: Tensor, layer: int, vision_prompts: list[Tensor]) -> Tensor:
        param = self.visual.conv1.weight
        x = torch.cat([x_BTD.to(param.device, param.dtype), prompts_BXD.to(param.device, param.dtype)], dim=1)
        x, _ = self._blocks(x, layer + 1, len(self.visual.transformer.resblocks), vision_prompts)
        return self._head(x)


class _StageOffsets:
    """A ConvNeXt's prompted vision forward: each prompted stage with its channel offset (``run_stages``); taps and
    splices are feature maps as spatial tokens, with no prompt tokens (``prompts_BXD`` is ``(B, 0, D)``)."""

    has_tokens = False

    def __init__(self, tower: ConvNeXtTower):
        self.tower = tower

    def encode(self, images_BRHW: Tensor, offsets: list[Tensor]) -> Tensor:
        x_BDHW, _ = self.tower.run_stages(self.tower.stem(images_BRHW), 0, self.tower.n_blocks, offsets)
        return self.tower.features(x_BDHW)

    def tap(self, images_BRHW: Tensor, layers: Sequence[int],
            offsets: list[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
        _, maps = self.tower.run_stages(self.tower.stem(images_BRHW), 0, max(layers) + 1, offsets, taps=tuple(layers))
        tokens = {layer: self.tower.tokens(maps[layer]) for layer in sorted(layers)}
        return {layer: (x_BTD, x_BTD[:, :0]) for layer, x_BTD in tokens.items()}

    def finish(self, x_BTD: Tensor, prompts_BXD: Tensor, layer: int, offsets: list[Tensor]) -> Tensor:
        if prompts_BXD.shape[1]:
            raise ValueError("an adapted ConvNeXt has no prompt tokens to splice back")
        param = next(self.tower.trunk.parameters())
        x_BDHW = self.tower.feature_map(x_BTD.to(param.device, param.dtype), layer)
        x_BDHW, _ = self.tower.run_stages(x_BDHW, layer + 1, self.tower.n_blocks, offsets)
        return self.tower.features(x_BDHW)


class AdaptedCLIP:
    """A frozen open_clip CLIP with MaPLe prompts; only ``prompts`` has trainable parameters. The text side is MaPLe's
    for every tower; the vision side is the tower's (``_PromptTokens`` for a ViT, ``_StageOffsets`` for a ConvNeXt)."""

    def __init__(self, clip: Any, tokenizer: Any, prompts: Prompts, config: MapleConfig):
        check_fits(config, clip)
        tower = tower_of(clip.visual)
        kind = prompts_class(tower)
        if prompts.method != kind.method:
            raise UserError(f"the prompts are {prompts.method} prompts ({prompts.description}), and this "
                            f"model's image tower is a {kind.tower_name}, which takes {kind.method} prompts; use "
                            "prompts trained on this model")
        if (prompts.n_ctx, prompts.depth if prompts.n_ctx else config.depth) != (config.n_ctx, config.depth):
            raise UserError(f"the prompts have n_ctx {prompts.n_ctx} and depth {prompts.depth}, the config "
                            f"{config.n_ctx} and {config.depth}; pass matching --n-ctx/--depth")
        d_text, widths = int(clip.token_embedding.weight.shape[1]), kind.widths_on(tower, prompts.depth)
        if prompts.ctx.shape[1] != d_text or prompts.vision_widths != widths:
            theirs, ours = (", ".join(map(str, w)) for w in (prompts.vision_widths, widths))
            raise UserError(f"the prompts are for widths {prompts.ctx.shape[1]} (text) / {theirs} (vision), the model "
                            f"has {d_text} / {ours}; use prompts trained on this model")
        self.clip, self.tokenizer, self.prompts, self.config = clip, tokenizer, prompts, config
        self.vision = prompts.vision_side(tower)

    @property
    def n_ctx(self) -> int:
        return self.config.n_ctx

    @property
    def method(self) -> str:
        return self.prompts.method

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

    def _vision_prompts(self) -> list[Tensor]:
        return self.prompts.vision_prompts() if self.n_ctx else []

    def encode_image(self, images_BRHW: Tensor, *, normalize: bool = False) -> Tensor:
        """Image embeddings ``(B, E)`` of the prompted vision tower."""
        features_BE = self.vision.encode(images_BRHW, self._vision_prompts())
        return F.normalize(features_BE, dim=-1) if normalize else features_BE

    def logits(self, images_BRHW: Tensor, text_CE: Tensor) -> Tensor:
        """CLIP's ``logit_scale · cosine`` of every image with every class embedding: ``(B, C)``."""
        image_BE = self.encode_image(images_BRHW, normalize=True)
        return self.clip.logit_scale.exp() * image_BE @ F.normalize(text_CE, dim=-1).T

    def check_prompt_tokens(self, keep: bool) -> None:
        """Refuse to keep prompt tokens the model does not have (a ConvNeXt's prompts are channel offsets)."""
        if keep and not self.vision.has_tokens:
            raise UserError(KEEP_REFUSED)

    def token_layout(self, layer: int, *, keep_prompts: bool) -> dict[str, Any]:
        """The stored token layout of layer ``layer``'s taps: the base model's, plus the kept prompt tokens."""
        self.check_prompt_tokens(keep_prompts)
        layout = tower_of(self.clip.visual).token_layout(layer)
        return with_prompt_tokens(layout, self.n_ctx) if keep_prompts else layout

    @torch.inference_mode()
    def tap(self, images_BRHW: Tensor, layers: Sequence[int], *, keep_prompts: bool = False) -> dict[int, Tensor]:
        """The tokens of each requested layer (a ViT block's residual stream, a ConvNeXt stage's output map) at the
        base model's positions, ``(B, T, D)``, then, with ``keep_prompts``, the vision prompt tokens
        (``(B, T + X, D)``; a ViT's only); without, they are dropped.

        The forward stops after the last layer asked.
        """
        self.check_prompt_tokens(keep_prompts)
        full = self.tap_with_prompts(images_BRHW, layers)
        if keep_prompts:
            return {layer: torch.cat([x_BTD, prompts_BXD], dim=1) for layer, (x_BTD, prompts_BXD) in full.items()}
        return {layer: x_BTD for layer, (x_BTD, _) in full.items()}

    @torch.inference_mode()
    def tap_with_prompts(self, images_BRHW: Tensor, layers: Sequence[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """Per requested layer, ``(x_BTD, prompts_BXD)``: base positions and the prompt tokens after it (none for a
        ConvNeXt)."""
        return self.vision.tap(images_BRHW, layers, self._vision_prompts())

    @torch.inference_mode()
    def finish(self, x_BTD: Tensor, prompts_BXD: Tensor, layer: int) -> Tensor:
        """Image embeddings ``(B, E)`` from the residual stream after layer ``layer`` (base positions and
        prompt tokens, as ``tap_with_prompts`` returns them): the adapted twin of ``splice.finish_forward``."""
        return self.vision.finish(x_BTD, prompts_BXD, layer, self._vision_prompts())


# ---------------------------------------------------------------------------------------
# Files


def base_record(model: LoadedModel) -> dict[str, Any]:
    """What identifies the base model of an adapter."""
    return {"name": model.name, "pretrained": model.pretrained, "checkpoint_sha256": model.checkpoint_sha256}


def adapter_record(config: MapleConfig, model: LoadedModel, class_names: Sequence[str],
                   prompt_names: Sequence[str]) -> dict[str, Any]:
    """The ``adapter`` section of an adapter folder's config.json (prompt names: what the prompts say per class)."""
    return {"method": prompts_class(model.tower).method, **config.to_dict(), "class_names": list(class_names),
            "prompt_names": list(prompt_names), "base_model": base_record(model)}


def save_prompts(path: Path, prompts: Prompts) -> None:
    """The prompt parameters as safetensors (official names without ``prompt_learner.``), atomically."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in prompts.state_dict().items()}
    save_tensors(path, tensors)


def _prompts_shaped_like(state: dict[str, Tensor], source: Path) -> Prompts:
    """Prompts of the shapes of a state dict, by its keys: a ViT's (``proj``) or a ConvNeXt's (``stage_offsets``)."""
    if "ctx" not in state or not ("proj.weight" in state or "stage_offsets.0.weight" in state):
        raise UserError(f"{source} holds no MaPLe prompts: no ctx / proj.weight / stage_offsets.0.weight (expected "
                        "the official prompt_learner.* keys or a prompts.safetensors written by pipeline adapt)")
    n_ctx, d_text = (int(n) for n in state["ctx"].shape)
    depth = 1 + sum(1 for k in state if k.startswith("compound_prompts_text."))
    if "proj.weight" in state:
        return MaplePrompts(n_ctx, depth, d_text, (int(state["proj.weight"].shape[0]),))
    widths = [int(state[f"stage_offsets.{i}.weight"].shape[0]) for i in range(depth)
              if f"stage_offsets.{i}.weight" in state]
    if len(widths) != depth:
        raise UserError(f"{source} holds MaPLe prompts of inconsistent shapes ({len(widths)} stage offsets for "
                        f"depth {depth})")
    return StageOffsetPrompts(n_ctx, depth, d_text, widths)


def prompts_from_state(state: dict[str, Tensor], source: Path) -> Prompts:
    """The prompts holding ``state`` (float32), of the method its keys name; the shapes must be consistent."""
    prompts = _prompts_shaped_like(state, source)
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
    if record.get("method") not in BY_METHOD:
        raise UserError(f"{config_path} describes no MaPLe adapter; create the folder with pipeline adapt")
    if not prompts_path.is_file():
        raise UserError(f"{adapter_dir} has no {PROMPTS_NAME} yet (training unfinished); rerun pipeline adapt "
                        "with the same options to finish it")
    return record


def load_adapter(adapter_dir: Path, model: LoadedModel) -> AdaptedCLIP:
    """The adapter folder's prompts on ``model``; refuses an adapter of another method (by name, before anything
    else) or trained on another base model."""
    import open_clip

    record = read_adapter_config(adapter_dir)
    method, wanted = record["method"], prompts_class(model.tower)
    if method != wanted.method:
        raise UserError(f"the adapter in {adapter_dir} is a {method} adapter ({BY_METHOD[method].description}), and "
                        f"{model.name} has a {wanted.tower_name} image tower, which takes {wanted.method} "
                        "adapters; pass an adapter trained on this model")
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


def stored_tokens(method: str, *, keep_prompts: bool) -> str:
    """Which tokens an adapted store holds, in words (its ``model.adapter.stored_tokens``)."""
    if method == OFFSETS_METHOD:
        return "the base model's positions; the adapter's vision prompts are channel offsets, not tokens"
    if keep_prompts:
        return "the base model's positions, then the appended vision prompt tokens (token_layout.prompt_token_indices)"
    return "the base model's positions only; the appended vision prompt tokens are dropped"


def adapter_identity(adapter_dir: Path) -> dict[str, Any]:
    """What an activation store of the adapted model records about the adapter (part of its config)."""
    record = read_adapter_config(adapter_dir)
    return {"method": record["method"], "n_ctx": record["n_ctx"], "depth": record["depth"],
            "prompts_sha256": file_sha256(Path(adapter_dir) / PROMPTS_NAME)}
