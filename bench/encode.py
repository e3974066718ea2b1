"""Encoding to the sparse code store vs the SAE forward alone.

    python bench/encode.py [--images 256] [--expansion 8] [--l0 149]

Builds a ViT-B/16-shaped store (N x 197 x 768 float16) and a ReLU SAE whose encoder bias
is set so that about ``--l0`` latents fire per token (the paper's L0 is ~149), then times
(a) ``pipeline encode`` end to end minus SAE loading (reads, encodes, CSR, zstd, writes),
(b) ``sae.encode`` alone on the same tokens held in memory. Prints the ratio last
(target >= 0.8).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from _util import peak_rss_mb, seconds
from loader import make_store

from pipeline.sae import ReLUConfig, build, save_sae
from stages import encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--l0", type=int, default=149)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    store = make_store(work / "store", args.images)
    sae = build(ReLUConfig.from_expansion(d_in=768, expansion=args.expansion, layer=10), seed=0).eval()
    x_ND = torch.from_numpy(store.acts(10)[:]).reshape(-1, 768).float()
    with torch.no_grad():  # a per-latent threshold that leaves ~l0 active latents per token
        pre = sae.pre_acts(sae.to_normed(x_ND[:4096]))
        sae.b_enc -= torch.quantile(pre, 1 - args.l0 / sae.config.d_sae, dim=0)
    save_sae(sae, work / "sae")
    batch = max(256, 2**26 // sae.config.d_sae)
    cfg = encode.Config(cache_dir=store.path, sae_dir=work / "sae", out_dir=work / "codes", device="cpu",
                        progress=False, overwrite=True)

    def forward_only() -> None:
        with torch.inference_mode():
            for i in range(0, len(x_ND), batch):
                sae.encode(x_ND[i:i + batch])

    def encode_run() -> float:
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
        return encode.run(cfg)

    out = encode_run()
    forward_only()
    t_enc = seconds(encode_run)
    t_fwd = seconds(forward_only)
    shutil.rmtree(work)
    n = len(x_ND)
    print(f"{args.images} images x 197 tokens, SAE 768 -> {sae.config.d_sae}, mean L0 {out.mean_l0:.0f}, "
          f"batch {batch} tokens, {torch.get_num_threads()} threads")
    print(f"pipeline encode : {n / t_enc:10,.0f} tokens/s")
    print(f"sae.encode only : {n / t_fwd:10,.0f} tokens/s")
    print(f"peak RSS        : {peak_rss_mb():10,.0f} MB")
    print(f"ratio encode/forward = {t_fwd / t_enc:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
