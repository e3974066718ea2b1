"""A paper-width ReLU SAE step on CPU in micro-batches: peak RSS and tokens/s.

    OMP_NUM_THREADS=2 python bench/paper_step.py [--images 128] [--width 768] [--expansion 64] [--steps 3]

The paper's step is 128 images x 197 tokens = 25,216 tokens through a x64 SAE of ViT-B-16
width (768 -> 49,152): one dense float32 (tokens x latents) tensor is 4.96 GB, and a step
holds several at once, so the whole step does not fit 24 GiB. ``Trainer.step`` runs it in
micro-batches (automatic size) with the whole batch's update. Half the latents are marked
dead so ghost gradients run, as they do for most of a real run. Activations are random and
non-centred (mean 1, per-dimension scales 0.5..2).

Each measurement runs in a child process so its ru_maxrss is its own: the micro-batched
step, and a one-part (whole) step on as many tokens as one micro-batch. From the latter the
whole paper step's RSS is extrapolated (fixed part + per-token part x 25,216); it is run only
if that estimate is under --whole-limit-gib.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _util import peak_rss_mb

from pipeline.sae import ReLUConfig, TrainConfig, Trainer, build

GIB = 2**30


def child(args: argparse.Namespace) -> None:
    """Build, mark half the latents dead, run ``args.steps`` steps; print one JSON line."""
    torch.manual_seed(0)
    d, s, b = args.width, args.width * args.expansion, args.tokens
    sae = build(ReLUConfig(d_in=d, d_sae=s, dead_window_tokens=b), seed=0)
    trainer = Trainer(sae, TrainConfig(batch_tokens=b, warmup_steps=1, log_every=10**9,
                                       micro_batch_tokens=args.micro_batch_tokens))
    trainer.firing.tokens_since_fired_S[: s // 2] = b  # dead: ghost grads on for these
    trainer.firing.n_tokens = b
    scale_D = torch.linspace(0.5, 2.0, d)
    x_BD = 1.0 + torch.randn(b, d) * scale_D
    before_mb = peak_rss_mb()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        out = trainer.step(x_BD)
        times.append(time.perf_counter() - start)
    print(json.dumps({"tokens": b, "part_tokens": trainer.cfg.part_tokens(s), "before_mb": before_mb,
                      "peak_mb": peak_rss_mb(), "seconds": times, "aux_loss": float(out["aux_loss"]),
                      "threads": torch.get_num_threads()}))


def run_child(tokens: int, steps: int, micro: int | None, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--tokens", str(tokens), "--steps", str(steps),
           "--width", str(args.width), "--expansion", str(args.expansion)]
    if micro is not None:
        cmd += ["--micro-batch-tokens", str(micro)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--tokens-per-image", type=int, default=197)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--whole-limit-gib", type=float, default=12.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    b, d, s = args.images * args.tokens_per_image, args.width, args.width * args.expansion
    parts = run_child(b, args.steps, None, args)
    m = parts["part_tokens"]
    one_part = run_child(m, 1, m, args)
    per_token_mb = (one_part["peak_mb"] - one_part["before_mb"]) / m
    whole_est_mb = one_part["before_mb"] + per_token_mb * b
    print(f"SAE {d} -> {s:,} (x{args.expansion}) ReLU + ghost grads (half the latents dead), "
          f"{args.images} images x {args.tokens_per_image} tokens = {b:,} tokens/step, "
          f"{parts['threads']} threads, CPU")
    print(f"one dense (tokens x latents) float32 tensor: {4 * b * s / 1e9:.2f} GB")
    print(f"micro-batched step : {b // m + (b % m > 0)} parts of <= {m:,} tokens (automatic)")
    print(f"  step seconds     : {', '.join(f'{t:.1f}' for t in parts['seconds'])}")
    print(f"  tokens/s         : {b / min(parts['seconds']):,.0f} (best step), "
          f"{b * len(parts['seconds']) / sum(parts['seconds']):,.0f} (mean)")
    print(f"  peak RSS         : {parts['peak_mb']:,.0f} MB ({parts['peak_mb'] / 1024:.2f} GiB; "
          f"{parts['before_mb']:,.0f} MB before the first step)")
    print(f"one-part step of {m:,} tokens: peak RSS {one_part['peak_mb']:,.0f} MB "
          f"({per_token_mb:.2f} MB per token above the {one_part['before_mb']:,.0f} MB fixed part)")
    print(f"whole {b:,}-token step, extrapolated: {whole_est_mb / 1024:,.1f} GiB", end="")
    if whole_est_mb / 1024 < args.whole_limit_gib:
        whole = run_child(b, 1, b, args)
        print(f"; measured: {whole['peak_mb'] / 1024:.2f} GiB, {b / whole['seconds'][0]:,.0f} tokens/s")
    else:
        print(f" (> --whole-limit-gib {args.whole_limit_gib:g}: not run)")
    print(f"ratio micro-batched peak RSS / 24 GiB = {parts['peak_mb'] / 1024 / 24:.2f}  (target < 1)")
    print(f"ratio micro-batched / extrapolated whole-step RSS = {parts['peak_mb'] / whole_est_mb:.2f}")


if __name__ == "__main__":
    main()
