"""Splicing an SAE into a CLIP vision tower: replace the tokens at the tap by a reconstruction.

Layers are those of ``pipeline.towers``: a ViT block's residual-stream output, or a ConvNeXt
stage's feature map as spatial tokens. Splicing at layer ``L`` means: take every token of
layer ``L``, replace it by the SAE reconstruction computed from a possibly masked latent
vector, then finish the forward exactly as open_clip does. For a ViT: the blocks after the
tap (``resblocks[L + 1:]``), then ``visual._pool`` (which applies ``ln_post`` and pools: the
class token for CLIP ViTs; attention pooling too, where a model has it) and ``visual.proj``;
for a ConvNeXt: the tokens back as a feature map, the stages after it, the trunk's head and the
CLIP projection. No other module is touched, so with nothing replaced the result is
open_clip's own ``encode_image`` (tested). Because class-token pooling reads one row, a ViT's
last block can be computed for the class-token query alone (``class_token_only``; equal up
to float rounding, tested), which is most of the cost of a one-block tail.

Maths (per token, raw = cache units; ``s`` = the SAE's ``norm_scale``, codes ``f`` and the
parameters in the SAE's normalised units):

    x̂          = s · (f W_dec + b_dec)                     full reconstruction
    "on"  set A: x̂_A = s · (Σ_{j∈A} f_j W_dec[j] + b_dec)   keep only the latents in A
    "off" set A: x̂_¬A = x̂ − s · Σ_{j∈A} f_j W_dec[j]        zero the latents in A
    with the error term:  x̂_masked + (x − x̂), computed as x − (x̂ − x̂_masked) so that it is
    exactly x when nothing is masked.

    with a splice correction c_D (no error term): x̂_masked + c, at every token.

The correction (``Correction``) is the general form of the reference code's constant: its
masking splices ``x̂ − SAE_BIAS`` with SAE_BIAS = −0.105131256516992, i.e. +0.1051 on every
element (``constant:0.105131256516992``; the paper's 64.82 % "SAE in the loop" includes it).
``mean_error`` adds the SAE's own mean reconstruction error E[x − x̂] per dimension, stored
with the SAE (``pipeline.sae.io.save_mean_error``). It is not added with the error term,
which already restores the actual error x − x̂ (of which c is the mean).

"on" with every latent is x̂; "off" with every latent leaves ``s · b_dec`` at every token
(both computed exactly, without summing 49k rows). Latent sets are given per image (one
row of ``idx_BK`` per image, e.g. the top-k latents of its class), so one batch can mix
classes. Masked reconstructions cost ``O(tokens · k · D)``; the dense codes and the full
reconstruction are computed once per batch (``encode_tap``) and shared by every mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from cache.errors import UserError
from pipeline.sae import SAE
from pipeline.towers import tower_of

MODES = ("on", "off")
CORRECTIONS = ("none", "mean_error", "constant")
REFERENCE_SAE_BIAS = -0.105131256516992
"""The constant of the reference code's masking (dynamical-inference/patchsae); it splices x̂ − SAE_BIAS."""


@dataclasses.dataclass(frozen=True)
class Correction:
    """What is added to every spliced reconstruction without the error term.

    Written ``none``, ``mean_error`` (the SAE's mean error E[x − x̂] per dimension, raw units)
    or ``constant:<value>`` (one value on every element; the reference: ``constant:0.105131256516992``).
    """

    kind: str = "none"
    value: float | None = None  # the constant, for kind "constant" only

    def __post_init__(self) -> None:
        if self.kind not in CORRECTIONS:
            raise UserError(f"unknown splice correction '{self.kind}'; use none, mean_error or constant:<value>")
        if (self.kind == "constant") != (self.value is not None):
            raise UserError("a splice correction takes a value only as constant:<value>, e.g. constant:0.1051")

    @classmethod
    def parse(cls, text: str) -> Correction:
        kind, sep, value = str(text).strip().partition(":")
        if not sep:
            return cls(kind.lower())
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"splice correction '{text}' has no number after 'constant:'; "
                            "e.g. constant:0.1051") from None
        if kind.lower() != "constant" or not math.isfinite(number):
            raise UserError(f"splice correction '{text}' is not constant:<finite value>; use none, mean_error or "
                            "constant:<value>")
        return cls("constant", number)

    def __str__(self) -> str:
        return f"constant:{self.value!r}" if self.kind == "constant" else self.kind


@torch.inference_mode()
def tap_forward(visual: Any, images_BRHW: Tensor, layer: int) -> Tensor:
    """The tokens of layer ``layer``, ``(B, T, D)`` (a ViT's class token first); stops there."""
    tower = tower_of(visual)
    tower.check_layer(layer)
    param = next(visual.parameters())
    return tower.tap(images_BRHW.to(param.device, param.dtype), [layer])[0]


@torch.inference_mode()
def finish_forward(visual: Any, x_BTD: Tensor, layer: int, *, class_token_only: bool = False) -> Tensor:
    """Image features ``(B, E)`` from the tokens of layer ``layer`` (see ``pipeline.towers``)."""
    tower = tower_of(visual)
    tower.check_layer(layer)
    param = next(visual.parameters())
    return tower.finish(x_BTD.to(param.device, param.dtype), layer, class_token_only=class_token_only)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One batch of tapped residuals with its SAE codes and full reconstruction (float32)."""

    x_BTD: Tensor  # the residual stream at the tap, raw units
    f_BTS: Tensor  # dense codes, the SAE's normalised units
    xhat_BTD: Tensor  # full reconstruction s · (f W_dec + b_dec), raw units
    norm_scale: float


@torch.inference_mode()
def encode_tap(sae: SAE, x_BTD: Tensor) -> Encoded:
    """Encode every token of a batch once; the masks below reuse these codes."""
    b, t, d = x_BTD.shape
    if d != sae.config.d_in:
        raise UserError(f"the SAE expects width {sae.config.d_in} but the tap has width {d}; "
                        "use an SAE trained on this model and layer")
    param = sae.W_dec
    x_BTD = x_BTD.to(param.device, torch.float32)
    codes = sae.encode(x_BTD.reshape(b * t, d))
    xhat = sae.decode(codes).to(torch.float32)
    f = codes.dense().to(torch.float32)
    return Encoded(x_BTD=x_BTD, f_BTS=f.reshape(b, t, -1), xhat_BTD=xhat.reshape(b, t, d),
                   norm_scale=float(sae.config.norm_scale))


def _partial(sae: SAE, enc: Encoded, idx_BK: Tensor) -> Tensor:
    """s · Σ_{j∈A_b} f_j W_dec[j] per token, for each image's latent set ``idx_BK[b]`` (raw units)."""
    b, t, _ = enc.f_BTS.shape
    idx_BK = idx_BK.to(enc.f_BTS.device, torch.long)
    f_BTK = enc.f_BTS.gather(2, idx_BK[:, None, :].expand(b, t, idx_BK.shape[1]))
    w_BKD = sae.W_dec.detach().to(torch.float32)[idx_BK]
    return torch.bmm(f_BTK, w_BKD) * enc.norm_scale


@torch.inference_mode()
def masked_reconstruction(sae: SAE, enc: Encoded, mode: str, idx_BK: Tensor | None) -> Tensor:
    """The reconstruction ``(B, T, D)`` from masked codes (raw units).

    ``idx_BK``: the latent set of each image (row b applies to every token of image b);
    None means every latent ("on" → x̂, "off" → s · b_dec at every token).
    """
    if mode not in MODES:
        raise UserError(f"unknown masking mode '{mode}'; use one of {', '.join(MODES)}")
    b_dec_D = sae.b_dec.detach().to(torch.float32) * enc.norm_scale
    if idx_BK is None:
        if mode == "on":
            return enc.xhat_BTD
        return b_dec_D.expand_as(enc.xhat_BTD).clone()
    if idx_BK.ndim != 2 or idx_BK.shape[0] != enc.f_BTS.shape[0]:
        raise ValueError(f"idx_BK must be (B, K) with B={enc.f_BTS.shape[0]}, got {tuple(idx_BK.shape)}")
    part_BTD = _partial(sae, enc, idx_BK)
    if mode == "on":
        return part_BTD + b_dec_D
    return enc.xhat_BTD - part_BTD


def splice_input(enc: Encoded, xhat_masked_BTD: Tensor, *, error_term: bool, shift_D: Tensor | None = None) -> Tensor:
    """What replaces the residual stream at the tap: x̂_masked (+ the correction ``shift_D``), or
    x − (x̂ − x̂_masked)."""
    if not error_term:
        return xhat_masked_BTD if shift_D is None else xhat_masked_BTD + shift_D.to(xhat_masked_BTD.device)
    if xhat_masked_BTD is enc.xhat_BTD:
        return enc.x_BTD  # nothing masked: the error term restores x exactly
    return enc.x_BTD - (enc.xhat_BTD - xhat_masked_BTD)


@torch.inference_mode()
def spliced_residual(sae: SAE, x_BTD: Tensor, *, mode: str = "on", idx_BK: Tensor | None = None,
                     error_term: bool = False, shift_D: Tensor | None = None) -> Tensor:
    """The residual stream at the tap after splicing (one mask, one batch)."""
    enc = encode_tap(sae, x_BTD)
    return splice_input(enc, masked_reconstruction(sae, enc, mode, idx_BK), error_term=error_term, shift_D=shift_D)


@torch.inference_mode()
def spliced_features(visual: Any, sae: SAE, layer: int, x_BTD: Tensor, *, mode: str = "on",
                     idx_BK: Tensor | None = None, error_term: bool = False, shift_D: Tensor | None = None,
                     class_token_only: bool = False) -> Tensor:
    """Image features ``(B, E)`` with the SAE spliced in at ``layer`` (tap given as ``x_BTD``)."""
    return finish_forward(visual, spliced_residual(sae, x_BTD, mode=mode, idx_BK=idx_BK, error_term=error_term,
                                                   shift_D=shift_D),
                          layer, class_token_only=class_token_only)


@contextlib.contextmanager
def splice_hook(visual: Any, sae: SAE, layer: int, *, mode: str = "on", idx_BK: Tensor | None = None,
                error_term: bool = False, shift_D: Tensor | None = None) -> Iterator[None]:
    """While active, every forward of ``visual`` (a ViT) has the SAE spliced in after block ``layer``.

    A forward hook on ``resblocks[layer]`` replaces its output; the rest of the model's own
    forward runs unchanged. For models whose forward is not open_clip's stock one (e.g.
    with extra prompt tokens); ``idx_BK`` must then match the batch being run.
    """
    tower = tower_of(visual)
    tower.check_layer(layer)
    if tower.kind != "vit":
        raise UserError(f"splicing into a running forward needs a ViT (this tower is a {tower.kind})")
    batch_first = getattr(visual.transformer, "batch_first", True)

    def hook(module: Any, args: Any, output: Tensor) -> Tensor:
        x_BTD = output if batch_first else output.transpose(0, 1)
        new_BTD = spliced_residual(sae, x_BTD, mode=mode, idx_BK=idx_BK, error_term=error_term,
                                   shift_D=shift_D).to(output.dtype)
        return new_BTD if batch_first else new_BTD.transpose(0, 1)

    handle = visual.transformer.resblocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def finish_many(visual: Any, xs: Sequence[Tensor], layer: int, *, max_rows: int = 64,
                class_token_only: bool = False) -> list[Tensor]:
    """``finish_forward`` of several same-shaped batches, stacked into forwards of up to ``max_rows`` images."""
    if not xs:
        return []
    b = xs[0].shape[0]
    per = max(1, max_rows // max(b, 1))
    out: list[Tensor] = []
    for start in range(0, len(xs), per):
        group = xs[start:start + per]
        feats = finish_forward(visual, torch.cat(list(group)), layer, class_token_only=class_token_only)
        out.extend(feats.split([x.shape[0] for x in group]))
    return out
