"""The zero-shot head: templates, prompt averaging, 100 × cosine logits, accuracy, the disk cache."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import open_clip
import pytest
import torch

from cache.errors import UserError
from pipeline import zeroshot
from pipeline.models import load_model
from pipeline.world import SyntheticWorld, WorldConfig

TINY_CLIP = "tiny-clip"


class _LookupTokenizer:
    """Maps each whole prompt to one token id (its position in ``prompts``)."""

    def __init__(self, prompts: list[str]):
        self.ids = {p: i for i, p in enumerate(prompts)}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.ids[t]] for t in texts])


class _LookupTextModel(torch.nn.Module):
    """``encode_text`` returns a fixed, unnormalised vector per prompt id."""

    def __init__(self, vectors: torch.Tensor):  # (prompt id, E)
        super().__init__()
        self.table = torch.nn.Parameter(vectors.clone(), requires_grad=False)

    def encode_text(self, tokens_BQ: torch.Tensor) -> torch.Tensor:
        return self.table[tokens_BQ[:, 0]]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny-clip saved as an open_clip pretrained file, so it has a sha256 to key on."""
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def test_openai_templates_are_the_80_of_open_clip():
    ours = zeroshot.OPENAI_IMAGENET_TEMPLATES
    assert len(ours) == 80
    assert len(set(ours)) == 80
    assert all(t.count("{}") == 1 for t in ours)
    assert list(ours) == [make("{}") for make in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert ours[0] == "a bad photo of a {}." and ours[-1] == "a tattoo of the {}."


def test_world_templates_fill_class_names():
    names = SyntheticWorld(WorldConfig(), n_images=20).class_names
    assert "red circle" in names
    prompts = [t.format("red circle") for t in zeroshot.WORLD_TEMPLATES]
    assert "a photo of a red circle." in prompts
    assert set(zeroshot.TEMPLATE_SETS) == {"openai", "world", *zeroshot.DATASET_TEMPLATES}


def test_text_classifier_matches_hand_computation():
    # 2 classes x 2 templates; prompt vectors chosen so the arithmetic is easy by hand.
    templates = ["a {}.", "the {}."]
    names = ["cat", "dog"]
    prompts = [t.format(n) for n in names for t in templates]  # a cat., the cat., a dog., the dog.
    vectors = torch.tensor([[3.0, 4.0], [0.0, 2.0], [-5.0, 0.0], [0.0, -0.5]])
    W_CE = zeroshot.text_classifier(_LookupTextModel(vectors), _LookupTokenizer(prompts), names, templates, "cpu")
    # cat: (0.6, 0.8) and (0, 1) -> mean (0.3, 0.9) -> / sqrt(0.9)
    # dog: (-1, 0) and (0, -1) -> mean (-0.5, -0.5) -> (-1/sqrt 2, -1/sqrt 2)
    expected = torch.tensor([[0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)],
                             [-1 / math.sqrt(2), -1 / math.sqrt(2)]])
    assert W_CE.dtype == torch.float32 and W_CE.shape == (2, 2)
    torch.testing.assert_close(W_CE, expected, rtol=0, atol=1e-6)


def test_text_classifier_batches_do_not_change_the_result():
    names = [f"class {c}" for c in range(5)]
    templates = list(zeroshot.OPENAI_IMAGENET_TEMPLATES[:7])
    prompts = [t.format(n) for n in names for t in templates]
    vectors = torch.randn(len(prompts), 8, generator=torch.Generator().manual_seed(1))
    model, tok = _LookupTextModel(vectors), _LookupTokenizer(prompts)
    whole = zeroshot.text_classifier(model, tok, names, templates, "cpu")
    pieces = zeroshot.text_classifier(model, tok, names, templates, "cpu", batch_size=3)
    torch.testing.assert_close(whole, pieces, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole.norm(dim=-1), torch.ones(5))


def test_text_classifier_on_a_real_tiny_clip():
    model = load_model(TINY_CLIP, "none")
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    assert tokenizer.context_length == 32  # the registered config's, not open_clip's default 77
    W_CE = zeroshot.text_classifier(model.model, tokenizer, ["red circle", "blue square", "green ring"],
                                    zeroshot.WORLD_TEMPLATES, "cpu")
    assert W_CE.shape == (3, 128)
    torch.testing.assert_close(W_CE.norm(dim=-1), torch.ones(3))
    one = zeroshot.text_classifier(model.model, tokenizer, ["blue square"], zeroshot.WORLD_TEMPLATES, "cpu")
    torch.testing.assert_close(one[0], W_CE[1], rtol=0, atol=1e-5)


def test_bad_templates_are_refused():
    model = _LookupTextModel(torch.ones(1, 2))
    with pytest.raises(UserError, match="exactly one"):
        zeroshot.text_classifier(model, _LookupTokenizer(["x"]), ["x"], ["no slot"], "cpu")
    with pytest.raises(UserError, match="non-empty list"):
        zeroshot.text_classifier(model, _LookupTokenizer(["x"]), ["x"], "a {}.", "cpu")


def test_zero_shot_logits_are_100_times_cosine():
    W_CE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    image_BE = torch.tensor([[2.0, 0.0], [0.0, -3.0], [3.0, 4.0]])
    expected = torch.tensor([[100.0, 0.0, 60.0], [0.0, -100.0, -80.0], [60.0, 80.0, 100.0]])
    torch.testing.assert_close(zeroshot.zero_shot_logits(image_BE, W_CE), expected)


def test_zero_shot_scores_match_a_manual_loop(tiny_checkpoint):
    model = load_model(TINY_CLIP, str(tiny_checkpoint))
    world = SyntheticWorld(WorldConfig(seed=3), n_images=40, split="test", transform=model.preprocess)
    names, templates = world.class_names, zeroshot.WORLD_TEMPLATES
    result = zeroshot.zero_shot_scores(model, world, names, templates, batch_size=16)
    accuracy = result["accuracy"]
    W_CE = zeroshot.text_classifier(model.model, open_clip.get_tokenizer(TINY_CLIP), names, templates, "cpu")
    with torch.inference_mode():
        images = torch.stack([world[i][0] for i in range(len(world))])
        predicted = zeroshot.zero_shot_logits(model.model.encode_image(images), W_CE).argmax(-1)
    labels = torch.tensor([world.label(i) for i in range(len(world))])
    assert accuracy == pytest.approx((predicted == labels).float().mean().item())
    assert 0.0 <= accuracy <= 1.0
    recalls = [(predicted[labels == c] == c).float().mean().item() for c in labels.unique().tolist()]
    assert result["mean_recall"] == pytest.approx(sum(recalls) / len(recalls))


def test_cache_hit_returns_identical_weights_and_miss_on_other_names(tiny_checkpoint, tmp_path, monkeypatch):
    model = load_model(TINY_CLIP, str(tiny_checkpoint))
    names, templates = ["red circle", "blue square"], zeroshot.WORLD_TEMPLATES
    first = zeroshot.cached_text_classifier(model, names, templates, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("zeroshot-*.pt"))
    assert len(files) == 1
    key = zeroshot.classifier_key(model, names, templates)
    assert key["weights"] == model.checkpoint_sha256
    assert files[0] == zeroshot.classifier_path(tmp_path, key)
    assert len(files[0].stem.removeprefix("zeroshot-")) == 64

    calls = []
    real = zeroshot.text_classifier
    monkeypatch.setattr(zeroshot, "text_classifier", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = zeroshot.cached_text_classifier(model, names, templates, cache_dir=tmp_path)
    assert calls == [] and torch.equal(first, again)

    other = zeroshot.cached_text_classifier(model, ["red circle", "green ring"], templates, cache_dir=tmp_path)
    assert calls == [1] and len(list(tmp_path.glob("zeroshot-*.pt"))) == 2
    assert torch.equal(other[0], first[0]) and not torch.equal(other[1], first[1])
    zeroshot.cached_text_classifier(model, names, templates[:1], cache_dir=tmp_path)
    assert calls == [1, 1] and len(list(tmp_path.glob("zeroshot-*.pt"))) == 3


def test_random_init_models_are_never_cached(tmp_path):
    model = load_model(TINY_CLIP, "none")
    assert zeroshot.classifier_key(model, ["a"], ["a {}."]) is None
    zeroshot.cached_text_classifier(model, ["red circle"], ["a {}."], cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_dataset_template_sets():
    from pipeline.zeroshot import DATASET_TEMPLATES, TEMPLATE_SETS

    assert TEMPLATE_SETS["eurosat"] == ("a centered satellite photo of {}.",)
    assert all("{}" in t for templates in DATASET_TEMPLATES.values() for t in templates)


def test_zero_shot_on_another_world_than_the_pretraining_one_warns(tmp_path, caplog):
    run = tmp_path / "tiny-clip"
    run.mkdir()
    (run / "model.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"world": WorldConfig(seed=0, image_size=64).to_dict()}))
    with caplog.at_level(logging.WARNING, logger="pipeline.zeroshot"):
        assert zeroshot.warn_if_world_differs(str(run / "model.pt"), "synthetic", 0, 32)
    warning = [r.getMessage() for r in caplog.records]
    assert len(warning) == 1 and "image_size 64 there, 32 here" in warning[0]
    caplog.clear()
    # held-out values follow the model (datasets read them from its config.json): no warning
    held_out = WorldConfig(seed=0, image_size=32, held_out=(("texture", "checker"),))
    (run / "config.json").write_text(json.dumps({"world": held_out.to_dict()}))
    assert not zeroshot.warn_if_world_differs(str(run / "model.pt"), "synthetic", 0, 32)
    (run / "config.json").write_text(json.dumps({"world": WorldConfig(seed=0, image_size=32, task="shape").to_dict()}))
    assert not zeroshot.warn_if_world_differs(str(run / "model.pt"), "synthetic", 0, 32)  # the task does not matter
    assert zeroshot.warn_if_world_differs(str(run / "model.pt"), "synthetic", 1, 32)  # another seed does
    assert not zeroshot.warn_if_world_differs(str(run / "model.pt"), "eurosat", 1, 32)
    assert not zeroshot.warn_if_world_differs("openai", "synthetic", 1, 32)
