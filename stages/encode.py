"""Stage two (b): encode every token of an activation store with a trained SAE into codes.zarr.

Shard ``k`` of the code store holds the codes of the images of shard ``k`` of the activation
store. Resumable and locked like extraction; the SAE encodes any store of the model it was
trained on, at its width and layer, including that model's MaPLe-adapted stores (the
adaptation study); a store of another model is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from cache import schema, space
from cache.codes import CodeStore, ShardCodes
from cache.errors import UserError, require_threads
from cache.store import ActivationStore, StoreLock, config_sha256
from cache.writer import BackgroundWriter
from pipeline.configs import Stage, writer_record
from pipeline.models import file_sha256, resolve_device
from pipeline.progress import Progress, already, announce, next_steps
from pipeline.sae import SAE, Codes, load_sae
from pipeline.threads import sized

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    cache_dir: Path  # identity: activation store to encode
    sae_dir: Path  # identity: trained SAE folder (config.json + weights.safetensors)
    out_dir: Path  # code store to create or resume
    batch_tokens: int | None = None  # tokens per SAE forward; default keeps a dense batch near 256 MB
    device: str = "auto"  # cpu, cuda, cuda:N, or auto (GPU when present)
    overwrite: bool = False  # replace a code store made from another SAE or store
    threads: int | None = None  # torch CPU threads; default: the CPUs this process may use
    progress: bool = True  # show a progress bar

    def __post_init__(self) -> None:
        require_threads(self.threads)
        for name in ("cache_dir", "sae_dir", "out_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class Outputs:
    codes_dir: Path
    n_images: int
    n_tokens: int
    nnz: int
    mean_l0: float
    seconds: float


def store_base_model(store: ActivationStore) -> str:
    """``name/pretrained`` of the model a store was extracted from (an adapted store: its base model)."""
    m = store.attrs.get(schema.ATTR_MODEL) or {}
    return f"{m.get('name')}/{m.get('pretrained')}"


def check_sae_fits_store(sae: SAE, store: ActivationStore) -> int:
    """The SAE's layer, checked against the store; refuses another model, a width or layer that does not fit.

    An adapted store is accepted when its base model is the SAE's model: that is the
    adaptation study (one SAE encodes the base and the adapted model).
    """
    c = sae.config
    if c.d_in != store.d_model:
        raise UserError(f"the SAE expects width {c.d_in} but {store.path} holds width {store.d_model}; "
                        "use an SAE trained on this model")
    base = store_base_model(store)
    if c.model and c.model.lower() != base.lower():
        raise UserError(f"the SAE was trained on {c.model} but {store.path} holds activations of {base}; "
                        "use an SAE trained on that model or a store of the SAE's model")
    layer = c.layer if c.layer is not None else store.layers[0]
    if layer not in store.layers:
        raise UserError(f"the SAE was trained on layer {layer}, which {store.path} does not hold "
                        f"(layers {store.layers}); extract that layer or use another SAE")
    if c.cache_config_sha256 and c.cache_config_sha256 != store.config_sha256:
        log.warning("the SAE was trained on another store (config %s); encoding %s with it anyway",
                    c.cache_config_sha256[:12], store.path)
    return layer


def codes_to_csr(codes: Codes) -> ShardCodes:
    """CSR of one batch: nonzeros per token in ascending latent order."""
    if codes.is_sparse:
        order = (codes.rows_N * codes.d_sae + codes.idx_N).argsort()  # by token, then latent
        values, indices, rows = codes.vals_N[order], codes.idx_N[order], codes.rows_N[order]
        keep = values > 0
        indices, values = indices[keep], values[keep]
        counts = torch.bincount(rows[keep], minlength=codes.n_tokens)
    else:
        rows, indices = codes.acts_BS.nonzero(as_tuple=True)
        values = codes.acts_BS[rows, indices]
        counts = torch.bincount(rows, minlength=codes.acts_BS.shape[0])
    ptr = torch.zeros(len(counts) + 1, dtype=torch.int64)
    torch.cumsum(counts.cpu(), 0, out=ptr[1:])
    return ShardCodes(ptr.numpy(), indices.cpu().numpy().astype(np.int32), values.float().cpu().numpy())


def concat_csr(parts: list[ShardCodes]) -> ShardCodes:
    offsets = np.cumsum([0] + [p.token_ptr[-1] for p in parts[:-1]])
    ptr = np.concatenate([[0]] + [p.token_ptr[1:] + o for p, o in zip(parts, offsets)]).astype(np.int64)
    return ShardCodes(ptr, np.concatenate([p.indices for p in parts]), np.concatenate([p.values for p in parts]))


@sized
def run(cfg: Config) -> Outputs:
    started = time.perf_counter()
    store = ActivationStore(cfg.cache_dir, mode="r")
    store.require_complete()
    device = resolve_device(cfg.device)
    sae = load_sae(cfg.sae_dir, device=device)
    layer = check_sae_fits_store(sae, store)
    d_sae = sae.config.d_sae
    batch_tokens = cfg.batch_tokens or max(256, 2**26 // d_sae)
    weights_sha = file_sha256(cfg.sae_dir / "weights.safetensors")
    identity = config_sha256({"store": store.config_sha256, "layer": layer, "sae_weights": weights_sha})
    attrs = {"acts_store": str(store.path.resolve()), "acts_config_sha256": store.config_sha256, "layer": layer,
             "sae_dir": str(cfg.sae_dir.resolve()), "sae_weights_sha256": weights_sha,
             "sae_config": sae.config.to_dict(), "class_names": store.class_names,
             "token_layout": store.token_layout,
             "values": "SAE codes as returned by encode (the SAE's normalised units)",
             schema.ATTR_WRITER: writer_record("encode", cfg)}
    t = store.n_tokens
    total = _codes_nbytes(sae, store, layer, batch_tokens, device)
    with StoreLock(cfg.out_dir), space.room_for(cfg.out_dir, total, resumes="the last complete shard"):
        codes = CodeStore.create_or_resume(cfg.out_dir, n_images=store.n_images, n_tokens=t, d_sae=d_sae,
                                           images_per_shard=store.images_per_shard, attrs=attrs,
                                           identity=identity, overwrite=cfg.overwrite)
        pending = codes.incomplete_shards()
        valid = store.valid
        n_pending = sum(store.shard_slice(k).stop - store.shard_slice(k).start for k in pending)
        announce("encode",
                 f"{store.n_images:,} images x {t} tokens of block {layer} in {store.path} through the SAE "
                 f"{cfg.sae_dir} ({sae.config.arch}, {d_sae:,} latents)",
                 f"into {cfg.out_dir}: about {space.human_bytes(total)} of sparse codes; {n_pending:,} images to "
                 f"encode" + already(store.n_images - n_pending, "encoded"))
        bar = Progress(total=n_pending * t, unit="tok", unit_scale=True, desc=f"encode {cfg.out_dir.name}",
                       enabled=cfg.progress)
        with BackgroundWriter(codes.write_shard) as writer, torch.inference_mode():
            for k in pending:
                sl = store.shard_slice(k)
                x_ND = torch.from_numpy(store.read(layer, sl.start, sl.stop)).reshape(-1, store.d_model)
                keep_N = torch.from_numpy(np.repeat(valid[sl], t))
                parts = []
                for s in range(0, len(x_ND), batch_tokens):
                    x_BD = x_ND[s:s + batch_tokens].to(device, torch.float32)
                    c = sae.encode(x_BD)
                    c = _drop_rows(c, ~keep_N[s:s + batch_tokens].to(device))
                    parts.append(codes_to_csr(c))
                    bar.update(len(x_BD))
                writer.submit(k, concat_csr(parts))
        bar.close()
    nnz = int(sum(codes.read_shard(k).token_ptr[-1] for k in range(codes.n_shards)))
    n_tokens = store.n_images * t
    return Outputs(codes_dir=codes.path, n_images=store.n_images, n_tokens=n_tokens, nnz=nnz,
                   mean_l0=nnz / max(n_tokens, 1), seconds=time.perf_counter() - started)


def _codes_nbytes(sae: SAE, store: ActivationStore, layer: int, batch_tokens: int, device: str) -> int:
    """About what the code store will hold: 8 bytes (latent id, value) per nonzero, at the mean L0 of one batch
    of the first images (the token pointers compress to little beside them)."""
    c = store.images_per_chunk
    n = min(store.n_images, -(-max(1, batch_tokens // store.n_tokens) // c) * c)  # whole chunks: checked reads
    x_BTD = store.read(layer, 0, n)[store.valid[:n]]
    if not len(x_BTD):
        return 0  # no readable image among the first ones to measure
    with torch.inference_mode():
        codes = sae.encode(torch.from_numpy(x_BTD).reshape(-1, store.d_model).to(device, torch.float32))
    nnz_per_image = int(codes_to_csr(codes).token_ptr[-1]) / len(x_BTD)
    return int(nnz_per_image * int(store.valid.sum()) * 8)


def _drop_rows(codes: Codes, drop_B: torch.Tensor) -> Codes:
    """Empty codes for tokens of unreadable images (their activations are placeholders)."""
    if not drop_B.any():
        return codes
    if codes.is_sparse:
        return Codes(d_sae=codes.d_sae, vals_N=codes.vals_N.masked_fill(drop_B[codes.rows_N], 0),
                     idx_N=codes.idx_N, count_B=codes.count_B)
    return Codes(d_sae=codes.d_sae, acts_BS=codes.acts_BS.masked_fill(drop_B[:, None], 0))


def summary(out: Outputs) -> str:
    return (f"encoded {out.n_images} images ({out.n_tokens} tokens, mean L0 {out.mean_l0:.1f}) "
            f"in {out.seconds:.1f} s -> {out.codes_dir}\n"
            + next_steps(f"pipeline verify {out.codes_dir}", f"pipeline stats --codes {out.codes_dir} --cache STORE --out STATS_DIR"))


STAGE = Stage(name="encode", config=Config, run=run, summary=summary, reads=("cache_dir", "sae_dir"),
              writes=("out_dir",), persist=True, cached=False,
              help="Write every token's sparse SAE code (CSR per shard, zstd); rerun to resume.")
