"""Stage three: per-latent statistics against plain numpy, planted latents, out-of-core graph, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from dask.callbacks import Callback

from app.cli import main
from cache.codes import CodeStore, ShardCodes
from cache.errors import UserError
from cache.store import StoreLock, StoreSpec, create_or_resume
from pipeline import latents as files
from pipeline import statistics
from pipeline.latents import LatentStats
from stages import stats

# ---------------------------------------------------------------------------------------
# Builders (also used by test_report.py)


def csr_of(f_NTS: np.ndarray) -> ShardCodes:
    """CSR codes of dense ``(N, T, S)`` activations (N: a shard's images; latents ascending within a token)."""
    flat = f_NTS.reshape(-1, f_NTS.shape[-1])
    rows, cols = np.nonzero(flat)
    ptr = np.zeros(len(flat) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(flat)), out=ptr[1:])
    return ShardCodes(ptr, cols.astype(np.int32), flat[rows, cols].astype(np.float32))


def build_stores(tmp: Path, f_NTS: np.ndarray, labels_N: np.ndarray, valid_N: np.ndarray, *, class_names,
                 images_per_shard: int, grid=None, dataset=None, preprocess=None, image_ids=None,
                 n_prefix: int = 1, write_shards=None) -> tuple[Path, Path]:
    """An activation store (tiny width, zero activations) and a code store holding ``f_NTS``.

    Invalid images get no codes, as `pipeline encode` writes them. ``write_shards`` limits
    which code shards are written (to make an incomplete store).
    """
    n, t, s = f_NTS.shape
    f_NTS = f_NTS * valid_N[:, None, None]
    grid = grid or [int(round(math.sqrt(t - n_prefix)))] * 2
    layout = {"n_tokens": t, "n_prefix_tokens": n_prefix, "class_token_index": 0 if n_prefix else None,
              "register_token_indices": list(range(1, n_prefix)), "patch_grid": list(grid),
              "patch_order": "row-major"}
    ids = image_ids or [f"img/{i}" for i in range(n)]
    spec = StoreSpec(layers=(3,), n_tokens=t, d_model=2, image_ids=ids, class_names=list(class_names),
                     images_per_chunk=images_per_shard, images_per_shard=images_per_shard,
                     config={"test": str(tmp), "n": n},
                     attrs={"token_layout": layout, "dataset": dataset or {"name": "imported", "split": "all",
                                                                           "root": None, "limit": None, "seed": 0},
                            "preprocess": preprocess or {}, "model": {"name": "test"}})
    store = create_or_resume(tmp / "acts", spec)
    for k in range(store.n_shards):
        sl = store.shard_slice(k)
        store.write_shard(k, {3: np.zeros((sl.stop - sl.start, t, 2), np.float16)}, labels_N[sl], valid_N[sl])
    codes = CodeStore.create_or_resume(
        tmp / "codes", n_images=n, n_tokens=t, d_sae=s, images_per_shard=images_per_shard,
        attrs={"acts_config_sha256": store.config_sha256, "class_names": list(class_names), "token_layout": layout,
               "layer": 3, "sae_weights_sha256": "0" * 64, "values": "test codes"},
        identity="codes-" + store.config_sha256, overwrite=False)
    for k in range(codes.n_shards) if write_shards is None else write_shards:
        sl = store.shard_slice(k)
        codes.write_shard(k, csr_of(f_NTS[sl]))
    return tmp / "acts", tmp / "codes"


def random_codes(rng, n=37, t=5, s=12, n_classes=3):
    """Sparse random codes with a dead latent (0), a rare latent (1), values around the 0.2 threshold."""
    f = rng.random((n, t, s)).astype(np.float32) * (rng.random((n, t, s)) < 0.25)
    f[:, :, 0] = 0
    f[:, :, 1] = 0
    f[[5, 30], 2, 1] = [0.7, 0.3]  # rare: two images, one patch each
    f[3, :, 4] = 0.2  # exactly the threshold: never counted
    labels = rng.integers(0, n_classes, n)
    valid = np.ones(n, bool)
    valid[[7, 20]] = False
    return f, labels, valid


def numpy_stats(f_NTS, labels, valid, *, n_classes, k=10, threshold=0.2, n_prefix=1):
    """Plain numpy, dense, straight from the definitions."""
    f = f_NTS.astype(np.float64) * valid[:, None, None]
    a_NS = f.mean(1)
    v = np.flatnonzero(valid)
    out = {}
    for name, score_NS in (("", a_NS), ("_cls", f[:, 0]), ("_max_patch", f[:, n_prefix:].max(1))):
        active = score_NS[v] > 0
        out["frequency" + name] = active.mean(0)
        with np.errstate(invalid="ignore"):
            out["mean_activation" + name] = np.where(active.any(0), (score_NS[v] * active).sum(0) / active.sum(0),
                                                     np.nan)
    out["n_active_images"] = (a_NS[v] > 0).sum(0)
    s = f.shape[2]
    refs = []
    for j in range(s):
        cand = [i for i in v if a_NS[i, j] > 0]
        cand.sort(key=lambda i: (-a_NS[i, j], i))
        refs.append(cand[:k])
    out["refs"] = refs
    out["ref_scores"] = [[a_NS[i, j] for i in r] for j, r in enumerate(refs)]
    entropy, std, top, share = [], [], [], []
    for j, r in enumerate(refs):
        w = np.zeros(n_classes)
        for i in r:
            w[labels[i]] += a_NS[i, j]
        if w.sum() == 0:
            entropy.append(np.nan), std.append(np.nan), top.append(-1), share.append(np.nan)
            continue
        p = w / w.sum()
        nz = p[p > 0]
        entropy.append(-(nz * np.log(nz)).sum())
        std.append(math.sqrt(sum(pc * (1 - pc) for pc in p)))
        top.append(int(np.argmax(p)))
        share.append(p.max())
    out.update(label_entropy=np.array(entropy), label_std=np.array(std), top_class=np.array(top),
               top_class_share=np.array(share))
    counts = np.zeros((n_classes, s), np.int64)
    for c in range(n_classes):
        counts[c] = (f_NTS[valid & (labels == c)] > np.float32(threshold)).sum((0, 1))  # float32, as stored
    out["counts"] = counts
    out["maps"] = [[f[i, n_prefix:, j] for i in r] for j, r in enumerate(refs)]
    return out


def run_stats(acts, codes, out, **overrides):
    cfg = dict(codes_dir=codes, cache_dir=acts, out_dir=out, plots=False, scheduler="synchronous")
    cfg.update(overrides)
    return stats.run(stats.Config(**cfg))


def column(table, name):
    """A parquet column as float64 with nulls as NaN, plus its null mask."""
    col = table.column(name)
    return np.asarray(col.to_numpy(zero_copy_only=False), float), np.asarray(col.is_null().to_numpy(
        zero_copy_only=False))


@pytest.fixture(scope="module")
def random_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats-random")
    rng = np.random.default_rng(0)
    f, labels, valid = random_codes(rng)
    acts, codes = build_stores(tmp, f, labels, valid, class_names=["a", "b", "c"], images_per_shard=8)
    out = run_stats(acts, codes, tmp / "stats", top_k=4, scheduler="threads", n_workers=2)
    return tmp, f, labels, valid, acts, codes, out


# ---------------------------------------------------------------------------------------
# Acceptance 1: every statistic against plain numpy


def test_a_statistics_folder_being_written_is_refused_and_a_refusal_leaves_nothing(random_case):
    """Two stats runs into one folder mixed their files (meta.json of one beside the table of the other)."""
    tmp, f, labels, valid, acts, codes, out = random_case
    locked = tmp / "locked"
    with StoreLock(locked):
        with pytest.raises(UserError, match="being written by another process"):
            run_stats(acts, codes, locked)
        assert [p.name for p in locked.iterdir()] == [".lock"]
    assert not locked.exists()
    with pytest.raises(UserError, match="not a sparse code store"):
        run_stats(acts, acts, tmp / "refused")
    assert not (tmp / "refused").exists()


def test_every_statistic_matches_numpy(random_case):
    tmp, f, labels, valid, acts, codes, out = random_case
    ref = numpy_stats(f, labels, valid, n_classes=3, k=4)
    table = pq.read_table(out.latents_path)
    assert table.column_names == list(files.LATENT_COLUMNS)
    for name in ("frequency", "mean_activation", "frequency_cls", "mean_activation_cls", "frequency_max_patch",
                 "mean_activation_max_patch", "label_entropy", "label_std", "top_class_share"):
        values, null = column(table, name)
        expected = np.asarray(ref[name], float)
        np.testing.assert_array_equal(null, np.isnan(expected), err_msg=name)  # missing is null, never 0
        np.testing.assert_allclose(values[~null], expected[~null], rtol=1e-9, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(table.column("n_active_images").to_numpy(), ref["n_active_images"])
    top, top_null = column(table, "top_class")
    np.testing.assert_array_equal(np.where(top_null, -1, top), ref["top_class"])
    counts = np.load(out.class_counts_path)
    np.testing.assert_array_equal(counts, ref["counts"])
    in_f64 = (f[valid & (labels == labels[3]), :, 4].astype(np.float64) > 0.2).sum()
    assert counts[labels[3], 4] == in_f64 - 5  # image 3 holds float32(0.2) on its 5 tokens: not above 0.2
    np.testing.assert_array_equal(table.column("n_tokens_above_threshold").to_numpy(), ref["counts"].sum(0))
    assert json.loads(out.class_names_path.read_text()) == ["a", "b", "c"]

    s = LatentStats(out.stats_dir)
    for j in range(f.shape[2]):
        r = s.references(j)
        assert r["image_index"].tolist() == ref["refs"][j], j
        np.testing.assert_allclose(r["score"], ref["ref_scores"][j], rtol=1e-12)
        assert r["image_id"].tolist() == [f"img/{i}" for i in ref["refs"][j]]
        assert r["label"].tolist() == [labels[i] for i in ref["refs"][j]]
        expected_maps = np.reshape(ref["maps"][j], (-1, 2, 2)) if ref["refs"][j] else np.zeros((0, 2, 2))
        np.testing.assert_array_equal(r["maps"], expected_maps.astype(np.float32))

    summary = json.loads(out.summary_path.read_text())
    assert summary["n_latents"] == 12 and summary["n_valid_images"] == 35
    assert summary["n_dead"] == int((ref["n_active_images"] == 0).sum()) == 1
    assert summary["fraction_dead"] == pytest.approx(1 / 12)
    alive = ref["n_active_images"] > 0
    assert summary["frequency_quantiles"]["q50"] == pytest.approx(np.median(ref["frequency"][alive]))
    assert summary["label_entropy_quantiles"]["q50"] == pytest.approx(np.nanmedian(ref["label_entropy"]))
    assert summary["config"]["top_k"] == 4 and summary["config"]["threshold"] == 0.2
    meta = json.loads(out.meta_path.read_text())
    codes_attrs = CodeStore(codes).attrs
    assert meta["provenance"]["acts_config_sha256"] == codes_attrs["acts_config_sha256"]
    assert meta["provenance"]["codes_config_sha256"] == codes_attrs["config_sha256"]
    assert "sqrt(1 - sum_c p_c^2)" in meta["definitions"]["label_std"]


def test_dead_and_rare_latents_have_no_fake_references(random_case):
    _, f, labels, valid, _, _, out = random_case
    s = LatentStats(out.stats_dir)
    dead = s.row(0)
    assert dead["dead"] and dead["frequency"] == 0 and dead["n_references"] == 0
    for key in ("mean_activation", "label_entropy", "label_std", "top_class", "top_class_name"):
        assert dead[key] is None, key
    import zarr

    refs = zarr.open_group(out.references_path, mode="r")
    assert np.isneginf(refs["score"][0]).all() and (refs["image_index"][0] == -1).all()
    assert (refs["label"][0] == -1).all() and list(refs["image_id"][0]) == [""] * 4
    assert not refs["maps"][0].any()
    rare = s.references(1)  # fires on images 5 and 30 only: two references, two empty slots
    assert rare["image_index"].tolist() == [5, 30]
    assert refs["image_index"][1].tolist() == [5, 30, -1, -1] and np.isneginf(refs["score"][1][2:]).all()
    assert s.row(1)["frequency"] == pytest.approx(2 / 35) and s.row(1)["frequency_cls"] == 0
    assert s.row(1)["mean_activation_cls"] is None  # never active on the class token: no mean, not 0


def test_results_do_not_depend_on_the_scheduler_and_barely_on_the_reduction_tree(random_case, tmp_path):
    """The merge tree is fixed by the graph (not by the scheduler): same tree, same bits."""
    _, _, _, _, acts, codes, out = random_case
    base = pq.read_table(out.latents_path)
    same = run_stats(acts, codes, tmp_path / "sync", top_k=4)
    assert pq.read_table(same.latents_path).equals(base)
    other_tree = run_stats(acts, codes, tmp_path / "tree", top_k=4, split_every=2)
    table = pq.read_table(other_tree.latents_path)
    for name in base.column_names:  # sums added in another order: equal up to rounding
        if name == "top_class_name":
            assert table.column(name).equals(base.column(name))
            continue
        (values, null), (expected, expected_null) = column(table, name), column(base, name)
        np.testing.assert_array_equal(null, expected_null, err_msg=name)
        np.testing.assert_allclose(values[~null], expected[~null], rtol=1e-12, err_msg=name)
    np.testing.assert_array_equal(np.load(other_tree.class_counts_path), np.load(out.class_counts_path))
    a, b = LatentStats(out.stats_dir), LatentStats(other_tree.stats_dir)
    for j in range(12):
        for key, value in a.references(j).items():
            np.testing.assert_array_equal(b.references(j)[key], value)


def test_distributed_scheduler_address(random_case, tmp_path):
    from distributed import LocalCluster

    _, _, _, _, acts, codes, out = random_case
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        again = run_stats(acts, codes, tmp_path / "dist", top_k=4, scheduler=cluster.scheduler_address)
    assert pq.read_table(again.latents_path).equals(pq.read_table(out.latents_path))


def test_processes_scheduler(random_case, tmp_path):
    _, _, _, _, acts, codes, out = random_case
    again = run_stats(acts, codes, tmp_path / "proc", top_k=4, scheduler="processes", n_workers=2)
    assert pq.read_table(again.latents_path).equals(pq.read_table(out.latents_path))


def test_real_encode_output(tmp_path):
    """An imported store encoded by `pipeline encode` with a random SAE: the stats match its dense codes."""
    import torch

    from pipeline.sae import ReLUConfig, build, save_sae
    from stages import encode, importer

    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 10, 6)).astype(np.float16)  # 1 class token + 3 x 3 patches
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(30) % 4)
    importer.run(importer.Config(source_path=tmp_path / "x.npy", out_dir=tmp_path / "acts",
                                 labels_path=tmp_path / "y.npy", images_per_chunk=4, images_per_shard=8))
    sae = build(ReLUConfig.from_expansion(d_in=6, expansion=3, layer=0), seed=0)
    with torch.no_grad():
        sae.b_enc -= 0.3  # sparser codes
    save_sae(sae, tmp_path / "sae")
    encode.run(encode.Config(cache_dir=tmp_path / "acts", sae_dir=tmp_path / "sae", out_dir=tmp_path / "codes",
                             device="cpu", progress=False))
    store = CodeStore(tmp_path / "codes")
    f = np.stack([store.image(i) for i in range(30)])
    assert (f > 0).any() and (f == 0).any()
    out = run_stats(tmp_path / "acts", tmp_path / "codes", tmp_path / "stats", scheduler="threads")
    ref = numpy_stats(f, np.arange(30) % 4, np.ones(30, bool), n_classes=4)
    table = pq.read_table(out.latents_path)
    for name in ("frequency", "mean_activation", "frequency_max_patch", "label_entropy", "label_std"):
        values, null = column(table, name)
        np.testing.assert_allclose(values[~null], np.asarray(ref[name])[~null], rtol=1e-9, err_msg=name)
    np.testing.assert_array_equal(np.load(out.class_counts_path), ref["counts"])
    assert LatentStats(out.stats_dir).patch_grid == (3, 3)


# ---------------------------------------------------------------------------------------
# Acceptance 3: planted latents


def test_planted_class_specific_and_uniform_latents(tmp_path):
    n_classes, per_class = 5, 6
    n, t = n_classes * per_class, 5
    labels = np.arange(n) % n_classes
    f = np.zeros((n, t, 3), np.float32)
    f[labels == 2, 1:, 0] = 1.0  # latent 0: class 2 only
    f[:, 0, 1] = 0.5  # latent 1: every image equally (class token)
    f[:, 3, 2] = np.where(labels == 4, 0.9, 0.3)  # latent 2: everything, class 4 most
    acts, codes = build_stores(tmp_path, f, labels, np.ones(n, bool), class_names=list("vwxyz"),
                               images_per_shard=7)
    out = run_stats(acts, codes, tmp_path / "stats", top_k=10)
    s = LatentStats(out.stats_dir)
    r0, r1 = s.row(0), s.row(1)
    assert r0["label_entropy"] == pytest.approx(0, abs=1e-12) and r0["label_std"] == pytest.approx(0, abs=1e-12)
    assert r0["top_class"] == 2 and r0["top_class_name"] == "x" and r0["top_class_share"] == pytest.approx(1)
    assert r0["frequency"] == pytest.approx(1 / n_classes) and r0["mean_activation"] == pytest.approx(4 / 5)
    # equal activations everywhere: ties go to the lowest image indices, two of each class
    assert s.references(1)["image_index"].tolist() == list(range(10))
    assert r1["label_entropy"] == pytest.approx(math.log(n_classes))
    assert r1["label_std"] == pytest.approx(math.sqrt(1 - 1 / n_classes))
    assert r1["frequency"] == 1 and r1["frequency_cls"] == 1 and r1["frequency_max_patch"] == 0
    p = np.array([5.4, 0.3, 0.3, 0.3, 0.3]) / 6.6  # refs: the 6 images of class 4, then images 0..3
    assert s.row(2)["top_class"] == 4 and s.row(2)["top_class_share"] == pytest.approx(p[0])
    assert s.row(2)["label_entropy"] == pytest.approx(-(p * np.log(p)).sum())
    assert s.row(2)["label_std"] == pytest.approx(math.sqrt(1 - (p ** 2).sum()))
    counts = np.load(out.class_counts_path)
    assert counts[:, 0].tolist() == [0, 0, per_class * 4, 0, 0]
    assert counts[:, 1].tolist() == [per_class] * n_classes  # 0.5 > 0.2 on one token per image
    assert counts[:, 2].tolist() == [per_class] * n_classes  # 0.3 and 0.9 both > 0.2
    assert s.top_classes_by_counts(0) == [("x", per_class * 4)]


# ---------------------------------------------------------------------------------------
# Acceptance 2: out of core


class _Reads(Callback):
    """Records which code shards every Dask task reads (synchronous scheduler: one task at a time)."""

    def __init__(self):
        super().__init__()
        self.current, self.reads, self.partial_bytes = None, {}, []

    def _pretask(self, key, dsk, state):
        self.current = key if isinstance(key, str) else key[0]
        self.reads.setdefault(self.current, [])

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(result, statistics.Partial) and "shard" in str(key):
            self.partial_bytes.append(result.nbytes)


def _count_reads(monkeypatch, acts, codes, out):
    recorder = _Reads()
    original = CodeStore.read_shard

    def read_shard(self, k):
        recorder.reads[recorder.current].append(k)
        return original(self, k)

    monkeypatch.setattr(CodeStore, "read_shard", read_shard)
    monkeypatch.setattr(CodeStore, "image", lambda *a: pytest.fail("stats must not read images one by one"))
    monkeypatch.setattr(CodeStore, "latent", lambda *a: pytest.fail("stats must not read a latent's (N, T) array"))
    with recorder:
        run_stats(acts, codes, out, top_k=3)
    return recorder


def test_every_task_reads_exactly_one_shard_and_partials_do_not_grow_with_n(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    sizes = {}
    for n in (24, 96):
        f = rng.random((n, 5, 16)).astype(np.float32) * (rng.random((n, 5, 16)) < 0.3)
        acts, codes = build_stores(tmp_path / str(n), f, np.arange(n) % 3, np.ones(n, bool),
                                   class_names=list("abc"), images_per_shard=8)
        rec = _count_reads(monkeypatch, acts, codes, tmp_path / str(n) / "stats")
        n_shards = n // 8
        shard_tasks = {k: v for k, v in rec.reads.items() if k.startswith("stats-shard-")}
        assert sorted(shard_tasks) == [f"stats-shard-{k:06d}" for k in range(n_shards)]
        assert all(v == [int(k[-6:])] for k, v in shard_tasks.items())  # one task, one shard
        map_tasks = {k: v for k, v in rec.reads.items() if k.startswith("stats-maps-")}
        assert all(v == [int(k[-6:])] for k, v in map_tasks.items()) and len(map_tasks) <= n_shards
        assert all(not v for k, v in rec.reads.items() if k.startswith("stats-merge-"))  # merges read nothing
        assert sum(len(v) for v in rec.reads.values()) == n_shards + len(map_tasks)
        sizes[n] = max(rec.partial_bytes)
    assert sizes[96] == sizes[24]  # a shard's partial result has the same size whatever N is


# ---------------------------------------------------------------------------------------
# Acceptance 5: refusals


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


def test_refuses_stores_from_different_runs(random_case, tmp_path):
    _, f, labels, valid, acts, _, _ = random_case
    _, other_codes = build_stores(tmp_path, f, labels, valid, class_names=["a", "b", "c"], images_per_shard=8)
    _one_line_error(_cli("stats", "--codes", other_codes, "--cache", acts, "--out", tmp_path / "s"),
                    "encoded from another activation store")
    assert not (tmp_path / "s").exists()


def test_refuses_incomplete_code_store(tmp_path):
    f, labels, valid = random_codes(np.random.default_rng(3))
    acts, codes = build_stores(tmp_path, f, labels, valid, class_names=list("abc"), images_per_shard=8,
                               write_shards=[0, 1, 3])
    _one_line_error(_cli("stats", "--codes", codes, "--cache", acts, "--out", tmp_path / "s"), "incomplete")


def test_refuses_a_store_without_valid_images(tmp_path):
    f = np.ones((6, 5, 3), np.float32)
    acts, codes = build_stores(tmp_path, f, np.zeros(6, int), np.zeros(6, bool), class_names=["a"],
                               images_per_shard=4)
    _one_line_error(_cli("stats", "--codes", codes, "--cache", acts, "--out", tmp_path / "s"), "no valid images")


def test_refuses_unknown_latent_and_bad_options(random_case, tmp_path):
    _, _, _, _, acts, codes, out = random_case
    _one_line_error(_cli("show-latent", "--stats", out.stats_dir, "--latent", 12), "latent 12 does not exist")
    _one_line_error(_cli("show-latent", "--stats", out.stats_dir, "--latent", -1), "does not exist")
    _one_line_error(_cli("show-latent", "--stats", tmp_path, "--latent", 1), "not a complete statistics folder")
    _one_line_error(_cli("stats", "--codes", codes, "--cache", acts, "--out", tmp_path / "x", "--scheduler", "gpu"),
                    "unknown --scheduler")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    _one_line_error(_cli("stats", "--codes", codes, "--cache", acts, "--out", tmp_path / "busy"), "other files")


# ---------------------------------------------------------------------------------------
# CLI


def test_cli_stats_plots_and_show_latent(random_case, tmp_path):
    _, _, _, _, acts, codes, _ = random_case
    result = _cli("stats", "--codes", codes, "--cache", acts, "--out", tmp_path / "s", "--top-k", 3,
                  "--scheduler", "synchronous")
    assert result.exit_code == 0, result.output
    assert "statistics of 12 latents (1 dead) over 35 valid images in 5 shards" in result.output
    for name in ("frequency_vs_activation.png", "histograms.png", "class_top_latents.png"):
        assert (tmp_path / "s" / name).stat().st_size > 5_000, name
    again = _cli("stats", "--codes", codes, "--cache", acts, "--out", tmp_path / "s", "--no-plots")  # rerun: replaces
    assert again.exit_code == 0, again.output
    shown = _cli("show-latent", "--stats", tmp_path / "s", "--latent", 1)
    assert shown.exit_code == 0, shown.output
    assert "frequency        0.05714" in shown.output and "img/5" in shown.output and "img/30" in shown.output
    dead = _cli("show-latent", "--stats", tmp_path / "s", "--latent", 0)
    assert "dead: never active" in dead.output
