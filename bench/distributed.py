"""Distributed extraction: images/s with a local Dask cluster of 1 vs 2 worker processes.

    python bench/distributed.py [--model tiny-vit] [--images 6000]

Each worker is a single-threaded process that loads the model once and writes whole
shards. Times ``pipeline extract --scheduler local`` end to end (cluster start-up and model
loading included, as a user pays them). Prints the ratio last (2 workers / 1 worker; the
ideal on this 2-core machine is 2.0).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _util import peak_rss_mb

# This file's folder is first on sys.path and its name would shadow the dask.distributed
# package: move it last (worker processes inherit this sys.path and still find _util).
sys.path.append(sys.path.pop(sys.path.index(str(Path(__file__).resolve().parent))))

from stages import extract  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--shard-images", type=int, default=250)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    rate = {}
    for n_workers in (1, 2):
        cfg = extract.Config(dataset="synthetic", out_dir=work / str(n_workers), limit=args.images, model=args.model,
                             pretrained="none", layers=(1, 3), batch_size=64, images_per_shard=args.shard_images,
                             scheduler="local", n_workers=n_workers, progress=False)
        start = time.perf_counter()
        extract.run(cfg)
        rate[n_workers] = args.images / (time.perf_counter() - start)
    shutil.rmtree(work)
    print(f"{args.model}, {args.images} synthetic images, shards of {args.shard_images}")
    for n, r in rate.items():
        print(f"{n} worker{'s' if n > 1 else ' '} : {r:8.1f} images/s")
    print(f"peak RSS (coordinator) : {peak_rss_mb():.0f} MB")
    print(f"ratio 2 workers / 1 worker = {rate[2] / rate[1]:.2f}  (ideal 2.0 on 2 cores)")


if __name__ == "__main__":
    main()
