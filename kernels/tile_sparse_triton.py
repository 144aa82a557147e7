"""Triton kernels for the tile-wise sparse matmul (SC20): ``out = x @ W.T`` visiting only surviving tiles.

Layout (see ``tile_sparse.py``): the surviving output features (``columns``) are grouped into tiles of
``TILE_N``; tile ``t`` keeps its own sorted list of input features ``rows[row_offsets[t]:row_offsets[t+1]]``
and stores their weights densely as ``values[row_offsets[t] + j, :]``, one ``(kept_rows, TILE_N)`` block.
Each tile is a small dense GEMM with its own reduction length, so a tile with 75% of its rows pruned does a
quarter of the multiply-adds, on ordinary tensor cores.

- forward: program (row block of x, tile): gather x's kept columns for the tile, ``tl.dot`` with the tile,
  scatter the result into the tile's output columns. Pruned output features stay zero.
- grad of x: program (row block, tile): ``dout[:, tile columns] @ tile.T`` adds into ``dx[:, tile rows]``.
  Different tiles share input features, so the adds go through fp32 atomics: the work stays proportional to
  the surviving weights, at the price of a summation order that can differ between runs (last-bit changes).
- grad of values (fine-tuning the surviving weights): program (tile, block of its rows) reduces over all rows
  of x: ``x[:, tile rows].T @ dout[:, tile columns]``, deterministic.

Imported lazily (see ``backend.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megascope.kernels.backend import dot_precision, interpreting


@dataclass(frozen=True)
class _Launch:
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


def _launch(tile_n: int, dtype: torch.dtype) -> _Launch:
    if interpreting():
        return _Launch(16, 16, 1, 1)
    if dtype == torch.float32:
        return _Launch(32, 32, 4, 2)
    # Untuned starting point: a 64 x TILE_N accumulator, 32-deep steps through the tile's kept rows.
    return _Launch(64, 32, 4 if tile_n <= 64 else 8, 3)


@triton.jit
def _fwd_kernel(
    X, VALUES, ROWS, ROW_OFFSETS, COLUMNS, OUT,
    M, n_kept_columns, stride_xm, stride_om,
    TILE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    block_m = tl.program_id(0)
    tile = tl.program_id(1)
    m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    m64 = m.to(tl.int64)
    lanes = tl.arange(0, TILE_N)
    lane_ok = tile * TILE_N + lanes < n_kept_columns  # the last tile may be narrower
    columns = tl.load(COLUMNS + tile * TILE_N + lanes, mask=lane_ok, other=0)
    first = tl.load(ROW_OFFSETS + tile)
    last = tl.load(ROW_OFFSETS + tile + 1)
    acc = tl.zeros((BLOCK_M, TILE_N), tl.float32)
    for r in range(first, last, BLOCK_K):
        kept = r + tl.arange(0, BLOCK_K)
        kept_ok = kept < last
        rows = tl.load(ROWS + kept, mask=kept_ok, other=0)
        a = tl.load(X + m64[:, None] * stride_xm + rows[None, :], mask=m_ok[:, None] & kept_ok[None, :], other=0.0)
        b = tl.load(VALUES + kept.to(tl.int64)[:, None] * TILE_N + lanes[None, :], mask=kept_ok[:, None], other=0.0)
        acc += tl.dot(a, b, input_precision=DOT_PRECISION)
    tl.store(OUT + m64[:, None] * stride_om + columns[None, :], acc, mask=m_ok[:, None] & lane_ok[None, :])


@triton.jit
def _bwd_x_kernel(
    DOUT, VALUES, ROWS, ROW_OFFSETS, COLUMNS, DX32,
    M, n_kept_columns, stride_dom, stride_dxm,
    TILE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    block_m = tl.program_id(0)
    tile = tl.program_id(1)
    m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    m64 = m.to(tl.int64)
    lanes = tl.arange(0, TILE_N)
    lane_ok = tile * TILE_N + lanes < n_kept_columns
    columns = tl.load(COLUMNS + tile * TILE_N + lanes, mask=lane_ok, other=0)
    first = tl.load(ROW_OFFSETS + tile)
    last = tl.load(ROW_OFFSETS + tile + 1)
    dout = tl.load(
        DOUT + m64[:, None] * stride_dom + columns[None, :], mask=m_ok[:, None] & lane_ok[None, :], other=0.0
    )
    for r in range(first, last, BLOCK_K):
        kept = r + tl.arange(0, BLOCK_K)
        kept_ok = kept < last
        rows = tl.load(ROWS + kept, mask=kept_ok, other=0)
        b = tl.load(VALUES + kept.to(tl.int64)[:, None] * TILE_N + lanes[None, :], mask=kept_ok[:, None], other=0.0)
        part = tl.dot(dout, tl.trans(b), input_precision=DOT_PRECISION)
        tl.atomic_add(
            DX32 + m64[:, None] * stride_dxm + rows[None, :], part, mask=m_ok[:, None] & kept_ok[None, :], sem="relaxed"
        )


@triton.jit
def _bwd_values_kernel(
    X, DOUT, ROWS, ROW_OFFSETS, COLUMNS, DVALUES,
    M, n_kept_columns, stride_xm, stride_dom,
    TILE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    first = tl.load(ROW_OFFSETS + tile) + tl.program_id(1) * BLOCK_K
    last = tl.load(ROW_OFFSETS + tile + 1)
    if first >= last:
        return  # the grid is sized for the widest possible tile; this one keeps fewer rows
    kept = first + tl.arange(0, BLOCK_K)
    kept_ok = kept < last
    rows = tl.load(ROWS + kept, mask=kept_ok, other=0)
    lanes = tl.arange(0, TILE_N)
    lane_ok = tile * TILE_N + lanes < n_kept_columns
    columns = tl.load(COLUMNS + tile * TILE_N + lanes, mask=lane_ok, other=0)
    acc = tl.zeros((BLOCK_K, TILE_N), tl.float32)
    for start in range(0, M, BLOCK_M):
        m = start + tl.arange(0, BLOCK_M)
        m_ok = m < M
        m64 = m.to(tl.int64)
        a = tl.load(X + m64[:, None] * stride_xm + rows[None, :], mask=m_ok[:, None] & kept_ok[None, :], other=0.0)
        dout = tl.load(
            DOUT + m64[:, None] * stride_dom + columns[None, :], mask=m_ok[:, None] & lane_ok[None, :], other=0.0
        )
        acc += tl.dot(tl.trans(a), dout, input_precision=DOT_PRECISION)
    tl.store(DVALUES + kept.to(tl.int64)[:, None] * TILE_N + lanes[None, :], acc, mask=kept_ok[:, None])


def forward(
    x: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    row_offsets: torch.Tensor,
    columns: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """``x @ W.T`` for 2-D contiguous ``x``; ``W`` is given by the compact tile storage."""
    m = x.shape[0]
    tile_n = values.shape[1]
    n_tiles = row_offsets.numel() - 1
    # Pruned output features are never written by the kernel: start from zeros only when there are some.
    alloc = torch.zeros if columns.numel() < out_features else torch.empty
    out = alloc((m, out_features), device=x.device, dtype=x.dtype)
    if m == 0 or n_tiles == 0:
        return out
    cfg = _launch(tile_n, x.dtype)
    _fwd_kernel[(triton.cdiv(m, cfg.block_m), n_tiles)](
        x, values, rows, row_offsets, columns, out,
        m, columns.numel(), x.stride(0), out.stride(0),
        TILE_N=tile_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def backward_x(
    dout: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    row_offsets: torch.Tensor,
    columns: torch.Tensor,
    in_features: int,
) -> torch.Tensor:
    """``dout @ W``, the gradient of ``x``."""
    m = dout.shape[0]
    tile_n = values.shape[1]
    n_tiles = row_offsets.numel() - 1
    dx32 = torch.zeros((m, in_features), device=dout.device, dtype=torch.float32)
    if m > 0 and n_tiles > 0:
        cfg = _launch(tile_n, dout.dtype)
        _bwd_x_kernel[(triton.cdiv(m, cfg.block_m), n_tiles)](
            dout, values, rows, row_offsets, columns, dx32,
            m, columns.numel(), dout.stride(0), dx32.stride(0),
            TILE_N=tile_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(dout.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dx32.to(dout.dtype)


def backward_values(
    x: torch.Tensor,
    dout: torch.Tensor,
    rows: torch.Tensor,
    row_offsets: torch.Tensor,
    columns: torch.Tensor,
    values_shape: tuple[int, int],
    in_features: int,
) -> torch.Tensor:
    """The gradient of the compact ``values``: ``(x.T @ dout)`` at the surviving positions only."""
    m = x.shape[0]
    tile_n = values_shape[1]
    n_tiles = row_offsets.numel() - 1
    dvalues32 = torch.zeros(values_shape, device=x.device, dtype=torch.float32)
    if m > 0 and n_tiles > 0 and values_shape[0] > 0:
        cfg = _launch(tile_n, x.dtype)
        # A tile keeps at most in_features rows: size the grid for that rather than read the widest tile back.
        grid = (n_tiles, triton.cdiv(in_features, cfg.block_k))
        _bwd_values_kernel[grid](
            x, dout, rows, row_offsets, columns, dvalues32,
            m, columns.numel(), x.stride(0), dout.stride(0),
            TILE_N=tile_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dvalues32
