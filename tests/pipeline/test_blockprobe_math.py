"""The block probe's pieces: AUROC against its pairwise definition, pooling, the split, and a probe that
reads a planted attribute and not an absent one."""

from __future__ import annotations

import numpy as np
import pytest

from cache.errors import UserError
from pipeline import blockprobe as bp
from pipeline.probe import ProbeConfig


def _pairwise_auroc(score, positive) -> float:
    pos, neg = score[positive], score[~positive]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_auroc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 6, 200).astype(float)  # many ties
    positive = rng.random(200) < 0.3
    assert bp.auroc(score, positive) == pytest.approx(_pairwise_auroc(score, positive), abs=1e-12)
    assert bp.auroc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert np.isnan(bp.auroc(np.arange(4.0), np.zeros(4, bool)))


def test_pooled_features_are_class_token_patch_mean_max_and_quadrant_means():
    acts = np.random.default_rng(1).standard_normal((3, 1 + 3 * 2, 4)).astype(np.float16)  # 3 x 2 patch grid
    f = bp.pooled_features(acts, 1, 0, slice(1, 7), (3, 2))
    a = acts.astype(np.float32)
    p = a[:, 1:]  # row-major: (row 0: 0, 1), (row 1: 2, 3), (row 2: 4, 5); the middle row counts as bottom
    quadrants = [p[:, [0]].mean(1), p[:, [1]].mean(1), p[:, [2, 4]].mean(1), p[:, [3, 5]].mean(1)]
    np.testing.assert_allclose(f, np.concatenate([a[:, 0], p.mean(1), p.max(1), *quadrants], axis=1), rtol=1e-6)
    assert f.shape[1] == len(bp.FEATURES) * 4
    assert bp.pooled_features(acts[:, 1:], 0, None, slice(0, 6), (3, 2)).shape == (3, 24)  # no class token


def test_split_is_seeded_and_refuses_too_few_images():
    a, b = bp.split_train(40, 0.5, 3), bp.split_train(40, 0.5, 3)
    assert a.sum() == 20 and np.array_equal(a, b) and not np.array_equal(a, bp.split_train(40, 0.5, 4))
    with pytest.raises(UserError, match="at least 2"):
        bp.split_train(3, 0.5, 0)


def test_the_probe_reads_a_planted_attribute_and_not_a_random_one():
    rng = np.random.default_rng(2)
    n = 400
    shape = rng.integers(0, 5, n)  # planted: a direction per shape value
    colour = rng.integers(0, 4, n)  # not in the features at all
    features = rng.standard_normal((n, 16)) * 0.3
    features[np.arange(n), shape] += 2.0
    train = bp.split_train(n, 0.5, 0)
    res = {r.attribute: r for r in bp.probe_attributes(features, {"shape": shape, "colour": colour}, train,
                                                       ProbeConfig())}
    assert res["shape"].accuracy > 0.95 and (res["shape"].auroc_V > 0.99).all()
    assert res["colour"].accuracy < 0.4 and np.nanmax(np.abs(res["colour"].auroc_V - 0.5)) < 0.2
    table = bp.rows(2, list(res.values()), 0.95)
    assert [r["readable"] for r in table if r["attribute"] == "shape"] == [True] * 5
    assert not any(r["readable"] for r in table if r["attribute"] == "colour")
