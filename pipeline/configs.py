"""Stage configs declared once: each field's help, CLI name and identity are read off its dataclass.

A stage's ``Config`` is a frozen, keyword-only dataclass whose every field carries a trailing
comment; that comment is the field's help (continued on comment lines aligned under it), and a
comment starting with ``identity:`` marks a field that belongs to the run's identity. A class
attribute ``OPTIONS`` renames or hides fields on the command line. From this, the CLI builds
its options (app/cli.py) and the study turns params.yaml sections into configs
(:func:`from_section`) with every value's type checked — so a default, its help and its type
live in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import os
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from cache.errors import UserError

IDENTITY = "identity:"
CONFIG_DEFAULT = object()  # an Option keeps the Config's default


@dataclasses.dataclass(frozen=True)
class Option:
    """How one Config field appears on the command line (default: ``--field-name``)."""

    name: str | None = None  # e.g. "--tokens"; a name without dashes is a positional argument
    hidden: bool = False  # not on the command line (set by the study or by another option)
    default: Any = CONFIG_DEFAULT  # the command line's default, where it differs from the Config's


@dataclasses.dataclass(frozen=True)
class Field:
    """One Config field as users meet it."""

    name: str
    kind: Any  # the resolved annotation
    default: Any  # dataclasses.MISSING when required
    help: str
    identity: bool
    option: Option

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage as the CLI and DVC see it: its config, what it runs, and what it reads and writes.

    ``reads`` and ``writes`` name the Config fields that hold input and output paths; the study
    binds them to folders under work/ and dvc.yaml lists them as deps and outs. ``persist``
    outputs resume after an interruption, so DVC must not delete them before a rerun. Outputs
    that are not ``cached`` are tracked by hash only: DVC's cache would double the disk.
    ``logs`` name the fields that hold dvclive folders (pipeline.livelog): dvc.yaml declares
    their files as metrics and plots, outside the outs, so DVC reads the curves while the stage runs.
    """

    name: str
    config: type
    run: Callable[[Any], Any]
    summary: Callable[[Any], str]  # the one paragraph the CLI prints after run
    help: str  # the command's help: first line, then what a user should know before running it
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    persist: bool = False
    # False for the large outputs rebuilt exactly from their inputs: our stores (cache/FORMAT.md, checked by
    # `pipeline verify`), the training folders (their resume state dwarfs the result) and the report;
    # DVC records their hash and keeps no copy (app/plan.py has the measurement)
    cached: bool = True
    logs: tuple[str, ...] = ()
    command: str | None = None  # CLI command name when it differs from ``name``

    @property
    def module(self) -> str:
        return self.run.__module__


@functools.cache
def fields(config: type) -> tuple[Field, ...]:
    """The fields of a Config class with their help and identity, in declaration order."""
    hints = typing.get_type_hints(config)
    comments = _field_comments(config)
    options: Mapping[str, Option] = getattr(config, "OPTIONS", {})
    out = []
    for f in dataclasses.fields(config):
        text = comments.get(f.name, "")
        identity = text.startswith(IDENTITY)
        if identity:
            text = text[len(IDENTITY):].strip()
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        out.append(Field(f.name, hints[f.name], default, text, identity, options.get(f.name, Option())))
    return tuple(out)


def identity_fields(config: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(config) if f.identity)


def writer_record(stage: str, cfg: Any) -> dict[str, Any]:
    """What `pipeline repair` reruns to recompute a store's damaged shards: the stage, its config's
    identity fields (what defines the content; the other fields only change how fast) and the
    folder its relative paths start from."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return {"stage": stage, "cwd": os.getcwd(),
            "config": {name: plain(getattr(cfg, name)) for name in identity_fields(type(cfg))}}


def _field_comments(config: type) -> dict[str, str]:
    """``name -> comment`` of each annotated line of the class body, continuation lines joined."""
    source = textwrap.dedent(inspect.getsource(config))
    comments: dict[str, str] = {}
    field = None  # the field whose comment may continue on the next line
    column = -1
    line_has_code = False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and not line_has_code:
            line_has_code = True
            field = tok.string if tok.start[1] == 4 else None
            column = -1
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if line_has_code and field is not None:
                comments[field] = text
                column = tok.start[1]
            elif not line_has_code and field is not None and tok.start[1] == column:
                comments[field] += " " + text
            elif not line_has_code and field is not None and tok.start[1] != 4:
                raise ValueError(f"{config.__qualname__}: the comment under field '{field}' is not aligned with "
                                 f"its help ({tok.string!r})")
            else:
                field = None
        elif tok.type in (tokenize.NEWLINE, tokenize.NL):
            line_has_code = False
        elif tok.type not in (tokenize.INDENT, tokenize.DEDENT) and not line_has_code:
            line_has_code = True
            field = None
    return comments


# ---------------------------------------------------------------------------------------
# Values from params.yaml (or JSON): checked per field, never guessed


def from_section(config: type, section: str, values: Mapping[str, Any] | None, *, bound: Mapping[str, Any]) -> Any:
    """``config(**bound, **values)`` with every value of the params section checked against its field's
    type; an unknown key or a mistyped value is refused in one line naming the section and the key."""
    values = dict(values or {})
    by_name = {f.name: f for f in fields(config)}
    settable = sorted(n for n in by_name if n not in bound)
    for key in values:
        if key not in by_name or key in bound:
            raise UserError(f"params.yaml: unknown key '{key}' in section '{section}'; known keys: "
                            f"{', '.join(settable)}")
    checked = {key: check_value(by_name[key].kind, value, f"{section}.{key}") for key, value in values.items()}
    return config(**bound, **checked)


def check_value(kind: Any, value: Any, where: str) -> Any:
    """``value`` as the annotation ``kind`` wants it (lists become tuples, strings become Paths),
    or a UserError saying what was expected: a bool is not an int, a scalar is not a list."""
    ok, result = _coerce(kind, value)
    if not ok:
        raise UserError(f"params.yaml: {where} must be {describe(kind)} (got {value!r})")
    return result


def _coerce(kind: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            ok, result = _coerce(option, value)
            if ok:
                return True, result
        return False, None
    if kind is type(None):
        return value is None, None
    if origin is Literal:
        return value in typing.get_args(kind), value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:  # an int stays an int: the config records what was given
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if kind is str:
        return isinstance(value, str), value
    if kind is Path:  # the config's own checks make it a Path
        return isinstance(value, (str, Path)), value
    if origin is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            return False, None
        item_kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_kinds) != len(value):
            return False, None
        items = [_coerce(k, v) for k, v in zip(item_kinds, value)]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin in (dict, Mapping) or kind in (dict, Mapping) or origin is typing.Mapping:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else None
    if kind is Any:
        return True, value
    raise TypeError(f"no params check for annotation {kind!r}")


def describe(kind: Any) -> str:
    """The annotation in a researcher's words: 'an integer', 'a list of integers', 'one of relu, topk'."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(k) for k in typing.get_args(kind))
    if origin is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(kind))
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({describe(args[0])})" if typing.get_origin(args[0]) else f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path", Any: "anything"}.get(kind, "a mapping" if kind in (dict, Mapping) or origin in (
                dict, Mapping) else str(kind))


def _plural(kind: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", Path: "paths"}.get(kind, describe(kind))
