"""The one exception type for problems the user can fix, and the config checks that raise it."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input or state the user can fix; its message is one line saying what and how.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """


class DamagedShard(UserError):
    """A shard whose bytes cannot be read or do not match their recorded digest; names the repair.

    ``shard`` and ``why`` stay readable apart, so ``pipeline verify`` can list them without parsing
    the message.
    """

    def __init__(self, store: Any, shard: int, why: str):
        super().__init__(f"{store}: shard {shard} is damaged ({why}); `pipeline repair {store}` recomputes the "
                         "damaged shards")
        self.shard, self.why = shard, why


def require_integers(config: Any, *names: str) -> None:
    """Store each named field of a frozen dataclass as a plain int; bools and non-integers are refused
    (a YAML or JSON setting such as 2.5 or "3" must not pass silently)."""
    import numpy as np

    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"{name} must be an integer (got {value!r})")
        object.__setattr__(config, name, int(value))


def require_threads(threads: Any) -> None:
    """``--threads``: None (the CPUs this process may use) or at least 1."""
    if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
        raise UserError(f"--threads must be at least 1 (got {threads})")
