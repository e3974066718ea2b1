"""Classification heads held fixed while latents are masked: zero-shot prompts, an adapter's learned
prompts, or a linear probe on plain CLIP's embeddings.

Each returns ``(head, info)``: ``head`` maps final image embeddings ``(B, E)`` to logits
``(B, C)``; ``info`` is what ``masking.json`` records about it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cache.errors import UserError
from pipeline import maple, zeroshot
from pipeline.datasets import open_dataset, synthetic_options
from pipeline.models import LoadedModel
from pipeline.probe import LinearProbe, ProbeConfig, fit_linear_probe
from pipeline.sources import image_source

log = logging.getLogger(__name__)

TEMPLATE_CHOICES = ("auto", "openai", "world", "dataset")
Head = Callable[[torch.Tensor], torch.Tensor]


def zero_shot_head(model: LoadedModel, class_names: list[str], dataset_name: str, *, templates: str,
                   class_prompts: Path | None, cache_dir: Path | None) -> tuple[Head, dict[str, Any]]:
    """Prompt-averaged text embeddings of the class names (``templates``: one of ``TEMPLATE_CHOICES``)."""
    if templates == "auto":  # the world's prompts; else the 80 OpenAI ones (the paper's protocol)
        template_set = "world" if dataset_name == "synthetic" else "openai"
    elif templates == "dataset":  # the dataset's own prompts where the literature has them
        template_set = dataset_name if dataset_name in zeroshot.DATASET_TEMPLATES else "openai"
    else:
        template_set = templates
    names = zeroshot.read_class_prompts(class_prompts, class_names)
    W_CE = zeroshot.cached_text_classifier(model, names, zeroshot.TEMPLATE_SETS[template_set], cache_dir=cache_dir)
    info = {"kind": "zeroshot", "templates": template_set,
            "n_templates": len(zeroshot.TEMPLATE_SETS[template_set]), "prompt_names": names,
            "logits": "100 x cosine(image embedding, prompt-averaged class embedding)"}
    return (lambda f: zeroshot.zero_shot_logits(f, W_CE)), info


def adapted_head(adapter_dir: Path, adapted: maple.AdaptedCLIP, class_names: list[str]) -> tuple[Head, dict[str, Any]]:
    """The adapted model's own classifier: its learned prompt per class (templates do not apply)."""
    record = maple.read_adapter_config(adapter_dir)
    trained_on = list(record["class_names"])
    if trained_on != list(class_names):
        raise UserError(f"the adapter in {adapter_dir} was trained on other classes ({len(trained_on)}: "
                        f"{trained_on[0]}, ...) than these ({len(class_names)}: {class_names[0]}, ...); mask it on "
                        "its dataset")
    names = list(record["prompt_names"])
    with torch.inference_mode():
        W_CE = adapted.encode_text(names, normalize=True).float()
    info = {"kind": "zeroshot", "templates": "the adapter's learned MaPLe prompt", "prompt_names": names,
            "logits": "100 x cosine(adapted image embedding, adapted class embedding)"}
    return (lambda f: zeroshot.zero_shot_logits(f, W_CE)), info


def probe_head(model: LoadedModel, adapted: maple.AdaptedCLIP | None, data: dict[str, Any],
               features: dict[int, torch.Tensor], labels: np.ndarray, probe_rows: np.ndarray, same_split: bool,
               class_names: list[str], *, probe_split: str | None, probe_images: int, probe_l2: float,
               batch_size: int, tail_rows: int, workers: int) -> tuple[LinearProbe, dict[str, Any]]:
    """A linear probe on plain CLIP's embeddings: of ``probe_rows`` (``same_split``, their ``features``
    computed already), or of ``probe_images`` images of ``probe_split`` of the dataset ``data`` names."""
    n_classes = len(class_names)
    if same_split:
        rows = [r for r in probe_rows.tolist() if r in features]
        x = torch.stack([features[r] for r in rows])
        y = torch.from_numpy(labels[rows])
        split = data["split"]
    else:
        if data["dataset"] is None:
            raise UserError("--probe-split needs --dataset and --root to read the probe's images")
        probe_set = open_dataset(data["dataset"], root=data["root"], split=probe_split,
                                 transform=model.preprocess, limit=probe_images, seed=data["seed"],
                                 image_size=model.image_size, **synthetic_options(data.get("world")))
        if probe_set.class_names != class_names:
            raise UserError(f"probe split '{probe_split}' has other classes than the evaluation split; "
                            "pick a split of the same dataset")
        src = image_source(probe_set, model, adapted, 0, workers)
        xs, ys = [], []
        for batch, feats in src.plain_features(model, np.arange(src.n_rows), batch_size, tail_rows):
            xs.append(feats.float().cpu())
            ys.append(torch.from_numpy(batch.labels))
        if not xs:
            raise UserError(f"no readable images in probe split '{probe_split}'")
        x, y = torch.cat(xs), torch.cat(ys)
        split = probe_set.split
    probe = fit_linear_probe(x, y, n_classes, ProbeConfig(l2=probe_l2))
    log.info("linear probe fit on %d images of split '%s' (train accuracy %.4f)", probe.n_train, split,
             probe.train_accuracy)
    info = {"kind": "probe", "split": split, "n_train": probe.n_train, "train_accuracy": probe.train_accuracy,
            "held_out_from_evaluation": same_split, "l2": probe_l2,
            "features": "plain CLIP final image embeddings, L2-normalised then standardised",
            "fit": "multinomial logistic regression, full-batch L-BFGS from zero, float64"}
    return probe, info
