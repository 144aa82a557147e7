"""Tile-wise sparsity (SC20, Guo et al., "Accelerating Sparse DNN Models without Hardware-Support via
Tile-Wise Sparsity"): a pruning pattern regular at the level of tiles, so a sparse matmul skips whole pieces of
work on dense hardware, and the matmul that exploits it.

For ``y = x @ W.T`` with ``W`` of shape ``(out_features, in_features)`` (as ``nn.Linear`` stores it), SC20's
GEMM view is ``B = W.T`` of shape ``(K = in_features, N = out_features)``. The pattern, in that view:

1. **columns**: whole columns of ``B`` (output features) are pruned globally, by score;
2. **tiles**: the surviving columns, in order, are grouped into tiles of ``tile_n``;
3. **rows within tiles**: each tile prunes whole rows of ``B`` (input features) of its own choosing. A
   (tile, row) pair is the pruning unit, ranked globally, so tiles keep different numbers of rows.

What survives is stored compactly (``TileSparseWeight``): per tile, its kept input features and a dense
``(kept_rows, tile_n)`` block of weights. ``tile_sparse_matmul`` runs one small dense GEMM per tile over only
its kept rows (``tile_sparse_triton.py``); the reference here builds the dense pruned weight and multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from megascope.kernels.backend import check_choice, check_triton_dtype, use_triton

TRITON_TILE_WIDTHS = (16, 32, 64, 128, 256)  # tl.dot wants power-of-two tiles of at least 16


@dataclass(frozen=True)
class TileSparseWeight:
    """A tile-wise pruned ``(out_features, in_features)`` weight in compact storage.

    ``values[row_offsets[t] + j, c]`` is ``W[columns[t * tile_n + c], rows[row_offsets[t] + j]]``: tile ``t``
    covers output features ``columns[t * tile_n : (t + 1) * tile_n]`` and keeps input features
    ``rows[row_offsets[t] : row_offsets[t + 1]]`` (sorted). The last tile's block is zero-padded to ``tile_n``
    columns. Everything else in ``W`` is zero.
    """

    values: torch.Tensor
    """``(kept rows over all tiles, tile_n)``, the weights' dtype."""
    rows: torch.Tensor
    """int32 ``(kept rows over all tiles,)``: each tile's kept input features, ascending."""
    row_offsets: torch.Tensor
    """int32 ``(n_tiles + 1,)``: tile ``t``'s rows are ``rows[row_offsets[t]:row_offsets[t + 1]]``."""
    columns: torch.Tensor
    """int32 ``(kept output features,)``, ascending; tile ``t`` is ``columns[t * tile_n:(t + 1) * tile_n]``."""
    shape: tuple[int, int]
    """``(out_features, in_features)`` of the dense weight."""
    tile_n: int
    """Output features per tile."""

    @property
    def n_tiles(self) -> int:
        return self.row_offsets.numel() - 1

    def tile_widths(self) -> torch.Tensor:
        """Output features in each tile (``tile_n``, except possibly the last)."""
        n_kept = self.columns.numel()
        starts = torch.arange(self.n_tiles, device=self.columns.device) * self.tile_n
        return (n_kept - starts).clamp(max=self.tile_n)

    def nnz(self) -> int:
        """Weights that survived pruning."""
        kept_rows = (self.row_offsets[1:] - self.row_offsets[:-1]).long()
        return int((kept_rows * self.tile_widths()).sum())

    @property
    def sparsity(self) -> float:
        """Share of the dense weight that was pruned."""
        out_features, in_features = self.shape
        return 1.0 - self.nnz() / (out_features * in_features)

    def with_values(self, values: torch.Tensor) -> TileSparseWeight:
        """The same pattern with other values (a fine-tuned, cast or differentiable copy)."""
        if values.shape != self.values.shape:
            raise ValueError(f"values must have shape {tuple(self.values.shape)}; got {tuple(values.shape)}")
        return replace(self, values=values)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TileSparseWeight:
        return replace(
            self,
            values=self.values.to(device=device, dtype=dtype),
            rows=self.rows.to(device),
            row_offsets=self.row_offsets.to(device),
            columns=self.columns.to(device),
        )

    def dense_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out_index, in_index, valid)``, each shaped like ``values``: where each stored value lives in ``W``;
        ``valid`` is False on the last tile's padding."""
        device = self.values.device
        kept_rows = (self.row_offsets[1:] - self.row_offsets[:-1]).long()
        tile_of_row = torch.repeat_interleave(torch.arange(self.n_tiles, device=device), kept_rows)
        lane = tile_of_row[:, None] * self.tile_n + torch.arange(self.tile_n, device=device)
        valid = lane < self.columns.numel()
        out_index = self.columns.long()[lane.clamp(max=max(self.columns.numel() - 1, 0))]
        in_index = self.rows.long()[:, None].expand_as(lane)
        return out_index, in_index, valid

    def to_dense(self) -> torch.Tensor:
        """The pruned weight as a dense ``(out_features, in_features)`` tensor; differentiable in ``values``."""
        out_index, in_index, valid = self.dense_index()
        dense = torch.zeros(self.shape, device=self.values.device, dtype=self.values.dtype)
        return dense.index_put((out_index[valid], in_index[valid]), self.values[valid])


def tile_prune(
    weight: torch.Tensor,
    sparsity: float,
    *,
    tile_n: int = 64,
    column_sparsity: float = 0.0,
    importance: torch.Tensor | None = None,
) -> TileSparseWeight:
    """Prune ``weight`` ``(out_features, in_features)`` to the tile-wise pattern at ``sparsity``.

    Args:
        weight: the dense weight, as ``nn.Linear`` stores it.
        sparsity: share of the weight to prune, in ``[0, 1)``. Met exactly up to one pruning unit: the
            result's pruned count is within ``tile_n`` weights of ``round(sparsity * weight.numel())``.
        tile_n: output features per tile (SC20's ``G``). The Triton kernel takes 16, 32, 64, 128 or 256.
        column_sparsity: share of whole output features pruned globally before tiling (at most ``sparsity``).
            The rest of the target is met by pruning (tile, input feature) rows.
        importance: scores shaped like ``weight`` (for example ``|w * grad|``); defaults to ``|weight|``. A
            unit's score is the mean score of its weights, so the last, narrower tile competes fairly.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"tile_prune: weight must be a 2-D floating-point tensor; got {tuple(weight.shape)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"tile_prune: sparsity must be in [0, 1); got {sparsity}")
    if not 0.0 <= column_sparsity <= sparsity:
        raise ValueError(f"tile_prune: column_sparsity must be in [0, sparsity={sparsity}]; got {column_sparsity}")
    if tile_n < 1:
        raise ValueError(f"tile_prune: tile_n must be positive; got {tile_n}")
    if importance is not None and importance.shape != weight.shape:
        raise ValueError(
            f"tile_prune: importance must match weight {tuple(weight.shape)}; got {tuple(importance.shape)}"
        )
    weight = weight.detach()
    out_features, in_features = weight.shape
    score = (weight.abs() if importance is None else importance.detach().abs()).float()

    # 1. Whole output features, lowest mean score first; survivors stay in ascending order.
    n_pruned_columns = round(column_sparsity * out_features)
    column_order = torch.argsort(score.mean(1), stable=True)
    columns = torch.sort(column_order[n_pruned_columns:]).values
    n_kept = columns.numel()

    # 2. Tiles of tile_n surviving columns; each (tile, input feature) row's score is its mean over the tile.
    n_tiles = -(-n_kept // tile_n)
    padded = torch.zeros(n_tiles * tile_n, in_features, device=weight.device)
    padded[:n_kept] = score[columns]
    widths = (n_kept - torch.arange(n_tiles, device=weight.device) * tile_n).clamp(max=tile_n)
    unit_score = padded.view(n_tiles, tile_n, in_features).sum(1) / widths[:, None]

    # 3. Prune the lowest-scoring units until the pruned count is as close as it gets to the target; units
    # differ in size only in the last tile, so the count lands within one unit (<= tile_n weights).
    target = round(sparsity * out_features * in_features) - n_pruned_columns * in_features
    order = torch.argsort(unit_score.flatten(), stable=True)
    unit_size = widths[:, None].expand(n_tiles, in_features).flatten()[order]
    pruned_so_far = torch.cat([torch.zeros(1, dtype=torch.long, device=weight.device), unit_size.cumsum(0)])
    n_units = int(torch.argmin((pruned_so_far - target).abs()))
    keep = torch.ones(n_tiles * in_features, dtype=torch.bool, device=weight.device)
    keep[order[:n_units]] = False
    keep = keep.view(n_tiles, in_features)

    # Compact storage: kept rows of every tile, in tile order, ascending within a tile.
    tile_index, rows = keep.nonzero(as_tuple=True)
    row_offsets = torch.zeros(n_tiles + 1, dtype=torch.long, device=weight.device)
    row_offsets[1:] = keep.sum(1).cumsum(0)
    lane = tile_index[:, None] * tile_n + torch.arange(tile_n, device=weight.device)
    valid = lane < n_kept
    values = torch.zeros(rows.numel(), tile_n, device=weight.device, dtype=weight.dtype)
    out_index = columns[lane.clamp(max=max(n_kept - 1, 0))]
    values[valid] = weight[out_index[valid], rows[:, None].expand_as(lane)[valid]]
    return TileSparseWeight(
        values=values,
        rows=rows.to(torch.int32),
        row_offsets=row_offsets.to(torch.int32),
        columns=columns.to(torch.int32),
        shape=(out_features, in_features),
        tile_n=tile_n,
    )


def tile_sparse_matmul(x: torch.Tensor, weight: TileSparseWeight, *, kernels: str = "auto") -> torch.Tensor:
    """``x @ W.T`` for ``x`` of shape ``(..., in_features)``, where ``W`` is the pruned weight ``weight``
    describes: ``(..., out_features)``, differentiable in ``x`` and in ``weight.values``.

    ``x`` and ``weight.values`` must share a dtype (cast one; under autocast the caller casts both).
    """
    check_choice(kernels)
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"tile_sparse_matmul: x must be (..., {in_features}); got {tuple(x.shape)}")
    if x.dtype != weight.values.dtype or not x.is_floating_point():
        raise TypeError(
            f"tile_sparse_matmul: x ({x.dtype}) and weight.values ({weight.values.dtype}) must share a float dtype"
        )
    if weight.values.dim() != 2 or weight.values.shape[1] != weight.tile_n:
        raise ValueError(f"tile_sparse_matmul: weight.values must be (rows, tile_n={weight.tile_n})")
    if kernels == "triton":
        _check_triton(x, weight)
    tensors = (x, weight.values, weight.rows, weight.row_offsets, weight.columns)
    if not use_triton(kernels, "tile_sparse_matmul", *tensors):
        return x @ weight.to_dense().T
    _check_triton(x, weight)
    shape = x.shape
    out: torch.Tensor = _TileSparseMatmul.apply(
        x.reshape(-1, in_features).contiguous(),
        weight.values.contiguous(),
        weight.rows.contiguous(),
        weight.row_offsets.contiguous(),
        weight.columns.contiguous(),
        out_features,
    )
    return out.view(*shape[:-1], out_features)


def _check_triton(x: torch.Tensor, weight: TileSparseWeight) -> None:
    check_triton_dtype("tile_sparse_matmul", "x", x)
    if weight.tile_n not in TRITON_TILE_WIDTHS:
        raise ValueError(
            f"tile_sparse_matmul: tile_n {weight.tile_n} is not supported by the Triton kernel "
            f"(supported: {', '.join(map(str, TRITON_TILE_WIDTHS))}); prune with one of those or use kernels='torch'"
        )
    for name in ("rows", "row_offsets", "columns"):
        if getattr(weight, name).dtype != torch.int32:
            raise TypeError(f"tile_sparse_matmul: weight.{name} must be int32")


class _TileSparseMatmul(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        values: torch.Tensor,
        rows: torch.Tensor,
        row_offsets: torch.Tensor,
        columns: torch.Tensor,
        out_features: int,
    ) -> torch.Tensor:
        from megascope.kernels import tile_sparse_triton

        ctx.save_for_backward(x, values, rows, row_offsets, columns)
        return tile_sparse_triton.forward(x, values, rows, row_offsets, columns, out_features)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from megascope.kernels import tile_sparse_triton

        x, values, rows, row_offsets, columns = ctx.saved_tensors
        dout = dout.contiguous()
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = tile_sparse_triton.backward_x(dout, values, rows, row_offsets, columns, x.shape[1])
        if ctx.needs_input_grad[1]:
            dvalues = tile_sparse_triton.backward_values(
                x, dout, rows, row_offsets, columns, tuple(values.shape), x.shape[1]
            ).to(values.dtype)
        return dx, dvalues, None, None, None, None
