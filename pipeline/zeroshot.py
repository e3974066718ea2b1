"""Zero-shot classification with a CLIP text tower: prompt-ensembled class embeddings.

Shape letters as in CONTRIBUTING.md; E is the joint image–text embedding width
(``embed_dim`` of the open_clip config; 512 for ViT-B-16, 128 for tiny-clip).

Classifier (SCIENCE.md): for each class, every template is filled with the class name and
encoded by the text tower; each prompt embedding is L2-normalised, the class's embeddings
are averaged, and the mean is L2-normalised again.  Stacking the classes gives ``W_CE``;
logits are ``100 × cosine(image embedding, class embedding)``, the scale CLIP uses.

Templates are format strings with one ``{}`` for the class name.

Classifier cache: ``cached_text_classifier`` stores ``W_CE`` under ``cache_dir`` in a file
named after the sha256 of its key (model name, weights — checkpoint sha256 or pretrained
tag —, dtype, class names, templates).  Randomly initialised models (``pretrained='none'``)
are never cached: their weights depend on an init seed the key cannot see.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cache.atomic import atomic_write
from cache.errors import UserError
from pipeline import scores
from pipeline.models import DTYPES, LoadedModel  # importing registers pipeline/model_configs

log = logging.getLogger(__name__)

LOGIT_SCALE = 100.0  # logits = LOGIT_SCALE × cosine, as in CLIP's zero-shot evaluation
CACHE_VERSION = 1  # part of the cache key; bump when the classifier computation changes

# The 80 prompt templates OpenAI used for ImageNet zero-shot (CLIP paper, prompt engineering
# notebook), in their order.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.',
    'a photo of the hard to see {}.', 'a low resolution photo of the {}.', 'a rendering of a {}.',
    'graffiti of a {}.', 'a bad photo of the {}.', 'a cropped photo of the {}.',
    'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.',
    'a dark photo of the {}.', 'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.',
    'a photo of the cool {}.', 'a close-up photo of a {}.', 'a black and white photo of the {}.',
    'a painting of the {}.', 'a painting of a {}.', 'a pixelated photo of the {}.',
    'a sculpture of the {}.', 'a bright photo of the {}.', 'a cropped photo of a {}.',
    'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.',
    'a rendering of the {}.', 'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.',
    'a close-up photo of the {}.', 'a photo of a {}.', 'the origami {}.',
    'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.', 'a origami {}.',
    'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.',
    'a photo of a nice {}.', 'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.',
    'art of a {}.', 'a sketch of the {}.', 'a embroidered {}.', 'a pixelated photo of a {}.',
    'itap of the {}.', 'a jpeg corrupted photo of the {}.', 'a good photo of a {}.',
    'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.',
    'a dark photo of a {}.', 'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.',
    'a photo of a cool {}.', 'a photo of a small {}.', 'a tattoo of the {}.',
)

# Prompts for the synthetic world's class names ("red circle", ...).  Training captions read
# "a photo of a small red circle on a grey background with stripes"; these keep the
# "a photo of a" opening and drop the attributes the class does not fix.
WORLD_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "an image of a {}.")

# Datasets whose literature uses their own prompts (CoOp's single templates).
DATASET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "eurosat": ("a centered satellite photo of {}.",),
    "dtd": ("{} texture.",),
    "fgvcaircraft": ("a photo of a {}, a type of aircraft.",),
    "flowers102": ("a photo of a {}, a type of flower.",),
    "food101": ("a photo of {}, a type of food.",),
    "oxfordpets": ("a photo of a {}, a type of pet.",),
    "ucf101": ("a photo of a person doing {}.",),
}

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"openai": OPENAI_IMAGENET_TEMPLATES, "world": WORLD_TEMPLATES,
                                             **DATASET_TEMPLATES}


def _check_templates(templates: Sequence[str]) -> None:
    if isinstance(templates, str) or not templates:
        raise UserError("templates must be a non-empty list of prompt strings with one '{}', e.g. ['a photo of a {}.']")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise UserError(f"template {bad[0]!r} must contain exactly one '{{}}' for the class name")


@torch.inference_mode()
def text_classifier(model: Any, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str],
                    device: str | torch.device, *, batch_size: int = 256) -> torch.Tensor:
    """Unit-norm class embeddings ``W_CE`` (float32, on ``device``), one row per class name.

    ``model`` is an open_clip CLIP (anything with ``encode_text``); ``tokenizer`` maps a
    list of strings to token ids (``open_clip.get_tokenizer(name)``).  Per class: encode
    every filled template, L2-normalise each, average, L2-normalise the mean.
    """
    if not class_names:
        raise UserError("no class names given for the zero-shot classifier")
    _check_templates(templates)
    prompts = [template.format(name) for name in class_names for template in templates]
    rows = []
    for start in range(0, len(prompts), batch_size):
        tokens_BQ = tokenizer(prompts[start:start + batch_size]).to(device)
        rows.append(F.normalize(model.encode_text(tokens_BQ).float(), dim=-1))
    per_template = torch.cat(rows).reshape(len(class_names), len(templates), -1)  # (C, templates, E)
    return F.normalize(per_template.mean(dim=1), dim=-1)


def read_class_prompts(path: str | os.PathLike | None, class_names: Sequence[str]) -> list[str]:
    """The names to put in the prompts: ``class_names``, or those of a JSON file.

    The file is a list of C names in label order, or ``{class name: prompt name}`` (e.g.
    EuroSAT's "AnnualCrop" → "annual crop land", CoOp's names).
    """
    if path is None:
        return list(class_names)
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read --class-prompts {path} ({err}); give a JSON list of names") from None
    if isinstance(raw, dict):
        missing = [c for c in class_names if c not in raw]
        if missing:
            raise UserError(f"--class-prompts {path} has no name for class '{missing[0]}'")
        return [str(raw[c]) for c in class_names]
    if not isinstance(raw, list) or len(raw) != len(class_names):
        raise UserError(f"--class-prompts {path} must list {len(class_names)} names (one per class)")
    return [str(n) for n in raw]


def zero_shot_logits(image_features_BE: torch.Tensor, W_CE: torch.Tensor) -> torch.Tensor:
    """``100 × cosine`` between each image embedding and each class embedding: (B, C), float32."""
    image_BE = F.normalize(image_features_BE.float(), dim=-1)
    return LOGIT_SCALE * image_BE @ F.normalize(W_CE.float(), dim=-1).T


def classifier_key(model: LoadedModel, class_names: Sequence[str], templates: Sequence[str]) -> dict[str, Any] | None:
    """What identifies a classifier, as a JSON-able dict; None when the weights cannot be named."""
    if model.checkpoint_sha256 is None and model.pretrained.lower() == "none":
        return None
    return {"cache_version": CACHE_VERSION, "model": model.name,
            "weights": model.checkpoint_sha256 or model.pretrained, "dtype": model.dtype,
            "class_names": list(class_names), "templates": list(templates)}


def classifier_path(cache_dir: str | os.PathLike, key: dict[str, Any]) -> Path:
    """``cache_dir/zeroshot-<sha256 of the key's canonical JSON>.pt``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"zeroshot-{digest}.pt"


def cached_text_classifier(model: LoadedModel, class_names: Sequence[str], templates: Sequence[str], *,
                           cache_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """``text_classifier`` of a loaded model, read from / written to ``cache_dir`` when given.

    A stored file whose recorded key differs from the requested one (never expected) is
    recomputed and replaced.  Returns float32 ``W_CE`` on the model's device.
    """
    _check_templates(templates)
    key = classifier_key(model, class_names, templates) if cache_dir is not None else None
    path = classifier_path(cache_dir, key) if key is not None else None
    if path is not None and path.is_file():
        record = torch.load(path, map_location="cpu", weights_only=True)
        if record.get("key") == key:
            log.debug("zero-shot classifier read from %s", path)
            return record["W_CE"].to(model.device)
        log.warning("zero-shot cache file %s holds another key; recomputing it", path)
    tokenizer = open_clip.get_tokenizer(model.name)
    W_CE = text_classifier(model.model, tokenizer, class_names, templates, model.device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"key": key, "W_CE": W_CE.cpu()}
        atomic_write(path, lambda tmp: torch.save(record, tmp))
        log.debug("zero-shot classifier written to %s", path)
    return W_CE


@torch.inference_mode()
def zero_shot_scores(model: LoadedModel, dataset: Dataset, class_names: Sequence[str],
                     templates: Sequence[str], batch_size: int = 256, *,
                     cache_dir: str | os.PathLike | None = None, workers: int = 0) -> dict[str, float]:
    """Top-1 ``accuracy`` and ``mean_recall`` (per class, then averaged; fractions in [0, 1]) of the
    zero-shot classifier on ``dataset``.

    ``dataset[i]`` must give ``(preprocessed image (R, H, W), label)`` with labels indexing
    ``class_names`` (e.g. a ``SyntheticWorld`` with ``transform=model.preprocess``).
    """
    if len(dataset) == 0:
        raise UserError("zero-shot evaluation needs at least one image")
    W_CE = cached_text_classifier(model, class_names, templates, cache_dir=cache_dir)
    correct_C = np.zeros(len(class_names), np.int64)
    totals_C = np.zeros(len(class_names), np.int64)
    for images_BRHW, labels_B in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        features_BE = model.model.encode_image(images_BRHW.to(model.device, DTYPES[model.dtype]))
        predicted_B = zero_shot_logits(features_BE, W_CE).argmax(dim=-1).cpu()
        correct_b, totals_b = scores.class_counts(predicted_B.numpy(), labels_B.numpy(), len(class_names))
        correct_C += correct_b
        totals_C += totals_b
    return {"accuracy": scores.accuracy(correct_C, totals_C), "mean_recall": scores.mean_recall(correct_C, totals_C)}


def warn_if_world_differs(pretrained: str, dataset: str, seed: int, image_size: int) -> bool:
    """Warn when zero-shot on the synthetic world uses a model pretrained on another world.

    A checkpoint of ``pipeline pretrain`` sits beside the config.json that records its world;
    a different seed, image size or renderer means the prompts may name concepts the model
    never saw. (Held-out values follow the model's world: datasets take them from it.)
    Returns whether it warned.
    """
    from pipeline.world import WorldConfig, pretraining_world

    trained = pretraining_world(pretrained) if dataset == "synthetic" else None
    if trained is None:
        return False
    ours = WorldConfig(seed=seed, image_size=image_size).to_dict()
    differ = [k for k in sorted(set(trained) | set(ours))
              if k not in ("task", "held_out") and trained.get(k) != ours.get(k)]
    if differ:
        log.warning("zero-shot on a synthetic world that differs from the one %s was pretrained on (%s); "
                    "its prompts may name concepts it never saw: extract with the pretraining world's settings",
                    pretrained, ", ".join(f"{k} {trained.get(k)!r} there, {ours.get(k)!r} here" for k in differ))
    return bool(differ)

