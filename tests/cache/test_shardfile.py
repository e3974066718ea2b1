"""Our shard files are byte-identical to zarr's own encoding and read back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from cache.shardfile import _plain_layout, read_rows, write_rows


def _array(path, n, compressors=None):
    return zarr.create_array(str(path), shape=(n, 5, 6), chunks=(3, 5, 6), shards=(9, 5, 6), dtype="float16",
                             compressors=compressors, fill_value=np.nan, config={"write_empty_chunks": True})


@pytest.mark.parametrize("n", [27, 31, 2])  # whole shards; a partial last shard; one partial chunk
def test_bytes_equal_zarr_encoding(tmp_path, n):
    rows = np.random.default_rng(n).standard_normal((n, 5, 6)).astype(np.float16)
    ours, theirs = _array(tmp_path / "ours", n), _array(tmp_path / "theirs", n)
    assert _plain_layout(ours)
    for start in range(0, n, 9):
        write_rows(ours, start, rows[start:start + 9])
        theirs[start:start + 9] = rows[start:start + 9]
    files = sorted(p.relative_to(tmp_path / "theirs") for p in (tmp_path / "theirs").rglob("c/**/*") if p.is_file())
    assert files
    for f in files:
        assert (tmp_path / "ours" / f).read_bytes() == (tmp_path / "theirs" / f).read_bytes(), f
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours"))[:], rows)
    assert not list((tmp_path / "ours").rglob(".*tmp*"))


def test_other_layouts_fall_back_to_zarr(tmp_path):
    arr = _array(tmp_path / "z", 18, compressors=zarr.codecs.ZstdCodec())
    assert not _plain_layout(arr)
    rows = np.ones((9, 5, 6), np.float16)
    write_rows(arr, 9, rows)
    np.testing.assert_array_equal(arr[9:18], rows)
    assert np.isnan(arr[0:9]).all()


def test_refuses_partial_shards(tmp_path):
    arr = _array(tmp_path / "z", 27)
    with pytest.raises(ValueError, match="not one whole shard"):
        write_rows(arr, 3, np.ones((9, 5, 6), np.float16))
    with pytest.raises(ValueError, match="not one whole shard"):
        write_rows(arr, 0, np.ones((4, 5, 6), np.float16))


@pytest.mark.parametrize("writer", ["ours", "zarr"])
def test_read_rows_equals_zarr(tmp_path, writer):
    n = 31
    rows = np.random.default_rng(1).standard_normal((n, 5, 6)).astype(np.float16)
    arr = _array(tmp_path / "a", n)
    for start in range(0, n, 9):
        if writer == "ours":
            write_rows(arr, start, rows[start:start + 9])
        else:
            arr[start:start + 9] = rows[start:start + 9]
    for start, stop in [(0, 3), (3, 6), (0, 9), (4, 8), (9, 18), (27, 31), (30, 31), (2, 7)]:
        np.testing.assert_array_equal(read_rows(arr, start, stop), rows[start:stop])
    np.testing.assert_array_equal(read_rows(arr, 7, 12), rows[7:12])  # crosses shards: through zarr
    out = np.empty((5, 5, 6), np.float16)
    assert read_rows(arr, 2, 7, out=out) is out
    np.testing.assert_array_equal(out, rows[2:7])


def test_read_rows_falls_back_for_compressed_arrays(tmp_path):
    arr = _array(tmp_path / "z", 18, compressors=zarr.codecs.ZstdCodec())
    rows = np.arange(18 * 30, dtype=np.float16).reshape(18, 5, 6)
    arr[:] = rows
    np.testing.assert_array_equal(read_rows(arr, 3, 6), rows[3:6])
