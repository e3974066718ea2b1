"""The spliced forward: parity with open_clip, the hand-built reconstruction path, mask semantics."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline import splice, towers
from pipeline.masking import random_latents, top_latents
from pipeline.models import load_model
from pipeline.sae import Codes, ReLUConfig, build

pytestmark = pytest.mark.usefixtures("one_thread")




def _random_sae(d_in: int, d_sae: int, layer: int, *, norm_scale: float = 1.0, seed: int = 0):
    """A random ReLU SAE with non-zero biases (so b_dec and the units matter)."""
    sae = build(ReLUConfig(d_in=d_in, d_sae=d_sae, layer=layer, norm_scale=norm_scale), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=g))
    return sae.eval()


def _hook_reconstruction(visual, layer: int, replace):
    """Forward hook on resblocks[layer] whose output is replaced by ``replace(output)``."""
    def hook(module, args, output):
        return replace(output)

    return visual.transformer.resblocks[layer].register_forward_hook(hook)


def _check_parity(lm, sae, layer: int, images) -> None:
    visual = lm.visual
    d = lm.width(layer)
    with torch.inference_mode():
        ref_BE = lm.model.encode_image(images)
        x_BTD = splice.tap_forward(visual, images, layer)
        torch.testing.assert_close(x_BTD, lm.tap(images, (layer,))[layer], rtol=0, atol=0)
        # Nothing masked, with the error term: open_clip's own features and logits.
        ours_BE = splice.spliced_features(visual, sae, layer, x_BTD, error_term=True)
        torch.testing.assert_close(ours_BE, ref_BE)
        # The last block computed for the class-token query alone: the same up to rounding.
        assert towers.supports_class_token_only(visual)
        torch.testing.assert_close(splice.finish_forward(visual, x_BTD, layer, class_token_only=True), ref_BE,
                                   rtol=1e-5, atol=1e-5)
        text = open_clip.get_tokenizer(lm.name)(["a photo of a cat.", "a photo of a dog.", "a map."])
        unit_image_BE, unit_text_CE, scale = lm.model(images, text)
        ref_logits = scale * unit_image_BE @ unit_text_CE.T
        ours_logits = scale * F.normalize(ours_BE, dim=-1) @ unit_text_CE.T
        torch.testing.assert_close(ours_logits, ref_logits)
        # Without the error term: decode(encode(x)) substituted by hand in a hook on resblocks[layer].
        handle = _hook_reconstruction(
            visual, layer, lambda out: sae.decode(sae.encode(out.reshape(-1, d))).reshape(out.shape))
        try:
            hand_BE = lm.model.encode_image(images)
        finally:
            handle.remove()
        ours_BE = splice.spliced_features(visual, sae, layer, x_BTD, error_term=False)
        torch.testing.assert_close(ours_BE, hand_BE)
        assert not torch.allclose(hand_BE, ref_BE, atol=1e-3)  # the reconstruction really changed something


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-vit", "none", device="cpu")


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_tiny_vit_parity(tiny, layer):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(layer))
    _check_parity(tiny, _random_sae(tiny.width(layer), 96, layer, norm_scale=1.7), layer, images)


def test_vit_b_16_parity():
    lm = load_model("ViT-B-16", "none", device="cpu")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    _check_parity(lm, _random_sae(lm.width(10), 1536, 10, norm_scale=2.0), 10, images)


# ---------------------------------------------------------------------------------------
# Mask semantics (no model needed)


def _encoded(sae, b=2, t=5, seed=0):
    x = 2.0 * torch.randn(b, t, sae.config.d_in, generator=torch.Generator().manual_seed(seed))
    return splice.encode_tap(sae, x)


def test_all_latents_on_and_off():
    sae = _random_sae(16, 40, 0, norm_scale=1.3)
    enc = _encoded(sae)
    b = enc.f_BTS.shape[0]
    every_BK = torch.arange(40).expand(b, 40)
    full = splice.masked_reconstruction(sae, enc, "on", None)
    assert full is enc.xhat_BTD
    torch.testing.assert_close(splice.masked_reconstruction(sae, enc, "on", every_BK), full)
    b_dec_BTD = (sae.b_dec * 1.3).expand_as(full)
    off_all = splice.masked_reconstruction(sae, enc, "off", None)
    assert torch.equal(off_all, b_dec_BTD)
    torch.testing.assert_close(splice.masked_reconstruction(sae, enc, "off", every_BK), b_dec_BTD,
                               atol=1e-4, rtol=1e-4)
    # The error term with nothing masked gives x back exactly; with everything off, x - x_hat + b_dec.
    assert torch.equal(splice.splice_input(enc, full, error_term=True), enc.x_BTD)
    torch.testing.assert_close(splice.splice_input(enc, off_all, error_term=True),
                               enc.x_BTD - enc.xhat_BTD + b_dec_BTD)
    # The reference decode of the SAE agrees with the full reconstruction.
    codes = sae.encode(enc.x_BTD.reshape(-1, 16))
    torch.testing.assert_close(full.reshape(-1, 16), sae.decode(codes))


def test_masks_apply_per_image_by_class():
    sae = _random_sae(8, 12, 0, norm_scale=0.7)
    with torch.no_grad():
        sae.b_enc.fill_(1.0)  # every latent active: a dropped latent always changes the result
    enc = _encoded(sae, b=4)
    counts_CS = torch.zeros(2, 12, dtype=torch.long)
    counts_CS[0, [3, 7, 1]] = torch.tensor([50, 40, 30])
    counts_CS[1, [5, 0, 9]] = torch.tensor([9, 8, 8])  # tie between 0 and 9: lower index first
    top_CK = torch.from_numpy(top_latents(counts_CS.numpy(), 3))
    assert top_CK.tolist() == [[3, 7, 1], [5, 0, 9]]
    labels_B = torch.tensor([0, 1, 1, 0])
    for mode in ("on", "off"):
        got = splice.masked_reconstruction(sae, enc, mode, top_CK[labels_B, :2])
        for b, c in enumerate(labels_B.tolist()):
            keep_S = torch.zeros(12, dtype=torch.bool)
            keep_S[top_CK[c, :2]] = True
            if mode == "off":
                keep_S = ~keep_S
            f_TS = enc.f_BTS[b] * keep_S
            hand_TD = sae.decode(Codes(d_sae=12, acts_BS=f_TS))
            torch.testing.assert_close(got[b], hand_TD)
    # Images of the two classes get different sets, so swapping the labels changes the result.
    swapped = splice.masked_reconstruction(sae, enc, "on", top_CK[1 - labels_B, :2])
    assert not torch.allclose(swapped, splice.masked_reconstruction(sae, enc, "on", top_CK[labels_B, :2]))


def test_off_all_leaves_only_b_dec_at_the_tap(tiny):
    layer = 1
    sae = _random_sae(tiny.width(layer), 64, layer, norm_scale=1.5)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    seen = {}

    def grab(module, args):
        seen["x"] = args[0].detach().clone()

    handle = tiny.visual.transformer.resblocks[layer + 1].register_forward_pre_hook(grab)
    try:
        x = splice.tap_forward(tiny.visual, images, layer)
        splice.spliced_features(tiny.visual, sae, layer, x, mode="off", idx_BK=None)
    finally:
        handle.remove()
    assert torch.equal(seen["x"], (sae.b_dec * 1.5).detach().expand(2, tiny.n_tokens(layer), tiny.width(layer)))


def test_splice_hook_matches_the_spliced_forward(tiny):
    layer = 2
    sae = _random_sae(tiny.width(layer), 64, layer, norm_scale=0.8)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    idx_BK = torch.tensor([[0, 5, 9], [1, 2, 3], [60, 61, 62]])
    with torch.inference_mode():
        x = splice.tap_forward(tiny.visual, images, layer)
        for mode, err in [("on", False), ("off", True)]:
            with splice.splice_hook(tiny.visual, sae, layer, mode=mode, idx_BK=idx_BK, error_term=err):
                hooked = tiny.model.encode_image(images)
            torch.testing.assert_close(
                hooked, splice.spliced_features(tiny.visual, sae, layer, x, mode=mode, idx_BK=idx_BK, error_term=err))
        assert not tiny.visual.transformer.resblocks[layer]._forward_hooks  # removed on exit


def test_random_sets_are_seeded_and_nested():
    a = random_latents(2, 3, 50, 10, seed=4)
    assert a.shape == (2, 3, 10)
    assert (a == random_latents(2, 3, 50, 10, seed=4)).all()
    assert not (a[0] == a[1]).all()
    assert all(len(set(row)) == 10 for row in a.reshape(-1, 10).tolist())


# ---------------------------------------------------------------------------------------
# The splice correction


def _biased_sae(d: int, layer: int, offset_D: torch.Tensor):
    """An SAE whose reconstruction is x + offset exactly: latents relu(x + o) and relu(-x - o), decoded ±1."""
    sae = build(ReLUConfig(d_in=d, d_sae=2 * d, layer=layer), seed=0)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.copy_(torch.cat([offset_D, -offset_D]))
        sae.b_dec.zero_()
    return sae.eval()


def test_correction_parses_and_prints():
    assert str(splice.Correction.parse("none")) == "none"
    assert str(splice.Correction.parse(" Mean_Error ")) == "mean_error"
    assert splice.Correction.parse("constant:0.105131256516992").value == -splice.REFERENCE_SAE_BIAS
    assert str(splice.Correction.parse("constant:-2")) == "constant:-2.0"
    for bad in ("median", "constant", "constant:x", "mean_error:1", "constant:nan"):
        with pytest.raises(splice.UserError):
            splice.Correction.parse(bad)


def test_constant_correction_adds_the_constant_and_none_changes_nothing():
    sae = _random_sae(16, 40, 0, norm_scale=1.3)
    enc = _encoded(sae)
    idx_BK = torch.tensor([[0, 3], [7, 9]])
    c_D = torch.full((16,), 0.105131256516992)
    for mode, idx in [("on", None), ("off", None), ("on", idx_BK), ("off", idx_BK)]:
        xhat = splice.masked_reconstruction(sae, enc, mode, idx)
        assert splice.splice_input(enc, xhat, error_term=False) is xhat  # none: today's tensor, untouched
        assert torch.equal(splice.splice_input(enc, xhat, error_term=False, shift_D=c_D), xhat + 0.105131256516992)
        # With the error term the correction is not added: the actual error is already there.
        assert torch.equal(splice.splice_input(enc, xhat, error_term=True, shift_D=c_D),
                           splice.splice_input(enc, xhat, error_term=True))
    x = 2.0 * torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(splice.spliced_residual(sae, x, shift_D=c_D), sae.decode(sae.encode(x.reshape(10, 16)))
                       .reshape(2, 5, 16) + 0.105131256516992)


def test_mean_error_correction_brings_a_biased_sae_back_to_plain_clip(tiny):
    from pipeline.sae import mean_error

    layer = 1
    offset_D = 0.5 + 0.2 * torch.randn(tiny.width(layer), generator=torch.Generator().manual_seed(3))  # systematic bias
    sae = _biased_sae(tiny.width(layer), layer, offset_D)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        x_BTD = splice.tap_forward(tiny.visual, images, layer)
        err_D, n = mean_error(sae, [x_BTD.reshape(-1, tiny.width(layer))])
        assert n == 4 * tiny.n_tokens(layer)
        torch.testing.assert_close(err_D, -offset_D, rtol=0, atol=1e-5)
        plain_BE = splice.finish_forward(tiny.visual, x_BTD, layer)
        none_BE = splice.spliced_features(tiny.visual, sae, layer, x_BTD)
        fixed_BE = splice.spliced_features(tiny.visual, sae, layer, x_BTD, shift_D=err_D)
    gap_none = float((none_BE - plain_BE).abs().max())
    gap_fixed = float((fixed_BE - plain_BE).abs().max())
    assert gap_none > 0.4 and gap_fixed < 1e-5, (gap_none, gap_fixed)
    cos_none = float(F.cosine_similarity(none_BE, plain_BE).min())
    assert cos_none < 0.98 and float(F.cosine_similarity(fixed_BE, plain_BE).min()) > 0.99999
