"""MaPLe on a tiny open_clip CLIP: no prompts = the base model, where prompts go, gradients, files."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from cache.errors import UserError
from pipeline import maple, zeroshot
from pipeline.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["red circle", "blue square", "green ring"]


@pytest.fixture(scope="module")
def base():
    return load_model("tiny-clip", "none", init_seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("tiny-clip")


def _images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _adapted(base, tokenizer, **config) -> maple.AdaptedCLIP:
    cfg = maple.MapleConfig(**{"n_ctx": 2, "depth": 2, **config})
    return maple.AdaptedCLIP(base.model, tokenizer, maple.new_prompts(cfg, base.model, tokenizer, seed=1), cfg)


@pytest.mark.parametrize("ctx_init", ["a photo of a", None])
def test_without_prompts_the_adapted_model_is_the_base_model(base, tokenizer, ctx_init):
    adapted = _adapted(base, tokenizer, n_ctx=0, depth=2, ctx_init=ctx_init)
    images = _images()
    with torch.inference_mode():
        W_CE = zeroshot.text_classifier(base.model, tokenizer, NAMES, [adapted.config.template], "cpu")
        base_logits = base.model.logit_scale.exp() * F.normalize(base.model.encode_image(images), dim=-1) @ W_CE.T
        logits = adapted.logits(images, adapted.encode_text(NAMES))
        torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-5)
        assert torch.equal(adapted.encode_image(images), base.model.encode_image(images))
        taps, base_taps = adapted.tap(images, (1, 3)), base.tap(images, (1, 3))
        assert all(torch.equal(taps[layer], base_taps[layer]) for layer in (1, 3))


def test_only_the_prompt_parameters_receive_gradients(base, tokenizer):
    adapted = _adapted(base, tokenizer)
    loss = F.cross_entropy(adapted.logits(_images(), adapted.encode_text(NAMES)), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    with_grad = {name for name, p in adapted.prompts.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"ctx", "proj.weight", "proj.bias", "compound_prompts_text.0",
                         "compound_prompt_projections.0.weight", "compound_prompt_projections.0.bias"}
    assert all(p.grad is None and not p.requires_grad for p in base.model.parameters())


def test_prompts_sit_where_maple_puts_them(base, tokenizer):
    """Layer 0: ctx after SOS (text), proj(ctx) after the patches (vision); block 1's input holds the deep
    text prompt at the context positions and its coupled projection as the last vision tokens."""
    adapted = _adapted(base, tokenizer)
    p = adapted.prompts
    seen = {}
    hooks = [base.model.transformer.resblocks[1].register_forward_pre_hook(lambda m, a: seen.update(text=a[0])),
             base.model.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: seen.update(v0=a[0])),
             base.model.visual.transformer.resblocks[1].register_forward_pre_hook(lambda m, a: seen.update(v1=a[0]))]
    try:
        with torch.no_grad():
            adapted.encode_text(NAMES)
            adapted.encode_image(_images(2))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        assert torch.equal(seen["text"][:, 1:3], p.compound_prompts_text[0].expand(3, -1, -1))
        coupled = p.compound_prompt_projections[0](p.compound_prompts_text[0])
        assert torch.equal(seen["v1"][:, -2:], coupled.expand(2, -1, -1))
        assert seen["v0"].shape[1] == base.n_tokens(0) + 2  # class + 64 patches + 2 prompts
        ln_pre_of_prompts = base.model.visual.ln_pre(p.proj(p.ctx))  # ln_pre is per token
        torch.testing.assert_close(seen["v0"][0, -2:], ln_pre_of_prompts, rtol=0, atol=1e-6)


def test_ctx_starts_from_the_init_phrase_tokens(base, tokenizer):
    adapted = _adapted(base, tokenizer, ctx_init="a photo of a")
    with torch.no_grad():
        words = base.model.token_embedding(tokenizer(["a photo"]))[0, 1:3]
    assert torch.equal(adapted.prompts.ctx.data, words)
    assert adapted.config.template == "a photo of a {}."
    assert maple.MapleConfig(n_ctx=2, ctx_init=None).template == "X X {}."


def test_taps_keep_the_base_layout_and_finish_equals_the_forward(base, tokenizer):
    adapted = _adapted(base, tokenizer)
    images = _images(4)
    with torch.inference_mode():
        taps = adapted.tap(images, (0, 2))
        assert taps[2].shape == base.tap(images, (2,))[2].shape == (4, base.n_tokens(2), base.width(2))
        assert not torch.allclose(taps[2], base.tap(images, (2,))[2], atol=1e-3)  # the prompts change the residuals
        (x_BTD, prompts_BXD), = adapted.tap_with_prompts(images, (0,)).values()
        assert torch.equal(x_BTD, taps[0]) and prompts_BXD.shape == (4, 2, base.width(0))
        torch.testing.assert_close(adapted.finish(x_BTD, prompts_BXD, 0), adapted.encode_image(images), rtol=0,
                                   atol=1e-5)


def test_prompt_depth_beyond_the_towers_is_refused(base, tokenizer):
    with pytest.raises(UserError) as err:
        _adapted(base, tokenizer, depth=3)
    assert str(err.value) == ("prompt depth 3 exceeds the model's towers (2 text and 4 vision blocks); "
                              "use --depth 2 or less")


def test_our_file_and_the_official_checkpoint_layout_load_the_same_prompts(base, tokenizer, tmp_path):
    prompts = _adapted(base, tokenizer).prompts
    maple.save_prompts(tmp_path / "prompts.safetensors", prompts)
    official = {"state_dict": {**{f"prompt_learner.{k}": v.half() for k, v in prompts.state_dict().items()},
                               "prompt_learner.token_prefix": torch.zeros(3, 1, 128),
                               "prompt_learner.token_suffix": torch.zeros(3, 29, 128)},
                "epoch": 5}
    torch.save(official, tmp_path / "model.pth.tar-5")
    torch.save(prompts.state_dict(), tmp_path / "prompts.pt")
    ours = maple.prompts_from_state(maple.read_prompts_file(tmp_path / "prompts.safetensors"), tmp_path)
    plain = maple.prompts_from_state(maple.read_prompts_file(tmp_path / "prompts.pt"), tmp_path)
    theirs = maple.prompts_from_state(maple.read_prompts_file(tmp_path / "model.pth.tar-5"), tmp_path)
    for (name, a), (_, b), (_, c), (_, d) in zip(prompts.state_dict().items(), ours.state_dict().items(),
                                                 theirs.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b) and torch.equal(a, d), name
        assert torch.equal(a.half().float(), c), name
    assert (theirs.n_ctx, theirs.depth) == (2, 2)


def test_prompts_of_another_width_are_refused(base, tokenizer):
    wide = maple.MaplePrompts(2, 9, 512, (768,))  # the official ViT-B/16 shapes
    with pytest.raises(UserError) as err:
        maple.AdaptedCLIP(base.model, tokenizer, wide, maple.MapleConfig(n_ctx=2, depth=2))
    assert "n_ctx 2 and depth 9" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:
        maple.AdaptedCLIP(base.model, tokenizer, maple.MaplePrompts(2, 2, 512, (768,)), maple.MapleConfig(depth=2))
    assert "widths 512 (text) / 768 (vision), the model has 128 / 128" in str(err.value)
