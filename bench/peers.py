"""Our SAE trainer against SAELens on the same planted activations: tokens/s, FVU and L0.

    python bench/peers.py [--tokens 1000000] [--threads 2] [--sizes 128 768]

`sae-lens` is installed for this benchmark only (the `interop` extra); it is never a
dependency of the project. Each size trains ReLU+L1, TopK and BatchTopK (k = 8) with both
trainers on the same in-memory pool of activations, with the same token budget, batch,
learning rate, warm-up and thread count. The two trainers run in turns of ``--chunk``
steps (``Turns``), each timed on its own turns from building the SAE to its last step, so
start-up counts (ours: the b_dec init from a sample; SAELens: its trainer's set-up) and
load from other work hits both alike. The data pool is made beforehand.

Data: a planted dictionary in superposition (4·D unit features, 8 active per token drawn
∝ 1/i, exponential magnitudes), scaled so tokens have mean norm √D, which is what both
tools expect of normalised activations, so neither normalises. FVU and L0 are measured
the same way for both on held-out tokens of the same distribution, each SAE in its
inference form (BatchTopK: its learned threshold). Each tool keeps its own loss and
defaults; the L1 weights differ because the losses do (ours: the token-norm error averaged
over D; SAELens: squared error summed over D, L1 weighted by decoder norms) and are chosen
so both land near the same L0. Ratios (ours ÷ SAELens tokens/s; our BatchTopK ÷ our TopK)
are printed last.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bar (read when tqdm is imported)
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from _util import peak_rss_mb

from pipeline.sae import TrainConfig, Trainer, build, config_class

N_ACTIVE, FEATURES_PER_DIM, EXPANSION, K = 8, 4, 8, 8
EVAL_TOKENS = 16_384


@dataclass(frozen=True)
class Size:
    """One SAE shape with its batch, budget share and the L1 weights that give both tools a similar L0."""

    d_in: int
    batch: int
    budget_share: float  # of --tokens
    l1_ours: float
    l1_lens: float


SIZES = {
    128: Size(d_in=128, batch=4096, budget_share=1.0, l1_ours=1.2e-3, l1_lens=5.0),
    768: Size(d_in=768, batch=1024, budget_share=0.25, l1_ours=3e-4, l1_lens=5.0),
}


def planted(d_in: int, n_tokens: int, seed: int) -> torch.Tensor:
    """(n_tokens, d_in) float32 activations of a planted dictionary, mean token norm √d_in."""
    g = torch.Generator().manual_seed(seed)
    n_features = FEATURES_PER_DIM * d_in
    dict_FD = torch.randn(n_features, d_in, generator=torch.Generator().manual_seed(0))
    dict_FD /= dict_FD.norm(dim=1, keepdim=True)
    log_p_F = -torch.arange(1, n_features + 1, dtype=torch.float32).log()
    parts = []
    for start in range(0, n_tokens, 8192):
        b = min(8192, n_tokens - start)
        gumbel_BF = -torch.log(-torch.log(torch.rand(b, n_features, generator=g).clamp_min(1e-20)))
        idx_BK = (log_p_F + gumbel_BF).topk(N_ACTIVE, dim=1).indices
        mag_BK = -torch.log(torch.rand(b, N_ACTIVE, generator=g).clamp_min(1e-20))
        parts.append(torch.nn.functional.embedding_bag(idx_BK, dict_FD, per_sample_weights=mag_BK, mode="sum"))
    x_ND = torch.cat(parts)
    return x_ND * (math.sqrt(d_in) / x_ND.norm(dim=1).mean())


class Turns:
    """Two trainers, each in its own thread, take turns of ``chunk`` batches; each one's clock runs only on its turn.

    So both see the same machine load, drift included (the ratio is robust to other work on
    the machine), while each runs its own unmodified training loop, start-up included.
    """

    def __init__(self, chunk: int):
        self.chunk, self.turn, self.done = chunk, 0, [False, False]
        self.seconds = [0.0, 0.0]
        self.started: list[float | None] = [None, None]  # when each clock last started (None: stopped)
        self.cond = threading.Condition()

    def run(self, jobs) -> list:
        """Run the two ``jobs(turns, me)`` in turns; returns their results."""
        results: list = [None, None]
        errors: list = []

        def worker(me: int) -> None:
            self._wait(me)
            try:
                results[me] = jobs[me](self, me)
            except Exception as exc:  # noqa: BLE001  (re-raised by the main thread)
                errors.append(exc)
            finally:
                self._stop(me)
                with self.cond:
                    self.done[me] = True
                    self.turn = 1 - me
                    self.cond.notify_all()

        threads = [threading.Thread(target=worker, args=(me,)) for me in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def _wait(self, me: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == me or self.done[1 - me])
        self.started[me] = time.perf_counter()

    def _stop(self, me: int) -> None:
        if self.started[me] is not None:
            self.seconds[me] += time.perf_counter() - self.started[me]
            self.started[me] = None

    def stop_clock(self, me: int) -> None:
        """End this trainer's timing (training is over; evaluation follows, untimed)."""
        self._stop(me)

    def batches(self, me: int, pool_ND: torch.Tensor, batch: int, n_steps: int) -> Iterator[torch.Tensor]:
        """``n_steps`` batches, consecutive slices of the pool (wrapping around), handing over every ``chunk``."""
        per_pass = pool_ND.shape[0] // batch
        for i in range(n_steps):
            if i and i % self.chunk == 0:
                self._stop(me)
                with self.cond:
                    self.turn = 1 - me
                    self.cond.notify_all()
                self._wait(me)
            j = i % per_pass
            yield pool_ND[j * batch:(j + 1) * batch]


def fvu_l0(x_ND: torch.Tensor, x_hat_ND: torch.Tensor, acts_l0_N: torch.Tensor) -> tuple[float, float]:
    """FVU (Σ‖x − x̂‖² / Σ‖x − mean‖²) and mean L0 over the held-out tokens."""
    fvu = (x_ND - x_hat_ND).pow(2).sum() / (x_ND - x_ND.mean(dim=0)).pow(2).sum()
    return float(fvu), float(acts_l0_N.float().mean())


def train_ours(turns: Turns, me: int, arch: str, size: Size, pool_ND, n_steps: int, lr: float, warmup: int, eval_ND):
    extra = {"l1": size.l1_ours} if arch == "relu" else {"k": K}
    sae = build(config_class(arch)(d_in=size.d_in, d_sae=EXPANSION * size.d_in, **extra), seed=0)
    trainer = Trainer(sae, TrainConfig(lr=lr, warmup_steps=warmup, batch_tokens=size.batch,
                                       log_every=10**9, checkpoint_every=10**9))
    trainer.init_from_sample(pool_ND[:size.batch])
    trainer.fit(turns.batches(me, pool_ND, size.batch, n_steps))
    turns.stop_clock(me)
    sae.eval()
    with torch.no_grad():
        x_hat_ND, codes = sae(eval_ND)
    return fvu_l0(eval_ND, x_hat_ND, codes.l0())


def train_lens(turns: Turns, me: int, arch: str, size: Size, pool_ND, n_steps: int, lr: float, warmup: int, eval_ND):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.standard_sae import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
    )
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    shape = {"d_in": size.d_in, "d_sae": EXPANSION * size.d_in}
    if arch == "relu":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**shape, l1_coefficient=size.l1_lens))
    elif arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**shape, k=K))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**shape, k=K))
    cfg = SAETrainerConfig(
        total_training_samples=n_steps * size.batch, train_batch_size_samples=size.batch, lr=lr,
        lr_end=lr, lr_warm_up_steps=warmup, logger=LoggingConfig(log_to_wandb=False),
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=turns.batches(me, pool_ND, size.batch, n_steps)).fit()
    turns.stop_clock(me)
    sae.eval()
    with torch.no_grad():
        acts_NS, pre_NS = sae.encode_with_hidden_pre(eval_ND)
        if arch == "batchtopk":  # its inference form (saved as JumpReLU): the learned threshold
            acts_NS = pre_NS.relu() * (pre_NS > sae.topk_threshold)
        x_hat_ND = sae.decode(acts_NS)
    return fvu_l0(eval_ND, x_hat_ND, (acts_NS > 0).sum(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000,
                        help="token budget at d 128 (d 768: a quarter of it, in batches of 1,024)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=5, help="steps per turn (the trainers alternate)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(SIZES), choices=sorted(SIZES))
    parser.add_argument("--archs", nargs="+", default=["relu", "topk", "batchtopk"],
                        choices=["relu", "topk", "batchtopk"])
    parser.add_argument("--l1-ours", type=float, help="our ReLU's L1 weight (default: per size)")
    parser.add_argument("--l1-lens", type=float, help="SAELens's ReLU L1 weight (default: per size)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import_start = time.perf_counter()
    import sae_lens  # imported once, outside the timed runs
    print(f"sae-lens {sae_lens.__version__} imported in {time.perf_counter() - import_start:.1f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    rows = []
    for d in args.sizes:
        size = SIZES[d]
        for field, value in (("l1_ours", args.l1_ours), ("l1_lens", args.l1_lens)):
            if value is not None:
                size = dataclasses.replace(size, **{field: value})
        n_steps = max(1, round(args.tokens * size.budget_share / size.batch))
        warmup = max(1, n_steps // 10)
        pool_ND = planted(d, min(n_steps, 256) * size.batch, seed=1)
        eval_ND = planted(d, EVAL_TOKENS, seed=2)
        print(f"\nd {d} -> {EXPANSION * d}: {n_steps} steps x {size.batch} tokens = {n_steps * size.batch:,}"
              f" tokens (pool {pool_ND.shape[0]:,}), lr {args.lr}, warm-up {warmup} steps, k {K},"
              f" L1 ours {size.l1_ours:g} / SAELens {size.l1_lens:g}")
        for arch in args.archs:
            turns = Turns(args.chunk)
            run = {"arch": arch, "size": size, "pool_ND": pool_ND, "n_steps": n_steps, "lr": args.lr,
                   "warmup": warmup, "eval_ND": eval_ND}
            results = turns.run([functools.partial(train_ours, **run), functools.partial(train_lens, **run)])
            for tool, seconds, (fvu, l0) in zip(("ours", "SAELens"), turns.seconds, results):
                tok_s = n_steps * size.batch / seconds
                rows.append((d, arch, tool, tok_s))
                print(f"  {arch:9s} {tool:7s} {seconds:7.1f} s  {tok_s:9,.0f} tokens/s  FVU {fvu:.3f}  L0 {l0:6.1f}",
                      flush=True)
        del pool_ND, eval_ND
    print(f"\npeak RSS {peak_rss_mb():,.0f} MB")
    speed = {(d, arch, tool): t for d, arch, tool, t in rows}
    for d in args.sizes:
        for arch in args.archs:
            print(f"ratio ours/SAELens tokens/s d {d} {arch} = "
                  f"{speed[d, arch, 'ours'] / speed[d, arch, 'SAELens']:.2f}  (target >= 1.2)")
        if {"topk", "batchtopk"} <= set(args.archs):
            print(f"ratio our batchtopk/topk tokens/s d {d} = "
                  f"{speed[d, 'batchtopk', 'ours'] / speed[d, 'topk', 'ours']:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
