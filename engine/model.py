"""A decoder-only transformer over packed variable-length documents.

Llama-style by default (RMSNorm, rotary position embeddings, SwiGLU MLP, no biases); ``norm="layernorm"``
and ``activation="gelu"`` switch to the GPT/BERT choices (the GELU MLP's up-projection then has a bias). The
model takes one packed sequence of tokens with ``cu_seqlens`` marking document starts: positions restart at 0
in every document and attention never crosses a document boundary, so no padding token is ever computed.

Attention, the residual-add + norm pairs, the MLP activation and (after ``prune_mlp``) the MLP projections go
through ``megascope.kernels``: fused Triton kernels or their PyTorch references, as ``kernels`` says.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from megascope.kernels import (
    KernelChoice,
    TileSparseWeight,
    add_layer_norm,
    add_rms_norm,
    bias_gelu,
    check_choice,
    swiglu,
    tile_prune,
    tile_sparse_matmul,
    varlen_attention,
)


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
        # SwiGLU: gate, up and down projections; GELU: up (with its bias) and down.
        mlp = self.dim * self.ffn_dim * 3 if self.activation == "swiglu" else self.dim * self.ffn_dim * 2 + self.ffn_dim
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


class AddRMSNorm(nn.Module):
    """Adds a sublayer's output to the residual stream and normalises the sum: ``(y, new_residual)``."""

    def __init__(self, dim: int, eps: float, kernels: KernelChoice) -> None:
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps, kernels=self.kernels)


class AddLayerNorm(nn.LayerNorm):
    """LayerNorm (weight and bias) after the residual add: ``(y, new_residual)``.

    An ``nn.LayerNorm`` (same parameters, same state-dict keys) whose forward also takes the residual.
    """

    def __init__(self, dim: int, eps: float, kernels: KernelChoice) -> None:
        super().__init__(dim, eps=eps)
        self.kernels = kernels

    def forward(  # type: ignore[override]  # the fused add needs the residual as a second input
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, kernels=self.kernels)


def _make_norm(config: ModelConfig, kernels: KernelChoice) -> AddRMSNorm | AddLayerNorm:
    if config.norm == "rmsnorm":
        return AddRMSNorm(config.dim, config.norm_eps, kernels)
    return AddLayerNorm(config.dim, config.norm_eps, kernels)


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
    def __init__(self, config: ModelConfig, kernels: KernelChoice) -> None:
        super().__init__()
        self.config = config
        self.kernels = kernels
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
        # The packed batch goes in as it is: no padding, no per-document split.
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, kernels=self.kernels)
        return self.wo(out.reshape(tokens, c.dim))


class TileSparseLinear(nn.Module):
    """A bias-free linear layer whose weight was pruned tile-wise (SC20): ``x @ W.T`` through
    ``tile_sparse_matmul``. Its surviving weights (``values``) are a parameter and keep training; pruned
    weights stay zero because they are not stored."""

    def __init__(self, weight: TileSparseWeight, kernels: KernelChoice) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.tile_n = weight.tile_n
        self.kernels = kernels
        self.values = nn.Parameter(weight.values.detach().clone())
        self.register_buffer("rows", weight.rows.clone())
        self.register_buffer("row_offsets", weight.row_offsets.clone())
        self.register_buffer("columns", weight.columns.clone())

    def sparse_weight(self) -> TileSparseWeight:
        return TileSparseWeight(
            values=self.values,
            rows=self.get_buffer("rows"),
            row_offsets=self.get_buffer("row_offsets"),
            columns=self.get_buffer("columns"),
            shape=(self.out_features, self.in_features),
            tile_n=self.tile_n,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.sparse_weight()
        # A custom op is invisible to autocast: cast both operands as autocast would for nn.Linear.
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.with_values(weight.values.to(dtype))
        return tile_sparse_matmul(x, weight, kernels=self.kernels)

    def extra_repr(self) -> str:
        w = self.sparse_weight()
        return f"in_features={self.in_features}, out_features={self.out_features}, tile_n={self.tile_n}, " + (
            f"sparsity={w.sparsity:.3f}"
        )


class MLP(nn.Module):
    PROJECTIONS = ("w_gate", "w_up", "w_down")

    def __init__(self, config: ModelConfig, kernels: KernelChoice) -> None:
        super().__init__()
        self.activation = config.activation
        self.kernels = kernels
        self.w_gate: nn.Module | None = None
        if config.activation == "swiglu":
            self.w_gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        # Projections are nn.Linear, or TileSparseLinear after Transformer.prune_mlp.
        self.w_up: nn.Module = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_down: nn.Module = nn.Linear(config.ffn_dim, config.dim, bias=False)
        if config.activation == "gelu":
            # GPT/BERT's up-projection bias, held apart from the projection so that it is added inside the
            # fused GELU kernel (ByteTransformer's add-bias-GELU) and survives pruning of w_up.
            self.b_up = nn.Parameter(torch.zeros(config.ffn_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate is not None:
            return self.w_down(swiglu(self.w_gate(x), self.w_up(x), kernels=self.kernels))
        h = self.w_up(x)
        # Under autocast h is bf16: add the bias in h's dtype, as nn.Linear under autocast would.
        return self.w_down(bias_gelu(h, self.b_up.to(h.dtype), kernels=self.kernels))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, kernels: KernelChoice) -> None:
        super().__init__()
        self.attention_norm = _make_norm(config, kernels)
        self.attention = Attention(config, kernels)
        self.mlp_norm = _make_norm(config, kernels)
        self.mlp = MLP(config, kernels)

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block on the stream ``residual + h``, where ``h`` is the last sublayer's output (not yet
        added): each norm adds it in and normalises in one fused step. Returns the new ``(h, residual)``."""
        y, residual = self.attention_norm(h, residual)
        h = self.attention(y, cos, sin, cu_seqlens, max_seqlen)
        y, residual = self.mlp_norm(h, residual)
        return self.mlp(y), residual


class Transformer(nn.Module):
    """The model. ``kernels``: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``
    (the ``--kernels`` flag); every choice computes the same function."""

    def __init__(self, config: ModelConfig, kernels: KernelChoice = "auto") -> None:
        super().__init__()
        check_choice(kernels)
        self.config = config
        self.kernels = kernels
        self.embedding = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, kernels) for _ in range(config.n_layers))
        self.norm = _make_norm(config, kernels)
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
        # The residual stream travels as (h, residual) with the stream = residual + h; it starts as the
        # embedding plus zeros, so the first fused add changes nothing.
        h = self.embedding(tokens)
        residual = torch.zeros_like(h)
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, cu_seqlens, max_seqlen)
        y, _ = self.norm(h, residual)
        return self.output(y)

    @torch.no_grad()
    def prune_mlp(self, sparsity: float, *, tile_n: int = 64, column_sparsity: float = 0.0) -> None:
        """Prune every MLP projection tile-wise (SC20) to ``sparsity`` by weight magnitude and switch it to the
        tile-sparse matmul (``TileSparseLinear``); then fine-tune as usual.

        The projections' parameters are replaced, so build the optimizer (and any DDP wrapper) after this
        call. The pattern lives in buffers whose shapes depend on it, so a pruned model's state dict loads only
        into a model with that same pattern. Calling this again prunes further (SC20 prunes in steps,
        fine-tuning between them). ``num_params`` and the FLOP count stay those of the dense model.
        """
        for layer in self.layers:
            mlp = layer.mlp
            for name in MLP.PROJECTIONS:
                projection = getattr(mlp, name)
                if projection is None:
                    continue
                if isinstance(projection, TileSparseLinear):
                    dense = projection.sparse_weight().to_dense()
                else:
                    dense = projection.weight
                pruned = tile_prune(dense, sparsity, tile_n=tile_n, column_sparsity=column_sparsity)
                setattr(mlp, name, TileSparseLinear(pruned, self.kernels).to(dense.device))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss; targets of -100 (a document's last token) are ignored."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)


__all__ = ["PRESETS", "ModelConfig", "TileSparseLinear", "Transformer", "cross_entropy", "preset"]
