"""Variable-length causal attention over packed documents.

Tokens of many documents are packed back to back into one sequence with no padding; ``cu_seqlens``
(cumulative lengths, ``[0, len_0, len_0 + len_1, ..., total]``) says where each document starts. A token
attends only to earlier tokens of its own document.

Two implementations sit behind ``varlen_attention``: the fused Triton kernel (``attention_triton.py``) and
the PyTorch reference below (scaled_dot_product_attention per group of equally long documents); see
``backend.py`` for which one runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megascope.kernels.backend import check_choice, check_triton_dtype, use_triton

# Head dims the Triton kernel is built for: powers of two (its tiles are ``head_dim`` wide) from the smallest
# tl.dot accepts. 64 and 128 are the ones that matter (Llama, GPT); 16 and 32 serve small models.
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    kernels: str = "auto",
) -> torch.Tensor:
    """Attention within each packed document.

    Args:
        q: ``(total_tokens, n_heads, head_dim)``.
        k, v: ``(total_tokens, n_kv_heads, head_dim)``; ``n_heads`` must be a multiple of ``n_kv_heads``
            (grouped-query attention).
        cu_seqlens: int32 ``(n_docs + 1,)``, starts at 0, never decreases and ends at ``total_tokens``.
        max_seqlen: the longest document (an upper bound is fine; the Triton grid is sized by it).
        causal: mask future tokens within a document.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        kernels: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``megascope.kernels.backend``). The Triton kernel
            takes head dims 16, 32, 64, 128 and float16, bfloat16 or float32.

    Returns:
        ``(total_tokens, n_heads, head_dim)``, same dtype as ``q``.

    Raises:
        ValueError/TypeError on bad input, before any kernel launches.
    """
    check_choice(kernels)
    _check_shapes(q, k, v, cu_seqlens)
    lengths = _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
    if softmax_scale is None:
        softmax_scale = q.shape[2] ** -0.5
    if kernels == "triton":
        _check_triton_inputs(q)  # asked for by name: say what it cannot take before where it cannot run
    if not use_triton(kernels, "varlen_attention", q, k, v, cu_seqlens):
        return _reference_varlen_attention(q, k, v, cu_seqlens, lengths, causal, softmax_scale)
    _check_triton_inputs(q)
    if q.shape[0] == 0:
        return torch.empty_like(q)
    out: torch.Tensor = _VarlenAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.contiguous(), max_seqlen, causal, softmax_scale
    )
    return out


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (total_tokens, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must match q in tokens and head_dim; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least two entries; got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64); got {cu_seqlens.dtype}")


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, max_seqlen: int) -> list[int]:
    """The document lengths, after checking that ``cu_seqlens`` describes ``total_tokens`` packed tokens.

    One small device-to-host copy per call (a sync on CUDA): the price of refusing a bad ``cu_seqlens`` here
    instead of letting a kernel read out of bounds or silently skip tokens.
    """
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total_tokens:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at total_tokens={total_tokens}; got {bounds[0]}..{bounds[-1]}"
        )
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is less than the longest document ({max(lengths)} tokens)")
    return lengths


def _check_triton_inputs(q: torch.Tensor) -> None:
    # k and v were checked to match q in head_dim and dtype.
    if q.shape[2] not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"varlen_attention: head_dim {q.shape[2]} is not supported by the Triton kernel "
            f"(supported: {', '.join(map(str, TRITON_HEAD_DIMS))}); use kernels='torch' (--kernels torch)"
        )
    check_triton_dtype("varlen_attention", "q", q)


def _reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    lengths: list[int],
    causal: bool,
    softmax_scale: float,
) -> torch.Tensor:
    # Documents of equal length are batched into one SDPA call: packed data is mostly full-length chunks,
    # so this is a handful of calls per layer instead of one per document, and no attention is ever
    # computed across a document boundary (a block-diagonal mask over all tokens would be O(total^2)).
    starts_by_length: dict[int, list[int]] = {}
    for start, length in zip(cu_seqlens.tolist()[:-1], lengths, strict=True):
        if length > 0:
            starts_by_length.setdefault(length, []).append(start)

    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    for length, starts in starts_by_length.items():
        index = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)).reshape(-1)
        # (docs, length, heads, dim) -> (docs, heads, length, dim) as SDPA wants.
        qd = q[index].view(len(starts), length, q.shape[1], q.shape[2]).transpose(1, 2)
        kd = k[index].view(len(starts), length, k.shape[1], k.shape[2]).transpose(1, 2)
        vd = v[index].view(len(starts), length, v.shape[1], v.shape[2]).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)
        out[index] = od.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
    return out


class _VarlenAttention(torch.autograd.Function):
    """The Triton forward and backward; saves the output and the log-sum-exp, not the attention matrix."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        causal: bool,
        softmax_scale: float,
    ) -> torch.Tensor:
        from megascope.kernels import attention_triton

        out, lse = attention_triton.forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.softmax_scale = max_seqlen, causal, softmax_scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from megascope.kernels import attention_triton

        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = attention_triton.backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.softmax_scale
        )
        return dq, dk, dv, None, None, None, None
