"""Pretraining the tiny CLIP at the default size: zero-shot accuracy and wall time.

    python bench/pretrain.py [--steps N] [--batch-size B] [--precision P] [--workers W] [--threads T]

Runs ``pipeline pretrain`` with params.yaml's ``pretrain`` settings (override with the
options) in a temporary folder, then prints the training wall time, the zero-shot accuracy
on 1,000 test images of the 20 shape x colour classes, and both against the targets
(>= 90 % within ~5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _util import peak_rss_mb

from pipeline.threads import quiet_openmp

quiet_openmp()  # as `pipeline pretrain` does, before torch is imported: waiting OpenMP threads sleep

from app.params import load_params  # noqa: E402
from pipeline.configs import from_section  # noqa: E402
from stages import pretrain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_ACCURACY = 0.90
TARGET_SECONDS = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--precision", choices=pretrain.PRECISIONS)
    parser.add_argument("--workers", type=int, default=1, help="batch-rendering processes (0 = in the loop)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = dict(load_params(ROOT / "params.yaml")["pretrain"])
    settings.update({k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                       ("precision", args.precision)) if v is not None})
    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    try:
        cfg = from_section(pretrain.Config, "pretrain", settings,
                           bound={"out_dir": work / "run", "threads": args.threads, "workers": args.workers,
                                  "progress": True})
        out = pretrain.run(cfg)
    finally:
        shutil.rmtree(work)
    print(f"{cfg.model}: {out.steps} steps x {cfg.batch_size} pairs, {cfg.precision}, {args.threads} threads, "
          f"{args.workers} rendering workers")
    print(f"training wall time        : {out.train_seconds:7.1f} s   (target <= ~{TARGET_SECONDS:.0f} s)")
    print(f"zero-shot accuracy        : {100 * out.accuracy:7.1f} %   (target >= {100 * TARGET_ACCURACY:.0f} %, "
          f"{out.n_classes} classes, chance {100 / out.n_classes:.1f} %)")
    print(f"mean per-class recall     : {100 * out.mean_recall:7.1f} %")
    print(f"final contrastive loss    : {out.final_loss:7.3f}")
    print(f"peak RSS                  : {peak_rss_mb():7.0f} MB")
    print(f"ratio time/target = {out.train_seconds / TARGET_SECONDS:.2f}, "
          f"accuracy/target = {out.accuracy / TARGET_ACCURACY:.2f}")


if __name__ == "__main__":
    main()
