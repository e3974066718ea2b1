"""Factories shared by the tests: tiny real models, generated image folders, small stores."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from stages import extract

TINY = "tiny-vit"
# `pipeline extract` options of make_extract_config's store
TINY_ARGS = ["--dataset", "synthetic", "--limit", "48", "--model", TINY, "--pretrained", "none",
             "--layers", "1,3", "--batch-size", "8", "--device", "cpu", "--chunk-images", "4",
             "--shard-images", "16", "--no-progress"]


def make_extract_config(tmp_path: Path, **overrides) -> extract.Config:
    """A fast extraction config: tiny random ViT on 48 synthetic images, several shards."""
    base = dict(dataset="synthetic", out_dir=tmp_path / "store", limit=48, model=TINY, pretrained="none",
                layers=(1, 3), batch_size=8, device="cpu", images_per_chunk=4, images_per_shard=16,
                progress=False)
    base.update(overrides)
    return extract.Config(**base)


def with_options(args: list[str], **replace: str) -> list[str]:
    """``args`` with the values of some options replaced, e.g. ``with_options(TINY_ARGS, layers="2")``."""
    out = list(args)
    for flag, value in replace.items():
        out[out.index("--" + flag.replace("_", "-")) + 1] = value
    return out


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under a store (the lock file holds a pid, so it is left out)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def make_image_folder(root: Path, n_classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    """Folder-per-class tree of generated JPEG/PNG images with class-dependent colours."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] += 150
            Image.fromarray(pixels).save(d / f"img_{i}.jpg" if i % 2 else d / f"img_{i}.png")
    return root


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    """A refusal: exit status 2 and exactly one `error:` line that names the problem."""
    assert code == 2, output
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle in lines[0], lines[0]


def sigkill_when(cmd: Sequence[str], ready: Callable[[], bool], *, env: dict[str, str], cwd: Path | None = None,
                 timeout: float = 120.0) -> None:
    """Run ``cmd`` and SIGKILL it once ``ready()`` holds (or at ``timeout``); fails if it ended by itself first."""
    with tempfile.TemporaryFile() as output:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:
            output.seek(0)
            raise AssertionError(f"{cmd[3:5]} ended before the kill:\n{output.read().decode(errors='replace')}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
