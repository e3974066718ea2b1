"""The SAE contract: config, codes, the base module and the architecture registry.

Units. Every SAE works internally in *normalised units*: raw activations are divided by
``config.norm_scale`` before the encoder and the decoder output is multiplied back.
``encode``/``decode``/``forward`` take and return raw (cache) units and apply the scale
themselves; the ``*_normed`` methods work in normalised units and are what the trainer and
the losses use. Parameters (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``) and codes live in
normalised units; ``norm_scale`` is stored in every checkpoint so metrics can always be
computed in the cache's original units.

Maths (normalised units, x̃ = x / norm_scale):
    pre = (x̃ − b_dec) W_enc + b_enc          (B, S)
    f   = act(pre)                            architecture-specific, f ≥ 0
    x̂   = norm_scale · (f W_dec + b_dec)

Shapes: W_enc (D, S), b_enc (S,), W_dec (S, D) with unit-norm rows, b_dec (D,).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import MISSING, dataclass
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache.errors import UserError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TOKEN_KINDS = ("all", "patches", "cls")
INITS = ("auto", "tied", "reference")
"""Weight inits ``build`` knows: "auto" (the architecture's ``default_init``), "tied", "reference"."""
RECORD_ORDER = (
    "arch", "d_in", "d_sae", "k", "l1", "aux_k", "aux_coef", "dead_window_tokens", "norm_scale",
    "dtype", "threshold_lr", "model", "layer", "token_kind", "cache_config_sha256",
)
"""Key order of ``SAEConfig.to_dict`` (checkpoint format 1); other fields follow in field order."""
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_EXACT_FLOAT_COUNT = 2**24
"""float32 holds every whole number up to this exactly: rows counted in one float sum."""

_REGISTRY: dict[str, type["SAE"]] = {}


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """What every SAE has: shape, units, dtype, L1 weight and provenance.

    Each architecture subclasses it with its own fields and defaults, next to its module, and
    registers the pair (``register``), so the registry knows an architecture's config by name.
    """

    arch: ClassVar[str] = ""
    """Architecture name, set by ``register``."""
    d_in: int
    """Input width D (the model width; read it from the cache, never guess it)."""
    d_sae: int
    """Number of latents S (``from_expansion`` computes it from an expansion)."""
    l1: float = 0.0
    """L1 coefficient λ (architectures set their default: 8e-5 for relu, 0 for the TopK family)."""
    dead_window_tokens: int = 10_000_000
    """A latent is dead if it has not fired in this many tokens (Gao et al. 2024: 10M)."""
    norm_scale: float = 1.0
    """Raw activations are divided by this before the SAE and outputs multiplied back."""
    dtype: str = "float32"
    """Parameter dtype: "float32", "float64", "bfloat16" or "float16" (train in float32)."""
    model: str = ""
    """Provenance: the model the activations came from, e.g. "ViT-B-16/openai"."""
    layer: int | None = None
    """Provenance: block index, 0-based, residual-stream output of that block (None = unknown)."""
    token_kind: str = "all"
    """Provenance: tokens trained on: "all" (class + patches), "patches" or "cls"."""
    cache_config_sha256: str = ""
    """Provenance: sha256 of the activation cache's extraction config ("" = unknown)."""

    def __post_init__(self) -> None:
        if not self.arch:
            raise TypeError(f"{type(self).__name__} is not registered: build an architecture's "
                            "config (config_class(name)) or register yours with its SAE")
        check_int("d_in", self.d_in, minimum=1)
        check_int("d_sae", self.d_sae, minimum=1)
        check_number("l1", self.l1)
        check_int("dead_window_tokens", self.dead_window_tokens, minimum=1)
        check_number("norm_scale", self.norm_scale, strict=True)
        object.__setattr__(self, "norm_scale", float(self.norm_scale))
        if self.dtype not in DTYPES:
            raise UserError(f"unknown SAE dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not isinstance(self.model, str):
            raise UserError(f"model must be a string, got {self.model!r}")
        if self.layer is not None:
            check_int("layer", self.layer, minimum=0)
        if self.token_kind not in TOKEN_KINDS:
            raise UserError(
                f"unknown token_kind {self.token_kind!r}: use one of {', '.join(TOKEN_KINDS)}"
            )
        if self.cache_config_sha256 and not _SHA256_RE.match(self.cache_config_sha256):
            raise UserError(
                "cache_config_sha256 must be 64 lowercase hex digits or empty, got "
                f"{self.cache_config_sha256!r}"
            )

    @classmethod
    def from_fields(cls, **fields) -> "SAEConfig":
        """``cls(**fields)`` with a one-line UserError for a field this architecture lacks or needs
        (the fields come from users and files, not only from code)."""
        declared = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - set(declared))
        if unknown:
            raise UserError(
                f"SAE arch {cls.arch!r} takes no {', '.join(unknown)}: remove it or pick an arch "
                "that has it"
            )
        missing = [
            name for name, f in declared.items()
            if name not in fields and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise UserError(f"SAE arch {cls.arch!r} needs {', '.join(missing)}: set it")
        return cls(**fields)

    @classmethod
    def from_expansion(cls, *, d_in: int, expansion: float, **fields) -> "SAEConfig":
        """Config with ``d_sae = d_in × expansion`` (must come out a whole number)."""
        d_sae = d_in * expansion
        if not (isinstance(d_in, int) and d_sae > 0 and float(d_sae).is_integer()):
            raise UserError(
                f"expansion {expansion} × d_in {d_in} is not a positive whole number of latents: "
                "pick an expansion such as 8, 16, 32 or 64"
            )
        return cls.from_fields(d_in=d_in, d_sae=int(d_sae), **fields)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by ``dtype``."""
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        """The flat record checkpoints save: arch, ``format1_fill`` and every field (fields win), JSON-ready."""
        record = {"arch": self.arch, **self.format1_fill(), **dataclasses.asdict(self)}
        rank = {key: i for i, key in enumerate(RECORD_ORDER)}
        return dict(sorted(record.items(), key=lambda item: rank.get(item[0], len(rank))))

    def format1_fill(self) -> dict:
        """Keys checkpoint format 1 holds for this architecture with no field behind them.

        Format 1 gave every SAE the fields of all three first architectures; the ones an
        architecture does not use keep their fixed values so its files stay byte-identical.
        """
        return {}


def check_int(name: str, value, *, minimum: int) -> None:
    """UserError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False) -> None:
    """UserError unless ``value`` is a finite real number >= ``minimum`` (> if ``strict``)."""
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (value > minimum if strict else value >= minimum)
    )
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise UserError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True, eq=False)
class Codes:
    """The latent codes of a batch of tokens, dense or as sparse entries.

    Exactly one representation is set: ``acts_BS`` (dense: relu, BatchTopK at inference) or
    the entries ``vals_N``, ``idx_N`` with ``count_B`` (TopK; BatchTopK in training), in
    token order: token b owns the ``count_B[b]`` consecutive entries after those of tokens
    before it, each a distinct latent. Sparse codes hold only what a token keeps, so
    BatchTopK's uneven counts cost no padding. Values are ≥ 0; an entry whose value is 0 is
    not active. Codes are in the SAE's normalised units.
    """

    d_sae: int
    acts_BS: Tensor | None = None
    vals_N: Tensor | None = None
    idx_N: Tensor | None = None
    count_B: Tensor | None = None

    def __post_init__(self) -> None:
        sparse = [getattr(self, f) is not None for f in ("vals_N", "idx_N", "count_B")]
        if self.acts_BS is not None:
            if any(sparse):
                raise ValueError("Codes takes either acts_BS or sparse entries, not both")
        elif not all(sparse):
            raise ValueError("Codes needs acts_BS, or all of vals_N, idx_N and count_B")

    @classmethod
    def fixed_width(cls, d_sae: int, vals_BK: Tensor, idx_BK: Tensor) -> "Codes":
        """Sparse codes with K entries per token, from (B, K) values and latent indices."""
        n_rows, width = vals_BK.shape
        count_B = torch.full((n_rows,), width, dtype=torch.int64, device=vals_BK.device)
        return cls(d_sae=d_sae, vals_N=vals_BK.reshape(-1), idx_N=idx_BK.reshape(-1), count_B=count_B)

    @property
    def is_sparse(self) -> bool:
        """True for the sparse-entry representation."""
        return self.acts_BS is None

    @property
    def n_tokens(self) -> int:
        """Number of tokens B in the batch."""
        return self.acts_BS.shape[0] if self.acts_BS is not None else len(self.count_B)

    @functools.cached_property
    def rows_N(self) -> Tensor:
        """The token of each sparse entry."""
        return torch.repeat_interleave(self.count_B, output_size=len(self.vals_N))

    @functools.cached_property
    def offsets_B(self) -> Tensor:
        """Where each token's sparse entries start."""
        return self.count_B.cumsum(0) - self.count_B

    def dense(self) -> Tensor:
        """Codes as a dense (B, S) tensor (differentiable)."""
        if self.acts_BS is not None:
            return self.acts_BS
        out_BS = self.vals_N.new_zeros(self.n_tokens, self.d_sae)
        return out_BS.index_put((self.rows_N, self.idx_N), self.vals_N)

    def l0(self) -> Tensor:
        """Number of active (> 0) latents per token, float (B,)."""
        if self.acts_BS is not None:
            return (self.acts_BS > 0).sum(dim=1).to(torch.float32)
        return self._per_token((self.vals_N > 0).to(torch.float32))

    def l1(self) -> Tensor:
        """Sum of |f| over latents per token (B,) (differentiable).

        Codes are ≥ 0, so this is their plain sum: its gradient is a constant, where |f|'s
        would cost two more (B, S) passes (sign, product) in every ReLU training step.
        """
        if self.acts_BS is not None:
            return self.acts_BS.sum(dim=1)
        return self._per_token(self.vals_N)

    def _per_token(self, values_N: Tensor) -> Tensor:
        return values_N.new_zeros(self.n_tokens).index_add(0, self.rows_N, values_N)

    def fire_counts(self) -> Tensor:
        """Per latent, the number of tokens of this batch on which it is > 0 (int64, (S,))."""
        if self.acts_BS is not None:
            # sign(f) is 1 where f > 0 and 0 elsewhere (f ≥ 0), and summing it in float32 is
            # exact below 2^24 rows: about 10× faster than summing the bool mask into int64
            return sum(
                torch.sign(part_BS).sum(dim=0, dtype=torch.float32).to(torch.int64)
                for part_BS in self.acts_BS.detach().split(_EXACT_FLOAT_COUNT)
            )
        idx = torch.where(self.vals_N > 0, self.idx_N, self.d_sae)
        return torch.bincount(idx, minlength=self.d_sae + 1)[: self.d_sae]

    def detach(self) -> "Codes":
        """The same codes cut from the autograd graph."""
        if self.acts_BS is not None:
            return Codes(d_sae=self.d_sae, acts_BS=self.acts_BS.detach())
        return Codes(d_sae=self.d_sae, vals_N=self.vals_N.detach(), idx_N=self.idx_N, count_B=self.count_B)


class SAE(nn.Module):
    """Base sparse autoencoder; subclasses only define ``activate`` (pre-activations → codes).

    Raw-unit API: ``encode(x_BD) -> Codes``, ``decode(codes) -> x_hat_BD``,
    ``forward(x_BD) -> (x_hat_BD, codes)``. Normalised-unit API (used for training):
    ``pre_acts``, ``activate``, ``encode_normed``, ``decode_normed``.

    Like any nn.Module, ``build`` returns it in training mode and ``load_sae`` in eval mode;
    BatchTopK encodes differently in the two (batch budget vs threshold), so call ``.eval()``
    (and use ``torch.no_grad()``) for inference.
    """

    arch: ClassVar[str]
    config_class: ClassVar[type[SAEConfig]]
    """The architecture's config class, set by ``register``."""
    default_revival: ClassVar[str] = "none"
    """Dead-latent revival the trainer uses by default ("ghost_grads" or "auxk")."""
    batch_wide: ClassVar[bool] = False
    """Training-mode ``activate`` depends on the whole batch (BatchTopK): a batch trained in
    micro-batches first goes through ``batch_context``, then each part through ``activate_part``."""
    default_init: ClassVar[str] = "tied"
    """Weight init ``init="auto"`` picks ("tied" or "reference"; see ``reset_parameters``)."""

    def __init__(self, config: SAEConfig, *, generator: torch.Generator | None = None, init: str = "auto"):
        super().__init__()
        if type(config) is not self.config_class:
            raise ValueError(
                f"{type(config).__name__} given to the {self.arch!r} SAE, which takes "
                f"{self.config_class.__name__}"
            )
        self.config = config
        D, S, dtype = config.d_in, config.d_sae, config.torch_dtype
        self.W_enc = nn.Parameter(torch.empty(D, S, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(S, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(S, D, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(D, dtype=dtype))
        self.reset_parameters(generator=generator, init=init)

    @torch.no_grad()
    def reset_parameters(self, *, generator: torch.Generator | None = None, init: str = "auto") -> None:
        """Random weights, both biases zero; W_dec rows always unit vectors.

        "tied": W_enc = W_decᵀ (Gao et al. 2024; right for the TopK family, whose k caps the
        first reconstruction). "reference": independent Kaiming-uniform W_enc (D, S) and W_dec
        (S, D), bound √(6 / size(1)) as torch's ``kaiming_uniform_``, then unit decoder rows (the
        PatchSAE reference). For a ReLU SAE the tied start overshoots: about half of the S
        latents fire on every token, so the first reconstruction is far too large (FVU ≈ 990
        at ×64); the reference W_enc has column norms ≈ √(2D/S), so its first reconstruction
        is ≈ ‖x − b_dec‖ long in a direction unrelated to x (FVU ≈ 2). Yet on planted
        dictionaries the tied start recovers the features better, because each latent starts
        as a matched filter of its own decoder row (NOTES-relu.md); every architecture
        defaults to it.

        ``b_dec`` should then be set to the geometric median of a sample
        (``Trainer.init_from_sample``).
        """
        if init not in INITS:
            raise UserError(f"unknown SAE init {init!r}: use one of {', '.join(INITS)}")
        init = self.default_init if init == "auto" else init
        if init == "tied":
            w_SD = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        else:
            self.W_enc.copy_(_kaiming_uniform(self.W_enc.shape, generator))
            w_SD = _kaiming_uniform(self.W_dec.shape, generator)
        w_SD /= w_SD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.copy_(w_SD)
        if init == "tied":
            self.W_enc.copy_(w_SD.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- units -------------------------------------------------------------------------
    def to_normed(self, x_BD: Tensor) -> Tensor:
        """Raw activations → normalised units (cast to the parameter dtype, ÷ norm_scale)."""
        x_BD = x_BD.to(device=self.W_enc.device, dtype=self.W_enc.dtype)
        if self.config.norm_scale != 1.0:
            x_BD = x_BD / self.config.norm_scale
        return x_BD

    def from_normed(self, xn_BD: Tensor) -> Tensor:
        """Normalised units → raw units (× norm_scale)."""
        if self.config.norm_scale != 1.0:
            xn_BD = xn_BD * self.config.norm_scale
        return xn_BD

    # -- normalised-unit core ----------------------------------------------------------
    def pre_acts(self, xn_BD: Tensor) -> Tensor:
        """Encoder pre-activations (x̃ − b_dec) W_enc + b_enc, shape (B, S).

        b_dec's gradient through the encoder is −(Σ_b ∂L/∂pre_b) W_encᵀ, a (S,) × (S, D)
        product, but autograd would get it from a full (B, S) × (S, D) matmul. So when
        gradients are on, b_dec enters the product detached and again through the bias as
        (b_dec − b_dec.detach()) W_enc, which is exactly zero in value and carries that
        gradient: the same values (up to the rounding of the bias added inside the matmul),
        one matmul of six fewer per training step.
        """
        b_dec_D = self.b_dec
        if not (torch.is_grad_enabled() and b_dec_D.requires_grad):
            return (xn_BD - b_dec_D) @ self.W_enc + self.b_enc
        bias_S = self.b_enc - (b_dec_D - b_dec_D.detach()) @ self.W_enc
        if torch.is_autocast_enabled(xn_BD.device.type):  # keep the float32 bias add of the plain form
            return (xn_BD - b_dec_D.detach()) @ self.W_enc + bias_S
        return torch.addmm(bias_S, xn_BD - b_dec_D.detach(), self.W_enc)  # the bias added inside the matmul

    def activate(self, pre_BS: Tensor) -> Codes:
        """Architecture-specific activation: pre-activations → non-negative codes."""
        raise NotImplementedError

    def encode_normed(self, xn_BD: Tensor) -> Codes:
        """Codes of normalised inputs."""
        return self.activate(self.pre_acts(xn_BD))

    def decode_normed(self, codes: Codes) -> Tensor:
        """Reconstruction in normalised units: f W_dec + b_dec, shape (B, D)."""
        if codes.acts_BS is not None:
            return F.linear(codes.acts_BS, self.W_dec.t(), self.b_dec)  # W_dec grad as gᵀf: faster on CPU
        # sparse: each token's weighted sum of its entries' decoder rows; never builds (B, S)
        out_BD = F.embedding_bag(
            codes.idx_N, self.W_dec, offsets=codes.offsets_B,
            per_sample_weights=codes.vals_N.to(self.W_dec.dtype), mode="sum",
        )
        return out_BD + self.b_dec

    # -- raw-unit API ------------------------------------------------------------------
    def encode(self, x_BD: Tensor) -> Codes:
        """Codes of raw activations (applies ``norm_scale``)."""
        return self.encode_normed(self.to_normed(x_BD))

    def decode(self, codes: Codes) -> Tensor:
        """Reconstruction in raw units (applies ``norm_scale``)."""
        return self.from_normed(self.decode_normed(codes))

    def forward(self, x_BD: Tensor) -> tuple[Tensor, Codes]:
        """(reconstruction in raw units, codes)."""
        codes = self.encode(x_BD)
        return self.decode(codes), codes

    # -- hooks -------------------------------------------------------------------------
    def batch_context(self, pre_chunks: Iterable[Tensor], n_tokens: int) -> Any:
        """What training-mode activation needs from a whole batch of ``n_tokens`` tokens that it
        sees in micro-batches (``pre_chunks``: the batch's pre-activations, part by part).
        Only called when ``batch_wide``."""
        raise NotImplementedError

    def activate_part(self, pre_BS: Tensor, context: Any) -> Codes:
        """Training-mode activation of one micro-batch given its batch's ``batch_context``
        (None: the part is the whole batch)."""
        return self.activate(pre_BS)

    @torch.no_grad()
    def update_running_stats_(self, codes: Codes | None, context: Any = None) -> None:
        """Called by the trainer after each applied step with that step's codes, or, when the
        step ran in micro-batches, with None and the step's ``batch_context``."""

    def inference_threshold(self) -> float | None:
        """The inference threshold θ, for architectures that have one (else None)."""
        return None

    def extra_repr(self) -> str:
        c = self.config
        common = {f.name for f in dataclasses.fields(SAEConfig)}
        own = [f.name for f in dataclasses.fields(c) if f.name not in common]
        return ", ".join(f"{n}={getattr(c, n)}" for n in ("arch", "d_in", "d_sae", *own, "norm_scale"))


_SAE_T = TypeVar("_SAE_T", bound=type[SAE])


def register(name: str, config_class: type[SAEConfig]) -> Callable[[_SAE_T], _SAE_T]:
    """Class decorator: register an SAE subclass and its config class under an architecture name."""

    def deco(cls: _SAE_T) -> _SAE_T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SAE arch {name!r} is already registered to {_REGISTRY[name]}")
        if config_class.__dict__.get("arch", name) != name:
            raise ValueError(f"{config_class.__name__} is already the config of {config_class.arch!r}")
        cls.arch = config_class.arch = name
        cls.config_class = config_class
        _REGISTRY[name] = cls
        return cls

    return deco


def arch_class(name: str) -> type[SAE]:
    """The SAE class registered under ``name``."""
    if name not in _REGISTRY:
        raise UserError(f"unknown SAE arch {name!r}: use one of {', '.join(registered_archs())}")
    return _REGISTRY[name]


def config_class(name: str) -> type[SAEConfig]:
    """The config class of the architecture registered under ``name``."""
    return arch_class(name).config_class


def registered_archs() -> tuple[str, ...]:
    """Names of every registered architecture, sorted."""
    return tuple(sorted(_REGISTRY))


def build(config: SAEConfig, *, seed: int | None = None, init: str = "auto") -> SAE:
    """A freshly initialised SAE of the config's architecture; ``seed`` makes the init reproducible.

    ``init`` is one of ``INITS`` (see ``SAE.reset_parameters``); it is how training starts, not
    part of the SAE, so checkpoints do not record it.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return _REGISTRY[config.arch](config, generator=generator, init=init)


def _kaiming_uniform(shape: torch.Size, generator: torch.Generator | None) -> Tensor:
    """U(−b, b) with b = √(6 / shape[1]): torch's ``kaiming_uniform_`` (ReLU gain) for a 2-D shape."""
    bound = math.sqrt(6.0 / shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def estimate_norm_scale(x_ND: Tensor) -> float:
    """A ``norm_scale`` so normalised tokens have mean L2 norm √D: mean ‖x‖ / √D.

    Compute it on a sample of the training activations (float64, NaN rows refused).
    """
    x = x_ND.detach().to(torch.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise UserError(f"norm_scale sample must be a non-empty (N, D) array, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise UserError("norm_scale sample contains NaN/inf: run `pipeline verify` on the cache")
    scale = x.norm(dim=1).mean().item() / math.sqrt(x.shape[1])
    if not scale > 0:
        raise UserError("norm_scale sample is all zeros: check the cache (`pipeline verify`)")
    return scale
