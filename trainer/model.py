"""A small decoder-only transformer, sized by name or by an explicit `ModelConfig`.

Pre-norm blocks (RMSNorm or LayerNorm), rotary positions, causal attention through
`scaled_dot_product_attention`, a GELU or SwiGLU MLP, and input/output embeddings tied.

Initialisation is portable: weights are drawn from a counter-based integer hash of
(seed, parameter name, element index), so the same seed gives bit-identical weights on any
CPU or GPU. torch's own generators do not (anchors.md: `randn` bits change with the CPU's
vector unit, and CPU and CUDA streams differ), and a swarm whose round-0 weights already hash
alike needs no transfer of the initial state.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainer.tokenizer import ByteTokenizer

MlpKind = Literal["swiglu", "gelu"]
NormKind = Literal["rmsnorm", "layernorm"]


class ModelConfigError(ValueError):
    """A model configuration that cannot describe a working model."""


class ModelInputError(ValueError):
    """Token input of the wrong shape, dtype, length or id range."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the transformer. `mlp_hidden` is the hidden width of the MLP."""

    vocab_size: int = ByteTokenizer.vocab_size
    context_tokens: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 352
    mlp: MlpKind = "swiglu"
    norm: NormKind = "rmsnorm"
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "context_tokens",
            "d_model",
            "n_layers",
            "n_heads",
            "mlp_hidden",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ModelConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ModelConfigError("head size d_model/n_heads must be even for rotary positions")
        if self.mlp not in ("swiglu", "gelu"):
            raise ModelConfigError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ModelConfigError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        for name in ("rope_base", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ModelConfigError(f"{name} must be a positive finite number, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def parameter_count(self) -> int:
        """Number of trainable parameters, computed without building the model."""
        d, h = self.d_model, self.mlp_hidden
        attention = 4 * d * d
        mlp = (3 if self.mlp == "swiglu" else 2) * d * h
        norms = 2 * d * (2 if self.norm == "layernorm" else 1)
        final_norm = d * (2 if self.norm == "layernorm" else 1)
        return self.vocab_size * d + self.n_layers * (attention + mlp + norms) + final_norm


# Named sizes. `tiny` trains in minutes on 2 CPU cores; `350m` is about 310M parameters.
MODEL_SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(context_tokens=128, d_model=128, n_layers=4, n_heads=4, mlp_hidden=352),
    "small": ModelConfig(context_tokens=256, d_model=384, n_layers=6, n_heads=6, mlp_hidden=1024),
    "base": ModelConfig(context_tokens=512, d_model=768, n_layers=12, n_heads=12, mlp_hidden=2048),
    "350m": ModelConfig(
        context_tokens=1024, d_model=1024, n_layers=24, n_heads=16, mlp_hidden=2816
    ),
}


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """The registered config `name`, with fields replaced by `overrides`."""
    try:
        config = MODEL_SIZES[name]
    except KeyError:
        raise ModelConfigError(
            f"unknown model size {name!r}; known sizes: {', '.join(MODEL_SIZES)}"
        ) from None
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ModelConfigError(f"unknown ModelConfig fields: {sorted(unknown)}")
    return replace(config, **overrides)


# ---------------------------------------------------------------------------------------------
# Portable initialisation


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 tensors holding values < 2**32, without overflow.

    The constant is split into 16-bit halves so each partial product stays below 2**48.
    """
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply, 'lowbias32' constants) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash32_int(value: int) -> int:
    return int(_hash32(torch.tensor([value & _MASK32], dtype=torch.int64))[0])


def portable_uniform(
    shape: tuple[int, ...], seed: int, stream: str, *, half_width: float
) -> torch.Tensor:
    """fp32 tensor of values uniform in (-half_width, half_width), bit-identical everywhere.

    Values depend only on (seed, stream, element index): integer ops make 24 random bits per
    element, which are mapped exactly to (-1, 1) in float64, then scaled with one IEEE
    multiply and one rounding to fp32, so no vector unit or device changes the result.
    """
    key = _hash32_int(_hash32_int(seed) ^ zlib.crc32(stream.encode("utf-8")))
    key = _hash32_int(key ^ ((seed >> 32) & _MASK32))
    numel = math.prod(shape)
    index = torch.arange(numel, dtype=torch.int64)
    bits = _hash32(_hash32((index + key) & _MASK32) ^ key) >> 8  # 24 bits
    unit = (bits.to(torch.float64) * 2.0 + 1.0) * 2.0**-24 - 1.0  # exact, in (-1, 1)
    return (unit * half_width).to(torch.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Model


def _norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions: rotate pairs (x[i], x[i + d/2]) by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        qkv = self.qkv(x).view(batch, time, 3, self.n_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # (B, H, T, hd)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, time, width))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        if self.kind == "swiglu":
            self.gate = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.up = nn.Linear(config.d_model, config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = _norm(config)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM: tokens (B, T) int -> logits (B, T, vocab). Output layer = embedding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = _norm(config)
        inv_freq = config.rope_base ** (
            -torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
        )
        angles = torch.outer(torch.arange(config.context_tokens, dtype=torch.float64), inv_freq)
        # Not persistent: derived from the config, so never part of shared state or checkpoints.
        self.rope_cos: torch.Tensor
        self.rope_sin: torch.Tensor
        self.register_buffer("rope_cos", angles.cos().to(torch.float32), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(torch.float32), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ModelInputError(
                f"tokens must have shape (batch, time), got {tuple(tokens.shape)}"
            )
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ModelInputError(f"tokens must be an integer tensor, got {tokens.dtype}")
        batch, time = tokens.shape
        if batch == 0:
            raise ModelInputError("empty batch")
        if not 0 < time <= self.config.context_tokens:
            raise ModelInputError(
                f"sequence length {time} is outside 1..{self.config.context_tokens}"
                " (context_tokens)"
            )
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ModelInputError(
                f"token ids must lie in 0..{self.config.vocab_size - 1}, got {low}..{high}"
            )
        cos, sin = self.rope_cos[:time], self.rope_sin[:time]
        x = self.embed(tokens.long())
        for block in self.blocks:
            x = block(x, cos, sin)
        return F.linear(self.final_norm(x), self.embed.weight)

    def initialize(self, seed: int) -> None:
        """Overwrite every parameter with the portable init for `seed` (see module doc).

        Uniform init with the std of the usual normal init: `init_std` for embeddings and
        input projections, `init_std / sqrt(2 * n_layers)` for the projections that write
        into the residual stream; norm scales 1, norm biases 0.
        """
        config = self.config
        residual_std = config.init_std / math.sqrt(2 * config.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if param.dim() == 1:
                    param.fill_(0.0 if name.endswith(".bias") else 1.0)
                    continue
                std = (
                    residual_std
                    if name.endswith(("out.weight", "down.weight"))
                    else config.init_std
                )
                values = portable_uniform(
                    tuple(param.shape), seed, name, half_width=std * math.sqrt(3.0)
                )
                param.copy_(values.to(param.device))


def build_model(
    config: ModelConfig | str, *, seed: int = 0, device: torch.device | str = "cpu"
) -> Transformer:
    """A `Transformer` for a config or registered size name, initialised from `seed`."""
    if isinstance(config, str):
        config = model_config(config)
    model = Transformer(config)
    model.initialize(seed)
    return model.to(torch.device(device))


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `model(inputs)` against `targets` (same shape as inputs)."""
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
