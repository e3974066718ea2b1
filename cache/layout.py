"""Token kinds of a store's recorded ``token_layout`` (FORMAT.md "Token order"), read in one place.

Within an image: the prefix tokens (class token, registers), the patches, then any vision
prompt tokens an adapted model appended (MaPLe, ``prompt_token_indices``; absent means none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROMPT_TOKEN_INDICES = "prompt_token_indices"


def n_prompt_tokens(layout: Mapping[str, Any]) -> int:
    """Prompt tokens after the patches (0 for base models and stores that drop them)."""
    return len(layout.get(PROMPT_TOKEN_INDICES) or [])


def patch_slice(layout: Mapping[str, Any], n_tokens: int) -> slice:
    """Positions of the patch tokens: after the prefix, before any prompt tokens."""
    return slice(int(layout["n_prefix_tokens"]), n_tokens - n_prompt_tokens(layout))


def with_prompt_tokens(layout: Mapping[str, Any], n_prompts: int) -> dict[str, Any]:
    """``layout`` with ``n_prompts`` prompt tokens appended after its last token."""
    t = int(layout["n_tokens"])
    return {**layout, "n_tokens": t + n_prompts, PROMPT_TOKEN_INDICES: list(range(t, t + n_prompts))}
