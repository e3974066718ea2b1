"""A procedurally generated, offline, deterministic image world with ground truth.

Every image shows one object (shape, colour, size, position, small rotation) on a
background (colour and texture).  The world serves three purposes:

* the built-in offline dataset ``synthetic`` for activation extraction;
* image–caption pairs (``partial_caption``) to pretrain a tiny CLIP contrastively;
* ground truth for evaluating SAE latents: attribute values (``scene``) and the per-pixel
  object mask (``mask``).

Determinism: image ``i`` of split ``s`` depends only on ``(config, s, i)`` (and on
``allow_held_out``): its random stream is a numpy Generator seeded with
``(seed, split id, i)``, so any index renders identically in any order and in any worker.
The scene (attribute values and geometry, as fractions of the image side) does not depend
on ``image_size``; only the pixel noise does.  ``n_images`` only sets the length, so a
longer world starts with the same images as a shorter one.

Rendering (numpy only): each layer (texture pattern, object) is an implicit function
``f(y, x)`` in pixel units, negative inside and 1-Lipschitz.  Coverage is the 4×4
supersampled average of ``f < 0``; pixels whose centre is further than the sub-sample
spread from the boundary are provably uniform, so only boundary pixels are supersampled.
The result is identical to rendering at 4× and average-pooling, at a fraction of the cost.
The mask is ``object coverage >= 0.5``.  Colours are then composited (background, pattern,
object) and mild uniform integer noise is added.

Bump ``RENDER_VERSION`` whenever a change alters the pixels, masks or captions of an
existing ``(config, split, index)``; it is part of ``WorldConfig.to_dict()``, so stores
keyed on that dict are invalidated.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cache.errors import UserError

RENDER_VERSION = 1

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross", "ring"),
    "colour": ("red", "green", "blue", "yellow"),
    "size": ("small", "large"),
    "texture": ("plain", "stripes", "dots", "checker"),
    "background": ("grey", "purple", "teal", "brown"),
}

TASKS: dict[str, tuple[str, ...]] = {
    "shape_colour": ("shape", "colour"),  # 20 classes, named "red circle"
    "shape": ("shape",),
    "colour": ("colour",),
    "size": ("size",),
    "texture": ("texture",),
    "background": ("background",),
}

OBJECT_ATTRIBUTES: tuple[str, ...] = ("shape", "colour")  # every pretraining caption names these

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Saturated, bright object colours (0–255), far apart from each other and from the
# muted/dark backgrounds below.
OBJECT_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (40, 185, 60),
    "blue": (50, 95, 230),
    "yellow": (235, 205, 45),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grey": (105, 105, 105),
    "purple": (75, 50, 95),
    "teal": (30, 90, 90),
    "brown": (105, 72, 42),
}
# Channel spread (max - min) that separates the two palettes even after jitter and noise:
# object colours are always at least this vivid, backgrounds and patterns always below it.
SATURATED = 100
PATTERN_MIX = 0.3  # texture pattern colour = background blended this far towards white

SIZE_SCALE = {"small": (0.15, 0.19), "large": (0.27, 0.33)}  # object radius / image side
BORDER = 0.04  # minimum gap between the object's bounding disc and the image edge (fraction)
MAX_ANGLE = 20.0  # object rotation is uniform in [-MAX_ANGLE, MAX_ANGLE] degrees
TEXTURE_PERIOD = {  # pattern scale as a fraction of the image side, by texture
    "plain": (0.15, 0.2),  # unused
    "stripes": (0.14, 0.22),  # stripe period (half dark, half light)
    "dots": (0.16, 0.24),  # dot lattice spacing
    "checker": (0.10, 0.16),  # checker cell side
}
STRIPE_ANGLES = (0.0, 45.0, 90.0, 135.0)
DOT_RADIUS = 0.27  # dot radius / lattice spacing
OBJECT_JITTER = 12  # per-image object colour offset, uniform integers in [-J, J] per channel
BACKGROUND_JITTER = 8  # per-image background colour offset, likewise
NOISE = 6  # per-pixel noise, uniform integers in [-NOISE, NOISE] per channel
SUPERSAMPLE = 4  # sub-samples per pixel side

_SPLIT_IDS = {name: k for k, name in enumerate(SPLITS)}
_RNG_SALT = 0x5EED_3D17  # keeps world streams apart from other seeds of the project


def _choices(names) -> str:
    return ", ".join(names)


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """What the synthetic world draws; everything that changes its images is here."""

    seed: int = 0  # base seed; image i of a split uses the stream (seed, split id, i)
    image_size: int = 32  # output side in pixels (square), at least 16; the model's input size
    task: str = "shape_colour"  # which attributes make the class label; a key of TASKS
    held_out: tuple[tuple[str, str], ...] = ()  # (attribute, value) pairs never drawn unless allowed

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise UserError(f"world seed must be a non-negative integer (got {self.seed!r})")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer)):
            raise UserError(f"world image_size must be an integer (got {self.image_size!r})")
        if self.image_size < 16:
            raise UserError(f"world image_size must be at least 16 pixels (got {self.image_size})")
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "image_size", int(self.image_size))
        if not isinstance(self.task, str) or self.task not in TASKS:
            raise UserError(f"unknown world task '{self.task}'; choose one of: {_choices(TASKS)}")
        pairs = []
        for item in self.held_out:
            if not isinstance(item, (tuple, list)) or len(item) != 2 or not all(isinstance(x, str) for x in item):
                raise UserError(f"held_out entries must be (attribute, value) pairs (got {item!r}), "
                                f"e.g. (('shape', 'ring'),)")
            attribute, value = item
            if attribute not in ATTRIBUTES:
                raise UserError(f"unknown attribute '{attribute}' in held_out; choose one of: "
                                f"{_choices(ATTRIBUTES)}")
            if value not in ATTRIBUTES[attribute]:
                raise UserError(f"unknown {attribute} value '{value}' in held_out; choose one of: "
                                f"{_choices(ATTRIBUTES[attribute])}")
            pairs.append((attribute, value))
        pairs = tuple(sorted(set(pairs)))  # canonical order, so equal configs hash equally
        for attribute, values in ATTRIBUTES.items():
            if all((attribute, value) in pairs for value in values):
                raise UserError(f"held_out holds out every {attribute} value; keep at least one of: "
                                f"{_choices(values)}")
        object.__setattr__(self, "held_out", pairs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of this config plus RENDER_VERSION; ``from_dict`` reads it back."""
        return {"seed": self.seed, "image_size": self.image_size, "task": self.task,
                "held_out": [list(pair) for pair in self.held_out], "render_version": RENDER_VERSION}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "WorldConfig":
        """Inverse of ``to_dict``; refuses a record written by another renderer version."""
        record = dict(record)
        version = record.pop("render_version", RENDER_VERSION)
        if version != RENDER_VERSION:
            raise UserError(f"synthetic world record has render_version {version} but this code renders "
                            f"version {RENDER_VERSION}; regenerate the data with this code")
        unknown = sorted(set(record) - {"seed", "image_size", "task", "held_out"})
        if unknown:
            raise UserError(f"unknown world config key '{unknown[0]}'; "
                            f"valid keys: seed, image_size, task, held_out")
        if "held_out" in record:
            record["held_out"] = tuple(tuple(pair) for pair in record["held_out"])
        return cls(**record)


def parse_held_out(items) -> tuple[tuple[str, str], ...]:
    """``held_out`` pairs from 'attribute=value' strings or (attribute, value) pairs, validated."""
    pairs = []
    for item in items or ():
        if isinstance(item, str):
            attribute, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"held-out value '{item}' must read attribute=value, e.g. texture=checker")
            item = (attribute.strip(), value.strip())
        pairs.append(tuple(item) if isinstance(item, (list, tuple)) else item)
    return WorldConfig(held_out=tuple(pairs)).held_out


def pretraining_world(checkpoint: str | Path) -> dict[str, Any] | None:
    """The world record (``WorldConfig.to_dict()``) a ``pipeline pretrain`` checkpoint was trained
    on, read from the config.json beside it; None for any other weights."""
    config_path = Path(checkpoint).parent / "config.json"
    if not Path(checkpoint).is_file() or not config_path.is_file():
        return None
    try:
        world = json.loads(config_path.read_text())["world"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return dict(world) if isinstance(world, dict) else None


def held_out_of(checkpoint: str | Path) -> tuple[tuple[str, str], ...]:
    """The (attribute, value) pairs a pretrained checkpoint never saw (empty for other weights)."""
    world = pretraining_world(checkpoint)
    return tuple(tuple(pair) for pair in (world or {}).get("held_out", ()))


# ---------------------------------------------------------------------------------------
# Captions and class names


def _object_phrase(values: dict[str, str]) -> str | None:
    words = [values[name] for name in ("size", "colour") if name in values]
    if "shape" in values:
        words.append(values["shape"])
    elif words:
        words.append("object")
    return " ".join(words) if words else None


def _background_phrase(values: dict[str, str]) -> str | None:
    if "texture" not in values and "background" not in values:
        return None
    colour = values.get("background")
    base = f"{colour} background" if colour else "background"
    texture = values.get("texture")
    if texture == "plain":
        return f"plain {base}"
    if texture == "stripes":
        return f"{base} with stripes"
    if texture == "dots":
        return f"{base} with dots"
    if texture == "checker":
        return f"{base} with a checker pattern"
    return base


def _phrase(values: dict[str, str]) -> str:
    """Noun phrase naming the given attribute values, e.g. 'red circle', 'plain background'."""
    thing, ground = _object_phrase(values), _background_phrase(values)
    if thing and ground:
        return f"{thing} on a {ground}"
    return thing or ground or "object"


def caption_for(values: dict[str, Any]) -> str:
    """Caption naming the attribute values in ``values`` (a scene: all of them; other keys are ignored).

    E.g. 'a photo of a small red circle on a grey background with stripes'; plain
    backgrounds read 'on a plain grey background', checker ones 'with a checker pattern'.
    """
    return f"a photo of a {_phrase({name: values[name] for name in ATTRIBUTES if name in values})}"


def partial_caption_values(scene: dict[str, Any], rng: np.random.Generator) -> dict[str, str]:
    """The attribute values a pretraining caption names: the object (colour and shape)
    always, each other value with probability 1/2; e.g. 'a photo of a red circle' or
    'a photo of a small blue ring on a background with dots'.

    Like alt-text, a caption always names its main subject and only sometimes the details.
    Pretraining on these keeps short prompts such as 'a photo of a red circle.' in
    distribution; with full captions only, such prompts fall far from every caption the
    text tower saw and zero-shot accuracy stays low.
    """
    return {name: scene[name] for name in ATTRIBUTES if name in OBJECT_ATTRIBUTES or rng.random() < 0.5}


# ---------------------------------------------------------------------------------------
# Scene sampling


def _sample_scene(rng: np.random.Generator, fixed: dict[str, str],
                  allowed: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Draw one scene; ``fixed`` attributes are given, the others uniform over ``allowed``.

    The number of draws is the same whatever is fixed, so the stream stays aligned.
    """
    picks = rng.random(len(ATTRIBUTES))
    cont = rng.random(8)
    scene: dict[str, Any] = {}
    for k, (name, values) in enumerate(allowed.items()):
        scene[name] = fixed[name] if name in fixed else values[int(picks[k] * len(values))]
    low, high = SIZE_SCALE[scene["size"]]
    scale = low + (high - low) * cont[0]
    room = 1.0 - 2.0 * (scale + BORDER)  # the object's unit disc stays BORDER inside the image
    scene["position"] = (float(scale + BORDER + room * cont[1]), float(scale + BORDER + room * cont[2]))
    scene["scale"] = float(scale)
    scene["angle"] = float(MAX_ANGLE * (2.0 * cont[3] - 1.0))
    low, high = TEXTURE_PERIOD[scene["texture"]]
    scene["texture_period"] = float(low + (high - low) * cont[4])
    scene["texture_phase"] = (float(cont[5]), float(cont[6]))
    scene["texture_angle"] = STRIPE_ANGLES[int(cont[7] * len(STRIPE_ANGLES))]
    jitter = rng.integers(-OBJECT_JITTER, OBJECT_JITTER + 1, size=3)
    scene["object_jitter"] = tuple(int(v) for v in jitter)
    jitter = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=3)
    scene["background_jitter"] = tuple(int(v) for v in jitter)
    return scene


# ---------------------------------------------------------------------------------------
# Rendering

# Implicit functions take pixel coordinates (y, x) (any broadcastable float32 arrays, pixel
# centres at i + 0.5) and return a signed value in pixels: negative inside, 1-Lipschitz.
Implicit = Callable[[np.ndarray, np.ndarray], np.ndarray]

_SUB = (np.arange(SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE  # exact binary fractions
_SUB_Y = np.repeat(_SUB, SUPERSAMPLE)[None, :]
_SUB_X = np.tile(_SUB, SUPERSAMPLE)[None, :]
# A sub-sample lies at most this far from its pixel centre; 1-Lipschitz functions whose
# |value| at the centre exceeds it have the same sign on all sub-samples.
_EDGE = float(np.hypot(_SUB[-1] - 0.5, _SUB[-1] - 0.5)) + 1e-3


@functools.lru_cache(maxsize=16)
def _centres(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as a column (H, 1) and a row (1, W), float32 (H = W = n)."""
    c = np.arange(n, dtype=np.float32) + np.float32(0.5)
    c.setflags(write=False)
    return c[:, None], c[None, :]


def _coverage(f: Implicit, n: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Fraction (H, W) of each pixel's SUPERSAMPLE² sub-samples where f < 0.

    ``box`` (row0, row1, col0, col1) limits the work to pixels that may be covered; the
    rest of the image is 0.
    """
    y_H1, x_1W = _centres(n)
    r0, r1, c0, c1 = box if box is not None else (0, n, 0, n)
    cover_HW = np.zeros((n, n), np.float32)
    # box_*: the rows and columns of ``box`` only (a subset of H and W)
    box_value_HW = np.broadcast_to(f(y_H1[r0:r1], x_1W[:, c0:c1]), (r1 - r0, c1 - c0))
    box_cover_HW = cover_HW[r0:r1, c0:c1]
    box_cover_HW[...] = box_value_HW < 0
    rows, cols = np.nonzero(np.abs(box_value_HW) < _EDGE)
    if rows.size:
        y = (rows + r0).astype(np.float32)[:, None] + _SUB_Y
        x = (cols + c0).astype(np.float32)[:, None] + _SUB_X
        box_cover_HW[rows, cols] = (f(y, x) < 0).mean(axis=1, dtype=np.float32)
    return cover_HW


def _unit_shape(shape: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Signed 1-Lipschitz function of local (u, v) (v down); the shape fits the unit disc."""
    if shape == "circle":
        return lambda u, v: np.hypot(u, v) - 1.0
    if shape == "ring":
        return lambda u, v: np.abs(np.hypot(u, v) - 0.775) - 0.225  # radii 0.55 to 1
    if shape == "square":
        return lambda u, v: np.maximum(np.abs(u), np.abs(v)) - 0.7  # corners at 0.99
    if shape == "cross":
        def cross(u, v):
            au, av = np.abs(u), np.abs(v)
            return np.minimum(np.maximum(au - 0.95, av - 0.3), np.maximum(au - 0.3, av - 0.95))
        return cross
    if shape == "triangle":  # equilateral, inscribed in the unit disc, apex up
        s = math.sqrt(3.0) / 2.0

        def triangle(u, v):
            left, right = -s * u - 0.5 * v, s * u - 0.5 * v
            return np.maximum(np.maximum(left, right), v) - 0.5
        return triangle
    raise UserError(f"unknown shape '{shape}'; choose one of: {_choices(ATTRIBUTES['shape'])}")


def _object_implicit(scene: dict[str, Any], n: int) -> Implicit:
    unit = _unit_shape(scene["shape"])
    radius = np.float32(scene["scale"] * n)
    cy, cx = (np.float32(p * n) for p in scene["position"])
    theta = math.radians(scene["angle"])
    c, s = np.float32(math.cos(theta) / radius), np.float32(math.sin(theta) / radius)

    def f(y, x):
        dy, dx = y - cy, x - cx
        return unit(c * dx + s * dy, c * dy - s * dx) * radius
    return f


def _texture_implicit(scene: dict[str, Any], n: int) -> Implicit | None:
    texture = scene["texture"]
    if texture == "plain":
        return None
    period = np.float32(scene["texture_period"] * n)
    py, px = scene["texture_phase"]
    if texture == "stripes":
        theta = math.radians(scene["texture_angle"])
        c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        offset = np.float32(py * period)
        half, quarter = period / 2, period / 4
        return lambda y, x: np.abs(np.mod(c * x + s * y + offset, period) - half) - quarter
    if texture == "dots":
        oy, ox = np.float32(py * period), np.float32(px * period)
        half, radius = period / 2, np.float32(DOT_RADIUS) * period
        return lambda y, x: np.hypot(np.mod(y + oy, period) - half, np.mod(x + ox, period) - half) - radius
    if texture == "checker":
        oy, ox = np.float32(2 * py), np.float32(2 * px)  # phase over one period of two cells

        def checker(y, x):
            a, b = x / period + ox, y / period + oy
            fa, fb = np.floor(a), np.floor(b)
            ra, rb = a - fa, b - fb
            gap = np.minimum(np.minimum(ra, 1 - ra), np.minimum(rb, 1 - rb)) * period
            return np.where(np.mod(fa + fb, 2) == 0, gap, -gap)
        return checker
    raise UserError(f"unknown texture '{texture}'; choose one of: {_choices(ATTRIBUTES['texture'])}")


def scene_colours(scene: dict[str, Any]) -> dict[str, np.ndarray]:
    """RGB (0–255, float32 (R,)) of the scene's 'object', 'background' and 'pattern'."""
    obj = np.asarray(OBJECT_RGB[scene["colour"]], np.float32) + np.asarray(scene["object_jitter"], np.float32)
    back = (np.asarray(BACKGROUND_RGB[scene["background"]], np.float32)
            + np.asarray(scene["background_jitter"], np.float32))
    pattern = back + np.float32(PATTERN_MIX) * (np.float32(255) - back)
    return {"object": obj, "background": back, "pattern": pattern}


def _object_box(scene: dict[str, Any], n: int) -> tuple[int, int, int, int]:
    """Pixel rows and columns (row0, row1, col0, col1) that the object's unit disc can touch."""
    cy, cx, radius = scene["position"][0] * n, scene["position"][1] * n, scene["scale"] * n
    return (max(0, math.floor(cy - radius) - 1), min(n, math.ceil(cy + radius) + 1),
            max(0, math.floor(cx - radius) - 1), min(n, math.ceil(cx + radius) + 1))


def object_coverage(scene: dict[str, Any], image_size: int) -> np.ndarray:
    """Fraction (H, W) float32 of each pixel covered by the object (4×4 supersampled)."""
    return _coverage(_object_implicit(scene, image_size), image_size, _object_box(scene, image_size))


def render_scene(scene: dict[str, Any], image_size: int,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene: (uint8 (H, W, R) image, bool (H, W) object mask).

    ``rng`` supplies the pixel noise; None draws no noise.  Edit a scene (e.g. its colour)
    and render it again to get a counterfactual image with the same geometry.
    """
    n = image_size
    colours = scene_colours(scene)
    back, pattern, obj = colours["background"], colours["pattern"], colours["object"]
    # Coverages are multiples of 1/SUPERSAMPLE², so every pixel is one of (levels)² blends of
    # the three colours: build that palette once and look pixels up in it.
    # The coverage levels are an axis of this function only (no key letter): shapes in comments.
    levels = SUPERSAMPLE**2 + 1
    frac = np.arange(levels, dtype=np.float32) / np.float32(levels - 1)  # (levels,)
    ground = back + frac[:, None] * (pattern - back)  # (texture level, R)
    blend = ground[:, None, :] + frac[None, :, None] * (obj - ground[:, None, :])  # (texture, object level, R)
    palette = np.rint(blend).astype(np.int16).reshape(levels * levels, 3)  # (levels², R), row = code
    obj_HW = object_coverage(scene, n)
    code_HW = np.rint(obj_HW * np.float32(levels - 1)).astype(np.intp)
    texture = _texture_implicit(scene, n)
    if texture is not None:
        code_HW += levels * np.rint(_coverage(texture, n) * np.float32(levels - 1)).astype(np.intp)
    image_HWR = palette.take(code_HW, axis=0)
    if rng is not None:
        image_HWR += rng.integers(-NOISE, NOISE + 1, size=(n, n, 3), dtype=np.int16)
    np.clip(image_HWR, 0, 255, out=image_HWR)
    return image_HWR.astype(np.uint8), obj_HW >= 0.5


# ---------------------------------------------------------------------------------------
# The dataset


class SyntheticWorld:
    """Map-style dataset of rendered scenes: ``world[i] -> (PIL image or transform(image), label)``.

    Labels are balanced: ``label = i % n_classes``; the class fixes the task's attributes,
    the rest are drawn from image i's own random stream.
    """

    def __init__(self, config: WorldConfig, *, n_images: int, split: str = "train",
                 transform: Callable | None = None, allow_held_out: bool = False) -> None:
        if not isinstance(config, WorldConfig):
            raise UserError(f"SyntheticWorld needs a WorldConfig (got {type(config).__name__})")
        if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
            raise UserError(f"n_images must be a positive integer (got {n_images!r})")
        if split not in _SPLIT_IDS:
            raise UserError(f"unknown split '{split}' for the synthetic world; choose one of: {_choices(SPLITS)}")
        self.config = config
        self.n_images = int(n_images)
        self.split = split
        self.transform = transform
        self.allow_held_out = bool(allow_held_out)
        task_attributes = TASKS[config.task]
        self.task_attributes: tuple[str, ...] = task_attributes
        # Classes enumerate every value (held-out ones included) so labels never shift.
        self.class_attributes: list[dict[str, str]] = [
            dict(zip(task_attributes, combo))
            for combo in itertools.product(*(ATTRIBUTES[name] for name in task_attributes))]
        self.class_names: list[str] = [_phrase(values) for values in self.class_attributes]
        self.n_classes = len(self.class_names)
        held = set(config.held_out)
        if not self.allow_held_out:
            for name in task_attributes:
                blocked = [value for value in ATTRIBUTES[name] if (name, value) in held]
                if blocked:
                    raise UserError(f"task '{config.task}' has classes with {name} '{blocked[0]}', which is held "
                                    f"out of this world (a model pretrained on it never saw it); pass "
                                    f"--allow-held-out to use it on purpose (a concept-addition test), or "
                                    f"pick another --task")
        self._allowed = {name: tuple(value for value in values
                                     if self.allow_held_out or (name, value) not in held)
                         for name, values in ATTRIBUTES.items()}
        self._split_id = _SPLIT_IDS[split]

    def __len__(self) -> int:
        return self.n_images

    def _index(self, i) -> int:
        i = operator.index(i)
        if i < 0:
            i += self.n_images
        if not 0 <= i < self.n_images:
            raise IndexError(f"image index {i} out of range for {self.n_images} images")
        return i

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([_RNG_SALT, self.config.seed, self._split_id, i])

    def label(self, i) -> int:
        """Class index of image i (no rendering)."""
        return self._index(i) % self.n_classes

    def scene(self, i) -> dict[str, Any]:
        """Attribute values of image i, plus geometry.

        Keys: the ATTRIBUTES names; 'position' (cy, cx) of the object centre as fractions
        of the image side in [0, 1]; 'scale' (object radius / side); 'angle' (degrees);
        'texture_period', 'texture_phase', 'texture_angle'; 'object_jitter',
        'background_jitter' (RGB offsets).  All values are JSON-able.
        """
        i = self._index(i)
        return _sample_scene(self._rng(i), self.class_attributes[i % self.n_classes], self._allowed)

    def caption(self, i) -> str:
        """Caption of image i naming all its attribute values."""
        return caption_for(self.scene(i))

    def partial_caption_values(self, i, scene: dict[str, Any] | None = None) -> dict[str, str]:
        """The attribute values image i's partial caption names (``partial_caption_values``),
        drawn from a stream of its own so images and full captions stay unchanged. ``scene``:
        image i's scene if the caller has it (from ``draw``), to save drawing it again."""
        i = self._index(i)
        rng = np.random.default_rng([_RNG_SALT, self.config.seed, self._split_id, i, 1])
        return partial_caption_values(self.scene(i) if scene is None else scene, rng)

    def partial_caption(self, i) -> str:
        """Caption of image i naming a random subset of its attribute values (``partial_caption_values``)."""
        return caption_for(self.partial_caption_values(i))

    def render(self, i) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (H, W, R) image, bool (H, W) object mask) of image i."""
        return self.draw(i)[1:]

    def draw(self, i) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """(scene, uint8 (H, W, R) image, bool (H, W) object mask) of image i: ``scene`` and
        ``render`` from one pass over its stream, for callers that need both."""
        i = self._index(i)
        rng = self._rng(i)
        scene = _sample_scene(rng, self.class_attributes[i % self.n_classes], self._allowed)
        return (scene, *render_scene(scene, self.config.image_size, rng))

    def mask(self, i) -> np.ndarray:
        """Bool (H, W) object mask of image i (pixels at least half covered by the object)."""
        return object_coverage(self.scene(i), self.config.image_size) >= 0.5

    def image_id(self, i) -> str:
        """Stable id of image i, 'synthetic/<split>/<i>'."""
        return f"synthetic/{self.split}/{self._index(i)}"

    def __getitem__(self, i) -> tuple[Any, int]:
        i = self._index(i)
        pixels_HWR, _ = self.render(i)
        image = Image.fromarray(pixels_HWR)
        if self.transform is not None:
            image = self.transform(image)
        return image, i % self.n_classes

    def __repr__(self) -> str:
        return (f"SyntheticWorld({self.config!r}, n_images={self.n_images}, split={self.split!r}, "
                f"allow_held_out={self.allow_held_out})")
