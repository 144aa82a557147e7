"""Triton kernels for residual add fused with RMSNorm or LayerNorm, forward and backward.

One kernel pair serves both norms (``IS_RMS`` picks the statistics at compile time). A program owns a
contiguous range of rows and keeps one whole row in registers, so each row is read once and written once per
pass: the forward reads ``x`` and ``residual`` and writes ``x + residual`` and the normalised output, where
eager PyTorch makes four passes. The weight (and bias) gradient is a sum over all rows: each program writes
its partial sum and torch adds those few rows up, which is deterministic where atomics would not be.

Statistics are computed in fp32 from the sum as stored (rounded to its dtype), so forward, backward and the
reference agree on what was normalised. Imported lazily (see ``backend.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megascope.kernels.backend import interpreting, num_programs


def _num_warps(block: int) -> int:
    return 1 if interpreting() else min(16, max(4, block // 512))


@triton.jit
def _add_norm_fwd_kernel(
    X, R, W, B, Y, S, MEAN, RSTD,
    n_rows, n_cols, rows_per_program, eps,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    first = program * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        offset = tl.cast(row, tl.int64) * n_cols  # a Python int in the interpreter: no .to()
        s = tl.load(X + offset + cols, mask=col_ok, other=0.0).to(tl.float32)
        s += tl.load(R + offset + cols, mask=col_ok, other=0.0).to(tl.float32)
        s = s.to(S.dtype.element_ty)
        tl.store(S + offset + cols, s, mask=col_ok)
        s = s.to(tl.float32)
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(s * s, 0) / n_cols + eps)
            normed = s * rstd
        else:
            mean = tl.sum(s, 0) / n_cols
            centred = tl.where(col_ok, s - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / n_cols + eps)
            normed = centred * rstd
            tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        y = normed * w
        if HAS_BIAS:
            y += b
        tl.store(Y + offset + cols, y, mask=col_ok)


@triton.jit
def _add_norm_bwd_kernel(
    DY, DS, S, W, MEAN, RSTD, DX, DR, DW_PART, DB_PART,
    n_rows, n_cols, rows_per_program,
    IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), tl.float32)
    db = tl.zeros((BLOCK,), tl.float32)
    first = program * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        offset = tl.cast(row, tl.int64) * n_cols  # a Python int in the interpreter: no .to()
        s = tl.load(S + offset + cols, mask=col_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offset + cols, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        # (MEAN is empty for RMSNorm: the constexpr ternary never emits that load.)
        normed = s * rstd if IS_RMS else tl.where(col_ok, (s - tl.load(MEAN + row)) * rstd, 0.0)
        dw += dy * normed
        if HAS_BIAS:
            db += dy
        dn = dy * w
        # d/ds of normed: rstd * (dn - mean(dn * normed) * normed), and for LayerNorm also - mean(dn).
        ds = dn - normed * (tl.sum(dn * normed, 0) / n_cols)
        if not IS_RMS:
            ds -= tl.sum(dn, 0) / n_cols
        ds *= rstd
        if HAS_DS:
            # The updated residual is an output too; its own gradient joins here.
            ds += tl.load(DS + offset + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DX + offset + cols, ds, mask=col_ok)
        tl.store(DR + offset + cols, ds, mask=col_ok)
    tl.store(DW_PART + program * n_cols + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + program * n_cols + cols, db, mask=col_ok)


def forward(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, new_residual, mean, rstd)`` for 2-D contiguous ``x`` and ``residual``.

    RMSNorm without ``bias``, LayerNorm with it; ``mean`` is empty for RMSNorm.
    """
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=out_dtype)
    s = torch.empty_like(y)
    is_rms = bias is None
    mean = torch.empty(0 if is_rms else n_rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    # Many rows per program on a GPU too: the forward has no cross-row reduction, but fewer, longer programs
    # keep the weight in registers across rows.
    programs = num_programs(n_rows, x.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    block = triton.next_power_of_2(n_cols)
    _add_norm_fwd_kernel[(programs,)](
        x, residual, weight, weight if bias is None else bias, y, s, mean, rstd,
        n_rows, n_cols, rows_per_program, eps,
        IS_RMS=is_rms, HAS_BIAS=not is_rms, BLOCK=block, num_warps=_num_warps(block),
    )  # fmt: skip
    return y, s, mean, rstd


def backward(
    grad_y: torch.Tensor,
    grad_s: torch.Tensor | None,
    s: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of x, residual, weight and bias (None without a bias)."""
    n_rows, n_cols = s.shape
    dx = torch.empty((n_rows, n_cols), device=s.device, dtype=x_dtype)
    dr = torch.empty((n_rows, n_cols), device=s.device, dtype=residual_dtype)
    programs = num_programs(n_rows, s.device)
    rows_per_program = triton.cdiv(n_rows, programs)
    dw_part = torch.empty((programs, n_cols), device=s.device, dtype=torch.float32)
    db_part = torch.empty((programs, n_cols) if has_bias else (0,), device=s.device, dtype=torch.float32)
    block = triton.next_power_of_2(n_cols)
    _add_norm_bwd_kernel[(programs,)](
        grad_y, grad_s if grad_s is not None else grad_y, s, weight, mean, rstd, dx, dr, dw_part, db_part,
        n_rows, n_cols, rows_per_program,
        IS_RMS=not has_bias, HAS_BIAS=has_bias, HAS_DS=grad_s is not None, BLOCK=block, num_warps=_num_warps(block),
    )  # fmt: skip
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0) if has_bias else None  # the caller casts it to the bias's dtype
    return dx, dr, dw, db
