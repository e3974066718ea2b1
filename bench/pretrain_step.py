"""Where a pretraining step's time goes, and what bfloat16 autocast buys.

    python bench/pretrain_step.py [--steps 30] [--threads 2]

Prepares ``--steps`` batches of the stage's default size (64 pairs) the way the DataLoader worker
does (``PairBatches``: render, caption, tokenise; timed), then trains one tiny CLIP per
precision side by side, one step of each in turn on the same batch, timing the forward
(with the loss), the backward and the optimizer step. Taking the steps in turn makes the
ratio robust to other work on the machine. Prints ms per step and, last, the ratio of the
median bfloat16 step to the median float32 step (medians: a step another process
interrupted does not count).
"""

from __future__ import annotations

import argparse
import statistics
import time

from pipeline.threads import quiet_openmp

quiet_openmp()  # as `pipeline pretrain` does, before torch is imported: waiting OpenMP threads sleep

import open_clip  # noqa: E402
import torch  # noqa: E402

from pipeline.world import SyntheticWorld  # noqa: E402
from stages import pretrain  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
WARMUP = 3  # steps of each precision not timed (first-call allocations, oneDNN kernel choice)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = pretrain.Config(out_dir="unused", steps=WARMUP + args.steps, warmup_steps=0)
    models = {}
    for precision in PRECISIONS:
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model(cfg.model).train()
        models[precision] = (model, pretrain.make_optimizer(model, cfg))
    world = pretrain.train_world(cfg, int(model.visual.image_size[0]))
    pairs = pretrain.PairBatches(SyntheticWorld(world, n_images=cfg.steps * cfg.batch_size, split="train"),
                                 cfg.batch_size, open_clip.get_tokenizer(cfg.model),
                                 model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"])
    prepare, batches = [], []
    for step in range(cfg.steps):
        start = time.perf_counter()
        batches.append(pairs[step])
        prepare.append(time.perf_counter() - start)

    parts = {p: {"forward": [], "backward": [], "optimizer": []} for p in PRECISIONS}
    losses = {p: [] for p in PRECISIONS}
    for step, (images_BRHW, tokens_BQ, true_BB, _) in enumerate(batches):
        for precision in PRECISIONS:
            model, optimizer = models[precision]
            t0 = time.perf_counter()
            loss = pretrain.contrastive_loss(model, images_BRHW, tokens_BQ, true_BB, precision)
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            optimizer.step()
            t3 = time.perf_counter()
            losses[precision].append(loss.item())
            if step >= WARMUP:
                for name, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
                    parts[precision][name].append(seconds)

    print(f"{cfg.model}, batch {cfg.batch_size}, {args.threads} threads, {args.steps} steps timed per precision")
    print(f"batch preparation (render, captions, tokens; 1 process): {1000 * statistics.median(prepare[WARMUP:]):6.1f} "
          f"ms per batch (median; the first batches also fill the token cache)")
    step_ms = {}
    for precision in PRECISIONS:
        medians = {name: 1000 * statistics.median(times) for name, times in parts[precision].items()}
        steps_s = [sum(parts) for parts in zip(*parts[precision].values())]
        step_ms[precision] = 1000 * statistics.median(steps_s)
        print(f"{precision:9s} step {step_ms[precision]:6.1f} ms (mean {1000 * statistics.mean(steps_s):6.1f}): "
              + ", ".join(f"{name} {ms:5.1f}" for name, ms in medians.items())
              + f" (medians); loss after {cfg.steps} steps {losses[precision][-1]:.3f}")
    print(f"ratio bfloat16/float32 step time (medians) = {step_ms['bfloat16'] / step_ms['float32']:.2f}")

if __name__ == "__main__":
    main()
