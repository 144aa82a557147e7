"""Triton kernels for SwiGLU and bias + GELU, forward and backward.

Both are memory-bound elementwise work: eager PyTorch writes every intermediate (``silu(gate)``, ``x + bias``)
to memory and reads it back; here each input is read once and each output written once, with the arithmetic
in fp32. The backward recomputes the activation from the saved inputs instead of saving it.

bias + GELU works on 2-D tiles (rows x columns) so the bias gradient, a sum over rows, is formed in registers:
each program writes one partial row and torch adds those up (deterministic, unlike atomics).
Imported lazily (see ``backend.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megascope.kernels.backend import interpreting, num_programs

# Globals a @triton.jit function reads must be constexpr.
SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_C = tl.constexpr(0.044715)


def _block() -> int:
    return 64 if interpreting() else 1024


@triton.jit
def _swiglu_fwd_kernel(GATE, UP, OUT, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    gate = tl.load(GATE + offsets, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, gate * tl.sigmoid(gate) * up, mask=ok)


@triton.jit
def _swiglu_bwd_kernel(GATE, UP, DOUT, DGATE, DUP, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    gate = tl.load(GATE + offsets, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=ok, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offsets, mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # silu'(g) = sig + g * sig * (1 - sig)
    tl.store(DGATE + offsets, dout * up * (sig + silu * (1.0 - sig)), mask=ok)
    tl.store(DUP + offsets, dout * silu, mask=ok)


@triton.jit
def _gelu_and_grad(z, APPROX_TANH: tl.constexpr):
    """GELU of fp32 ``z`` and its derivative, exact (erf) or with the tanh approximation."""
    if APPROX_TANH:
        inner = SQRT_2_OVER_PI * (z + GELU_TANH_C * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh, which tl.math lacks
        y = 0.5 * z * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * z * z)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT_HALF))
        y = z * cdf
        dy = cdf + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    return y, dy


@triton.jit
def _bias_gelu_fwd_kernel(
    X, BIAS, OUT, n_rows, n_cols, APPROX_TANH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    bias = tl.load(BIAS + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    z = tl.load(X + offsets, mask=ok, other=0.0).to(tl.float32) + bias[None, :]
    y, _ = _gelu_and_grad(z, APPROX_TANH)
    tl.store(OUT + offsets, y, mask=ok)


@triton.jit
def _bias_gelu_bwd_kernel(
    X, BIAS, DOUT, DX, DBIAS_PART, n_rows, n_cols, rows_per_program,
    APPROX_TANH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    dbias = tl.zeros((BLOCK_C,), tl.float32)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        ok = (rows[:, None] < last) & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        z = tl.load(X + offsets, mask=ok, other=0.0).to(tl.float32) + bias[None, :]
        _, grad = _gelu_and_grad(z, APPROX_TANH)
        dz = tl.load(DOUT + offsets, mask=ok, other=0.0).to(tl.float32) * grad
        tl.store(DX + offsets, dz, mask=ok)
        dbias += tl.sum(tl.where(ok, dz, 0.0), 0)
    tl.store(DBIAS_PART + program * n_cols + cols, dbias, mask=col_ok)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    block = _block()
    _swiglu_fwd_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=1 if interpreting() else 4)
    return out


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    block = _block()
    _swiglu_bwd_kernel[(triton.cdiv(n, block),)](
        gate, up, dout, dgate, dup, n, BLOCK=block, num_warps=1 if interpreting() else 4
    )
    return dgate, dup


def _tile(n_cols: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)`` for the 2-D bias + GELU kernels."""
    if interpreting():
        return 16, 16, 1
    return 16, min(256, triton.next_power_of_2(n_cols)), 4


def bias_gelu_forward(x: torch.Tensor, bias: torch.Tensor, approximate: str, out_dtype: torch.dtype) -> torch.Tensor:
    n_rows, n_cols = x.shape
    out = torch.empty((n_rows, n_cols), device=x.device, dtype=out_dtype)
    block_r, block_c, warps = _tile(n_cols)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    _bias_gelu_fwd_kernel[grid](
        x, bias, out, n_rows, n_cols, APPROX_TANH=approximate == "tanh", BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=warps,
    )  # fmt: skip
    return out


def bias_gelu_backward(
    x: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x (in x's dtype) and bias (fp32; the caller casts)."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    block_r, block_c, warps = _tile(n_cols)
    programs = num_programs(triton.cdiv(n_rows, block_r), x.device)
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_r) * block_r
    programs = max(1, triton.cdiv(n_rows, rows_per_program))
    dbias_part = torch.empty((programs, n_cols), device=x.device, dtype=torch.float32)
    _bias_gelu_bwd_kernel[(programs, triton.cdiv(n_cols, block_c))](
        x, bias, dout, dx, dbias_part, n_rows, n_cols, rows_per_program,
        APPROX_TANH=approximate == "tanh", BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return dx, dbias_part.sum(0)
