"""One module per stage: ``Config``, ``Outputs``, ``run(config) -> Outputs`` and its ``STAGE``
declaration (what it reads and writes). This registry is what the CLI and dvc.yaml are built from.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.configs import Stage

NAMES = ("pretrain", "extract", "import", "train", "encode", "stats", "mask", "groundtruth", "report", "adapt",
         "remap", "summary", "block-probe")
_MODULES = {"import": "importer", "block-probe": "blockprobe"}  # `import` is a Python keyword


def load(name: str) -> Stage:
    """The declaration of a registered stage (imports its module only)."""
    return importlib.import_module(f"stages.{_MODULES.get(name, name)}").STAGE
