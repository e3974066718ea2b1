"""What a long command says while it works: its plan first, then a progress bar that states,
once the run's own pace is known, how long the rest will take.

The estimate comes from the work itself, not from a table of past machines: the first unit
(which pays for start-up, compilation and cold caches) is left out, and the pace is measured
over the next few seconds. It is logged once, so it also reaches logs where no bar is drawn
(``--no-progress``, DVC's captured output).
"""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

log = logging.getLogger(__name__)

ESTIMATE_AFTER_S = 3.0  # seconds of steady work measured before the estimate
ESTIMATE_AFTER_FRACTION = 0.05  # ... or this share of the work, whichever comes first


def human_seconds(seconds: float) -> str:
    """3 s, 4 min 10 s, 2 h 05 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def announce(stage: str, *lines: str) -> None:
    """Say what a command is about to do: its inputs, outputs and sizes (one line each)."""
    log.info("%s: %s", stage, "\n  ".join(lines))


class Progress:
    """A tqdm bar (drawn unless ``enabled`` is false) whose first steady pace is logged as an estimate."""

    def __init__(self, *, total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True, **bar_options):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = initial
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                        dynamic_ncols=True, **bar_options)
        self._first: tuple[float, int] | None = None  # (time, units) at the end of the first update
        self.estimate_s: float | None = None

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, self.n)
            return
        if self.estimate_s is not None:
            return
        t0, n0 = self._first
        done, left = self.n - n0, self.total - self.n
        if left > 0 and done > 0 and (now - t0 >= ESTIMATE_AFTER_S or done >= ESTIMATE_AFTER_FRACTION * self.total):
            rate = done / (now - t0)
            self.estimate_s = left / rate
            if self.estimate_s >= 1:  # a run about to end needs no estimate
                log.info("%s: about %s to go (%s %s/s)", self.desc, human_seconds(self.estimate_s), _rate(rate),
                         self.unit)

    def set_postfix(self, *args, **kwargs) -> None:
        self.bar.set_postfix(*args, **kwargs)

    def close(self) -> None:
        self.bar.close()


def _rate(rate: float) -> str:
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def already(n_done: int, what: str) -> str:
    """", 40 already stored" when a rerun resumes, else nothing."""
    return f", {n_done:,} already {what}" if n_done else ""


def next_steps(*commands: str) -> str:
    """A summary's last lines: what a researcher usually runs or opens next."""
    return "  next: " + "\n        ".join(commands)
