"""Config fields declared once: help from the trailing comment, identity, CLI names."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import pytest

from cache.errors import UserError
from pipeline.configs import Option, check_value, fields, from_section, identity_fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class Example:
    """A config as a stage writes it."""

    OPTIONS: ClassVar = {"total": Option("--tokens")}

    out_dir: str  # where it goes
    total: int = 5  # identity: how many tokens, a long help that goes on
                    # to a second line
    kind: Literal["a", "b"] = "a"  # identity: which one
    # -- not part of the identity
    progress: bool = True  # show a progress bar


def test_help_identity_and_options_come_from_the_declaration():
    by_name = {f.name: f for f in fields(Example)}
    assert by_name["total"].help == "how many tokens, a long help that goes on to a second line"
    assert by_name["out_dir"].help == "where it goes" and by_name["out_dir"].required
    assert identity_fields(Example) == ("total", "kind")
    assert by_name["total"].option.name == "--tokens" and by_name["progress"].default is True


def test_a_misaligned_continuation_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Bad:
        n: int = 1  # help
          # drifted
    with pytest.raises(ValueError, match="not aligned"):
        fields(Bad)


@pytest.mark.parametrize("kind, value, ok", [
    (int, True, False), (int, 3, True), (int, 3.0, False), (float, 3, True), (float, "3", False),
    (tuple[int, ...], [1, 2], True), (tuple[int, ...], 3, False), (tuple[int, ...], [1, "a"], False),
    (int | None, None, True), (str | None, 4, False), (Literal["a", "b"], "c", False), (bool, 1, False),
])
def test_values_are_checked_per_type(kind, value, ok):
    if ok:
        check_value(kind, value, "s.k")
    else:
        with pytest.raises(UserError, match="s.k must be"):
            check_value(kind, value, "s.k")


def test_a_section_becomes_its_config_with_lists_as_tuples():
    cfg = from_section(Example, "ex", {"total": 7, "kind": "b"}, bound={"out_dir": "x"})
    assert cfg == Example(out_dir="x", total=7, kind="b")
    with pytest.raises(UserError, match="unknown key 'out_dir' in section 'ex'"):
        from_section(Example, "ex", {"out_dir": "y"}, bound={"out_dir": "x"})
