"""Shuffled token loader: determinism, resume by token offset, coverage, mixing, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.errors import UserError
from cache.loader import LoaderConfig, TokenLoader, split_rows
from cache.store import ActivationStore
from stages import importer


def _id_store(tmp_path, n=60, t=5, d=4, chunk=4, shard=12):
    """Each token's first coordinate is its global token id (row * t + token), exact in float16."""
    acts = np.zeros((n, t, d), np.float32)
    acts[..., 0] = np.arange(n * t).reshape(n, t)
    acts[..., 1] = np.arange(t)[None, :]
    np.save(tmp_path / "acts.npy", acts)
    importer.run(importer.Config(source_path=tmp_path / "acts.npy", out_dir=tmp_path / "store",
                                 images_per_chunk=chunk, images_per_shard=shard))
    return ActivationStore(tmp_path / "store")


def _take(loader, n_batches, start=0):
    it = loader.batches(start)
    return [next(it) for _ in range(n_batches)]


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    store = _id_store(tmp_path)
    cfg = LoaderConfig(layer=0, batch_tokens=7, window_chunks=3, seed=1)
    a, b = _take(TokenLoader(store, cfg), 30), _take(TokenLoader(store, cfg), 30)
    c = _take(TokenLoader(store, LoaderConfig(layer=0, batch_tokens=7, window_chunks=3, seed=2)), 30)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("skip", [1, 5, 42, 43, 90])  # inside windows, at a window edge, past an epoch
def test_resume_from_token_offset_matches_uninterrupted_stream(tmp_path, skip):
    store = _id_store(tmp_path)
    loader = TokenLoader(store, LoaderConfig(layer=0, batch_tokens=7, window_chunks=3, seed=0))
    full = _take(loader, skip + 10)
    resumed = _take(loader, 10, start=skip * 7)
    assert all(torch.equal(x, y) for x, y in zip(full[skip:], resumed))


def test_one_epoch_covers_every_token_exactly_once(tmp_path):
    store = _id_store(tmp_path)
    loader = TokenLoader(store, LoaderConfig(layer=0, batch_tokens=10, window_chunks=2, seed=0))
    assert loader.tokens_per_epoch == 300
    ids = torch.cat(_take(loader, 30))[:, 0].numpy()
    assert sorted(ids.tolist()) == list(range(300))
    assert not np.array_equal(ids, np.arange(300))  # shuffled, not the order on disk


def test_single_chunk_store_is_still_shuffled_and_terminates(tmp_path):
    store = _id_store(tmp_path, n=4, chunk=4, shard=4)
    loader = TokenLoader(store, LoaderConfig(layer=0, batch_tokens=6, seed=0))
    ids = torch.cat(_take(loader, 10))[:, 0].numpy()
    assert sorted(ids[:20].tolist()) == list(range(20))
    assert not np.array_equal(ids[:20], np.arange(20))
    assert not np.array_equal(ids[:20], ids[20:40])  # every epoch is reshuffled


def test_batches_mix_many_images(tmp_path):
    store = _id_store(tmp_path, n=400, chunk=4, shard=40)
    loader = TokenLoader(store, LoaderConfig(layer=0, batch_tokens=50, window_chunks=32, seed=0))
    images_per_batch = [len(np.unique(b[:, 0].numpy() // 5)) for b in _take(loader, 20)]
    assert min(images_per_batch) >= 30  # 50 tokens of ~128 images in the window: nearly all distinct


def test_token_kinds(tmp_path):
    store = _id_store(tmp_path)
    cls = TokenLoader(store, LoaderConfig(layer=0, token_kind="cls", batch_tokens=6))
    patches = TokenLoader(store, LoaderConfig(layer=0, token_kind="patches", batch_tokens=6))
    assert cls.tokens_per_epoch == 60 and patches.tokens_per_epoch == 240
    assert set(torch.cat(_take(cls, 10))[:, 1].tolist()) == {0.0}
    assert 0.0 not in set(torch.cat(_take(patches, 10))[:, 1].tolist())


def test_validation_split_is_by_image_and_disjoint(tmp_path):
    store = _id_store(tmp_path)
    masks = split_rows(store, 0.25, seed=3)
    assert masks["val"].sum() == 15 and masks["train"].sum() == 45
    assert not (masks["val"] & masks["train"]).any()
    val_loader = TokenLoader(store, LoaderConfig(layer=0, val_fraction=0.25, seed=3, batch_tokens=5), split="val")
    rows = set((torch.cat(_take(val_loader, 15))[:, 0].numpy() // 5).astype(int).tolist())
    assert rows == set(np.flatnonzero(masks["val"]).tolist())


def test_refuses_incomplete_store_and_bad_config(tmp_path):
    store = _id_store(tmp_path)
    store.group["done"][0] = 0
    with pytest.raises(UserError, match="pipeline verify"):
        TokenLoader(ActivationStore(tmp_path / "store"), LoaderConfig(layer=0))
    with pytest.raises(UserError, match="token kind"):
        LoaderConfig(layer=0, token_kind="registers")
    with pytest.raises(UserError, match="layer 7 is not in"):
        store.group["done"][0] = 1
        TokenLoader(ActivationStore(tmp_path / "store"), LoaderConfig(layer=7))


def test_batches_dropped_by_the_consumer_are_reused_held_ones_never():
    """Held batches keep their values; dropped ones give their memory to later batches."""
    from cache.loader import _Recycler
    pool = _Recycler((4, 2), np.float16, keep=2)
    held = torch.from_numpy(pool.array())
    view = held[1:]
    del held
    dropped = pool.array()
    assert not np.shares_memory(dropped, view.numpy())  # a view still holds the first array
    dropped_id = id(dropped)
    del dropped
    assert id(pool.array()) == dropped_id


def test_stream_is_the_same_whether_batches_are_kept_or_dropped(tmp_path):
    store = _id_store(tmp_path, n=120)
    cfg = LoaderConfig(layer=0, batch_tokens=20, window_chunks=3, seed=4)
    kept = _take(TokenLoader(store, cfg), 40)
    it, addresses, dropped = TokenLoader(store, cfg).batches(0), set(), []
    for _ in range(40):
        x = next(it)
        addresses.add(x.data_ptr())
        dropped.append(x.clone())
    assert all(torch.equal(a, b) for a, b in zip(kept, dropped))
    assert len({x.data_ptr() for x in kept}) == 40
    assert len(addresses) < 10  # memory of dropped batches was reused


def _reference_stream(store, cfg, split, n_tokens):
    """The stream by its definition, in plain numpy: chunks holding tokens of the split in the seeded
    order of each epoch, ``window_chunks`` at a time, each window's tokens in the window's seeded order."""
    acts_NTD = store.acts(cfg.layer)[:]
    rows = split_rows(store, cfg.val_fraction, cfg.seed)[split]
    tokens = {"all": slice(None), "cls": slice(0, 1), "patches": slice(1, None)}[cfg.token_kind]
    c = store.images_per_chunk
    chunks = [acts_NTD[s:s + c][rows[s:s + c]][:, tokens].reshape(-1, acts_NTD.shape[2])
              for s in range(0, store.n_images, c)]
    chunks = [x for x in chunks if len(x)]
    parts, epoch = [], 0
    while sum(map(len, parts)) < n_tokens:
        order = np.random.default_rng([cfg.seed, 2, epoch]).permutation(len(chunks))
        for w, i in enumerate(range(0, len(order), cfg.window_chunks)):
            window = np.concatenate([chunks[k] for k in order[i:i + cfg.window_chunks]])
            parts.append(window[np.random.default_rng([cfg.seed, 3, epoch, w]).permutation(len(window))])
        epoch += 1
    return np.concatenate(parts)[:n_tokens]


@pytest.mark.parametrize("kind,val,window,batch,start", [
    ("all", 0.0, 3, 7, 0), ("all", 0.0, 4, 50, 333), ("patches", 0.0, 2, 9, 5), ("cls", 0.0, 5, 4, 0),
    ("all", 0.3, 3, 11, 100), ("patches", 0.3, 64, 13, 7)])
def test_batches_equal_a_plain_reference_of_the_stream(tmp_path, kind, val, window, batch, start):
    store = _id_store(tmp_path)  # every token's first coordinate is its id: equal arrays mean equal order
    cfg = LoaderConfig(layer=0, token_kind=kind, val_fraction=val, window_chunks=window, batch_tokens=batch, seed=5)
    n_batches = 3 * TokenLoader(store, cfg).tokens_per_epoch // batch  # about three epochs
    got = torch.cat(_take(TokenLoader(store, cfg), n_batches, start=start)).numpy()
    want = _reference_stream(store, cfg, "train", start + n_batches * batch)[start:]
    np.testing.assert_array_equal(got, want)


def test_closing_a_stream_stops_its_prefetch_and_the_next_stream_reuses_its_memory(tmp_path, monkeypatch):
    """The prefetch of the second window, if it started, is blocked in its first chunk until the stream is
    closing: it then reads no further chunk, and the loader's next stream fills the same two buffers with the same batches."""
    import threading

    import cache.loader as loader_module

    store = _id_store(tmp_path)
    cfg = LoaderConfig(layer=0, batch_tokens=7, window_chunks=4, seed=0)
    want = _take(TokenLoader(store, cfg), 12)
    loader = TokenLoader(store, cfg)
    closing, reads, read = threading.Event(), [], store.read

    class Pool(loader_module.ThreadPoolExecutor):
        def shutdown(self, *args, **kwargs):  # the stream has told its reader to stop
            closing.set()
            super().shutdown(*args, **kwargs)

    def slow_read(*args, **kwargs):
        reads.append(args[1])
        if len(reads) > cfg.window_chunks:  # the prefetch of the second window
            assert closing.wait(timeout=60)
        return read(*args, **kwargs)

    monkeypatch.setattr(loader_module, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(store, "read", slow_read)
    it = loader.batches(0)
    next(it)
    it.close()
    assert len(reads) <= cfg.window_chunks + 1  # the first window, and at most the chunk being read
    buffers = [b.__array_interface__["data"][0] for b in loader._free_buffers]
    assert len(buffers) == 2
    monkeypatch.setattr(store, "read", read)
    got = _take(loader, 12)
    assert all(torch.equal(x, y) for x, y in zip(want, got))
    assert sorted(buffers) == sorted(b.__array_interface__["data"][0] for b in loader._free_buffers)
