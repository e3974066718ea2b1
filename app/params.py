"""params.yaml sections -> stage configs, refusing keys that no stage knows."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from cache.errors import UserError


def load_params(path: Path) -> dict[str, dict[str, Any]]:
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist; run from the project folder that holds params.yaml")
    # YAML 1.2, as DVC reads and writes params.yaml: `on`/`off` stay strings, never booleans
    params = YAML(typ="safe").load(Path(path).read_text()) or {}
    if not isinstance(params, dict):
        raise UserError(f"{path} must map section names to settings")
    return params


def section(params: dict[str, Any], name: str, allowed: Iterable[str]) -> dict[str, Any]:
    """One section's settings; an unknown key is refused by name, with the keys that exist."""
    values = params.get(name) or {}
    allowed = set(allowed)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise UserError(f"params.yaml: unknown key '{unknown[0]}' in section '{name}'; "
                        f"known keys: {', '.join(sorted(allowed))}")
    return dict(values)
