"""The vision towers the pipeline can take apart, behind one interface: where a layer is, what its
tokens look like, how to tap it, and how to finish the forward from it.

- **ViT** (open_clip ``VisionTransformer``): layer L = the residual stream after
  ``transformer.resblocks[L]``, every token: the class token first, then the patches in
  row-major order. Features: the remaining blocks, ``_pool`` (ln_post, pooling) and ``proj``.
- **ConvNeXt** (open_clip ``TimmModel`` around a timm ``ConvNeXt`` trunk, the ``convnext_*``
  configs): layer L = the output of ``trunk.stages[L]``, a feature map (B, C, H, W) read as
  H × W spatial tokens, row-major (token r * W + c is row r, column c), and no class token.
  Each stage has its own width and grid, so one store holds stages of one shape. Features:
  the remaining stages, ``norm_pre``, the trunk's head (global pool, norm) and the CLIP
  projection (``head``), as ``TimmModel.forward`` runs them. ``run_stages`` also runs stages
  with a channel offset added in each (the vision side of MaPLe on a ConvNeXt, pipeline/maple.py).

Every other tower (e.g. a timm ViT trunk as in the SigLIP configs) is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor

from cache.errors import UserError


class Tower:
    """One tower kind; subclasses know its modules."""

    kind: str
    n_prefix_tokens: int

    def __init__(self, visual: Any):
        self.visual = visual

    @property
    def n_blocks(self) -> int:
        raise NotImplementedError

    def block(self, layer: int) -> Any:
        """The module whose output is layer ``layer``."""
        raise NotImplementedError

    def grid(self, layer: int) -> tuple[int, int]:
        raise NotImplementedError

    def width(self, layer: int) -> int:
        raise NotImplementedError

    def tap(self, images_BRHW: Tensor, layers: list[int]) -> list[Tensor]:
        """``(B, T, D)`` at each of ``layers`` (sorted), prefix tokens first; stops after the last."""
        raise NotImplementedError

    def finish(self, x_BTD: Tensor, layer: int, *, class_token_only: bool = False) -> Tensor:
        """Image features ``(B, E)`` from layer ``layer``'s tokens."""
        raise NotImplementedError

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_blocks:
            raise UserError(f"layer {layer} is out of range for a model with {self.unit}s 0..{self.n_blocks - 1} "
                            f"({self.layer_meaning})")

    def n_tokens(self, layer: int) -> int:
        h, w = self.grid(layer)
        return self.n_prefix_tokens + h * w

    def token_layout(self, layer: int) -> dict[str, Any]:
        raise NotImplementedError

    unit = "block"
    layer_meaning = "block index, 0-based, residual output"


class ViTTower(Tower):
    kind = "vit"
    n_prefix_tokens = 1

    @property
    def n_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    def block(self, layer: int) -> Any:
        return self.visual.transformer.resblocks[layer]

    def grid(self, layer: int) -> tuple[int, int]:
        return tuple(int(g) for g in self.visual.grid_size)

    def width(self, layer: int) -> int:
        return int(self.visual.transformer.width)

    def token_layout(self, layer: int) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens(layer), "n_prefix_tokens": 1, "class_token_index": 0,
                "register_token_indices": [], "patch_grid": list(self.grid(layer)),
                "patch_order": "row-major: token 1 + r * grid_w + c is patch row r, column c"}

    def tap(self, images_BRHW: Tensor, layers: list[int]) -> list[Tensor]:
        out = self.visual.forward_intermediates(images_BRHW, indices=layers, stop_early=True, intermediates_only=True,
                                                output_fmt="NLC", output_extra_tokens=True)
        return [torch.cat([p, x], dim=1) for p, x in zip(out["image_intermediates_prefix"],
                                                         out["image_intermediates"])]

    def finish(self, x_BTD: Tensor, layer: int, *, class_token_only: bool = False) -> Tensor:
        return finish_vit(self.visual, x_BTD, layer, class_token_only=class_token_only)


class ConvNeXtTower(Tower):
    kind = "convnext"
    n_prefix_tokens = 0
    unit = "stage"
    layer_meaning = "stage index, 0-based, the stage's output feature map"

    @property
    def trunk(self) -> Any:
        return self.visual.trunk

    @property
    def n_blocks(self) -> int:
        return len(self.trunk.stages)

    def block(self, layer: int) -> Any:
        return self.trunk.stages[layer]

    def grid(self, layer: int) -> tuple[int, int]:
        """The stage's feature-map size at the model's input size (timm's feature_info: its stride)."""
        stride = int(self.trunk.feature_info[layer]["reduction"])
        return tuple(-(-int(s) // stride) for s in self.visual.image_size)

    def width(self, layer: int) -> int:
        return int(self.trunk.feature_info[layer]["num_chs"])

    def token_layout(self, layer: int) -> dict[str, Any]:
        return {"n_tokens": self.n_tokens(layer), "n_prefix_tokens": 0, "class_token_index": None,
                "register_token_indices": [], "patch_grid": list(self.grid(layer)),
                "patch_order": "row-major: token r * grid_w + c is feature-map row r, column c (no class token)"}

    def tap(self, images_BRHW: Tensor, layers: list[int]) -> list[Tensor]:
        maps = self.trunk.forward_intermediates(images_BRHW, indices=layers, stop_early=True, intermediates_only=True)
        return [self.tokens(m) for m in maps]

    def finish(self, x_BTD: Tensor, layer: int, *, class_token_only: bool = False) -> Tensor:
        self.check_layer(layer)
        x_BDHW, _ = self.run_stages(self.feature_map(x_BTD, layer), layer + 1, self.n_blocks)
        return self.features(x_BDHW)

    @staticmethod
    def tokens(x_BDHW: Tensor) -> Tensor:
        """A feature map as row-major spatial tokens ``(B, H * W, D)``."""
        return x_BDHW.flatten(2).transpose(1, 2)

    def feature_map(self, x_BTD: Tensor, layer: int) -> Tensor:
        """Layer ``layer``'s tokens back as its feature map ``(B, D, H, W)``."""
        h, w = self.grid(layer)
        return x_BTD.transpose(1, 2).reshape(x_BTD.shape[0], x_BTD.shape[2], h, w)

    def run_stages(self, x_BDHW: Tensor, start: int, stop: int, offsets: Sequence[Tensor] = (),
                   taps: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """Stages ``start … stop − 1`` on the map stage ``start`` reads (the stem's output for 0); also the output
        map of each stage in ``taps``.

        ``offsets[i]``, a ``(D_i,)`` vector, is added at every position of stage i's own residual
        stream: after its downsample, before its blocks (the stage's width, and it reaches the
        stage's output through every block's shortcut). Stages without an offset run as they are.
        """
        out = {}
        for i in range(start, stop):
            stage = self.trunk.stages[i]
            if i < len(offsets):
                x_BDHW = stage.downsample(x_BDHW)
                x_BDHW = stage.blocks(x_BDHW + offsets[i].to(x_BDHW.dtype)[:, None, None])
            else:
                x_BDHW = stage(x_BDHW)
            if i in taps:
                out[i] = x_BDHW
        return x_BDHW, out

    def stem(self, images_BRHW: Tensor) -> Tensor:
        """The map stage 0 reads."""
        param = next(self.trunk.stem.parameters())
        return self.trunk.stem(images_BRHW.to(param.device, param.dtype))

    def features(self, x_BDHW: Tensor) -> Tensor:
        """Image features ``(B, E)`` from the last stage's map, as ``TimmModel.forward`` computes them: ``norm_pre``,
        the trunk's head (global pool, norm), the CLIP projection."""
        return self.visual.head(self.trunk.forward_head(self.trunk.norm_pre(x_BDHW)))


def supports_class_token_only(visual: Any) -> bool:
    """True when the features depend on the last block's class-token output alone.

    That holds for open_clip ViTs that pool the class token (``pool_type == 'tok'``, no
    attention pooling) and use the standard ``ResidualAttentionBlock``, batch first.
    """
    blocks = visual.transformer.resblocks
    return (getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", None) == "tok"
            and getattr(visual.transformer, "batch_first", True)
            and all(type(b) is ResidualAttentionBlock for b in blocks))


def _class_token_block(block: Any, x_BTD: Tensor) -> Tensor:
    """``block(x)[:, :1]`` with only the class token as query (keys and values: every token).

    The same operations as ``ResidualAttentionBlock.forward`` (self-attention, no mask),
    restricted to the one output row the class-token pooling reads.
    """
    kv_BTD = block.ln_1(x_BTD)
    x_B1D = x_BTD[:, :1] + block.ls_1(block.attention(q_x=kv_BTD[:, :1], k_x=kv_BTD, v_x=kv_BTD))
    return x_B1D + block.ls_2(block.mlp(block.ln_2(x_B1D)))


def finish_vit(visual: Any, x_BTD: Tensor, layer: int, *, class_token_only: bool = False) -> Tensor:
    """A ViT's image features from the residual stream after block ``layer``.

    Runs ``resblocks[layer + 1:]``, then open_clip's own ``_pool`` (ln_post + pooling) and
    ``proj``: the tail of ``VisionTransformer.forward``. ``class_token_only`` computes the
    last block for the class-token query alone (the only row class-token pooling reads;
    ~4x less work for a one-block tail; equal up to float rounding); it is ignored where
    ``supports_class_token_only`` is False.
    """
    x = x_BTD
    transformer = visual.transformer
    tail = list(transformer.resblocks[layer + 1:])
    last = None
    if class_token_only and tail and supports_class_token_only(visual):
        last = tail.pop()
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in tail:
        x = block(x, attn_mask=None)
    if not batch_first:
        x = x.transpose(0, 1)
    if last is not None:
        x = _class_token_block(last, x)
    pooled_BE, _ = visual._pool(x)
    if visual.proj is not None:
        pooled_BE = pooled_BE @ visual.proj
    return pooled_BE


def tower_of(visual: Any) -> Tower:
    """The tower adapter of an open_clip vision tower; anything else is refused by name."""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        return ViTTower(visual)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        from timm.models.convnext import ConvNeXt

        if isinstance(trunk, ConvNeXt):
            return ConvNeXtTower(visual)
        raise UserError(f"the vision tower is a timm {type(trunk).__name__} trunk, which the pipeline cannot tap; "
                        "use an open_clip ViT (e.g. ViT-B-16) or a ConvNeXt (convnext_*) model")
    raise UserError(f"the vision tower {type(visual).__name__} is neither an open_clip ViT nor a timm ConvNeXt; "
                    "use a model such as ViT-B-16 or convnext_base")
