"""Extraction throughput vs the bare open_clip forward, and early stop vs the full forward.

    python bench/extract.py [--model ViT-B-16] [--layer 10] [--images 32] [--batch-size 16]

Four timings on the same images and batch size (random-init weights: speed does not
depend on them):
  extract    : ``pipeline extract``'s streaming loop (synthetic images rendered and
               preprocessed -> model -> Zarr store; model loading and store creation
               excluded, as they are paid once per store)
  model→Zarr : the same loop fed the already-preprocessed images from memory, i.e. what
               storing costs on top of the model (TARGETS.md's "model → Zarr")
  bare       : ``visual.forward_intermediates`` stopping at the tapped block, images in memory
  full       : ``encode_image`` (every block, pooling, projection)
Prints images/s, peak RSS, then the ratios (targets: model→Zarr/bare >= 0.95, bare/full > 1.1;
extract/bare is printed too: on 2 cores, rendering the images competes with the model).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from _util import peak_rss_mb, seconds

from pipeline.datasets import ImageSet, open_dataset
from pipeline.models import load_model
from stages import extract


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = load_model(args.model, "none", device="cpu")
    images = open_dataset("synthetic", root=None, split=None, transform=model.preprocess, limit=args.images,
                          image_size=model.image_size)
    batches = [torch.stack([images.dataset[i][0] for i in range(s, min(s + args.batch_size, args.images))])
               for s in range(0, args.images, args.batch_size)]
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    cfg = extract.Config(dataset="synthetic", out_dir=work / "store", limit=args.images, model=args.model,
                         pretrained="none", layers=(args.layer,), batch_size=args.batch_size, device="cpu",
                         progress=False)

    decoded = [images.dataset[i] for i in range(args.images)]
    in_memory = ImageSet(decoded, images.class_names, images.image_ids, images.name, images.split, images.root)

    def run_extract(preloaded: bool = False) -> float:
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        extract.open_dataset = (lambda *a, **k: in_memory) if preloaded else open_dataset
        return extract.run(cfg).stream_seconds

    @torch.inference_mode()
    def bare() -> None:
        for x in batches:
            model.visual.forward_intermediates(x, indices=[args.layer], stop_early=True, intermediates_only=True,
                                               output_fmt="NLC", output_extra_tokens=True)

    @torch.inference_mode()
    def full() -> None:
        for x in batches:
            model.model.encode_image(x)

    run_extract(), run_extract(True), bare(), full()  # warm-up
    runs = [(run_extract(), run_extract(True), seconds(bare), seconds(full))
            for _ in range(args.repeats)]  # interleaved
    t_extract, t_store, t_bare, t_full = (statistics.median(col) for col in zip(*runs))
    # ratios pair by pair (each round's runs saw the same machine load), then their median
    tap_vs_full = statistics.median(f / b for _, _, b, f in runs)
    extract_vs_bare = statistics.median(b / e for e, _, b, _ in runs)
    store_vs_bare = statistics.median(b / z for _, z, b, _ in runs)
    shutil.rmtree(work)
    n = args.images
    print(f"{args.model}, tap block {args.layer}, {n} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats}")
    print(f"extract (streaming loop)                  : {n / t_extract:7.2f} images/s")
    print(f"model->Zarr (same loop, images in memory) : {n / t_store:7.2f} images/s")
    print(f"bare forward to block {args.layer:<2d}               : {n / t_bare:7.2f} images/s")
    print(f"full forward (encode_image)               : {n / t_full:7.2f} images/s")
    print(f"peak RSS                                  : {peak_rss_mb():7.0f} MB")
    print(f"ratio tap/full = {tap_vs_full:.2f}  (target > 1.1; median of per-round ratios)")
    print(f"ratio model->Zarr/bare = {store_vs_bare:.2f}  (target >= 0.95; median of per-round ratios)")
    print(f"ratio extract/bare = {extract_vs_bare:.2f}  (images rendered in the loop; median of per-round ratios)")


if __name__ == "__main__":
    main()
