"""Stage one: parity with open_clip, metadata, early stop, resume, unreadable images."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cache.store import ActivationStore
from pipeline.datasets import open_dataset
from pipeline.models import load_model
from stages import extract
from tests.helpers import TINY, make_extract_config, make_image_folder, tree_digest


def _reference_acts(model_name: str, cfg: extract.Config) -> dict[int, np.ndarray]:
    """Independent reference: forward hooks on resblocks during open_clip's full encode_image."""
    loaded = load_model(model_name, "none", device="cpu", init_seed=cfg.seed)
    images = open_dataset(cfg.dataset, root=cfg.root, split=cfg.split, transform=loaded.preprocess,
                          limit=cfg.limit, seed=cfg.seed, image_size=loaded.image_size)
    batch = torch.stack([images.dataset[i][0] for i in range(len(images))])
    captured: dict[int, torch.Tensor] = {}
    hooks = [loaded.visual.transformer.resblocks[layer].register_forward_hook(
        lambda mod, inp, out, layer=layer: captured.__setitem__(layer, out.detach().clone()))
        for layer in cfg.layers]
    with torch.no_grad():
        loaded.model.encode_image(batch)
    for h in hooks:
        h.remove()
    fi = loaded.visual.forward_intermediates(batch, indices=list(cfg.layers), output_fmt="NLC",
                                             output_extra_tokens=True, intermediates_only=True)
    for layer, prefix, patches in zip(cfg.layers, fi["image_intermediates_prefix"], fi["image_intermediates"]):
        torch.testing.assert_close(torch.cat([prefix, patches], 1), captured[layer], rtol=0, atol=0)
    return {layer: captured[layer].numpy() for layer in cfg.layers}


def _assert_fp16_equal(stored: np.ndarray, ref_fp32: np.ndarray) -> None:
    """Equal to float16 rounding of the fp32 reference (one fp16 ulp of slack for BLAS order)."""
    np.testing.assert_allclose(stored.astype(np.float32), ref_fp32, rtol=2 ** -10, atol=1e-6)


def test_parity_tiny_with_open_clip(tmp_path):
    cfg = make_extract_config(tmp_path, limit=20, batch_size=6)
    extract.run(cfg)
    ref = _reference_acts(TINY, cfg)
    store = ActivationStore(cfg.out_dir, mode="r")
    for layer in cfg.layers:
        _assert_fp16_equal(store.acts(layer)[:], ref[layer])
    assert store.token_layout["class_token_index"] == 0
    assert store.token_layout["patch_grid"] == [4, 4]
    assert store.n_tokens == 17


def test_parity_vit_b16_random_init(tmp_path):
    cfg = make_extract_config(tmp_path, model="ViT-B-16", limit=3, layers=(10,), batch_size=3,
                              images_per_chunk=None, images_per_shard=None)
    extract.run(cfg)
    ref = _reference_acts("ViT-B-16", cfg)
    store = ActivationStore(cfg.out_dir, mode="r")
    assert store.acts(10).shape == (3, 197, 768)
    _assert_fp16_equal(store.acts(10)[:], ref[10])
    assert store.token_layout["patch_grid"] == [14, 14]


def test_forward_stops_after_last_block_and_skips_text_tower():
    loaded = load_model(TINY, "none", device="cpu")
    calls = {i: 0 for i in range(loaded.n_blocks)}
    for i, block in enumerate(loaded.visual.transformer.resblocks):
        block.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    text_calls = []
    loaded.model.transformer.register_forward_hook(lambda *a: text_calls.append(1))
    out = loaded.tap(torch.zeros(2, 3, 32, 32), (0, 1))
    assert calls == {0: 1, 1: 1, 2: 0, 3: 0}
    assert not text_calls
    assert out[1].shape == (2, 17, 64)


def test_metadata_survives_a_fresh_process(tiny_store):
    store = ActivationStore(tiny_store, mode="r")
    assert store.labels.min() >= 0 and len(store.labels) == 48
    assert len(set(store.image_ids)) == 48 and store.image_ids[0] == "synthetic/train/0"
    assert len(store.class_names) == 20
    assert len(store.config_sha256) == 64
    code = ("import json; from cache.store import ActivationStore; s = ActivationStore(%r, mode='r'); "
            "print(json.dumps({'attrs': s.attrs, 'labels': s.labels.tolist(), 'ids': list(map(str, s.image_ids))}))"
            % str(tiny_store))
    fresh = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert fresh["attrs"] == json.loads(json.dumps(store.attrs))
    assert fresh["labels"] == store.labels.tolist()
    assert fresh["ids"] == [str(i) for i in store.image_ids]
    assert fresh["attrs"]["config"]["layers"] == [1, 3]
    assert fresh["attrs"]["config"]["pretrained"] == "none"


def test_rerun_skips_complete_shards_and_keeps_bytes(tmp_path):
    cfg = make_extract_config(tmp_path)
    first = extract.run(cfg)
    before = tree_digest(cfg.out_dir)
    again = extract.run(cfg)
    assert first.n_computed == 48 and again.n_computed == 0
    assert tree_digest(cfg.out_dir) == before


def test_limit_is_a_seeded_subset_in_dataset_order(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n_classes=3, per_class=6)
    a = open_dataset("imagefolder", root=root, split=None, transform=None, limit=7, seed=1)
    b = open_dataset("imagefolder", root=root, split=None, transform=None, limit=7, seed=1)
    c = open_dataset("imagefolder", root=root, split=None, transform=None, limit=7, seed=2)
    assert a.image_ids == b.image_ids != c.image_ids
    assert a.image_ids == sorted(a.image_ids) and len(a.image_ids) == 7


def test_imagefolder_with_unreadable_and_non_rgb_images(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n_classes=2, per_class=4)
    Image.fromarray(np.full((20, 20), 128, np.uint8), mode="L").save(root / "class_0" / "gray.png")
    Image.fromarray(np.full((20, 20, 4), 200, np.uint8), mode="RGBA").save(root / "class_1" / "rgba.png")
    (root / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    cfg = make_extract_config(tmp_path, dataset="imagefolder", root=str(root), limit=None, images_per_shard=4)
    out = extract.run(cfg)
    store = ActivationStore(cfg.out_dir, mode="r")
    ids = [str(i) for i in store.image_ids]
    assert out.n_images == 11 and out.n_skipped == 1
    assert store.attrs["skipped_images"] == ["class_1/broken.jpg"]
    bad = ids.index("class_1/broken.jpg")
    assert not store.valid[bad] and store.labels[bad] == -1
    assert not store.acts(3)[bad].any()  # unreadable rows hold zeros, never NaN
    good = np.delete(np.arange(11), bad)
    assert store.valid[good].all()
    assert np.isfinite(store.acts(3)[:]).all()
    assert store.class_names == ["class_0", "class_1"]
    assert store.labels[ids.index("class_0/gray.png")] == 0 and store.labels[ids.index("class_1/rgba.png")] == 1


def test_eurosat_reads_a_local_tree(tmp_path):
    """The real torchvision EuroSAT loader on a generated ROOT/eurosat/2750/<class>/ tree."""
    classes = ["AnnualCrop", "Forest", "River"]
    base = tmp_path / "eurosat" / "2750"
    for c in classes:
        make_image_folder(base / "_tmp", n_classes=1, per_class=2, size=64)
        (base / "_tmp" / "class_0").rename(base / c)
    (base / "_tmp").rmdir()
    images = open_dataset("eurosat", root=tmp_path, split=None, transform=None)
    assert images.class_names == classes and len(images) == 6
    assert images.image_ids[0].startswith("eurosat/2750/AnnualCrop/")


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_do_not_reorder_rows(tmp_path, workers):
    cfg = make_extract_config(tmp_path / str(workers), workers=workers, limit=24)
    extract.run(cfg)
    store = ActivationStore(cfg.out_dir, mode="r")
    world_labels = [i % 20 for i in range(24)]
    assert store.labels.tolist() == world_labels
    if workers:
        single = make_extract_config(tmp_path / "single", limit=24)
        extract.run(single)
        assert np.array_equal(ActivationStore(single.out_dir, mode="r").acts(3)[:], store.acts(3)[:])
