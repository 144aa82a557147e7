"""Residual add fused with RMSNorm or LayerNorm (ByteTransformer's fused add-bias-LayerNorm).

A pre-norm transformer adds each sublayer's output to the residual stream and normalises the sum for the
next sublayer. ``add_rms_norm(x, residual, weight)`` does both and returns the normalised output and the
updated residual ``x + residual``: one read of each input and one write of each output instead of the four
passes eager PyTorch makes. The Triton kernels are in ``norms_triton.py``; the PyTorch references are here.

Dtypes: outputs take ``torch.promote_types(x.dtype, residual.dtype)`` (as ``x + residual`` would, so a bf16
sublayer output added to an fp32 residual stream keeps the stream in fp32); statistics are computed in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megascope.kernels.backend import check_choice, check_triton_dtype, use_triton

# One row lives in registers in the Triton kernel; wider rows would spill. Far above any model width here.
TRITON_MAX_DIM = 65536


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, kernels: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, new_residual)``: ``new_residual = x + residual``, ``y = RMSNorm(new_residual) * weight``.

    ``x`` and ``residual`` have one shape ``(..., dim)``; ``weight`` is ``(dim,)``.
    """
    check_choice(kernels)
    _check("add_rms_norm", x, residual, weight, None, eps)
    if kernels == "triton":
        _check_triton("add_rms_norm", x, residual, weight, None)
    if not use_triton(kernels, "add_rms_norm", x, residual, weight):
        return _reference_add_rms_norm(x, residual, weight, eps)
    _check_triton("add_rms_norm", x, residual, weight, None)
    return _apply_add_norm(x, residual, weight, None, eps)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    kernels: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, new_residual)``: ``new_residual = x + residual``, ``y = LayerNorm(new_residual) * weight + bias``."""
    check_choice(kernels)
    _check("add_layer_norm", x, residual, weight, bias, eps)
    if kernels == "triton":
        _check_triton("add_layer_norm", x, residual, weight, bias)
    if not use_triton(kernels, "add_layer_norm", x, residual, weight, bias):
        return _reference_add_layer_norm(x, residual, weight, bias, eps)
    _check_triton("add_layer_norm", x, residual, weight, bias)
    return _apply_add_norm(x, residual, weight, bias, eps)


def _check(
    op: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> None:
    if x.shape != residual.shape:
        raise ValueError(f"{op}: x and residual must have one shape; got {tuple(x.shape)} and {tuple(residual.shape)}")
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        dim = x.shape[-1] if x.dim() else "?"
        raise ValueError(f"{op}: weight must be (dim,) = ({dim},); got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"{op}: bias must be (dim,) = ({x.shape[-1]},); got {tuple(bias.shape)}")
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor; got {t.dtype}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0; got {eps}")


def _check_triton(
    op: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_triton_dtype(op, name, t)
    if x.shape[-1] > TRITON_MAX_DIM:
        raise ValueError(f"{op}: dim {x.shape[-1]} exceeds the Triton kernel's {TRITON_MAX_DIM}; use kernels='torch'")


def _reference_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    s = new_residual.to(_compute_dtype(new_residual))  # in bf16 the mean of squares loses too much precision
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight.to(s.dtype)
    return y.to(new_residual.dtype), new_residual


def _reference_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    dtype = _compute_dtype(new_residual)
    y = F.layer_norm(new_residual.to(dtype), (x.shape[-1],), weight.to(dtype), bias.to(dtype), eps)
    return y.to(new_residual.dtype), new_residual


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half precisions are normalised in fp32; float64 (the tests' ground truth) stays float64.
    return torch.promote_types(t.dtype, torch.float32)


def _apply_add_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # The kernels see 2-D contiguous rows; reshaping here, outside the autograd Function, keeps the outputs
    # ordinary tensors (not views made inside a Function, which autograd forbids modifying in place).
    dim = x.shape[-1]
    y, new_residual = _AddNorm.apply(
        x.reshape(-1, dim).contiguous(),
        residual.reshape(-1, dim).contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        eps,
    )
    return y.view(x.shape), new_residual.view(x.shape)


class _AddNorm(torch.autograd.Function):
    """Triton forward and backward of both fused norms on 2-D rows: RMSNorm without ``bias``, LayerNorm with."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from megascope.kernels import norms_triton

        out_dtype = torch.promote_types(x.dtype, residual.dtype)
        y, s, mean, rstd = norms_triton.forward(x, residual, weight, bias, eps, out_dtype)
        # The updated residual is saved instead of x and residual: it is the one tensor the backward needs,
        # and the caller keeps it alive anyway.
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_bias, ctx.x_dtype, ctx.residual_dtype = bias is not None, x.dtype, residual.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        return y, s

    @staticmethod
    def backward(
        ctx: Any, grad_y: torch.Tensor | None, grad_residual: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        from megascope.kernels import norms_triton

        s, weight, mean, rstd = ctx.saved_tensors
        dy = torch.zeros_like(s) if grad_y is None else grad_y.contiguous()
        ds = None if grad_residual is None else grad_residual.contiguous()
        dx, dr, dw, db = norms_triton.backward(
            dy, ds, s, weight, ctx.has_bias, mean, rstd, ctx.x_dtype, ctx.residual_dtype
        )
        return dx, dr, dw, None if db is None else db.to(ctx.bias_dtype), None
