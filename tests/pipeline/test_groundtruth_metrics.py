"""Ground-truth metrics (pipeline/groundtruth.py) on planted latents, hand-computed cases and brute force."""

from __future__ import annotations

import numpy as np
import pytest

from cache.errors import UserError
from pipeline import groundtruth as gt
from pipeline.world import SyntheticWorld, WorldConfig, object_coverage
from tests.stages.test_stats import csr_of


def pairs_of(f_NTS: np.ndarray, object_NP: np.ndarray, *, n_prefix: int = 1, **kwargs) -> gt.Pairs:
    """Pairs of dense ``(N, T, S)`` codes, through the CSR layout that a code shard stores."""
    codes = csr_of(f_NTS)
    return gt.image_pairs(codes.token_ptr, codes.indices, codes.values, object_NP, n_tokens=f_NTS.shape[1],
                          n_prefix=n_prefix, d_sae=f_NTS.shape[2], **kwargs)


def brute_auroc(score_N: np.ndarray, positive_N: np.ndarray) -> float:
    pos, neg = score_N[positive_N], score_N[~positive_N]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def test_auroc_equals_the_pairwise_definition_with_ties_and_implicit_zeros():
    rng = np.random.default_rng(0)
    n, s, v = 60, 7, 4
    score_NS = np.round(rng.random((n, s)) * 3) * (rng.random((n, s)) < 0.4)  # few distinct values: many ties
    score_NS[:, 0] = 0  # dead
    score_NS[:, 1] = 2.0  # fires on every image with the same score
    codes_N = rng.integers(0, v - 1, n)  # value v-1 never occurs: undefined
    image, latent = np.nonzero(score_NS)
    zeros = np.zeros(len(image), np.int64)
    pairs = gt.Pairs(image, latent, score_NS[image, latent], zeros, zeros, zeros.astype(bool))
    auc_SV = gt.auroc_by_value(pairs, codes_N, v, s)
    for j in range(s):
        for k in range(v - 1):
            assert auc_SV[j, k] == pytest.approx(brute_auroc(score_NS[:, j], codes_N == k)), (j, k)
    assert np.isnan(auc_SV[:, v - 1]).all()
    assert (auc_SV[:2, :v - 1] == 0.5).all()


def test_patch_object_masks_count_half_covered_patches():
    mask = np.zeros((1, 8, 8), bool)
    mask[0, :2, :4] = True  # top-left patch: exactly half
    mask[0, :4, 4] = True  # top-right patch: 4 of 16 pixels
    mask[0, 4:, 4:] = True  # bottom-right: whole
    assert gt.patch_object_masks(mask, (2, 2), 0.5).tolist() == [[True, False, False, True]]
    assert gt.patch_object_masks(mask, (2, 2), 0.25).tolist() == [[True, True, False, True]]


def test_purity_iou_and_pointing_by_hand():
    """Five images on a 2 x 2 grid with a class token; one latent; 'shape' values circle, square, ..."""
    f = np.zeros((5, 5, 1), np.float32)
    f[0, 1:, 0] = [3, 1, 2, 0]  # on: patches 0 and 2 (>= 1.5); object {0, 1}: IoU 1/3, max at 0: hit
    f[1, 1:, 0] = [0, 0, 0, 1]  # on {3}, object {3}: IoU 1, hit
    f[2, 1:, 0] = [2, 2, 0, 0]  # tie: on {0, 1}, object {1, 2}: IoU 1/3, first max (0) misses
    f[3, 0, 0] = 5.0  # class token only: score 0 with max_patch
    f[4, 1:, 0] = [0, 0.5, 0, 0]  # object covers no patch: not localised
    object_NP = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    codes = {"shape": np.array([0, 1, 0, 2, 1])}  # circle, square, circle, triangle, square
    pairs = pairs_of(f, object_NP)
    assert sorted(pairs.image.tolist()) == [0, 1, 2, 4]
    result = gt.evaluate(pairs, codes, object_NP.sum(1), 1, 0.95)
    circle = result.value_names.index(("shape", "circle"))
    assert result.best_V_of_S[0] == circle and result.auroc_SV[0, circle] == 1.0  # {3, 2} above {1, 0, 0.5}
    assert result.purity_SV[0, circle] == pytest.approx(5 / 6.5)
    assert result.prevalence_V[circle] == pytest.approx(2 / 5)
    assert result.loc.n_localised_S[0] == 3
    assert result.loc.iou_S[0] == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert result.loc.pointing_S[0] == pytest.approx(2 / 3)
    assert result.dedicated_V[circle] and result.best_latent_V[circle] == 0
    assert np.isnan(result.auroc_SV[0, result.value_names.index(("shape", "ring"))])  # no ring images

    mean = pairs_of(f, object_NP, score="mean")  # all five tokens: the class token counts
    assert dict(zip(mean.image.tolist(), mean.score.tolist()))[3] == pytest.approx(1.0)
    lenient = pairs_of(f, object_NP, map_threshold=0.0)  # every nonzero patch is on
    assert lenient.n_on.tolist() == [3, 1, 2, 1]


@pytest.fixture(scope="module")
def circles():
    """400 images of a 64-pixel world on a 16 x 16 grid (4-pixel patches), scenes and object patches."""
    world = SyntheticWorld(WorldConfig(seed=1, image_size=64), n_images=400)
    scenes = [world.scene(i) for i in range(len(world))]
    masks = np.stack([object_coverage(sc, 64) >= 0.5 for sc in scenes])
    return scenes, gt.patch_object_masks(masks, (16, 16), 0.5)


def test_planted_object_mask_latent_scores_one_and_a_random_latent_does_not(circles):
    """Acceptance 3: latent 0 equals the object mask on circle images: IoU, pointing, AUROC, purity 1."""
    scenes, object_NP = circles
    n, p = object_NP.shape
    is_circle = np.array([sc["shape"] == "circle" for sc in scenes])
    assert object_NP[is_circle].any(1).all()  # every circle covers some patch
    rng = np.random.default_rng(0)
    f = np.zeros((n, 1 + p, 3), np.float32)
    f[:, 1:, 0] = object_NP * is_circle[:, None]
    f[:, 1:, 1] = rng.random((n, p)) * (rng.random((n, p)) < 0.05)  # random latent
    result = gt.evaluate(pairs_of(f, object_NP), gt.value_codes([gt.scene_values(sc) for sc in scenes],
                                                                tuple(gt.ATTRIBUTE_VALUES)),
                         object_NP.sum(1), 3, 0.95)
    circle = result.value_names.index(("shape", "circle"))
    assert result.best_V_of_S[0] == circle
    assert result.auroc_SV[0, circle] == 1.0 and result.purity_SV[0, circle] == 1.0
    assert result.loc.iou_S[0] == 1.0 and result.loc.pointing_S[0] == 1.0
    assert result.loc.n_localised_S[0] == is_circle.sum()
    assert result.dedicated_V.sum() == 1 and result.best_latent_V[circle] == 0
    assert result.best_V_of_S[2] == -1 and (result.auroc_SV[2] == 0.5).all()  # dead: ties, no best value
    assert result.loc.iou_S[1] < 0.2  # random patches overlap the object by chance only


def test_random_latent_has_chance_auroc_for_every_value():
    world = SyntheticWorld(WorldConfig(seed=2), n_images=4000)
    codes = gt.value_codes([gt.scene_values(world.scene(i)) for i in range(len(world))], tuple(gt.ATTRIBUTE_VALUES))
    rng = np.random.default_rng(1)
    n, p = len(world), 16
    f = (rng.random((n, 1 + p, 1)) * (rng.random((n, 1 + p, 1)) < 0.1)).astype(np.float32)
    object_NP = np.zeros((n, p), bool)
    result = gt.evaluate(pairs_of(f, object_NP), codes, object_NP.sum(1), 1, 0.95)
    assert len(result.value_names) == sum(len(v) for v in gt.ATTRIBUTE_VALUES.values())
    assert np.all(np.abs(result.auroc_SV[0] - 0.5) < 0.05), result.auroc_SV[0]
    assert not result.dedicated_V.any()


def test_store_world_and_world_checks():
    world = SyntheticWorld(WorldConfig(seed=3, image_size=32), n_images=5, split="val")
    found = gt.store_world({"name": "synthetic", "split": "val", "seed": 3}, {"size": [32, 32]}, world.class_names,
                           [world.image_id(i) for i in (4, 0, 2)], "store")
    assert found.config == WorldConfig(seed=3, image_size=32) and found.split == "val"
    assert found.index_N.tolist() == [4, 0, 2]
    gt.check_world({"seed": 3, "task": "shape_colour"}, found.config)
    with pytest.raises(UserError, match=r"--world seed=4 differs .* \(seed=3\)"):
        gt.check_world({"seed": 4}, found.config)
    with pytest.raises(UserError, match="image_size=64 differs"):
        gt.check_world({"image_size": 64}, found.config)
    with pytest.raises(UserError, match="unknown world config key 'hue'"):
        gt.check_world({"hue": 1}, found.config)
    with pytest.raises(UserError, match="'eurosat' images, not the synthetic world"):
        gt.store_world({"name": "eurosat"}, {}, [], [], "store")
    with pytest.raises(UserError, match="not synthetic/val/<index>"):
        gt.store_world({"name": "synthetic", "split": "val", "seed": 3}, {"size": 32}, world.class_names,
                       ["synthetic/train/0"], "store")


def test_store_world_reads_the_recorded_world_with_its_held_out_values():
    config = WorldConfig(seed=2, image_size=32, task="texture", held_out=(("texture", "checker"),))
    world = SyntheticWorld(config, n_images=8, split="test", allow_held_out=True)
    record = {"name": "synthetic", "split": "test", "seed": 2,
              "world": {**config.to_dict(), "allow_held_out": True}}
    found = gt.store_world(record, {"size": 32}, world.class_names, [world.image_id(i) for i in range(8)], "store")
    assert found.config == config and found.allow_held_out and found.index_N.tolist() == list(range(8))
    rebuilt = SyntheticWorld(found.config, n_images=8, split="test", allow_held_out=found.allow_held_out)
    assert [rebuilt.scene(i) for i in range(8)] == [world.scene(i) for i in range(8)]
    assert any(world.scene(i)["texture"] == "checker" for i in range(8))
    with pytest.raises(UserError, match="class names differ from those of the world it records"):
        gt.store_world(record, {"size": 32}, ["red circle"], [world.image_id(0)], "store")


def test_unknown_attribute_is_refused_by_name():
    assert gt.check_attributes(["size", "shape"]) == ("shape", "size")
    with pytest.raises(UserError, match="unknown attribute 'hue'; choose from: shape, colour"):
        gt.check_attributes(["shape", "hue"])


def test_one_token_ceiling_by_hand():
    """Four images on a 2 x 2 grid (patches top-left, top-right, bottom-left, bottom-right)."""
    object_NP = np.array([[1, 0, 0, 0],  # centre top-left, inside it
                          [1, 1, 0, 0],  # centre top-right, straddling into top-left
                          [0, 0, 1, 0],  # centre bottom-left
                          [0, 0, 0, 0]], bool)  # centre bottom-right, too small to cover a patch
    codes = {"shape": np.array([0, 0, 0, 1]),  # circle, circle, circle, square
             "position": np.array([0, 1, 2, 3]),
             "texture": np.array([0, 0, 2, 2])}  # plain, plain, dots, dots
    ceiling = dict(zip([(a, v) for a in codes for v in gt.ATTRIBUTE_VALUES[a]],
                       gt.one_token_ceiling(codes, object_NP, (2, 2))))
    assert ceiling["shape", "circle"] == 1.0
    assert ceiling["shape", "square"] == 0.5  # its one image shows it on no patch
    assert np.isnan(ceiling["shape", "triangle"])  # no image has it
    assert ceiling["position", "top-left"] == pytest.approx(2.5 / 3)  # the straddling image ties with the true one
    assert ceiling["position", "top-right"] == 1.0
    assert ceiling["position", "bottom-left"] == 1.0
    assert ceiling["position", "bottom-right"] == 0.5
    assert ceiling["texture", "plain"] == 1.0 and ceiling["texture", "dots"] == 1.0
    # an odd grid: the middle row and column count as bottom and right, like an object centre on the line
    odd = np.zeros((2, 9), bool)
    odd[0, 4], odd[1, 0] = True, True  # image 0: the centre patch only; image 1: the top-left corner
    row = gt.one_token_ceiling({"position": np.array([3, 0])}, odd, (3, 3))
    assert row[0] == 1.0 and row[3] == 1.0 and np.isnan(row[1:3]).all()  # top-right, bottom-left: no image
