"""Classification scores reported side by side: micro accuracy and mean per-class recall.

Micro accuracy is the fraction of images classified correctly; it weighs classes by their
number of images. Mean per-class recall (balanced accuracy) is the mean over classes of the
fraction of that class's images classified correctly, so every class weighs the same; on a
balanced evaluation set the two are equal. Classes without images are left out of the mean.
"""

from __future__ import annotations

import numpy as np


def class_counts(pred_N: np.ndarray, labels_N: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, images) per true class, ``(C,)`` int64 each."""
    labels_N = np.asarray(labels_N, np.int64)
    totals_C = np.bincount(labels_N, minlength=n_classes).astype(np.int64)
    correct_C = np.bincount(labels_N[np.asarray(pred_N) == labels_N], minlength=n_classes).astype(np.int64)
    return correct_C, totals_C


def accuracy(correct_C: np.ndarray, totals_C: np.ndarray) -> float:
    """Micro accuracy: correct images over images."""
    return float(np.sum(correct_C) / np.sum(totals_C))


def mean_recall(correct_C: np.ndarray, totals_C: np.ndarray) -> float:
    """Mean over the classes with images of (correct / images of the class)."""
    totals_C = np.asarray(totals_C)
    seen = totals_C > 0
    return float(np.mean(np.asarray(correct_C)[seen] / totals_C[seen]))
