"""FORMAT.md and cache/schema.py name the same arrays and attributes."""

from __future__ import annotations

import re
from pathlib import Path

import zarr

from cache import schema

DOC = (Path(schema.__file__).parent / "FORMAT.md").read_text()


def _first_column(heading: str) -> set[str]:
    section = DOC.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return {m.group(1).split("/")[0] for m in re.finditer(r"^\| `([^`]+)` \|", section, re.M)}


def test_doc_lists_exactly_the_schema_arrays():
    assert _first_column("Arrays") == set(schema.ARRAYS)


def test_doc_lists_exactly_the_schema_attributes():
    assert _first_column("Group attributes") == set(schema.ATTRS)


def test_doc_lists_the_code_store_arrays():
    names = {m.group(1) for m in re.finditer(r"^\| `shards/<k>/(\w+)` \|", DOC, re.M)}
    assert names == set(schema.CODES_ARRAYS)


def test_doc_states_the_current_version():
    assert f"version {schema.FORMAT_VERSION})" in DOC.splitlines()[0]


def test_a_written_store_has_exactly_the_documented_names(tiny_store):
    group = zarr.open_group(tiny_store, mode="r")
    assert set(group.keys()) == set(schema.ARRAYS)
    assert set(group.attrs.asdict()) == set(schema.ATTRS)
    assert group[schema.acts_path(3)].dtype == schema.ACTS_DTYPE
