"""Shuffled token batches from an activation store, for SAE training.

Random access to single rows of a chunked array is slow (each read decodes a whole chunk),
so the loader reads *whole chunks* in a random order, ``window_chunks`` at a time, shuffles
the tokens of such a window in memory and cuts batches from the resulting stream. The next
window is read on a background thread while the current one is consumed.

The stream is a pure function of (store, config, start token): batches never depend on
timing or on where a previous run stopped, so training resumes from a token offset and
sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from cache.store import ActivationStore
from pipeline.errors import UserError

TOKEN_KINDS = ("all", "patches", "cls")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How tokens are drawn from a store."""

    layer: int  # block index to read (must be in the store)
    batch_tokens: int = 128 * 197  # tokens per batch (the paper: 128 images of ViT-B/16)
    token_kind: str = "all"  # all tokens, patches only, or the class token only
    window_chunks: int = 64  # chunks shuffled together; larger mixes more images per batch
    val_fraction: float = 0.0  # images held out for validation (chosen by seeded permutation)
    seed: int = 0  # seed of chunk order, token shuffle and the validation split

    def __post_init__(self) -> None:
        if self.token_kind not in TOKEN_KINDS:
            raise UserError(f"unknown token kind '{self.token_kind}'; choose one of {', '.join(TOKEN_KINDS)}")
        if self.batch_tokens < 1 or self.window_chunks < 1:
            raise UserError("batch tokens and window chunks must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"validation fraction must be in [0, 1), got {self.val_fraction}")


def token_indices(store: ActivationStore, kind: str) -> slice:
    """Token positions of a kind, from the store's recorded layout (never assumed)."""
    layout = store.token_layout
    if kind == "all":
        return slice(0, store.n_tokens)
    if kind == "cls":
        if layout.get("class_token_index") is None:
            raise UserError(f"{store.path} records no class token; use --token-kind all or patches")
        cls = int(layout["class_token_index"])
        return slice(cls, cls + 1)
    return slice(int(layout["n_prefix_tokens"]), store.n_tokens)


def split_rows(store: ActivationStore, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Boolean row masks of the train and val images (valid rows only), split by image."""
    valid = store.valid
    n_val = int(round(val_fraction * store.n_images))
    val = np.zeros(store.n_images, bool)
    val[np.random.default_rng([seed, 1]).permutation(store.n_images)[:n_val]] = True
    return {"train": valid & ~val, "val": valid & val, "all": valid}


class TokenLoader:
    """An endless, seeded stream of shuffled ``x_BD`` float32 token batches from one split."""

    def __init__(self, store: ActivationStore, cfg: LoaderConfig, *, split: str = "train"):
        store.require_complete()
        self.store, self.cfg = store, cfg
        self.array = store.acts(cfg.layer)
        self.tokens_T = token_indices(store, cfg.token_kind)
        self.rows = split_rows(store, cfg.val_fraction, cfg.seed)[split]
        c = store.images_per_chunk
        self.chunk_starts = np.arange(0, store.n_images, c)
        rows_per_chunk = np.add.reduceat(self.rows.astype(np.int64), self.chunk_starts)
        self.tokens_per_chunk = rows_per_chunk * len(range(store.n_tokens)[self.tokens_T])
        keep = self.tokens_per_chunk > 0
        self.chunk_starts, self.tokens_per_chunk = self.chunk_starts[keep], self.tokens_per_chunk[keep]
        self.tokens_per_epoch = int(self.tokens_per_chunk.sum())
        if self.tokens_per_epoch == 0:
            raise UserError(f"the {split} split of {store.path} has no tokens; check --val-fraction and the store")

    @property
    def d_model(self) -> int:
        return int(self.array.shape[2])

    def _windows(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.cfg.seed, 2, epoch]).permutation(len(self.chunk_starts))
        return [order[i:i + self.cfg.window_chunks] for i in range(0, len(order), self.cfg.window_chunks)]

    def _read_window(self, epoch: int, w: int, chunks: np.ndarray) -> torch.Tensor:
        """The window's tokens, shuffled, still float16 (batches are converted one at a time)."""
        c, d = self.store.images_per_chunk, self.d_model
        out_ND = np.empty((int(self.tokens_per_chunk[chunks].sum()), d), dtype=self.array.dtype)
        pos = 0
        for k in chunks:
            start = int(self.chunk_starts[k])
            stop = min(start + c, self.store.n_images)
            acts_NTD = self.array[start:stop]
            rows = self.rows[start:stop]
            if not rows.all():
                acts_NTD = acts_NTD[rows]
            acts_NTD = acts_NTD[:, self.tokens_T]
            n = acts_NTD.shape[0] * acts_NTD.shape[1]
            out_ND[pos:pos + n] = acts_NTD.reshape(n, d)
            pos += n
        perm = np.random.default_rng([self.cfg.seed, 3, epoch, w]).permutation(len(out_ND))
        return torch.from_numpy(out_ND[perm])

    def _token_stream(self, start_token: int) -> Iterator[torch.Tensor]:
        """Shuffled windows in order, the first one cut at ``start_token``; prefetches one ahead."""
        epoch, skip = divmod(start_token, self.tokens_per_epoch)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-loader") as pool:
            pending: Future | None = None
            while True:
                windows = self._windows(epoch)
                sizes = [int(self.tokens_per_chunk[w].sum()) for w in windows]
                first = 0
                while skip >= sizes[first]:
                    skip -= sizes[first]
                    first += 1
                jobs = [(epoch, i, windows[i]) for i in range(first, len(windows))]
                for j, job in enumerate(jobs):
                    current = pending.result() if pending is not None else self._read_window(*job)
                    pending = None
                    if j + 1 < len(jobs):
                        pending = pool.submit(self._read_window, *jobs[j + 1])
                    else:  # the next epoch's first window
                        pending = pool.submit(self._read_window, epoch + 1, 0, self._windows(epoch + 1)[0])
                    yield current[skip:]
                    skip = 0
                epoch += 1

    def batches(self, start_token: int = 0) -> Iterator[torch.Tensor]:
        """Endless float32 ``(batch_tokens, D)`` batches of the stream, from token ``start_token``."""
        b = self.cfg.batch_tokens
        carry: torch.Tensor | None = None  # the tail of the previous window, shorter than a batch
        for window in self._token_stream(start_token):
            pos = 0
            if carry is not None:
                pos = b - len(carry)
                if len(window) < pos:
                    carry = torch.cat([carry, window])
                    continue
                yield torch.cat([carry, window[:pos]]).float()
            n_full = (len(window) - pos) // b
            for i in range(n_full):
                yield window[pos + i * b: pos + (i + 1) * b].float()
            rest = window[pos + n_full * b:]
            carry = rest if len(rest) else None
