"""Labelled image datasets by name, each with stable image ids and class names.

Nothing is ever downloaded: every real dataset is read from a local ``--root``; a missing
root says where to get the data. ``synthetic`` is generated offline (pipeline/world.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from cache.errors import UserError

log = logging.getLogger(__name__)

SYNTHETIC_DEFAULT_IMAGES = 1000


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """A map-style dataset returning ``(image, label)``, plus what a store records about it."""

    dataset: Dataset
    class_names: list[str]
    image_ids: list[str]  # stable id per row (path relative to root, or generator id)
    name: str
    split: str
    root: str | None
    world: dict[str, Any] | None = None  # synthetic only: WorldConfig.to_dict() plus allow_held_out

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclasses.dataclass(frozen=True)
class _Source:
    """How to open one named dataset."""

    build: Callable[[Path, str, Callable | None], Any]
    splits: tuple[str, ...]
    default_split: str
    how_to_get: str


def _tv(cls_name: str, **kwargs: Any) -> Callable[[Path, str, Callable | None], Any]:
    def build(root: Path, split: str, transform: Callable | None) -> Any:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        extra = dict(kwargs)
        if split != "all":
            extra["split"] = split
        return cls(str(root), transform=transform, download=False, **extra)

    return build


def _folder(root: Path, split: str, transform: Callable | None) -> Any:
    from torchvision.datasets import ImageFolder

    folder = root if split == "all" else root / split
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; an imagefolder root holds one folder per class "
                        f"(or SPLIT/CLASS/ folders when --split is given, e.g. --split all for none)")
    return ImageFolder(str(folder), transform=transform)


def _eurosat(root: Path, split: str, transform: Callable | None) -> Any:
    import torchvision.datasets as tvd

    data = tvd.EuroSAT(str(root), transform=transform, download=False)
    if split == "all":
        return data
    split_file = next((p for p in (root / "split_zhou_EuroSAT.json",
                                   root / "eurosat" / "split_zhou_EuroSAT.json") if p.exists()), None)
    if split_file is None:
        raise UserError(f"EuroSAT split '{split}' needs CoOp's split_zhou_EuroSAT.json in {root}; "
                        "put it there or use --split all")
    wanted = {Path(rel).name for rel, *_ in json.loads(split_file.read_text())[split]}
    data.samples = [s for s in data.samples if Path(s[0]).name in wanted]
    data.targets = [t for _, t in data.samples]
    data.imgs = data.samples
    return data


SOURCES: dict[str, _Source] = {
    "imagefolder": _Source(_folder, ("all", "train", "val", "test"), "all",
                           "point --root at a folder with one sub-folder of images per class"),
    "eurosat": _Source(_eurosat, ("all", "train", "val", "test"), "all",
                       "download EuroSAT RGB (27,000 images, 10 classes) and unpack it so that "
                       "ROOT/eurosat/2750/<class>/*.jpg exists"),
    "imagenet": _Source(_folder, ("train", "val"), "val",
                        "arrange ImageNet as ROOT/<split>/<wnid>/*.JPEG"),
    "ucf101": _Source(_folder, ("all", "train", "test"), "all",
                      "extract the middle frame of every UCF101 video into ROOT/<class>/*.jpg"),
    "caltech101": _Source(_tv("Caltech101"), ("all",), "all",
                          "unpack Caltech101 so that ROOT/caltech101/101_ObjectCategories exists"),
    "oxfordpets": _Source(_tv("OxfordIIITPet"), ("trainval", "test"), "test",
                          "unpack Oxford-IIIT Pet so that ROOT/oxford-iiit-pet/images exists"),
    "stanfordcars": _Source(_tv("StanfordCars"), ("train", "test"), "test",
                            "unpack Stanford Cars so that ROOT/stanford_cars exists"),
    "flowers102": _Source(_tv("Flowers102"), ("train", "val", "test"), "test",
                          "unpack Oxford Flowers102 so that ROOT/flowers-102 exists"),
    "food101": _Source(_tv("Food101"), ("train", "test"), "test",
                       "unpack Food-101 so that ROOT/food-101 exists"),
    "fgvcaircraft": _Source(_tv("FGVCAircraft"), ("train", "val", "trainval", "test"), "test",
                            "unpack FGVC-Aircraft so that ROOT/fgvc-aircraft-2013b exists"),
    "sun397": _Source(_tv("SUN397"), ("all",), "all",
                      "unpack SUN397 so that ROOT/SUN397 exists"),
    "dtd": _Source(_tv("DTD"), ("train", "val", "test"), "test",
                   "unpack DTD so that ROOT/dtd exists"),
}
DATASET_NAMES = ("synthetic", *SOURCES)


def _class_names(data: Any) -> list[str]:
    for attr in ("classes", "categories"):
        names = getattr(data, attr, None)
        if names:
            return [str(n) for n in names]
    labels = _labels_or_none(data)
    n = int(max(labels)) + 1 if labels is not None and len(labels) else 0
    return [f"class_{i}" for i in range(n)]


def _labels_or_none(data: Any) -> Sequence[int] | None:
    for attr in ("targets", "_labels", "y"):
        labels = getattr(data, attr, None)
        if labels is not None:
            return labels
    return None


def _image_ids(data: Any, root: Path) -> list[str]:
    """Paths relative to root where the dataset lists its files, else the row index."""
    paths = None
    if hasattr(data, "samples"):
        paths = [p for p, _ in data.samples]
    elif hasattr(data, "_samples"):
        paths = [p for p, _ in data._samples]
    else:
        for attr in ("_image_files", "_images"):
            if hasattr(data, attr):
                paths = list(getattr(data, attr))
                break
    if paths is None:
        return [str(i) for i in range(len(data))]
    out = []
    for p in paths:
        p = Path(p)
        try:
            out.append(str(p.resolve().relative_to(root.resolve())))
        except ValueError:
            out.append(str(p))
    return out


class _Subset(Dataset):
    def __init__(self, data: Any, indices: np.ndarray):
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.data[int(self.indices[i])]


def subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    """``limit`` rows chosen uniformly at random (seeded), kept in dataset order; all rows if no limit."""
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=limit, replace=False))


def dataset_labels(data: Any) -> np.ndarray:
    """Label of every row (int64), from the dataset's label list where it keeps one (no image decoding)."""
    if isinstance(data, _Subset):
        return dataset_labels(data.data)[data.indices]
    if callable(getattr(data, "label", None)):  # SyntheticWorld
        return np.array([data.label(i) for i in range(len(data))], np.int64)
    labels = _labels_or_none(data)
    if labels is None:
        return np.array([int(data[i][1]) for i in range(len(data))], np.int64)
    return np.asarray(labels, np.int64)


def few_shot_indices(labels_N: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` rows of every class, drawn uniformly without replacement (seeded), ascending.

    Every class in ``0 … max label`` must have at least ``shots`` rows.
    """
    rng = np.random.default_rng([seed, shots])
    picked = []
    for c in range(int(labels_N.max()) + 1):
        rows = np.flatnonzero(labels_N == c)
        if len(rows) < shots:
            raise UserError(f"class {c} has {len(rows)} images in this split, fewer than --shots {shots}; "
                            "lower --shots or use a larger split")
        picked.append(rng.choice(rows, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


def synthetic_options(world: dict[str, Any] | None) -> dict[str, Any]:
    """``open_dataset`` keywords that rebuild the synthetic world a store records (``ImageSet.world``)."""
    if not world:
        return {}
    return {"synthetic_task": world.get("task", "shape_colour"), "held_out": [tuple(p) for p in world.get("held_out", ())],
            "allow_held_out": bool(world.get("allow_held_out", False))}


def default_split(name: str) -> str:
    return "train" if name == "synthetic" else SOURCES[name].default_split if name in SOURCES else "all"


def open_dataset(name: str, *, root: str | Path | None, split: str | None, transform: Callable | None,
                 limit: int | None = None, seed: int = 0, image_size: int = 224,
                 synthetic_task: str = "shape_colour", held_out: Sequence = (),
                 allow_held_out: bool = False) -> ImageSet:
    """Open a dataset by name; bad names, roots and splits raise UserError with the fix.

    ``synthetic_task``, ``held_out`` and ``allow_held_out`` shape the synthetic world only:
    its classes, the values its pretraining never showed, and whether images may show them.
    """
    if name not in DATASET_NAMES:
        raise UserError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASET_NAMES)}")
    split = split or default_split(name)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    if name == "synthetic":
        from pipeline.world import SyntheticWorld, WorldConfig

        config = WorldConfig(seed=seed, image_size=image_size, task=synthetic_task, held_out=tuple(held_out))
        world = SyntheticWorld(config, n_images=limit or SYNTHETIC_DEFAULT_IMAGES, split=split, transform=transform,
                               allow_held_out=allow_held_out)
        record = {**config.to_dict(), "allow_held_out": bool(allow_held_out)}
        return ImageSet(world, list(world.class_names), [world.image_id(i) for i in range(len(world))],
                        name, split, None, record)
    source = SOURCES[name]
    if root is None:
        raise UserError(f"dataset '{name}' needs --root: {source.how_to_get}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist; {source.how_to_get}")
    if split not in source.splits:
        raise UserError(f"dataset '{name}' has no split '{split}'; choose one of: {', '.join(source.splits)}")
    try:
        data = source.build(root, split, transform)
    except UserError:
        raise
    except (RuntimeError, FileNotFoundError) as err:
        raise UserError(f"could not read dataset '{name}' under {root} ({str(err).splitlines()[0]}); "
                        f"{source.how_to_get}") from None
    if len(data) == 0:
        raise UserError(f"dataset '{name}' under {root} has no images; {source.how_to_get}")
    ids = _image_ids(data, root)
    keep = subset_indices(len(data), limit, seed)
    if len(keep) < len(data):
        data = _Subset(data, keep)
        ids = [ids[i] for i in keep]
        class_names = _class_names(data.data)
    else:
        class_names = _class_names(data)
    return ImageSet(data, class_names, ids, name, split, str(root.resolve()))
