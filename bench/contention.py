"""Two stages sharing the machine: run side by side, they should take about as long as one after the other.

    python bench/contention.py [--pretrain-steps N] [--train-tokens N]

Runs `pipeline pretrain` (the tiny CLIP, a few steps) and `pipeline train` (an SAE on a small
tiny-ViT store made first, untimed) as separate processes, first one after the other, then
both at once, and prints concurrent / sequential wall time (target <= 1.25 on 2 cores). Twice:
as users run them (default --threads: the CPUs each process may use; OpenMP threads sleep while
they wait), then with OMP_WAIT_POLICY=ACTIVE and --threads set to every CPU of the machine, the
setting that made `pipeline pretrain` 18x slower among other jobs (issue 19). Size each stage to
take ~20-40 s alone; on a busy machine the figures mean little.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.25


def pipeline(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """``pipeline ARGS`` started in the background; its messages kept aside, shown if it fails."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=log)
    proc.log = log
    return proc


def wait(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.wait() != 0:
            proc.log.seek(0)
            sys.stderr.write(proc.log.read().decode(errors="replace"))
            raise SystemExit(f"{' '.join(map(str, proc.args))} failed with status {proc.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--train-tokens", type=int, default=400_000)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                             "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    work = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    store = work / "store"

    runs = iter(range(1_000_000))

    def commands(extra: list[str]) -> tuple[list[str], list[str]]:
        """Fresh output folders each time (a finished run would not be redone)."""
        n = next(runs)
        return (["pretrain", "--out", str(work / f"pretrain-{n}"), "--steps", str(args.pretrain_steps),
                 "--warmup-steps", str(min(30, args.pretrain_steps // 2)), "--eval-images", "100", "--no-progress", *extra],
                ["train", "--cache", str(store), "--layer", "3", "--out", str(work / f"sae-{n}"),
                 "--tokens", str(args.train_tokens), "--no-progress", *extra])

    def seconds(*cmds: list[str], env: dict[str, str]) -> float:
        started = time.perf_counter()
        wait(*[pipeline(*cmd, env=env) for cmd in cmds])
        return time.perf_counter() - started

    def timed(extra: list[str], env: dict[str, str]) -> tuple[float, float, float]:
        first, second = commands(extra)
        alone = seconds(first, env=env), seconds(second, env=env)
        return *alone, seconds(*commands(extra), env=env)

    print(f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable; pretrain {args.pretrain_steps} steps, "
          f"train {args.train_tokens:,} tokens; load average {os.getloadavg()[0]:.1f}")
    try:
        wait(pipeline("extract", "--dataset", "synthetic", "--limit", "400", "--model", "tiny-vit",
                      "--pretrained", "none", "--layers", "3", "--out", str(store), "--no-progress", env=base))
        for label, extra, env in (("as users run them (default threads, OpenMP waits sleeping)", [], base),
                                  ("OMP_WAIT_POLICY=ACTIVE, --threads all CPUs", ["--threads", str(os.cpu_count())],
                                   {**base, "OMP_WAIT_POLICY": "ACTIVE"})):
            pretrain_s, train_s, both_s = timed(extra, env)
            print(f"{label}:\n  pretrain alone {pretrain_s:6.1f} s, train alone {train_s:6.1f} s, one after the "
                  f"other {pretrain_s + train_s:6.1f} s, both at once {both_s:6.1f} s: ratio "
                  f"{both_s / (pretrain_s + train_s):.2f} (target <= {TARGET_RATIO})")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
