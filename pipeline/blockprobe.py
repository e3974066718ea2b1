"""Which attribute values a model's blocks encode linearly: a probe on raw activations, per block.

The SAE's ground truth (``pipeline.groundtruth``) asks whether some latent detects a value. A value
no latent detects is either the SAE's miss or the model's: this module says which, by fitting a
linear probe for each attribute on the block's own activations. Definitions:

- Features of an image at a block: the class token (when the layout has one), the mean of the
  patch tokens, their per-dimension maximum, and the mean of each quadrant of the patch grid
  (top-left, top-right, bottom-left, bottom-right; a middle row or column counts as bottom or
  right, as the ground truth's positions do), concatenated. The maximum mirrors the ground
  truth's image score (a latent's maximum over patches): a small object moves few patches, which
  the mean dilutes and the maximum keeps. Without the quadrants no linear probe could read
  position, which whole-image pooling erases.
- Probe: ``pipeline.probe``'s multinomial logistic regression (features L2-normalised and
  standardised, L2 weight ``l2``, full-batch L-BFGS), one per attribute, fitted on the training
  images (a seeded share ``train_fraction`` of the valid images) and scored on the rest.
- Accuracy of an attribute: the share of test images whose value the probe predicts; chance: the
  share of the most common value among them.
- AUROC of a value: the probability that the probe's softmax probability of v is higher on a
  random test image with v than on one without (ties count one half). A value is *readable* at a
  block when its AUROC reaches the threshold the ground truth uses for a dedicated latent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from cache.errors import UserError
from pipeline.groundtruth import ATTRIBUTE_VALUES, auroc
from pipeline.probe import ProbeConfig, fit_linear_probe

FEATURES = ("class token", "patch mean", "patch max", "top-left mean", "top-right mean", "bottom-left mean",
            "bottom-right mean")


def pooled_features(acts_NTD: np.ndarray, n_prefix: int, class_index: int | None, patches: slice,
                    grid_hw: tuple[int, int]) -> np.ndarray:
    """``(N, F)`` float32 image features of one block (see the module docstring): the class token if
    any, then the mean and the maximum over the patch tokens (row-major on ``grid_hw``), then the
    mean of each quadrant."""
    patch_NPD = acts_NTD[:, patches].astype(np.float32)
    h, w = grid_hw
    grid_NHWD = patch_NPD.reshape(len(patch_NPD), h, w, -1)
    quadrants = [grid_NHWD[:, rows, cols].mean(axis=(1, 2))
                 for rows in (slice(0, h // 2), slice(h // 2, h)) for cols in (slice(0, w // 2), slice(w // 2, w))]
    parts = [patch_NPD.mean(axis=1), patch_NPD.max(axis=1), *quadrants]
    if class_index is not None and class_index < n_prefix:
        parts.insert(0, acts_NTD[:, class_index].astype(np.float32))
    return np.concatenate(parts, axis=1)


def split_train(n_images: int, train_fraction: float, seed: int) -> np.ndarray:
    """Boolean ``(N,)`` mask of the training images: a seeded permutation's first share."""
    n_train = round(train_fraction * n_images)
    if not 2 <= n_train <= n_images - 2:
        raise UserError(f"{n_images} images leave {n_train} to train the probe and {n_images - n_train} to test it; "
                        "each needs at least 2: use more images or another --train-fraction")
    train = np.zeros(n_images, bool)
    train[np.random.default_rng([seed, 4]).permutation(n_images)[:n_train]] = True
    return train


@dataclasses.dataclass(frozen=True)
class AttributeResult:
    """One attribute's probe at one block, scored on the test images."""

    attribute: str
    accuracy: float
    chance: float
    auroc_V: np.ndarray  # per value of ATTRIBUTE_VALUES[attribute]; NaN where the test side is one-sided


def probe_attributes(features_NF: np.ndarray, codes: Mapping[str, np.ndarray], train_N: np.ndarray,
                     config: ProbeConfig) -> list[AttributeResult]:
    """Fit and score one probe per attribute; ``codes`` gives each image's value index per attribute."""
    x = torch.from_numpy(np.ascontiguousarray(features_NF, np.float64))
    results = []
    for attribute, code_N in codes.items():
        n_values = len(ATTRIBUTE_VALUES[attribute])
        probe = fit_linear_probe(x[train_N], torch.from_numpy(code_N[train_N]), n_values, config)
        test_code = code_N[~train_N]
        prob_NV = torch.softmax(probe.logits(x[~train_N]).double(), dim=1).numpy()
        accuracy = float((prob_NV.argmax(1) == test_code).mean())
        chance = float(np.bincount(test_code, minlength=n_values).max() / len(test_code))
        auroc_V = np.array([auroc(prob_NV[:, v], test_code == v) for v in range(n_values)])
        results.append(AttributeResult(attribute, accuracy, chance, auroc_V))
    return results


def rows(layer: int, results: Sequence[AttributeResult], threshold: float) -> list[dict]:
    """One table row per attribute value: block, attribute, value, its AUROC and readability, and the
    attribute's accuracy and chance."""
    out = []
    for r in results:
        for value, score in zip(ATTRIBUTE_VALUES[r.attribute], r.auroc_V):
            out.append({"layer": layer, "attribute": r.attribute, "value": value, "auroc": score,
                        "readable": bool(score >= threshold), "accuracy": r.accuracy, "chance": r.chance})
    return out
