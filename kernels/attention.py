"""Variable-length causal attention over packed documents.

Tokens of many documents are packed back to back into one sequence with no padding; ``cu_seqlens``
(cumulative lengths, ``[0, len_0, len_0 + len_1, ..., total]``) says where each document starts. A token
attends only to earlier tokens of its own document.

This is the reference path (PyTorch). The fused Triton kernel will sit behind the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention within each packed document.

    Args:
        q: ``(total_tokens, n_heads, head_dim)``.
        k, v: ``(total_tokens, n_kv_heads, head_dim)``; ``n_heads`` must be a multiple of ``n_kv_heads``
            (grouped-query attention).
        cu_seqlens: int32 ``(n_docs + 1,)``, starts at 0 and ends at ``total_tokens``.
        max_seqlen: the longest document (an upper bound is fine).
        causal: mask future tokens within a document.
        softmax_scale: defaults to ``head_dim ** -0.5``.

    Returns:
        ``(total_tokens, n_heads, head_dim)``, same dtype as ``q``.
    """
    _check_shapes(q, k, v, cu_seqlens)
    return _reference_varlen_attention(q, k, v, cu_seqlens, causal, softmax_scale)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (total_tokens, heads, head_dim); got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must match q in tokens and head_dim; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"n_heads ({q.shape[1]}) must be a multiple of n_kv_heads ({k.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least two entries; got shape {tuple(cu_seqlens.shape)}")


def _reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
) -> torch.Tensor:
    # Documents of equal length are batched into one SDPA call: packed data is mostly full-length chunks,
    # so this is a handful of calls per layer instead of one per document, and no attention is ever
    # computed across a document boundary (a block-diagonal mask over all tokens would be O(total^2)).
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at total_tokens={q.shape[0]}; got {bounds[0]}..{bounds[-1]}"
        )
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end < start:
            raise ValueError("cu_seqlens must be non-decreasing")
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)

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
