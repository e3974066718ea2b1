"""MaPLe on a tiny ConvNeXt CLIP (pipeline/maple.py, stage offsets): with no prompts or zero couplings it is the
base model, a hand-made forward with the offsets in hooks on open_clip's own forward equals ours, taps keep the
base layout, gradients reach only the prompts, the files round-trip, and adapters of the other tower are refused."""

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
MODEL = "tiny-convnext-clip"


@pytest.fixture(scope="module")
def base():
    return load_model(MODEL, "none", init_seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer(MODEL)


def _images(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _adapted(base, tokenizer, *, couple: bool = True, **config) -> maple.AdaptedCLIP:
    """Fresh prompts; ``couple`` gives the couplings (zero at init) random values so the offsets are not zero."""
    cfg = maple.MapleConfig(**{"n_ctx": 2, "depth": 2, **config})
    prompts = maple.new_prompts(cfg, base.model, tokenizer, seed=1)
    if couple:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            for linear in prompts.stage_offsets:
                linear.weight.normal_(std=0.5)
                linear.bias.normal_(std=0.5)
    return maple.AdaptedCLIP(base.model, tokenizer, prompts, cfg)


def _open_clip_logits(base, tokenizer, template: str, images: torch.Tensor) -> torch.Tensor:
    W_CE = zeroshot.text_classifier(base.model, tokenizer, NAMES, [template], "cpu")
    return base.model.logit_scale.exp() * F.normalize(base.model.encode_image(images), dim=-1) @ W_CE.T


@pytest.mark.parametrize("n_ctx, depth", [(0, 2), (2, 1), (2, 2)])
def test_no_prompts_or_zero_couplings_give_the_base_model(base, tokenizer, n_ctx, depth):
    """n_ctx 0: nothing is prompted; n_ctx 2 as initialised: the couplings are zero, so the image tower is the base
    model's, and with depth 1 the text prompt is ctx_init's own tokens (deeper text prompts start random, as
    MaPLe's)."""
    adapted = _adapted(base, tokenizer, n_ctx=n_ctx, depth=depth, couple=False)
    images = _images()
    with torch.inference_mode():
        assert torch.equal(adapted.encode_image(images), base.model.encode_image(images))
        taps, base_taps = adapted.tap(images, (0, 1, 3)), base.tap(images, (0, 1, 3))
        assert all(torch.equal(taps[layer], base_taps[layer]) for layer in (0, 1, 3))
        if n_ctx == 0 or depth == 1:
            torch.testing.assert_close(adapted.logits(images, adapted.encode_text(NAMES)),
                                       _open_clip_logits(base, tokenizer, adapted.config.template, images), rtol=0,
                                       atol=1e-5)
    if n_ctx:
        assert all(not p.weight.any() and not p.bias.any() for p in adapted.prompts.stage_offsets)


def test_the_offsets_equal_a_hand_made_forward_in_hooks_on_open_clips_own(base, tokenizer):
    """Reference: open_clip's encode_image with a pre-hook on stage i's blocks adding W_i · mean(text prompt i) + b_i
    at every position; every stage's output seen by forward hooks is the tap, and the features are ours."""
    adapted = _adapted(base, tokenizer)
    p = adapted.prompts
    with torch.no_grad():
        offsets = [p.stage_offsets[0].weight @ p.ctx.mean(0) + p.stage_offsets[0].bias,
                   p.stage_offsets[1].weight @ p.compound_prompts_text[0].mean(0) + p.stage_offsets[1].bias]
    assert [o.shape[0] for o in offsets] == [64, 128] and all(o.abs().sum() > 1 for o in offsets)
    stages = base.visual.trunk.stages
    seen = {}
    hooks = [stages[i].blocks.register_forward_pre_hook(lambda m, a, i=i: (a[0] + offsets[i][:, None, None],))
             for i in range(2)]
    hooks += [stage.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.clone()))
              for i, stage in enumerate(stages)]
    images = _images()
    try:
        with torch.no_grad():
            reference_BE = base.model.encode_image(images)
    finally:
        for h in hooks:
            h.remove()
    with torch.inference_mode():
        torch.testing.assert_close(adapted.encode_image(images), reference_BE, rtol=0, atol=1e-5)
        assert not torch.allclose(base.model.encode_image(images), reference_BE, atol=1e-3)  # the offsets matter
        taps = adapted.tap_with_prompts(images, (0, 1, 2, 3))
        for layer, (x_BTD, prompts_BXD) in taps.items():
            h, w = base.grid(layer)
            expected = seen[layer].permute(0, 2, 3, 1).reshape(5, h * w, base.width(layer))
            torch.testing.assert_close(x_BTD, expected, rtol=0, atol=1e-5)
            assert prompts_BXD.shape == (5, 0, base.width(layer))
            torch.testing.assert_close(adapted.finish(x_BTD, prompts_BXD, layer), reference_BE, rtol=0, atol=1e-5)


def test_only_the_prompt_parameters_receive_gradients(base, tokenizer):
    adapted = _adapted(base, tokenizer, couple=False)  # from the initial zero couplings
    loss = F.cross_entropy(adapted.logits(_images(), adapted.encode_text(NAMES)), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    with_grad = {name for name, p in adapted.prompts.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"ctx", "compound_prompts_text.0", "stage_offsets.0.weight", "stage_offsets.0.bias",
                         "stage_offsets.1.weight", "stage_offsets.1.bias"}
    assert all(p.grad is None and not p.requires_grad for p in base.model.parameters())


def test_taps_have_the_base_layout_and_prompt_tokens_cannot_be_kept(base, tokenizer):
    adapted = _adapted(base, tokenizer)
    assert adapted.method == "maple-stage-offsets"
    assert adapted.token_layout(1, keep_prompts=False) == base.token_layout(1)
    for refused in (lambda: adapted.token_layout(1, keep_prompts=True),
                    lambda: adapted.tap(_images(2), (1,), keep_prompts=True)):
        with pytest.raises(UserError) as err:
            refused()
        assert str(err.value) == maple.KEEP_REFUSED and "\n" not in str(err.value)


def test_depth_must_fit_the_text_blocks_and_the_stages(base, tokenizer):
    with pytest.raises(UserError) as err:
        _adapted(base, tokenizer, depth=3)
    assert str(err.value) == ("prompt depth 3 exceeds the model's towers (2 text and 4 vision stages); "
                              "use --depth 2 or less")


def test_prompts_file_round_trips_and_names_its_method(base, tokenizer, tmp_path):
    prompts = _adapted(base, tokenizer).prompts
    maple.save_prompts(tmp_path / "prompts.safetensors", prompts)
    loaded = maple.prompts_from_state(maple.read_prompts_file(tmp_path / "prompts.safetensors"), tmp_path)
    assert isinstance(loaded, maple.StageOffsetPrompts) and (loaded.n_ctx, loaded.depth) == (2, 2)
    assert loaded.vision_widths == (64, 128)
    assert all(torch.equal(a, b) for a, b in zip(prompts.state_dict().values(), loaded.state_dict().values()))


def test_prompts_of_the_other_tower_are_refused_by_name(base, tokenizer):
    vit = load_model("tiny-clip", "none")
    cfg = maple.MapleConfig(n_ctx=2, depth=2)
    vit_prompts = maple.new_prompts(cfg, vit.model, open_clip.get_tokenizer("tiny-clip"), seed=0)
    with pytest.raises(UserError) as err:
        maple.AdaptedCLIP(base.model, tokenizer, vit_prompts, cfg)
    assert str(err.value).startswith("the prompts are maple prompts (vision prompt tokens, for a ViT), and this "
                                     "model's image tower is a ConvNeXt, which takes maple-stage-offsets prompts")
    convnext_prompts = maple.new_prompts(cfg, base.model, tokenizer, seed=0)
    with pytest.raises(UserError, match=r"are maple-stage-offsets prompts \(per-stage channel offsets, for a "
                                        r"ConvNeXt\), and this model's image tower is a ViT, which takes maple"):
        maple.AdaptedCLIP(vit.model, open_clip.get_tokenizer("tiny-clip"), convnext_prompts, cfg)
