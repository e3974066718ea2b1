"""Where the masking sweep's tap comes from: the rows of an activation store, or images run up to the tap.

Every source yields ``Batch``es of tapped residuals ``x_BTD`` with their labels (``batches``)
and plain CLIP's final image embeddings (``plain_features``), so the sweep need not know
which one it reads. An adapted (MaPLe) model's vision prompt tokens at the tap either ride
along in ``prompts_BXD`` (dropped: the SAE never sees them, the blocks after the tap do) or
follow the patches in ``x_BTD`` (kept: encoded and masked like every other token).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache.store import ActivationStore
from pipeline import maple, splice
from pipeline.datasets import ImageSet
from pipeline.models import DTYPES, LoadedModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Batch:
    rows: np.ndarray  # indices into the source's rows
    labels: np.ndarray  # int64
    x_BTD: torch.Tensor | None = None  # tapped residuals (not filled by plain_features)
    images: torch.Tensor | None = None  # preprocessed images
    prompts_BXD: torch.Tensor | None = None  # an adapted model's vision prompt tokens at the tap that the SAE does
                                             # not see (none left when x_BTD keeps them)


class CacheSource:
    """Rows of an activation store; the tap is read from ``acts/<layer>``, invalid rows are skipped."""

    kind = "cache"

    def __init__(self, store: ActivationStore, layer: int):
        self.store, self.layer = store, layer
        self.labels = store.labels
        self.valid = store.valid
        self.image_ids = [str(i) for i in store.image_ids]
        self.n_rows = store.n_images

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        want = np.zeros(self.n_rows, bool)
        want[rows] = True
        want &= self.valid
        c = self.store.images_per_chunk
        step = -(-batch_size // c) * c  # whole chunks per read, each checked against its digest
        for start in range(0, self.n_rows, step):
            stop = min(start + step, self.n_rows)
            keep = np.flatnonzero(want[start:stop])
            if not len(keep):
                continue
            block = self.store.read(self.layer, start, stop)
            for s in range(0, len(keep), batch_size):
                local = keep[s:s + batch_size]
                x = torch.from_numpy(np.ascontiguousarray(block[local])).to(torch.float32)
                yield Batch(rows=start + local, labels=self.labels[start + local], x_BTD=x)

    def plain_features(self, model: LoadedModel, rows: np.ndarray, batch_size: int, tail_rows: int,
                       class_token_only: bool = False) -> Iterator[tuple[Batch, torch.Tensor]]:
        for batch in self.batches(rows, max(batch_size, tail_rows)):
            yield batch, splice.finish_forward(model.visual, batch.x_BTD.to(model.device, DTYPES[model.dtype]),
                                               self.layer, class_token_only=class_token_only)


class _SafeRows(Dataset):
    """``(image, label, ok, row)`` for chosen rows; an unreadable image gives ok=False."""

    def __init__(self, data: Dataset, rows: np.ndarray, image_size: int):
        self.data, self.rows, self.image_size = data, rows, image_size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool, int]:
        row = int(self.rows[i])
        try:
            image, label = self.data[row]
            return image, int(label), True, row
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for corrupt files
            log.warning("skipping unreadable image %d: %s", row, str(err).splitlines()[0])
            return torch.zeros(3, self.image_size, self.image_size), -1, False, row


class ImageSource:
    """Rows of a dataset; the tap is computed by running the model up to the layer."""

    kind = "images"

    def __init__(self, images: ImageSet, model: LoadedModel, layer: int, workers: int):
        self.images, self.model, self.layer, self.workers = images, model, layer, workers
        self.image_ids = list(images.image_ids)
        self.n_rows = len(images)
        self.labels = np.full(self.n_rows, -1, np.int64)  # filled by the first pass
        self.valid = np.ones(self.n_rows, bool)

    def _loader(self, rows: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, np.ndarray, np.ndarray]]:
        loader = DataLoader(_SafeRows(self.images.dataset, rows, self.model.image_size), batch_size=batch_size,
                            num_workers=self.workers, pin_memory=self.model.device.startswith("cuda"))
        for images, labels, ok, rows_B in loader:
            ok = ok.numpy().astype(bool)
            rows_B = rows_B.numpy()
            self.valid[rows_B[~ok]] = False
            self.labels[rows_B[ok]] = labels.numpy()[ok]
            if ok.any():
                yield images[torch.from_numpy(ok)], rows_B[ok], labels.numpy()[ok]

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        for images, rows_B, labels in self._loader(rows, batch_size):
            x = splice.tap_forward(self.model.visual, images, self.layer).to(torch.float32)
            yield Batch(rows=rows_B, labels=labels, x_BTD=x)

    def plain_features(self, model: LoadedModel, rows: np.ndarray, batch_size: int, tail_rows: int,
                       class_token_only: bool = False) -> Iterator[tuple[Batch, torch.Tensor]]:
        for images, rows_B, labels in self._loader(rows, batch_size):
            with torch.inference_mode():
                feats = model.model.encode_image(images.to(model.device, DTYPES[model.dtype]))
            yield Batch(rows=rows_B, labels=labels), feats


class AdaptedImageSource(ImageSource):
    """Rows of a dataset through a MaPLe-adapted model.

    Dropped prompt tokens: the SAE sees the tap at the base model's positions (class token
    and patches); the vision prompt tokens ride along in the batch and rejoin them for the
    blocks after the tap (``AdaptedCLIP.finish``), unmasked. Kept (``keep_prompts``): they
    follow the patches in ``x_BTD``, so the SAE encodes them and every mask applies to them.
    An adapted ConvNeXt has none (``prompts_BXD`` is empty; its prompts are channel offsets in the
    stages, which ``AdaptedCLIP.finish`` runs after the tap), and refuses to keep them.
    """

    def __init__(self, images: ImageSet, model: LoadedModel, adapted: maple.AdaptedCLIP, layer: int, workers: int,
                 keep_prompts: bool = False):
        adapted.check_prompt_tokens(keep_prompts)
        super().__init__(images, model, layer, workers)
        self.adapted, self.keep_prompts = adapted, keep_prompts

    def batches(self, rows: np.ndarray, batch_size: int) -> Iterator[Batch]:
        for images, rows_B, labels in self._loader(rows, batch_size):
            x_BTD, prompts_BXD = self.adapted.tap_with_prompts(images, (self.layer,))[self.layer]
            if self.keep_prompts:
                x_BTD, prompts_BXD = torch.cat([x_BTD, prompts_BXD], dim=1), prompts_BXD[:, :0]
            yield Batch(rows=rows_B, labels=labels, x_BTD=x_BTD.to(torch.float32), prompts_BXD=prompts_BXD)

    def plain_features(self, model: LoadedModel, rows: np.ndarray, batch_size: int, tail_rows: int,
                       class_token_only: bool = False) -> Iterator[tuple[Batch, torch.Tensor]]:
        for images, rows_B, labels in self._loader(rows, batch_size):
            with torch.inference_mode():
                feats = self.adapted.encode_image(images)
            yield Batch(rows=rows_B, labels=labels), feats


def image_source(images: ImageSet, model: LoadedModel, adapted: maple.AdaptedCLIP | None, layer: int,
                 workers: int, *, keep_prompts: bool = False) -> ImageSource:
    """The images through the base model, or through ``adapted`` when given (its prompt tokens encoded and masked
    with ``keep_prompts``)."""
    if adapted is None:
        return ImageSource(images, model, layer, workers)
    return AdaptedImageSource(images, model, adapted, layer, workers, keep_prompts)

