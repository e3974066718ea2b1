"""ConvNeXt towers: the tap equals the trunk's own stage outputs, the splice with nothing replaced
equals open_clip's features and logits, a hand-made splice in a hook on the stage equals ours, and a
tower we cannot tap is refused by name."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from app.cli import main
from cache.errors import UserError
from pipeline import splice
from pipeline.models import load_model
from pipeline.towers import tower_of
from tests.helpers import assert_one_line_error
from tests.pipeline.test_splice import _random_sae

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def convnext():
    return load_model("tiny-convnext-clip", "none", device="cpu")


def _stage_outputs(lm, images):
    """Every stage's output as the trunk computes it in open_clip's own encode_image (forward hooks)."""
    seen = {}
    handles = [stage.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.clone()))
               for i, stage in enumerate(lm.visual.trunk.stages)]
    try:
        features = lm.model.encode_image(images)
    finally:
        for h in handles:
            h.remove()
    return seen, features


def test_layers_shapes_and_layout(convnext):
    tower = convnext.tower
    assert tower.kind == "convnext" and convnext.n_blocks == 4 and convnext.n_prefix_tokens() == 0
    assert [convnext.grid(i) for i in range(4)] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [convnext.width(i) for i in range(4)] == [64, 128, 256, 512]
    layout = convnext.token_layout(0)
    assert layout["n_tokens"] == 64 and layout["class_token_index"] is None and layout["patch_grid"] == [8, 8]
    with pytest.raises(UserError, match="differ in shape"):
        convnext.check_layers((1, 2))
    with pytest.raises(UserError, match="stages 0..3"):
        convnext.check_layers((4,))


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_tiny_convnext_parity(convnext, layer):
    lm = convnext
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(layer))
    d = lm.width(layer)
    sae = _random_sae(d, 4 * d, layer, norm_scale=1.3)
    with torch.inference_mode():
        maps, ref_BE = _stage_outputs(lm, images)
        x_BTD = lm.tap(images, (layer,))[layer]
        b, c, h, w = maps[layer].shape
        assert x_BTD.shape == (3, h * w, c) == (3, lm.n_tokens(layer), d)
        # token r * W + col is the map's row r, column col
        torch.testing.assert_close(x_BTD, maps[layer].permute(0, 2, 3, 1).reshape(b, h * w, c), rtol=0, atol=0)
        r, col = h - 1, w // 2
        torch.testing.assert_close(x_BTD[:, r * w + col], maps[layer][:, :, r, col], rtol=0, atol=0)
        torch.testing.assert_close(splice.tap_forward(lm.visual, images, layer), x_BTD, rtol=0, atol=0)
        # nothing replaced (error term): open_clip's own features and logits
        ours_BE = splice.spliced_features(lm.visual, sae, layer, x_BTD, error_term=True)
        torch.testing.assert_close(ours_BE, ref_BE)
        text = open_clip.get_tokenizer(lm.name)(["a photo of a red circle.", "a photo of a blue ring."])
        unit_image_BE, unit_text_CE, scale = lm.model(images, text)
        torch.testing.assert_close(scale * F.normalize(ours_BE, dim=-1) @ unit_text_CE.T,
                                   scale * unit_image_BE @ unit_text_CE.T)
        # without the error term: decode(encode(tokens)) put back into the map by hand, in a hook on the stage
        def hand(module, args, out):
            tokens = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
            return sae.decode(sae.encode(tokens)).reshape(out.shape[0], out.shape[2], out.shape[3], -1).permute(
                0, 3, 1, 2)

        handle = lm.visual.trunk.stages[layer].register_forward_hook(hand)
        try:
            hand_BE = lm.model.encode_image(images)
        finally:
            handle.remove()
        ours_BE = splice.spliced_features(lm.visual, sae, layer, x_BTD, error_term=False)
        torch.testing.assert_close(ours_BE, hand_BE)
        assert not torch.allclose(hand_BE, ref_BE, atol=1e-3)


def test_a_timm_vit_tower_is_refused_by_name(tmp_path):
    lm = load_model("ViT-B-16-SigLIP", "none", device="cpu")
    with pytest.raises(UserError, match="timm VisionTransformer trunk"):
        tower_of(lm.visual)
    result = CliRunner().invoke(main, ["extract", "--dataset", "synthetic", "--limit", "4", "--model",
                                       "ViT-B-16-SigLIP", "--pretrained", "none", "--layers", "1", "--out",
                                       str(tmp_path / "store"), "--device", "cpu"])
    assert_one_line_error(result.exit_code, result.output, "VisionTransformer trunk", "convnext")
    assert not (tmp_path / "store").exists()
