"""Strict JSON: what every JSON file of the project is written with.

Browsers and strict parsers reject the bare ``NaN``/``Infinity`` that Python's json module
writes by default, so no file may hold them. A value that has no finite number becomes
``null`` and says why in a sibling key ``<name>_why`` (cache/FORMAT.md, "JSON files"):
``Undefined(why)`` states the reason; a stray non-finite float gets a generic one; in a
list, the list's key carries the reason of its nulls. ``json.dumps(allow_nan=False)``
behind it refuses whatever still slips through.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

WHY_SUFFIX = "_why"


@dataclasses.dataclass(frozen=True)
class Undefined:
    """A value that does not exist for this run; written as null with ``why`` beside it."""

    why: str


def dumps(record: Any, indent: int | None = 2) -> str:
    """``record`` as strict JSON (numpy scalars and arrays as numbers and lists)."""
    return json.dumps(_clean(record)[0], indent=indent, allow_nan=False)


def loads(text: str) -> Any:
    """Parse strict JSON: a bare NaN, Infinity or -Infinity is refused."""
    return json.loads(text, parse_constant=_refuse)


def _refuse(name: str) -> None:
    raise ValueError(f"{name} is not JSON; write null and the reason in a '<name>{WHY_SUFFIX}' key")


def _clean(value: Any) -> tuple[Any, str | None]:
    """(JSON-ready value, why it is null or holds nulls, or None)."""
    if isinstance(value, Undefined):
        return None, value.why
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out[key], why = _clean(item)
            if why is not None and f"{key}{WHY_SUFFIX}" not in value:
                out[f"{key}{WHY_SUFFIX}"] = why
        return out, None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy scalars and arrays, 0-dim tensors
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        items = [_clean(item) for item in value]
        whys = [why for _, why in items if why is not None]
        return [item for item, _ in items], (f"null entries: {whys[0]}" if whys else None)
    if isinstance(value, float) and not math.isfinite(value):
        return None, f"was {value}: not a finite number"
    return value, None
