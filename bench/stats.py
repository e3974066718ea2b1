"""Peak memory of ``pipeline stats`` at N and 2N images (out of core: it should not grow).

    python bench/stats.py [--images 2000] [--d-sae 4096] [--l0 32] [--shard-images 100]

Builds two code stores of ViT-B/16-shaped images (197 tokens: class token + 14 x 14 patches)
with random sparse codes (about ``--l0`` active latents per token, latent popularity skewed
so that frequencies spread over decades), each with a matching activation store (width 2:
only labels, validity and ids are read). Runs the statistics stage (threads scheduler, no
plots) on each in a fresh subprocess, so each peak RSS is that run's alone, and prints the
ratio of the two peaks last (target ~1.0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _util import peak_rss_mb

T, GRID, N_CLASSES = 197, 14, 10


def build(work: Path, n: int, d_sae: int, l0: int, shard: int, seed: int = 0) -> tuple[Path, Path]:
    from cache.codes import CodeStore, ShardCodes
    from cache.store import StoreSpec, create_or_resume

    layout = {"n_tokens": T, "n_prefix_tokens": 1, "class_token_index": 0, "register_token_indices": [],
              "patch_grid": [GRID, GRID], "patch_order": "row-major"}
    labels = np.arange(n) % N_CLASSES
    spec = StoreSpec(layers=(10,), n_tokens=T, d_model=2, image_ids=[f"bench/{i}" for i in range(n)],
                     class_names=[f"class_{c}" for c in range(N_CLASSES)], images_per_chunk=shard,
                     images_per_shard=shard, config={"bench": n, "seed": seed},
                     attrs={"token_layout": layout, "dataset": {"name": "imported"}, "preprocess": {}})
    store = create_or_resume(work / "acts", spec)
    codes = CodeStore.create_or_resume(work / "codes", n_images=n, n_tokens=T, d_sae=d_sae, images_per_shard=shard,
                                       attrs={"acts_config_sha256": store.config_sha256, "token_layout": layout,
                                              "class_names": spec.class_names},
                                       identity=f"bench-{n}", overwrite=True)
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, d_sae + 1) ** 0.8
    cdf = np.cumsum(popularity) / popularity.sum()
    for k in range(store.n_shards):
        sl = store.shard_slice(k)
        m = (sl.stop - sl.start) * T
        latents = np.sort(np.searchsorted(cdf, rng.random((m, l0))), axis=1)
        keep = np.ones_like(latents, bool)
        keep[:, 1:] = np.diff(latents, axis=1) > 0  # one entry per (token, latent)
        ptr = np.zeros(m + 1, np.int64)
        np.cumsum(keep.sum(1), out=ptr[1:])
        indices = latents[keep].astype(np.int32)
        values = rng.exponential(0.3, len(indices)).astype(np.float32) + 1e-3
        store.write_shard(k, {10: np.zeros((sl.stop - sl.start, T, 2), np.float16)}, labels[sl],
                          np.ones(sl.stop - sl.start, bool))
        codes.write_shard(k, ShardCodes(ptr, indices, values))
    return work / "acts", work / "codes"


def run_one(codes: str, acts: str, out: str) -> None:
    here = Path(__file__).resolve().parent  # bench/ holds scripts named like packages (distributed.py)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from stages import stats

    baseline = peak_rss_mb()
    started = time.perf_counter()
    result = stats.run(stats.Config(codes_dir=Path(codes), cache_dir=Path(acts), out_dir=Path(out), plots=False))
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "import_rss_mb": baseline, "n_shards": result.n_shards,
                      "n_dead": result.n_dead, "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--l0", type=int, default=32)
    parser.add_argument("--shard-images", type=int, default=100)
    parser.add_argument("--run-one", nargs=3, metavar=("CODES", "ACTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        run_one(*args.run_one)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-stats-"))
    peaks = {}
    try:
        for n in (args.images, 2 * args.images):
            acts, codes = build(work / str(n), n, args.d_sae, args.l0, args.shard_images)
            size = sum(p.stat().st_size for p in codes.rglob("*") if p.is_file())
            # stats.py lives in stages/ too: run this file by path, and import `stages` from the project root
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", str(codes), str(acts), str(work / f"s{n}")]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parents[1])
            r = json.loads(done.stdout.strip().splitlines()[-1])
            peaks[n] = r["peak_rss_mb"]
            print(f"{n:6d} images ({r['n_shards']} shards of {args.shard_images}, codes {size / 2**20:,.0f} MB on disk): "
                  f"{r['seconds']:6.1f} s, {n * T / r['seconds']:10,.0f} tokens/s, peak RSS {r['peak_rss_mb']:6,.0f} MB "
                  f"(after imports {r['import_rss_mb']:,.0f} MB)")
            shutil.rmtree(work / str(n))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = args.images, 2 * args.images
    print(f"S = {args.d_sae} latents, L0 ~ {args.l0}, {T} tokens per image, top-k 10, threads scheduler")
    print(f"ratio peak RSS {b}/{a} images = {peaks[b] / peaks[a]:.2f}  (target ~1.0: memory does not grow with N)")


if __name__ == "__main__":
    main()
