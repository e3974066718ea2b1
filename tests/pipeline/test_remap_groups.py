"""The remap maths: planted count moves land in their groups; the tokens normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import remap as rm
from tests.stages.test_remap import ADAPTED_CS, BASE_CS, PER_CLASS, T


def _group_names(group_S: np.ndarray) -> list[str]:
    return ["-" if g == 0 else rm.GROUPS[g - 1] for g in group_S]


# ---------------------------------------------------------------------------------------
# Acceptance 3: planted moves land in their groups


def test_planted_moves_land_in_exact_groups():
    n_base = rm.normalise_counts(BASE_CS, np.full(2, PER_CLASS), T, "max")
    n_adapted = rm.normalise_counts(ADAPTED_CS, np.full(2, PER_CLASS), T, "max")
    np.testing.assert_array_equal(n_base[1], [0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(n_adapted[1], [0, 0, 1, 1, 0, 0, 0, 0.25])
    group_CS = rm.group_latents(n_base, n_adapted, 0.5, 0.1)
    assert _group_names(group_CS[0]) == ["high_high", "high_low", "high_low", "low_high", "low_high", "-", "partial",
                                         "-"]
    assert _group_names(group_CS[1]) == ["-", "-", "high_high", "high_high", "-", "-", "-", "-"]


def test_tokens_normalisation_and_a_class_without_relevant_latents():
    """By tokens (20 per class) dog's counts 8 -> 4 are .4 -> .2: between the thresholds, nothing relevant."""
    n_base = rm.normalise_counts(BASE_CS, np.full(2, PER_CLASS), T, "tokens")
    np.testing.assert_allclose(n_base[1], [0, 0, .4, .4, 0, 0, 0, 0])
    n_adapted = rm.normalise_counts(ADAPTED_CS, np.full(2, PER_CLASS), T, "tokens")
    s = rm.summarise(rm.group_latents(n_base, n_adapted, 0.5, 0.1))
    assert s["relevant_C"].tolist() == [6, 0]
    assert all(np.isnan(s["fraction_C"][g][1]) for g in rm.GROUPS)  # nothing relevant: no fractions, not 0
    assert s["overall"] == pytest.approx({"high_high": 1 / 6, "high_low": 2 / 6, "low_high": 2 / 6, "partial": 1 / 6})
    empty = rm.normalise_counts(np.zeros((1, 3)), np.zeros(1), T, "tokens")  # a class without images
    assert empty.tolist() == [[0, 0, 0]]
