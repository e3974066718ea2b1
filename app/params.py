"""Reading params.yaml the way DVC does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from cache.errors import UserError


def load_params(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist; run from the project folder that holds params.yaml")
    # YAML 1.2, as DVC reads and writes params.yaml: `on`/`off` stay strings, never booleans
    try:
        params = YAML(typ="safe").load(Path(path).read_text()) or {}
    except YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path} is not valid YAML{at} ({getattr(err, 'problem', None) or err}); fix it, "
                        "e.g. check the indentation and the quotes there") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must map section names to settings")
    return params
