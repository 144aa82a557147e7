"""Triton kernels for variable-length causal attention (FlashAttention-2 style), forward and backward.

The tokens of many documents are packed back to back with no padding (ByteTransformer's zero-padding
attention). A program takes one block of rows of one document and one head, finds its document's bounds in
``cu_seqlens`` and never reads outside them: no padding token is stored, loaded or computed, and a program
whose block lies past its document's end returns at once. Softmax is computed online (running max and sum),
so the ``(seqlen, seqlen)`` score matrix never exists in memory; the backward recomputes it block by block
from the saved log-sum-exp.

Scores are kept in base-2 units (``qk * scale * log2(e)``) so that ``exp2`` replaces ``exp``; the saved
log-sum-exp is in the same units. Grouped-query attention: query head ``h`` reads key/value head
``h // GROUP``; the key/value gradients of one kv head sum over its ``GROUP`` query heads inside one program,
so no atomics are needed and the result is deterministic.

Imported lazily (see ``backend.py``), only when the Triton path runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megascope.kernels.backend import dot_precision, interpreting

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class _Launch:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _launch(head_dim: int, dtype: torch.dtype, backward: bool) -> _Launch:
    # Untuned starting points in the range FlashAttention's Triton kernels use on A100/H100; fp32 (tests)
    # takes smaller blocks because its tiles need twice the shared memory.
    if interpreting():
        return _Launch(16, 16, 1, 1)  # the interpreter's cost is per program and per element: keep both small
    if dtype == torch.float32:
        return _Launch(32, 32, 4, 1)
    if backward:
        return _Launch(64, 64, 4 if head_dim <= 64 else 8, 2)
    return _Launch(128, 64, 4 if head_dim <= 64 else 8, 3 if head_dim <= 64 else 2)


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, CU_SEQLENS,
    qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    doc = tl.program_id(0)
    block_m = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + doc)
    seqlen = tl.load(CU_SEQLENS + doc + 1) - start
    if block_m * BLOCK_M >= seqlen:
        return  # this document is shorter than max_seqlen: nothing to do here
    kv_head = head // GROUP

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seqlen
    # int64 token offsets: tokens * heads * head_dim passes 2^31 on long packs.
    row_tokens = (start + rows).to(tl.int64)
    q = tl.load(Q + row_tokens[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    # Causal: keys after this block's last row are never visible to it.
    end = tl.minimum((block_m + 1) * BLOCK_M, seqlen) if CAUSAL else seqlen
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen
        col_tokens = (start + cols).to(tl.int64)
        k = tl.load(
            K + col_tokens[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            V + col_tokens[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        # Every row sees at least one key in the first block (key 0), so the running max is finite from
        # then on; rows past the document's end are not masked here (they see real keys) and never stored.
        visible = col_ok[None, :] & (rows[:, None] >= cols[None, :]) if CAUSAL else col_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(OUT + row_tokens[:, None] * stride_ot + head * stride_oh + dims[None, :], acc, mask=row_ok[:, None])
    tl.store(LSE + row_tokens * stride_lt + head, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    doc = tl.program_id(0)
    block_n = tl.program_id(1)
    kv_head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + doc)
    seqlen = tl.load(CU_SEQLENS + doc + 1) - start
    if block_n * BLOCK_N >= seqlen:
        return

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    col_ok = cols < seqlen
    col_tokens = (start + cols).to(tl.int64)
    kv_mask = col_ok[:, None]
    k = tl.load(K + col_tokens[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + col_tokens[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    # Causal: queries before this key block never see it.
    lo = (block_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for start_m in range(lo, seqlen, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < seqlen
            row_tokens = (start + rows).to(tl.int64)
            q = tl.load(
                Q + row_tokens[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
            )
            do = tl.load(
                DO + row_tokens[:, None] * stride_dot + head * stride_doh + dims[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            lse = tl.load(LSE + row_tokens * stride_lt + head, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_tokens * stride_lt + head, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            visible = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                visible = visible & (rows[:, None] >= cols[None, :])
            p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(DK + col_tokens[:, None] * stride_dkt + kv_head * stride_dkh + dims[None, :], dk, mask=col_ok[:, None])
    tl.store(DV + col_tokens[:, None] * stride_dvt + kv_head * stride_dvh + dims[None, :], dv, mask=col_ok[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    doc = tl.program_id(0)
    block_m = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(CU_SEQLENS + doc)
    seqlen = tl.load(CU_SEQLENS + doc + 1) - start
    if block_m * BLOCK_M >= seqlen:
        return
    kv_head = head // GROUP

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = rows < seqlen
    row_tokens = (start + rows).to(tl.int64)
    q = tl.load(Q + row_tokens[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(
        DO + row_tokens[:, None] * stride_dot + head * stride_doh + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    lse = tl.load(LSE + row_tokens * stride_lt + head, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_tokens * stride_lt + head, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    end = tl.minimum((block_m + 1) * BLOCK_M, seqlen) if CAUSAL else seqlen
    for start_n in range(0, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen
        col_tokens = (start + cols).to(tl.int64)
        k = tl.load(
            K + col_tokens[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            V + col_tokens[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=col_ok[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            visible = visible & (rows[:, None] >= cols[None, :])
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + row_tokens[:, None] * stride_dqt + head * stride_dqh + dims[None, :], dq, mask=row_ok[:, None])


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``(tokens, heads, head_dim)`` and the log-sum-exp ``(tokens, heads)`` (fp32, base 2)."""
    tokens, n_heads, head_dim = q.shape
    n_docs = cu_seqlens.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty((tokens, n_heads), device=q.device, dtype=torch.float32)
    cfg = _launch(head_dim, q.dtype, backward=False)
    grid = (n_docs, triton.cdiv(max_seqlen, cfg.block_m), n_heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        softmax_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k and v."""
    _, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    n_docs = cu_seqlens.numel() - 1
    # delta_i = sum_d dO_id * O_id, the softmax backward's row term; one fused torch reduction is as fast as
    # a preprocessing kernel would be, and it is computed over packed tokens only.
    delta = (grad_out.float() * out.float()).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = _launch(head_dim, q.dtype, backward=True)
    common = {
        "GROUP": n_heads // n_kv_heads,
        "HEAD_DIM": head_dim,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "CAUSAL": causal,
        "DOT_PRECISION": dot_precision(q.dtype),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }
    _bwd_dkdv_kernel[(n_docs, triton.cdiv(max_seqlen, cfg.block_n), n_kv_heads)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens,
        softmax_scale * LOG2E, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        **common,
    )  # fmt: skip
    _bwd_dq_kernel[(n_docs, triton.cdiv(max_seqlen, cfg.block_m), n_heads)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens,
        softmax_scale * LOG2E, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        grad_out.stride(0), grad_out.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        **common,
    )  # fmt: skip
    return dq, dk, dv
