"""Micro accuracy beside mean per-class recall (balanced accuracy)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import scores


def test_imbalanced_example_where_accuracy_and_mean_recall_differ():
    # 8 images of class 0 (all right), 2 of class 1 (none right), 0 of class 2: a majority-class guesser.
    labels_N = np.array([0] * 8 + [1] * 2)
    pred_N = np.zeros(10, np.int64)
    correct_C, totals_C = scores.class_counts(pred_N, labels_N, 3)
    assert correct_C.tolist() == [8, 0, 0] and totals_C.tolist() == [8, 2, 0]
    assert scores.accuracy(correct_C, totals_C) == pytest.approx(0.8)
    assert scores.mean_recall(correct_C, totals_C) == pytest.approx(0.5)  # (1 + 0) / 2: class 2 has no images
    # One more right in class 1: accuracy moves by 1/10, recall by (1/2)/2.
    pred_N[8] = 1
    correct_C, totals_C = scores.class_counts(pred_N, labels_N, 3)
    assert scores.accuracy(correct_C, totals_C) == pytest.approx(0.9)
    assert scores.mean_recall(correct_C, totals_C) == pytest.approx(0.75)
    # Balanced classes: the two agree.
    labels_N = np.array([0, 0, 1, 1, 2, 2])
    correct_C, totals_C = scores.class_counts(np.array([0, 1, 1, 1, 0, 2]), labels_N, 3)
    assert scores.accuracy(correct_C, totals_C) == scores.mean_recall(correct_C, totals_C) == pytest.approx(4 / 6)
