"""SAE training step: achieved FLOP/s vs torch matmuls of the same shapes; TopK vs ReLU.

    python bench/train.py [--width 768] [--expansion 64] [--batch 2048] [--k 64]

A ReLU SAE step does five (B x D x S) matmuls (encoder and decoder forward; decoder weight,
code and encoder weight gradients) = 10·B·D·S FLOP. We time a full ``Trainer.step``
(losses, ghost-grad bookkeeping, decoder-norm projection, Adam) against the five bare
matmuls on the same device and threads. The paper's batch is 128 x 197 = 25,216 tokens;
the default here is 2,048 so a step fits a CPU's memory and patience (FLOP/s barely
depends on B at these sizes). Prints the ratio last (target >= 0.7 dense; TopK cheaper per
token than ReLU at the same width).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _util import peak_rss_mb, seconds

from pipeline.sae import TrainConfig, Trainer, build, config_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    b, d, s = args.batch, args.width, args.width * args.expansion
    x_BD = torch.randn(b, d)

    W_enc, W_dec = torch.randn(d, s) / d**0.5, torch.randn(s, d) / s**0.5
    f_BS, g_BD = torch.relu(x_BD @ W_enc), torch.randn(b, d)

    def matmuls() -> None:
        x_BD @ W_enc
        f_BS @ W_dec
        f_BS.T @ g_BD
        g_BD @ W_dec.T
        x_BD.T @ f_BS

    matmuls()
    t_mm = statistics.median(seconds(matmuls) for _ in range(args.steps))
    flop = 10 * b * d * s
    step_s = {}
    for arch in ("relu", "topk"):
        extra = {"k": args.k} if arch == "topk" else {}
        cfg = config_class(arch).from_expansion(d_in=d, expansion=args.expansion, **extra)
        trainer = Trainer(build(cfg, seed=0), TrainConfig(batch_tokens=b, warmup_steps=1, log_every=10**9))
        trainer.step(x_BD)
        step_s[arch] = statistics.median(seconds(lambda: trainer.step(x_BD)) for _ in range(args.steps))
        del trainer
    print(f"SAE {d} -> {s} ({args.expansion}x), batch {b} tokens, {torch.get_num_threads()} threads; "
          f"medians of {args.steps}")
    print(f"five bare matmuls  : {t_mm:6.2f} s  ({flop / t_mm / 1e9:6.1f} GFLOP/s)")
    for arch, t in step_s.items():
        print(f"{arch:5s} train step    : {t:6.2f} s  ({b / t:8,.0f} tokens/s"
              + (f", {flop / t / 1e9:6.1f} GFLOP/s achieved)" if arch == "relu" else f", k={args.k})"))
    print(f"peak RSS           : {peak_rss_mb():6.0f} MB")
    print(f"ratio topk/relu step time = {step_s['topk'] / step_s['relu']:.2f}  (target < 1)")
    print(f"ratio relu achieved/matmul FLOP/s = {t_mm / step_s['relu']:.2f}  (target >= 0.7)")


if __name__ == "__main__":
    main()
