"""Plots written next to a stage's outputs (PNG, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cache.atomic import atomic_write


def plot_curves(history: Sequence[dict[str, Any]], path: Path, *, panels: Sequence[tuple[str, str]],
                title: str, x: str = "step") -> Path:
    """One panel per (key, label) of ``history`` records against ``x``; missing keys are skipped."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(h[x], h[key]) for h in history if key in h]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
        ax.set_xlabel(x)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
