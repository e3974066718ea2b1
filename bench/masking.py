"""A full masking sweep with the cached tap vs from images.

    python bench/masking.py [--model tiny-vit] [--images 64] [--layer L] [--expansion 8]
                            [--k 1,2,5,10,50,100,500,all] [--seeds 3] [--repeats 1]
                            [--threads N] [--full-last-block]

Builds, in a temporary folder, an activation store of ``--images`` synthetic images at one
layer (default: the second-to-last block) with a randomly initialised model
(``--pretrained none``), a random ReLU SAE (``--expansion`` x width latents, encoder bias set
so ~``--l0`` latents fire per token), and its codes and statistics (the real encode and
stats stages). Then times ``stages.mask.run`` end to end (model load, plain-CLIP pass,
probe, sweep) twice: with ``cache_dir`` (only the blocks after the tap run; no image is
read) and from the images (decode, preprocess, run up to the tap). Prints both wall times
(median over ``--repeats``), the sweep part alone, and the ratio images / cache last.

ViT-B-16 example (slow on a CPU): --model ViT-B-16 --images 16 --layer 10 --expansion 4
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from _util import peak_rss_mb

from cache.store import ActivationStore
from pipeline.models import load_model
from pipeline.sae import ReLUConfig, build, save_sae
from stages import encode, extract, mask, stats


def build_inputs(work: Path, args: argparse.Namespace, layer: int) -> tuple[Path, Path, Path]:
    store_dir = work / "store"
    extract.run(extract.Config(dataset="synthetic", out_dir=store_dir, limit=args.images, model=args.model,
                               pretrained="none", layers=(layer,), batch_size=args.batch_size, device="cpu",
                               progress=False))
    store = ActivationStore(store_dir, mode="r")
    d = store.d_model
    sae = build(ReLUConfig(d_in=d, d_sae=int(d * args.expansion), layer=layer, model=f"{args.model}/none",
                          cache_config_sha256=store.config_sha256), seed=0).eval()
    x_ND = torch.from_numpy(store.acts(layer)[: min(args.images, 16)]).reshape(-1, d).float()
    with torch.no_grad():  # per-latent thresholds leaving ~l0 active latents per token
        sae.b_dec.copy_(x_ND.mean(0))
        pre = sae.pre_acts(sae.to_normed(x_ND))
        sae.b_enc -= torch.quantile(pre, 1 - args.l0 / sae.config.d_sae, dim=0)
    save_sae(sae, work / "sae")
    encode.run(encode.Config(cache_dir=store_dir, sae_dir=work / "sae", out_dir=work / "codes", device="cpu",
                             progress=False))
    stats.run(stats.Config(codes_dir=work / "codes", cache_dir=store_dir, out_dir=work / "stats", plots=False,
                           scheduler="synchronous"))
    return store_dir, work / "sae", work / "stats"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--layer", type=int, help="default: the second-to-last block")
    parser.add_argument("--expansion", type=float, default=8.0)
    parser.add_argument("--l0", type=int, default=32)
    parser.add_argument("--k", default="1,2,5,10,50,100,500,all")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--full-last-block", action="store_true",
                        help="compute the last block for every token (default: class token only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_blocks = load_model(args.model, "none", device="cpu").n_blocks
    layer = n_blocks - 2 if args.layer is None else args.layer
    work = Path(tempfile.mkdtemp(prefix="bench-masking-"))
    try:
        store_dir, sae_dir, stats_dir = build_inputs(work, args, layer)
        d_sae = int(ActivationStore(store_dir, mode="r").d_model * args.expansion)
        ks = tuple(k for k in (mask.parse_k(v) for v in args.k.split(",")) if k == mask.ALL or k <= d_sae)
        common = dict(sae_dir=sae_dir, stats_dir=stats_dir, model=args.model, pretrained="none", ks=ks,
                      n_seeds=args.seeds, device="cpu", progress=False, plots=False, batch_size=args.batch_size,
                      probe_images=max(2, args.images // 4), class_token_only=not args.full_last_block)
        runs: dict[str, list[mask.Outputs]] = {"cache": [], "images": []}
        for r in range(args.repeats):
            for kind in ("cache", "images"):
                out_dir = work / f"out-{kind}-{r}"
                source = {"cache_dir": store_dir} if kind == "cache" else {"dataset": "synthetic",
                                                                            "limit": args.images}
                runs[kind].append(mask.run(mask.Config(out_dir=out_dir, **source, **common)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = {k: statistics.median(o.seconds for o in v) for k, v in runs.items()}
    sweep = {k: statistics.median(o.sweep_seconds for o in v) for k, v in runs.items()}
    first = runs["cache"][0]
    n_variants = 2 + len(ks) * 2 + args.seeds * 2 * sum(k != mask.ALL for k in ks)
    print(f"{args.model} (random init), layer {layer} of {n_blocks} blocks, {first.n_images} evaluation images "
          f"(+{args.images - first.n_images} probe), SAE {d_sae} latents, k={','.join(map(str, ks))}, "
          f"{args.seeds} seeds: {n_variants} spliced forwards per image, {torch.get_num_threads()} threads, "
          f"last block {'for every token' if args.full_last_block else 'for the class token only'}")
    for kind in ("cache", "images"):
        print(f"from {kind:6s}: full run {total[kind]:7.2f} s   sweep {sweep[kind]:7.2f} s   "
              f"({first.n_images * n_variants / sweep[kind]:,.0f} spliced image-forwards/s)")
    print(f"peak RSS        : {peak_rss_mb():,.0f} MB")
    print(f"sweep ratio images/cache = {sweep['images'] / sweep['cache']:.2f}")
    print(f"ratio images/cache (full run) = {total['images'] / total['cache']:.2f}")


if __name__ == "__main__":
    main()
