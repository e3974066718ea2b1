"""pipeline import: .npy / .npz / raw memmap into the store protocol."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from app.cli import main
from cache.check import verify
from cache.store import ActivationStore


@pytest.mark.parametrize("kind", ["npy", "npz", "raw"])
def test_import_round_trip(tmp_path, kind):
    acts = np.random.default_rng(0).standard_normal((25, 5, 8)).astype(np.float16)
    labels = np.arange(25) % 3
    np.save(tmp_path / "labels.npy", labels)
    if kind == "npy":
        src, extra = tmp_path / "a.npy", []
        np.save(src, acts)
    elif kind == "npz":
        src, extra = tmp_path / "a.npz", ["--key", "x"]
        np.savez(src, x=acts, y=labels)
    else:
        src, extra = tmp_path / "a.bin", ["--shape", "25,5,8", "--dtype", "float16"]
        acts.tofile(src)
    out = tmp_path / "store"
    result = CliRunner().invoke(main, ["import", str(src), "--out", str(out), "--labels", str(tmp_path / "labels.npy"),
                                       "--class-names", "a,b,c", "--layer", "10", *extra])
    assert result.exit_code == 0, result.output
    store = ActivationStore(out)
    np.testing.assert_array_equal(store.acts(10)[:], acts)
    assert store.labels.tolist() == labels.tolist() and store.class_names == ["a", "b", "c"]
    assert store.token_layout["class_token_index"] == 0 and store.token_layout["patch_grid"] == [2, 2]
    assert verify(out).ok


def test_import_tokens_2d(tmp_path):
    acts = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    np.save(tmp_path / "t.npy", acts)
    result = CliRunner().invoke(main, ["import", str(tmp_path / "t.npy"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    store = ActivationStore(tmp_path / "s")
    assert store.acts(0).shape == (30, 1, 8) and store.token_layout["n_prefix_tokens"] == 0
    np.testing.assert_allclose(store.acts(0)[:, 0].astype(np.float32), acts, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("args, needle", [
    (["--shape", "3,4"], "needs 24"),
    ([], "give its --shape"),
])
def test_import_refusals(tmp_path, args, needle):
    (tmp_path / "a.bin").write_bytes(b"\0" * 10)
    result = CliRunner().invoke(main, ["import", str(tmp_path / "a.bin"), "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2 and needle in result.output


def test_import_refuses_nan(tmp_path):
    acts = np.ones((4, 3), np.float32)
    acts[2, 1] = np.nan
    np.save(tmp_path / "a.npy", acts)
    result = CliRunner().invoke(main, ["import", str(tmp_path / "a.npy"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "NaN/inf" in result.output
