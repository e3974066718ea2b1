"""Store writer alone vs a raw sequential write of the same bytes to the same disk.

    python bench/writer.py [--images 1024] [--dir /tmp]

Feeds float16 activations of ViT-B/16 shape (N, 197, 768) from memory through
``ActivationStore.write_shard`` (whole shards, default chunk/shard sizes) and compares with
writing the same bytes to one file. Prints MB/s of both and their ratio last (target >= 0.7).
The store fsyncs each shard before marking it done (a power cut must not leave a shard marked
done whose bytes never reached the disk); the line before the ratio shows what the same fsync
per shard costs a raw write, so the price of durability and the writer's own overhead separate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _util import median_seconds, peak_rss_mb

from cache.store import StoreSpec, create_or_resume, plan_layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    n, t, d = args.images, args.tokens, args.width
    acts_NTD = np.random.default_rng(0).standard_normal((n, t, d), dtype=np.float32).astype(np.float16)
    chunk, shard = plan_layout(t * d * 2, n)
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-writer-"))
    labels, valid = np.zeros(n, np.int64), np.ones(n, bool)

    def store_write() -> None:
        path = work / "store"
        shutil.rmtree(path, ignore_errors=True)
        spec = StoreSpec(layers=(10,), n_tokens=t, d_model=d, image_ids=[str(i) for i in range(n)],
                         class_names=["a"], images_per_chunk=chunk, images_per_shard=shard,
                         config={"bench": 1}, attrs={})
        store = create_or_resume(path, spec)
        for s in range(store.n_shards):
            sl = store.shard_slice(s)
            store.write_shard(s, {10: acts_NTD[sl]}, labels[sl], valid[sl])

    def raw_write() -> None:
        with open(work / "raw.bin", "wb") as f:
            for s in range(0, n, shard):
                f.write(memoryview(acts_NTD[s:s + shard]))  # no copy, like the store

    def raw_synced_write() -> None:
        for s in range(0, n, shard):
            with open(work / f"raw-{s}.bin", "wb") as f:
                f.write(memoryview(acts_NTD[s:s + shard]))
                f.flush()
                os.fsync(f.fileno())

    store_write(), raw_write(), raw_synced_write()  # warm-up
    mb = acts_NTD.nbytes / 1e6
    t_store = median_seconds(store_write, args.repeats)
    t_raw = median_seconds(raw_write, args.repeats)
    t_synced = median_seconds(raw_synced_write, args.repeats)
    shutil.rmtree(work)
    print(f"data: {n} x {t} x {d} float16 = {mb:.0f} MB; chunks of {chunk} images, shards of {shard}")
    print(f"store writer : {mb / t_store:8.1f} MB/s")
    print(f"raw write    : {mb / t_raw:8.1f} MB/s")
    print(f"raw + fsync  : {mb / t_synced:8.1f} MB/s  (one fsync per shard, as the store does)")
    print(f"peak RSS     : {peak_rss_mb():8.0f} MB")
    print(f"ratio store/(raw + fsync per shard) = {t_synced / t_store:.2f}")
    print(f"ratio store/raw = {t_raw / t_store:.2f}  (target >= 0.7)")


if __name__ == "__main__":
    main()
