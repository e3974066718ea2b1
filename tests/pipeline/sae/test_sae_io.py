"""Checkpoint folders: what is written, and a clear error for everything that can be wrong."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from sae_helpers import ALL_ARCHS, make_sae_config, make_train_config, random_batches
from safetensors.torch import load_file, save_file

from cache.errors import UserError
from pipeline.sae import (
    FORMAT_VERSION,
    Trainer,
    build,
    load_sae,
    load_trainer,
    save_sae,
    save_training_state,
)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_config_json_records_everything(arch, tmp_path):
    sae = build(make_sae_config(arch, norm_scale=2.5, model="ViT-B-16/openai", layer=10))
    save_sae(sae, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"format_version": FORMAT_VERSION, **sae.config.to_dict(),
                      "inference_threshold": sae.inference_threshold()}
    assert config["arch"] == arch
    assert config["norm_scale"] == 2.5 and config["layer"] == 10 and config["dtype"] == "float32"
    assert {f.name for f in dataclasses.fields(sae.config)} <= set(config)
    assert (config["inference_threshold"] is None) == (arch != "batchtopk")
    assert sorted(load_file(tmp_path / "weights.safetensors")) == sorted(sae.state_dict())
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


FORMAT1_KEYS = ["format_version", "arch", "d_in", "d_sae", "k", "l1", "aux_k", "aux_coef",
                "dead_window_tokens", "norm_scale", "dtype", "threshold_lr", "model", "layer",
                "token_kind", "cache_config_sha256", "inference_threshold"]
FORMAT1_RELU = """{
  "format_version": 1,
  "arch": "relu",
  "d_in": 16,
  "d_sae": 48,
  "k": null,
  "l1": 8e-05,
  "aux_k": 48,
  "aux_coef": 0.03125,
  "dead_window_tokens": 1000,
  "norm_scale": 2.5,
  "dtype": "float32",
  "threshold_lr": 0.01,
  "model": "ViT-B-16/openai",
  "layer": 10,
  "token_kind": "all",
  "cache_config_sha256": "",
  "inference_threshold": null
}
"""


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_the_first_archs_write_every_format1_key_in_order(arch, tmp_path):
    save_sae(build(make_sae_config(arch)), tmp_path)
    assert list(json.loads((tmp_path / "config.json").read_text())) == FORMAT1_KEYS


def test_a_format1_relu_file_loads_and_saves_back_byte_identical(tmp_path):
    save_sae(build(make_sae_config("relu")), tmp_path / "weights")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(FORMAT1_RELU)
    (tmp_path / "weights" / "weights.safetensors").rename(tmp_path / "old" / "weights.safetensors")
    sae = load_sae(tmp_path / "old")
    assert sae.config == make_sae_config("relu", norm_scale=2.5, model="ViT-B-16/openai", layer=10)
    save_sae(sae, tmp_path / "new")
    assert (tmp_path / "new" / "config.json").read_text() == FORMAT1_RELU


def test_topk_is_not_loaded_back_as_relu(tmp_path):
    sae = build(make_sae_config("topk", k=3))
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.config.arch == "topk" and loaded.config.k == 3
    assert (loaded.encode(random_batches(1)[0]).l0() <= 3).all()


def _saved(tmp_path, arch="batchtopk"):
    sae = build(make_sae_config(arch))
    save_sae(sae, tmp_path / "sae")
    return tmp_path / "sae"


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for key, value in list(changes.items()):
        if value is ...:
            del config[key]
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case, match", [
    ("no_dir", "does not exist"),
    ("no_config", "no config.json"),
    ("no_weights", "no weights.safetensors"),
    ("bad_json", "not valid JSON"),
    ("future_version", "format_version 2"),
    ("no_version", "format_version None"),
    ("unknown_field", "unknown fields"),
    ("missing_field", "lacks fields"),
    ("arch_swapped", "do not belong together"),
    ("width_changed", "do not belong together"),
    ("threshold_mismatch", "inference_threshold"),
    ("corrupt_weights", "unreadable"),
])
def test_bad_checkpoints_give_one_line_user_errors(tmp_path, case, match):
    path = _saved(tmp_path)
    if case == "no_dir":
        path = tmp_path / "nowhere"
    elif case == "no_config":
        (path / "config.json").unlink()
    elif case == "no_weights":
        (path / "weights.safetensors").unlink()
    elif case == "bad_json":
        (path / "config.json").write_text("{not json")
    elif case == "future_version":
        _edit_config(path, format_version=2)
    elif case == "no_version":
        _edit_config(path, format_version=...)
    elif case == "unknown_field":
        _edit_config(path, expansion=64)
    elif case == "missing_field":
        _edit_config(path, norm_scale=...)
    elif case == "arch_swapped":
        _edit_config(path, arch="relu", k=None, l1=8e-5)
    elif case == "width_changed":
        _edit_config(path, d_sae=96)
    elif case == "threshold_mismatch":
        _edit_config(path, inference_threshold=0.75)
    elif case == "corrupt_weights":
        (path / "weights.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match=match) as info:
        load_sae(path)
    assert "\n" not in str(info.value)


def test_dtype_mismatch_is_refused(tmp_path):
    path = _saved(tmp_path, arch="relu")
    tensors = {k: v.double() for k, v in load_file(path / "weights.safetensors").items()}
    save_file(tensors, path / "weights.safetensors")
    with pytest.raises(UserError, match="float64"):
        load_sae(path)


def test_save_overwrites_atomically_and_bf16_round_trips(tmp_path):
    sae = build(make_sae_config("topk", dtype="bfloat16"), seed=0)
    save_sae(sae, tmp_path)
    save_sae(build(make_sae_config("topk", dtype="bfloat16"), seed=1), tmp_path)  # overwrite
    loaded = load_sae(tmp_path)
    assert loaded.W_dec.dtype == torch.bfloat16
    assert not torch.equal(loaded.W_dec, sae.W_dec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "weights.safetensors"]


def test_load_trainer_errors(tmp_path):
    path = _saved(tmp_path, arch="relu")
    with pytest.raises(UserError, match="no trainer.pt"):
        load_trainer(path, make_train_config())
    trainer = Trainer(build(make_sae_config("relu")), make_train_config())
    trainer.step(random_batches(1)[0])
    save_training_state(trainer, path)
    (path / "trainer.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable trainer state"):
        load_trainer(path, make_train_config())
