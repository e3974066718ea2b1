"""Tests for the synthetic labelled image world (pipeline/world.py)."""

import itertools
import json
import math
import pickle

import numpy as np
import pytest
from PIL import Image

from cache.errors import UserError
from pipeline import world as W
from pipeline.world import (
    ATTRIBUTES,
    OBJECT_RGB,
    TASKS,
    SyntheticWorld,
    WorldConfig,
    caption_for,
    object_coverage,
    render_scene,
    scene_colours,
)


def make_world(n_images=40, *, split="train", transform=None, allow_held_out=False, **overrides):
    return SyntheticWorld(WorldConfig(**overrides), n_images=n_images, split=split, transform=transform,
                          allow_held_out=allow_held_out)


def centred_scene(**overrides):
    scene = {"shape": "circle", "colour": "red", "size": "large", "texture": "plain", "background": "grey",
             "position": (0.5, 0.5), "scale": 0.3, "angle": 0.0, "texture_period": 0.18,
             "texture_phase": (0.0, 0.0), "texture_angle": 0.0, "object_jitter": (0, 0, 0),
             "background_jitter": (0, 0, 0)}
    scene.update(overrides)
    return scene


def erode(mask_HW):
    inner = mask_HW.copy()
    inner[1:, :] &= mask_HW[:-1, :]
    inner[:-1, :] &= mask_HW[1:, :]
    inner[:, 1:] &= mask_HW[:, :-1]
    inner[:, :-1] &= mask_HW[:, 1:]
    return inner


# 1. Determinism -------------------------------------------------------------------------

def test_same_seed_gives_identical_images_captions_masks_in_any_order():
    a, b = make_world(30, seed=3), make_world(30, seed=3)
    forward = [a.render(i) for i in range(30)]
    backward = {i: b.render(i) for i in reversed(range(30))}
    for i in range(30):
        assert np.array_equal(forward[i][0], backward[i][0])
        assert np.array_equal(forward[i][1], backward[i][1])
        assert a.caption(i) == b.caption(i)
        assert np.array_equal(a.mask(i), forward[i][1])
        image, label = a[i]
        assert np.array_equal(np.asarray(image), forward[i][0]) and label == b[i][1]
        scene, pixels_HWR, mask_HW = b.draw(i)  # one pass gives what scene and render give
        assert scene == a.scene(i) and np.array_equal(pixels_HWR, forward[i][0])
        assert np.array_equal(mask_HW, forward[i][1])
        assert b.partial_caption_values(i, scene) == a.partial_caption_values(i)
    # The length does not change the content, nor does pickling (worker processes).
    longer = pickle.loads(pickle.dumps(make_world(500, seed=3)))
    assert all(np.array_equal(longer.render(i)[0], forward[i][0]) for i in range(30))


def test_different_seed_or_split_gives_different_images():
    base = make_world(20, seed=0)
    for other in (make_world(20, seed=1), make_world(20, seed=0, split="val"), make_world(20, seed=0, split="test")):
        for i in range(20):
            assert base.label(i) == other.label(i)
            assert not np.array_equal(base.render(i)[0], other.render(i)[0])
        assert sum(base.caption(i) != other.caption(i) for i in range(20)) >= 10
    # Noise makes two images of one scene differ; the scene itself does not depend on the size.
    assert make_world(5, image_size=32).scene(4) == make_world(5, image_size=64).scene(4)
    pixels_HWR = make_world(1).render(0)[0].astype(int)
    clean_HWR = render_scene(make_world(1).scene(0), 32)[0].astype(int)
    assert 0 < np.abs(pixels_HWR - clean_HWR).max() <= W.NOISE


# 2. Masks match the drawn objects -------------------------------------------------------

def test_masks_match_drawn_objects():
    world = make_world(120, seed=5, image_size=32)
    areas = {"small": [], "large": []}
    for i in range(len(world)):
        scene = world.scene(i)
        pixels_HWR, mask_HW = world.render(i)
        colours = scene_colours(scene)
        pixels_HWR = pixels_HWR.astype(np.float32)
        assert mask_HW.dtype == bool and mask_HW.shape == (32, 32)
        assert mask_HW.sum() >= 12
        # Fully inside: the object never touches the image border.
        assert not (mask_HW[0].any() or mask_HW[-1].any() or mask_HW[:, 0].any() or mask_HW[:, -1].any())
        cy, cx = scene["position"]
        ys, xs = np.nonzero(mask_HW)
        assert abs(ys.mean() + 0.5 - cy * 32) < 0.35 * scene["scale"] * 32 + 1
        assert abs(xs.mean() + 0.5 - cx * 32) < 0.35 * scene["scale"] * 32 + 1
        # The mask is the pixels at least half covered by the object.
        cover_HW = object_coverage(scene, 32)
        assert np.array_equal(mask_HW, cover_HW >= 0.5)
        obj, back, pattern = colours["object"], colours["background"], colours["pattern"]
        # Inside the mask: on average the object colour (edge pixels mix in a little background).
        mean = pixels_HWR[mask_HW].mean(0)
        assert np.linalg.norm(mean - obj) < 0.3 * min(np.linalg.norm(obj - back), np.linalg.norm(obj - pattern))
        assert np.abs(mean - OBJECT_RGB[scene["colour"]]).max() <= W.OBJECT_JITTER + 35
        # Fully covered pixels (most of the mask) are exactly the object colour up to the noise.
        full = cover_HW == 1
        assert full.sum() >= 0.4 * mask_HW.sum() and not (full & ~mask_HW).any()
        assert np.abs(pixels_HWR[full] - obj).max() <= W.NOISE + 0.5
        # Outside: pixels the object does not touch (nearly all) mix background and pattern colours.
        empty = cover_HW == 0
        assert empty.sum() >= 0.9 * (~mask_HW).sum() and not (empty & mask_HW).any()
        step = pattern - back
        t = np.clip((pixels_HWR[empty] - back) @ step / (step @ step), 0, 1)
        gap = np.linalg.norm(pixels_HWR[empty] - (back + t[:, None] * step), axis=1)
        assert gap.max() <= math.sqrt(3) * (W.NOISE + 0.5)
        if scene["texture"] == "plain":
            assert np.abs(pixels_HWR[empty] - back).max() <= W.NOISE + 0.5
        assert np.linalg.norm(pixels_HWR[~mask_HW].mean(0) - obj) > 2 * np.linalg.norm(mean - obj)
        areas[scene["size"]].append(mask_HW.sum())
    assert len(areas["small"]) > 20 and len(areas["large"]) > 20
    assert np.mean(areas["large"]) > 2.5 * np.mean(areas["small"])


@pytest.mark.parametrize("shape,texture", list(zip(ATTRIBUTES["shape"], itertools.cycle(ATTRIBUTES["texture"]))))
def test_coverage_equals_brute_force_supersampling(shape, texture):
    """The edge-only supersampling equals rendering at 4x everywhere and average-pooling."""
    n, s = 32, W.SUPERSAMPLE
    scene = centred_scene(shape=shape, texture=texture, position=(0.47, 0.55), scale=0.27, angle=13.0,
                          texture_period=0.15, texture_phase=(0.3, 0.7), texture_angle=45.0)
    fine = (np.arange(n * s, dtype=np.float32) + 0.5) / s
    for f, fast_HW in ((W._object_implicit(scene, n), object_coverage(scene, n)),
                       (W._texture_implicit(scene, n), None)):
        if f is None:
            continue
        if fast_HW is None:
            fast_HW = W._coverage(f, n)
        slow_HW = (np.broadcast_to(f(fine[:, None], fine[None, :]), (n * s, n * s)) < 0)
        slow_HW = slow_HW.reshape(n, s, n, s).mean(axis=(1, 3))
        assert np.array_equal(fast_HW, slow_HW)
        assert 0 < ((fast_HW > 0) & (fast_HW < 1)).sum()  # edges really are anti-aliased


# 3. Balanced classes --------------------------------------------------------------------

@pytest.mark.parametrize("task", list(TASKS))
def test_classes_are_balanced_and_named(task):
    world = make_world(1, task=task)
    n_classes = math.prod(len(ATTRIBUTES[name]) for name in TASKS[task])
    assert world.n_classes == len(world.class_names) == n_classes
    assert len(set(world.class_names)) == n_classes
    world = make_world(10 * n_classes, task=task)
    labels = [world[i][1] for i in range(len(world))]
    assert np.bincount(labels, minlength=n_classes).tolist() == [10] * n_classes
    for i in range(0, len(world), 7):  # the label's attributes are the scene's
        scene = world.scene(i)
        assert all(scene[name] == value for name, value in world.class_attributes[world.label(i)].items())


def test_shape_colour_class_names():
    world = make_world(1)
    assert len(world.class_names) == 20
    assert world.class_names[0] == "red circle" and "yellow ring" in world.class_names
    assert make_world(1, task="colour").class_names == ["red object", "green object", "blue object",
                                                        "yellow object"]
    assert make_world(1, task="texture").class_names[2] == "background with dots"


# 4. Captions ----------------------------------------------------------------------------

def test_captions_mention_every_attribute_value():
    world = make_world(80, seed=2)
    for i in range(len(world)):
        scene, words = world.scene(i), world.caption(i).split()
        assert world.caption(i) == caption_for(scene)
        for name, values in ATTRIBUTES.items():
            assert [value for value in values if value in words] == [scene[name]], (name, world.caption(i))
    scene = centred_scene(size="small", colour="red", shape="circle", texture="stripes", background="grey")
    assert caption_for(scene) == "a photo of a small red circle on a grey background with stripes"
    assert caption_for(centred_scene(texture="plain")) == "a photo of a large red circle on a plain grey background"


# 5. Held-out values and bad input -------------------------------------------------------

def test_held_out_values_never_drawn_unless_allowed():
    held = (("shape", "ring"), ("background", "teal"))
    world = make_world(200, task="colour", held_out=held)
    seen = [world.scene(i) for i in range(len(world))]
    assert not any(s["shape"] == "ring" or s["background"] == "teal" for s in seen)
    assert {s["shape"] for s in seen} == set(ATTRIBUTES["shape"]) - {"ring"}
    allowed = make_world(200, task="colour", held_out=held, allow_held_out=True)
    seen = [allowed.scene(i) for i in range(len(allowed))]
    assert sum(s["shape"] == "ring" for s in seen) > 10 and sum(s["background"] == "teal" for s in seen) > 10


def test_task_needing_held_out_value_needs_allow():
    for task in ("shape", "shape_colour"):
        with pytest.raises(UserError, match="ring"):
            make_world(10, task=task, held_out=(("shape", "ring"),))
    world = make_world(50, task="shape", held_out=(("shape", "ring"),), allow_held_out=True)
    ring = world.class_names.index("ring")
    assert [world.scene(i)["shape"] for i in range(ring, 50, 5)] == ["ring"] * 10


@pytest.mark.parametrize("overrides,bad", [
    ({"task": "shape_size"}, "shape_size"),
    ({"held_out": (("hue", "red"),)}, "hue"),
    ({"held_out": (("shape", "hexagon"),)}, "hexagon"),
    ({"held_out": tuple(("size", v) for v in ATTRIBUTES["size"])}, "size"),
    ({"held_out": ("shape", "ring")}, "pairs"),
    ({"image_size": 8}, "16"),
    ({"seed": -1}, "-1"),
])
def test_bad_config_raises_user_error_naming_it(overrides, bad):
    with pytest.raises(UserError, match=bad) as info:
        WorldConfig(**overrides)
    assert "\n" not in str(info.value)


def test_bad_world_arguments_raise_user_error():
    with pytest.raises(UserError, match="'validation'.*train, val, test"):
        make_world(10, split="validation")
    with pytest.raises(UserError, match="n_images"):
        make_world(0)
    with pytest.raises(UserError, match="circle"):  # lists the valid values
        WorldConfig(held_out=(("shape", "hexagon"),))
    world = make_world(3)
    with pytest.raises(IndexError):
        world[3]
    assert np.array_equal(np.asarray(world[-1][0]), np.asarray(world[2][0]))
    assert [label for _, label in world] == [0, 1, 2]  # iteration stops at IndexError


def test_config_record_round_trips_through_json():
    config = WorldConfig(seed=4, image_size=48, task="texture", held_out=(("shape", "ring"), ("colour", "blue")))
    record = json.loads(json.dumps(config.to_dict()))
    assert record["render_version"] == W.RENDER_VERSION
    assert WorldConfig.from_dict(record) == config
    assert config.held_out == (("colour", "blue"), ("shape", "ring"))  # canonical order
    with pytest.raises(UserError, match="render_version"):
        WorldConfig.from_dict({**record, "render_version": W.RENDER_VERSION + 1})
    with pytest.raises(UserError, match="colour_space"):
        WorldConfig.from_dict({**record, "colour_space": "rgb"})


def test_transform_and_ids():
    world = make_world(4, image_size=40, split="val", transform=lambda im: (im.size, im.mode))
    assert world[1] == (((40, 40), "RGB"), 1)
    assert world.image_id(3) == "synthetic/val/3"
    image, _ = make_world(2)[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


# 6. The classes are visually separable --------------------------------------------------

def colour_histograms(world):
    """Per image: 4x4x4-bin RGB histogram of its saturated pixels (backgrounds are muted)."""
    feats = []
    for i in range(len(world)):
        pixels = world.render(i)[0].reshape(-1, 3).astype(int)
        vivid = pixels[np.ptp(pixels, axis=1) >= W.SATURATED] // 64
        codes = vivid[:, 0] * 16 + vivid[:, 1] * 4 + vivid[:, 2]
        feats.append(np.bincount(codes, minlength=64) / max(len(codes), 1))
    return np.array(feats), np.array([world.label(i) for i in range(len(world))])


def test_object_colours_are_vivid_and_backgrounds_muted():
    spread = W.NOISE + W.OBJECT_JITTER
    assert min(np.ptp(rgb) for rgb in OBJECT_RGB.values()) - 2 * spread >= W.SATURATED
    for name in ATTRIBUTES["background"]:
        colours = scene_colours(centred_scene(background=name))
        for rgb in (colours["background"], colours["pattern"]):
            assert np.ptp(rgb) + 2 * (W.NOISE + W.BACKGROUND_JITTER) < W.SATURATED
    rgb = np.array(list(OBJECT_RGB.values()), float)
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)) > 150


def test_nearest_class_mean_on_colour_histograms_beats_chance():
    train_x, train_y = colour_histograms(make_world(400, task="colour", seed=1))
    test_x, test_y = colour_histograms(make_world(400, task="colour", seed=1, split="val"))
    class_means = np.stack([train_x[train_y == c].mean(0) for c in range(4)])  # (C, histogram bins)
    guess = np.argmin(((test_x[:, None, :] - class_means[None]) ** 2).sum(-1), axis=1)
    assert (guess == test_y).mean() >= 0.9  # chance is 0.25


def test_different_shapes_give_different_masks():
    masks = {shape: render_scene(centred_scene(shape=shape), 64)[1] for shape in ATTRIBUTES["shape"]}
    for a, b in itertools.combinations(ATTRIBUTES["shape"], 2):
        iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert iou < 0.8, (a, b, iou)
    assert not masks["ring"][32, 32] and all(masks[s][32, 32] for s in ATTRIBUTES["shape"] if s != "ring")
    area = {shape: int(m.sum()) for shape, m in masks.items()}
    radius = 0.3 * 64
    assert abs(area["circle"] - math.pi * radius**2) < 0.02 * area["circle"]
    rows, cols = masks["square"].any(1), masks["square"].any(0)
    box = rows[:, None] & cols[None, :]  # a filled, upright square, up to its 4 anti-aliased corners
    assert not (masks["square"] & ~box).any() and (box & ~masks["square"]).sum() <= 4
    assert abs(rows.sum() - 2 * 0.7 * radius) <= 1.25 and rows.sum() == cols.sum()
