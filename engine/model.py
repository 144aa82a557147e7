"""A decoder-only transformer over packed variable-length documents.

Llama-style by default (RMSNorm, rotary position embeddings, SwiGLU MLP, no biases); ``norm="layernorm"``
and ``activation="gelu"`` switch to the GPT/BERT choices. The model takes one packed sequence of tokens
with ``cu_seqlens`` marking document starts: positions restart at 0 in every document and attention never
crosses a document boundary, so no padding token is ever computed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from megascope.kernels import varlen_attention


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    """Byte-level tokens: one token per byte."""
    dim: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    """Fewer key/value heads than query heads gives grouped-query attention."""
    ffn_dim: int = 384
    """Hidden width of the MLP (per branch for SwiGLU)."""
    max_seq_len: int = 256
    """Longest document segment; longer documents are cut into segments of this length."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    activation: Literal["swiglu", "gelu"] = "swiglu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"model.dim ({self.dim}) must be a multiple of model.n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError("model head_dim (dim / n_heads) must be even for rotary embeddings")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"model.norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"model.activation must be 'swiglu' or 'gelu', got {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the config alone (no model is built)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        mlp = self.dim * self.ffn_dim * (3 if self.activation == "swiglu" else 2)
        norm_size = self.dim * (1 if self.norm == "rmsnorm" else 2)
        per_layer = attention + mlp + 2 * norm_size
        embedding = self.vocab_size * self.dim
        output = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = self.n_layers * per_layer + norm_size + output + (embedding if include_embedding else 0)
        return total

    def flops_per_step(self, doc_lengths: list[int]) -> float:
        """Training FLOPs (forward + backward) for one packed sequence with these document lengths.

        6 FLOPs per non-embedding parameter per token (PaLM appendix B), plus causal attention:
        QK^T and PV cost 2 * 2 * L^2/2 * dim per layer forward, times 3 for forward and backward.
        """
        tokens = sum(doc_lengths)
        dense = 6.0 * self.num_params(include_embedding=False) * tokens
        attention = 6.0 * self.n_layers * self.dim * sum(length * length for length in doc_lengths)
        return dense + attention

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    # Trains visibly on 2 CPU cores in minutes.
    "tiny": ModelConfig(),
    "small": ModelConfig(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, ffn_dim=1024, max_seq_len=512),
    # GPT-2-small-sized and up: for a GPU.
    "125m": ModelConfig(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048, max_seq_len=1024),
    "350m": ModelConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=2816, max_seq_len=2048),
    "1b": ModelConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=8, ffn_dim=5632, max_seq_len=2048),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with any fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: under bf16 autocast the mean of squares loses too much precision.
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


def rotary_tables(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape ``(max_seq_len, head_dim / 2)``."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(config.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (tokens, heads, head_dim); cos/sin: (tokens, head_dim / 2), gathered at each token's position.
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def positions_in_documents(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Each token's position inside its own document: 0, 1, ... restarting at every document start."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = cu_seqlens[:-1].long()
    return torch.arange(total_tokens, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        kv_dim = config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, kv_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        c = self.config
        tokens = x.shape[0]
        q = self.wq(x).view(tokens, c.n_heads, c.head_dim)
        k = self.wk(x).view(tokens, c.n_kv_heads, c.head_dim)
        v = self.wv(x).view(tokens, c.n_kv_heads, c.head_dim)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        return self.wo(out.reshape(tokens, c.dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.activation
        if config.activation == "swiglu":
            self.w_gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_up = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        return self.w_down(F.gelu(self.w_up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = _make_norm(config)
        self.attention = Attention(config)
        self.mlp_norm = _make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens, max_seqlen)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = _make_norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.embedding.weight
        cos, sin = rotary_tables(config)
        # Not parameters and not saved: rebuilt from the config, moved with the module.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            # Scale the residual-stream output projections down with depth (GPT-2) so the residual
            # stream's variance does not grow with the number of layers.
            if name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(param, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(param, std=std)

    def forward(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Logits ``(total_tokens, vocab_size)`` for a packed ``tokens`` ``(total_tokens,)``."""
        if max_seqlen > self.config.max_seq_len:
            raise ValueError(
                f"a document segment of {max_seqlen} tokens exceeds model.max_seq_len={self.config.max_seq_len}"
            )
        positions = positions_in_documents(cu_seqlens, tokens.shape[0])
        rope_cos, rope_sin = self.get_buffer("rope_cos"), self.get_buffer("rope_sin")
        cos, sin = rope_cos[positions], rope_sin[positions]
        x = self.embedding(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        return self.output(self.norm(x))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss; targets of -100 (a document's last token) are ignored."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


__all__ = ["PRESETS", "ModelConfig", "Transformer", "cross_entropy", "preset"]
