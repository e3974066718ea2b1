"""SAEs in and out: export to SAELens, import from SAELens and PatchSAE, with the real ``sae_lens``.

Each direction is checked with numbers (the same codes on a random batch, to ~1e-6); imported SAEs
then run through the encode, stats and mask stages on a tiny store; layers that are off by one
(resid_pre vs resid_post, or a wrong --layer) are refused in one line.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from app.cli import main
from cache.store import ActivationStore, StoreLock
from pipeline import masking
from pipeline.sae import build, config_class, load_sae, save_sae
from pipeline.sae.interop import SAELENS_CONFIG
from stages import encode, extract, stats
from tests.helpers import TINY, assert_one_line_error

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE as LensSAE
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

LAYER = 2
D, S = 16, 48


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _batch(d_in: int = D, n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 2.0 * torch.randn(n, d_in, generator=g)


def _ours(arch: str, **fields):
    extra = {"k": 5} if arch != "relu" else {}
    config = config_class(arch).from_fields(d_in=D, d_sae=S, norm_scale=1.7, layer=LAYER, model=f"{TINY}/none",
                                            **extra, **fields)
    sae = build(config, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(S, generator=g))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=g))
        sae.W_enc.mul_(1 + torch.rand(D, S, generator=g))
        if arch == "batchtopk":
            sae.threshold.fill_(0.15)
            sae.n_threshold_updates.fill_(7)
    return sae.eval()


def _lens_sae(kind: str, d_in: int, hook: str, *, seed: int = 3):
    """A random SAE built in SAELens: standard, topk (rescaled by decoder norms) or jumprelu (one threshold)."""
    meta = {"hook_name": hook, "model_name": "tiny-vit-made-in-saelens"}
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=S, apply_b_dec_to_input=False))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=S, k=6, rescale_acts_by_decoder_norm=True))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=S))
    for key, value in meta.items():
        sae.cfg.metadata[key] = value
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn(p.shape, generator=g) / d_in**0.5 * (1 + torch.rand(p.shape, generator=g)))
        sae.b_enc.copy_(0.1 * torch.randn(S, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(d_in, generator=g))
        if kind == "jumprelu":
            sae.threshold.fill_(0.2)
    return sae.eval()


def _codes_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a > 0).any() and (a == 0).any()
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Out: ours -> SAELens -> ours


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk"])
def test_export_loads_in_saelens_with_the_same_codes_and_imports_back(tmp_path, arch):
    ours = _ours(arch)
    save_sae(ours, tmp_path / "ours")
    code, out = _cli("export-sae", tmp_path / "ours", "--format", "saelens", tmp_path / "lens")
    assert code == 0, out
    lens = LensSAE.load_from_disk(tmp_path / "lens")
    assert lens.cfg.architecture() == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu"}[arch]
    assert lens.cfg.metadata.hook_name == f"blocks.{LAYER}.hook_resid_post"
    x = _batch()
    with torch.no_grad():
        codes = ours.encode(x).dense()
        _codes_close(lens.encode(x), codes)
        torch.testing.assert_close(lens.decode(lens.encode(x)), ours(x)[0], atol=1e-5, rtol=1e-5)
    code, out = _cli("import-sae", tmp_path / "lens", "--format", "saelens", tmp_path / "back")
    assert code == 0, out
    back = load_sae(tmp_path / "back")
    assert back.config == ours.config and back.inference_threshold() == pytest.approx(ours.inference_threshold())
    for name, p in ours.state_dict().items():
        if name != "n_threshold_updates":
            torch.testing.assert_close(back.state_dict()[name], p, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        _codes_close(back.encode(x).dense(), codes)


def test_export_refuses_an_sae_without_layer_and_a_used_folder(tmp_path):
    save_sae(build(config_class("relu")(d_in=D, d_sae=S), seed=0), tmp_path / "nolayer")
    code, out = _cli("export-sae", tmp_path / "nolayer", "--format", "saelens", tmp_path / "x")
    assert_one_line_error(code, out, "does not record its layer")
    save_sae(_ours("relu"), tmp_path / "ours")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "f").write_text("")
    code, out = _cli("export-sae", tmp_path / "ours", "--format", "saelens", tmp_path / "used")
    assert_one_line_error(code, out, "is not an empty folder")


def test_a_second_writer_of_the_output_folder_is_refused_and_writes_nothing(tmp_path):
    save_sae(_ours("relu"), tmp_path / "ours")
    code, out = _cli("export-sae", tmp_path / "ours", "--format", "saelens", tmp_path / "lens")
    assert code == 0, out
    for args in (("export-sae", tmp_path / "ours", "--format", "saelens"),
                 ("import-sae", tmp_path / "lens", "--format", "saelens")):
        with StoreLock(tmp_path / "busy") as held:
            code, out = _cli(*args, tmp_path / "busy")
            assert_one_line_error(code, out, "being written by another process")
            assert [p.name for p in (tmp_path / "busy").iterdir()] == [held.path.name]


# ---------------------------------------------------------------------------------------
# In: SAELens and PatchSAE -> ours -> encode, stats, mask


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """48 synthetic images through a random tiny ViT, block 2 only."""
    root = tmp_path_factory.mktemp("interop")
    cfg = extract.Config(dataset="synthetic", out_dir=root / "store", limit=48, model=TINY, pretrained="none",
                         layers=(LAYER,), batch_size=16, device="cpu", images_per_chunk=8, images_per_shard=16,
                         progress=False)
    extract.run(cfg)
    return cfg.out_dir


def _runs_through_the_stages(sae_dir: Path, store: Path, root: Path) -> None:
    """encode, stats and a masking sweep with the imported SAE; the stored codes are its codes."""
    out = encode.run(encode.Config(cache_dir=store, sae_dir=sae_dir, out_dir=root / "codes", device="cpu",
                                   progress=False))
    assert out.nnz > 0
    acts = ActivationStore(store, mode="r")
    from cache.codes import CodeStore

    sae = load_sae(sae_dir)
    with torch.no_grad():
        want = sae.encode(torch.from_numpy(acts.read(LAYER, 0, 8)[3]).float()).dense()
    np.testing.assert_allclose(CodeStore(root / "codes").image(3), want.numpy(), atol=1e-6)
    stats.run(stats.Config(codes_dir=root / "codes", cache_dir=store, out_dir=root / "stats", plots=False,
                           scheduler="synchronous"))
    code, output = _cli("mask", "--sae", sae_dir, "--stats", root / "stats", "--out", root / "mask", "--model", TINY,
                        "--pretrained", "none", "--k", "1,5,all", "--seeds", "1", "--device", "cpu", "--no-progress",
                        "--cache", store, "--probe-images", "16", "--no-plots")
    assert code == 0, output
    result = json.loads((root / "mask" / masking.RESULTS_FILE).read_text())
    assert result["layer"] == LAYER and set(result["accuracy"]["off"]) == {"1", "5", "all"}


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu"])
def test_saelens_sae_imports_with_the_same_codes(tmp_path, kind):
    lens = _lens_sae(kind, D, f"blocks.{LAYER}.hook_resid_post")
    lens.save_model(tmp_path / "lens")
    extra = ["--k", "8"] if kind == "jumprelu" else []
    code, out = _cli("import-sae", tmp_path / "lens", "--format", "saelens", tmp_path / "ours", "--layer", LAYER,
                     *extra)
    assert code == 0, out
    ours = load_sae(tmp_path / "ours")
    assert ours.config.arch == {"standard": "relu", "topk": "topk", "jumprelu": "batchtopk"}[kind]
    assert ours.config.layer == LAYER and ours.config.model == "tiny-vit-made-in-saelens"
    x = _batch()
    with torch.no_grad():
        _codes_close(ours.encode(x).dense(), lens.encode(x))
        torch.testing.assert_close(ours(x)[0], lens(x), atol=1e-5, rtol=1e-5)


def test_saelens_sae_runs_through_encode_stats_and_mask(store, tmp_path):
    d_model = ActivationStore(store, mode="r").d_model
    lens = _lens_sae("standard", d_model, f"blocks.{LAYER}.hook_resid_post")
    with torch.no_grad():
        lens.b_enc.fill_(0.05)
    lens.save_model(tmp_path / "lens")
    code, out = _cli("import-sae", tmp_path / "lens", "--format", "saelens", tmp_path / "ours", "--cache", store)
    assert_one_line_error(code, out, "trained on tiny-vit-made-in-saelens but", "pass --model")  # SAELens' name
    code, out = _cli("import-sae", tmp_path / "lens", "--format", "saelens", tmp_path / "ours", "--cache", store,
                     "--model", f"{TINY}/none")
    assert code == 0, out
    ours = load_sae(tmp_path / "ours")
    assert ours.config.model == f"{TINY}/none" and ours.config.layer == LAYER
    assert ours.config.cache_config_sha256 == ActivationStore(store, mode="r").config_sha256
    x = _batch(d_model)
    with torch.no_grad():
        _codes_close(ours.encode(x).dense(), lens.encode(x))
    _runs_through_the_stages(tmp_path / "ours", store, tmp_path)


# The reference's config, with its field names and defaults (src/sae_training/config.py of
# dynamical-inference/patchsae, after __post_init__), pickled under its module path.
@dataclass
class ViTSAERunnerConfig:
    custom_clip_ckpt_path: str | None = None
    class_token: bool | None = None
    image_width: int = 224
    image_height: int = 224
    model_name: str = "openai/clip-vit-base-patch16"
    module_name: str = "resid"
    block_layer: int = -2
    dataset_path: str = "evanarlian/imagenet_1k_resized_256"
    image_key: str = "image"
    label_key: str = "label"
    use_cached_activations: bool | None = None
    cached_activations_path: str | None = None
    d_in: int = 768
    total_training_tokens: int = 2_621_440
    n_batches_in_store: int = 15
    store_size: int | None = None
    max_batch_size_for_vit_forward_pass: int = 1024
    create_dataloader: bool = True
    device: str = "cpu"
    seed: int = 42
    dtype: torch.dtype = torch.float32
    b_dec_init_method: str = "geometric_median"
    expansion_factor: int = 64
    from_pretrained_path: str | None = None
    gated_sae: bool | None = None
    l1_coefficient: float = 8e-5
    lr: float = 4e-4
    lr_scheduler_name: str = "constantwithwarmup"
    lr_warm_up_steps: int = 500
    batch_size: int = 16
    mse_cls_coefficient: float = 1.0
    use_ghost_grads: bool | None = True
    feature_sampling_window: int = 64
    feature_sampling_method: str | None = None
    resample_batches: int = 32
    feature_reinit_scale: float = 0.2
    dead_feature_window: int = 64
    dead_feature_estimation_method: str = "no_fire"
    dead_feature_threshold: float = 1e-6
    log_to_wandb: bool | None = None
    wandb_project: str = "patch_sae"
    wandb_entity: str = "test"
    wandb_log_frequency: int = 20
    n_checkpoints: int = 1
    checkpoint_path: str = "out/checkpoints/abc123"

    def __post_init__(self):
        self.store_size = self.n_batches_in_store * self.batch_size
        self.d_sae = self.d_in * self.expansion_factor
        self.device = torch.device(self.device)
        self.run_name = f"{self.d_sae}-L1-{self.l1_coefficient}-LR-{self.lr}-Tokens-{self.total_training_tokens:3.3e}"


def _patchsae_checkpoint(path: Path, *, as_dict: bool = False, **cfg_fields) -> dict[str, torch.Tensor]:
    """A checkpoint as the reference's ``SparseAutoencoder.save_model`` writes it (``{"cfg", "state_dict"}``);
    ``as_dict``: the ``{"config": dict}`` form that its ``tasks/utils.load_sae`` also reads."""
    cfg = ViTSAERunnerConfig(**cfg_fields)
    g = torch.Generator().manual_seed(4)
    d_in, d_sae = cfg.d_in, cfg.d_sae
    state = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5, "b_enc": 0.05 * torch.randn(d_sae, generator=g),
             "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": 0.3 * torch.randn(d_in, generator=g)}
    state["W_dec"] /= state["W_dec"].norm(dim=1, keepdim=True)
    if as_dict:
        torch.save({"config": vars(cfg), "state_dict": state}, path)
        return state
    names = ["src", "src.sae_training", "src.sae_training.config"]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    cls = ViTSAERunnerConfig
    old = cls.__module__, cls.__qualname__
    cls.__module__, cls.__qualname__ = "src.sae_training.config", "ViTSAERunnerConfig"
    sys.modules["src.sae_training.config"].ViTSAERunnerConfig = cls
    try:
        torch.save({"cfg": cfg, "state_dict": state}, path)
    finally:
        cls.__module__, cls.__qualname__ = old
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return state


def _patchsae_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The reference's ``forward_standard`` codes: relu((x - b_dec) W_enc + b_enc)."""
    return torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])


def test_patchsae_checkpoint_imports_with_the_same_codes(tmp_path):
    state = _patchsae_checkpoint(tmp_path / "sae.pt", d_in=D, expansion_factor=3)
    assert "ViTSAERunnerConfig" in (tmp_path / "sae.pt").read_bytes().decode("latin-1")  # the real pickled class
    code, out = _cli("import-sae", tmp_path / "sae.pt", "--format", "patchsae", tmp_path / "ours")
    assert code == 0, out
    ours = load_sae(tmp_path / "ours")
    c = ours.config
    assert (c.arch, c.d_in, c.d_sae, c.layer, c.model, c.l1, c.token_kind) == \
        ("relu", D, 3 * D, 10, "ViT-B-16/openai", 8e-5, "all")  # block_layer -2 of 12 blocks is block 10
    x = _batch()
    with torch.no_grad():
        _codes_close(ours.encode(x).dense(), _patchsae_forward(state, x))


def test_patchsae_checkpoint_runs_through_encode_stats_and_mask(store, tmp_path):
    d_model = ActivationStore(store, mode="r").d_model
    state = _patchsae_checkpoint(tmp_path / "sae.pt", as_dict=True, d_in=d_model, expansion_factor=3,
                                 block_layer=LAYER, model_name="my-tiny-clip")
    code, out = _cli("import-sae", tmp_path / "sae.pt", "--format", "patchsae", tmp_path / "ours", "--cache", store)
    assert code == 0, out
    ours = load_sae(tmp_path / "ours")
    assert ours.config.layer == LAYER and ours.config.model == f"{TINY}/none"
    x = _batch(d_model)
    with torch.no_grad():
        _codes_close(ours.encode(x).dense(), _patchsae_forward(state, x))
    _runs_through_the_stages(tmp_path / "ours", store, tmp_path)


# ---------------------------------------------------------------------------------------
# Refusals: one line, exit status 2, nothing written


def test_a_layer_off_by_one_is_refused(store, tmp_path):
    d_model = ActivationStore(store, mode="r").d_model
    # resid_pre of block 2 is the output of block 1: asked for as block 2, refused
    _lens_sae("standard", d_model, f"blocks.{LAYER}.hook_resid_pre").save_model(tmp_path / "pre")
    code, out = _cli("import-sae", tmp_path / "pre", "--format", "saelens", tmp_path / "a", "--layer", LAYER)
    assert_one_line_error(code, out, f"hook blocks.{LAYER}.hook_resid_pre is the residual output of block {LAYER - 1}, "
                                     f"not block {LAYER}")
    # ... and the store holds block 2 only
    code, out = _cli("import-sae", tmp_path / "pre", "--format", "saelens", tmp_path / "b", "--cache", store)
    assert_one_line_error(code, out, f"output of block {LAYER - 1}, which", "does not hold (layers [2])")
    # resid_pre of block 3 is block 2: accepted, and it encodes the store
    _lens_sae("standard", d_model, f"blocks.{LAYER + 1}.hook_resid_pre").save_model(tmp_path / "pre3")
    code, out = _cli("import-sae", tmp_path / "pre3", "--format", "saelens", tmp_path / "c", "--cache", store,
                     "--model", f"{TINY}/none")
    assert code == 0 and load_sae(tmp_path / "c").config.layer == LAYER, out
    # the same off-by-one from a PatchSAE checkpoint
    _patchsae_checkpoint(tmp_path / "sae.pt", d_in=d_model, expansion_factor=2, block_layer=LAYER + 1)
    code, out = _cli("import-sae", tmp_path / "sae.pt", "--format", "patchsae", tmp_path / "d", "--layer", LAYER)
    assert_one_line_error(code, out, f"block_layer {LAYER + 1} is the residual output of block {LAYER + 1}, "
                                     f"not block {LAYER}")
    assert not any((tmp_path / name).exists() for name in "abd")


def test_what_cannot_be_carried_is_refused(store, tmp_path):
    def refused(lens_dir: Path, *needles: str, extra=()) -> None:
        code, out = _cli("import-sae", lens_dir, "--format", "saelens", tmp_path / "out", *extra)
        assert_one_line_error(code, out, *needles)
        assert not (tmp_path / "out").exists()

    def saved(name: str, kind="standard", hook=f"blocks.{LAYER}.hook_resid_post", edit=None, d_in=D) -> Path:
        _lens_sae(kind, d_in, hook).save_model(tmp_path / name)
        if edit:
            cfg = json.loads((tmp_path / name / SAELENS_CONFIG).read_text())
            edit(cfg)
            (tmp_path / name / SAELENS_CONFIG).write_text(json.dumps(cfg))
        return tmp_path / name

    refused(saved("mlp", hook=f"blocks.{LAYER}.hook_mlp_out"), "hook_mlp_out", "not the residual stream after a block")
    refused(saved("emb", hook="blocks.0.hook_resid_pre"), "the embeddings before the first block")
    refused(saved("gated", edit=lambda c: c.update(architecture="gated")), "SAELens 'gated' SAE", "cannot be carried")
    refused(saved("ln", edit=lambda c: c.update(normalize_activations="layer_norm")),
            "normalize_activations='layer_norm'")
    refused(saved("avg", edit=lambda c: c.update(normalize_activations="expected_average_only_in")),
            "fold_activation_norm_scaling_factor")
    lens = _lens_sae("jumprelu", D, f"blocks.{LAYER}.hook_resid_post")
    with torch.no_grad():
        lens.threshold.copy_(torch.linspace(0.1, 0.5, S))
    lens.save_model(tmp_path / "perlatent")
    refused(tmp_path / "perlatent", "a threshold per latent", extra=["--k", "4"])
    refused(saved("nok", kind="jumprelu"), "pass --k K")
    refused(saved("wide"), f"reads width {D} but", extra=["--cache", store])  # d_in mismatch with the store
    torch.save({"cfg": {"d_in": D, "expansion_factor": 2, "gated_sae": True, "block_layer": 1}, "state_dict": {}},
               tmp_path / "gated.pt")
    code, out = _cli("import-sae", tmp_path / "gated.pt", "--format", "patchsae", tmp_path / "out")
    assert_one_line_error(code, out, "gated PatchSAE SAE")
    torch.save({"cfg": {"d_in": D, "expansion_factor": 2, "model_name": "mine", "block_layer": -1},
                "state_dict": {}}, tmp_path / "neg.pt")
    code, out = _cli("import-sae", tmp_path / "neg.pt", "--format", "patchsae", tmp_path / "out")
    assert_one_line_error(code, out, "counted from the end", "pass --layer N")
    torch.save({"cfg": _Unsafe(), "state_dict": {}}, tmp_path / "pickle.pt")  # a class the file would have to run
    code, out = _cli("import-sae", tmp_path / "pickle.pt", "--format", "patchsae", tmp_path / "out")
    assert_one_line_error(code, out, "not a PatchSAE checkpoint that can be read safely (it pickles", "_Unsafe)")
    assert "weights_only" not in out  # never suggests loading it unsafely


class _Unsafe:
    pass
