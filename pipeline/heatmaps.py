"""Re-open a store's images by id and draw patch heatmaps over them (PNG, no display needed).

An activation store records how its images were made (``dataset`` and ``preprocess``
attributes); the statistics copy both into ``meta.json``. ``ImageSource`` uses them to show
an image as the model saw it: the synthetic world re-renders image ``i`` of a split from its
seed; folder datasets open ``ROOT/<image id>`` and apply the model's resize and centre crop,
so that the patch grid lines up with the picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class ImageUnavailable(Exception):
    """An image cannot be shown; the message says why (one line, shown on the report page)."""


def _size_hw(preprocess: dict[str, Any]) -> tuple[int, int] | None:
    size = (preprocess or {}).get("size")
    if size is None:
        return None
    if isinstance(size, (int, float)):
        return int(size), int(size)
    return int(size[0]), int(size[-1])


def model_view(image: Image.Image, preprocess: dict[str, Any]) -> np.ndarray:
    """``(H, W, R)`` uint8: ``image`` resized and cropped like open_clip's preprocessing (no normalisation)."""
    image = image.convert("RGB")
    hw = _size_hw(preprocess)
    if hw is None:
        return np.asarray(image)
    h, w = hw
    mode = preprocess.get("resize_mode", "shortest")
    resample = Image.BICUBIC if preprocess.get("interpolation", "bicubic") == "bicubic" else Image.BILINEAR
    if mode == "squash":
        return np.asarray(image.resize((w, h), resample))
    scale = (max if mode == "shortest" else min)(h / image.height, w / image.width)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new, resample)
    if mode == "shortest":  # centre crop
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return np.asarray(image.crop((left, top, left + w, top + h)))
    fill = preprocess.get("fill_color", 0)  # "longest": pad to the square
    canvas = Image.new("RGB", (w, h), (fill, fill, fill) if isinstance(fill, int) else tuple(fill))
    canvas.paste(image, ((w - image.width) // 2, (h - image.height) // 2))
    return np.asarray(canvas)


class ImageSource:
    """Opens images by their store id, as recorded in a statistics folder's ``image_source``."""

    def __init__(self, image_source: dict[str, Any], class_names: list[str], *, root: Path | str | None = None):
        self.dataset: dict[str, Any] = dict(image_source.get("dataset") or {})
        self.preprocess: dict[str, Any] = dict(image_source.get("preprocess") or {})
        self.name = str(self.dataset.get("name", "unknown"))
        recorded = self.dataset.get("root")
        self.root = Path(root) if root is not None else (Path(recorded) if recorded else None)
        self.class_names = list(class_names)
        self._task: str | None = None

    def problem(self) -> str | None:
        """Why no image of this source can be opened, or None when they may be."""
        if self.name == "synthetic":
            return None
        if self.name == "imported":
            return "the activations were imported from an array (pipeline import): there are no source images"
        if self.root is None:
            return f"the store does not record where the '{self.name}' images are; pass --root"
        if not self.root.is_dir():
            return f"the dataset root {self.root} does not exist here; pass --root DIR where the images are"
        return None

    def open(self, image_id: str) -> np.ndarray:
        """``(H, W, R)`` uint8 image as the model saw it; raises ImageUnavailable with the reason."""
        reason = self.problem()
        if reason:
            raise ImageUnavailable(reason)
        if self.name == "synthetic":
            return self._synthetic(image_id)
        path = self.root / image_id
        if not path.is_file():
            raise ImageUnavailable(f"{path} does not exist (pass --root DIR where the '{self.name}' images are)")
        try:
            with Image.open(path) as image:
                return model_view(image, self.preprocess)
        except OSError as err:
            raise ImageUnavailable(f"{path} could not be read ({err})") from None

    def _synthetic(self, image_id: str) -> np.ndarray:
        from pipeline.world import TASKS, SyntheticWorld, WorldConfig

        parts = image_id.split("/")
        if len(parts) != 3 or parts[0] != "synthetic" or not parts[2].isdigit():
            raise ImageUnavailable(f"'{image_id}' is not a synthetic image id (synthetic/<split>/<index>)")
        split, index = parts[1], int(parts[2])
        hw = _size_hw(self.preprocess)
        size = hw[0] if hw else 224
        seed = int(self.dataset.get("seed") or 0)
        if self._task is None:  # the task whose classes are the store's classes
            self._task = next((task for task in TASKS
                               if list(SyntheticWorld(WorldConfig(seed=seed, image_size=max(size, 16), task=task),
                                                      n_images=1).class_names) == self.class_names),
                              "shape_colour")
        world = SyntheticWorld(WorldConfig(seed=seed, image_size=max(size, 16), task=self._task),
                               n_images=index + 1, split=split)
        return world.render(index)[0]


def colormap_rgba(values: np.ndarray, vmax: float, cmap: str = "inferno") -> np.ndarray:
    """``values`` scaled by ``vmax`` through a matplotlib colormap, as uint8 RGBA."""
    from matplotlib import colormaps

    scaled = np.clip(values / vmax, 0, 1) if vmax > 0 else np.zeros_like(values, dtype=float)
    return (colormaps[cmap](scaled) * 255).astype(np.uint8)


def render_heatmap(map_HW: np.ndarray, vmax: float, *, image_HWR: np.ndarray | None = None,
                   size: int = 192, alpha: float = 0.65) -> Image.Image:
    """A ``size``-pixel-wide RGB picture of a patch map, over the image when one is given.

    Each patch is one flat cell (nearest-neighbour upsampling keeps the patch grid honest);
    zero patches leave the image untouched and the overlay's opacity grows with the value.
    """
    gh, gw = map_HW.shape
    if image_HWR is not None:
        height = max(1, round(size * image_HWR.shape[0] / image_HWR.shape[1]))
    else:
        height = max(1, round(size * gh / gw))
    rows, cols = np.arange(height) * gh // height, np.arange(size) * gw // size  # nearest patch of each pixel
    values = np.asarray(map_HW, float)[rows][:, cols]
    heat = colormap_rgba(values, vmax)[..., :3].astype(np.float32)
    if image_HWR is None:
        return Image.fromarray(heat.astype(np.uint8))
    base = np.asarray(Image.fromarray(image_HWR).convert("RGB").resize((size, height), Image.BICUBIC), np.float32)
    weight = (np.clip(values / vmax, 0, 1) if vmax > 0 else np.zeros_like(values))[..., None] * alpha
    return Image.fromarray((base * (1 - weight) + heat * weight).round().astype(np.uint8))
