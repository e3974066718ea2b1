"""Results folders (stats, mask, groundtruth, report, remap, grid, block-probe) have one writer at a time, as stores do."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from app.cli import main
from cache.store import StoreLock
from tests.helpers import assert_one_line_error, tree_digest

INPUTS = {"stats": ["--codes", "codes", "--cache", "acts"], "mask": ["--sae", "sae", "--stats", "stats", "--cache", "acts"],
          "groundtruth": ["--stats", "stats"], "report": ["--stats", "stats"],
          "remap": ["--base", "base", "--adapted", "adapted"], "grid": ["--cache", "acts"],
          "block-probe": ["--cache", "acts"]}


@pytest.mark.parametrize("stage", sorted(INPUTS))
def test_a_second_writer_of_a_results_folder_is_refused_and_writes_nothing(tmp_path, stage):
    """The lock is taken before anything is read, so the inputs (absent here) are never reached."""
    out = tmp_path / "out"
    with StoreLock(out) as held:
        before = tree_digest(out)
        args = [stage, *(str(tmp_path / a) if i % 2 else a for i, a in enumerate(INPUTS[stage])), "--out", str(out)]
        result = CliRunner().invoke(main, args)
        assert_one_line_error(result.exit_code, result.output, "being written by another process")
        assert sorted(p.name for p in out.iterdir()) == [held.path.name]
        assert tree_digest(out) == before
