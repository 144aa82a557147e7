"""Fused MLP activations: SwiGLU (Llama) and bias + GELU (GPT/BERT; ByteTransformer's fused add-bias-GELU).

``swiglu(gate, up) = silu(gate) * up`` and ``bias_gelu(x, bias) = gelu(x + bias)``, each one Triton kernel
forward and one backward (``activations_triton.py``), with the PyTorch references here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megascope.kernels.backend import check_choice, check_triton_dtype, use_triton

GELU_APPROXIMATIONS = ("none", "tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, kernels: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` for two tensors of one shape and dtype."""
    check_choice(kernels)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype or not gate.is_floating_point():
        raise TypeError(f"swiglu: gate and up must share one floating-point dtype; got {gate.dtype} and {up.dtype}")
    if kernels == "triton":
        check_triton_dtype("swiglu", "gate", gate)
    if not use_triton(kernels, "swiglu", gate, up):
        return F.silu(gate) * up
    check_triton_dtype("swiglu", "gate", gate)
    out: torch.Tensor = _SwiGLU.apply(gate.contiguous(), up.contiguous())
    return out


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none", *, kernels: str = "auto") -> torch.Tensor:
    """``gelu(x + bias)`` with ``bias`` of shape ``(x.shape[-1],)``; ``approximate`` as in ``F.gelu``.

    The result takes ``torch.promote_types(x.dtype, bias.dtype)``, as ``x + bias`` would.
    """
    check_choice(kernels)
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh'; got {approximate!r}")
    if x.dim() == 0 or bias.shape != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias must be (x.shape[-1],); got x {tuple(x.shape)} and bias {tuple(bias.shape)}")
    if not x.is_floating_point() or not bias.is_floating_point():
        raise TypeError(f"bias_gelu: x and bias must be floating-point; got {x.dtype} and {bias.dtype}")
    if kernels == "triton":
        _check_triton_bias_gelu(x, bias)
    if not use_triton(kernels, "bias_gelu", x, bias):
        return F.gelu(x + bias, approximate=approximate)
    _check_triton_bias_gelu(x, bias)
    # 2-D rows for the kernel, reshaped outside the Function so the result is no view made inside one.
    out: torch.Tensor = _BiasGelu.apply(x.reshape(-1, x.shape[-1]).contiguous(), bias.contiguous(), approximate)
    return out.view(x.shape)


def _check_triton_bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> None:
    check_triton_dtype("bias_gelu", "x", x)
    check_triton_dtype("bias_gelu", "bias", bias)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from megascope.kernels import activations_triton

        ctx.save_for_backward(gate, up)  # the inputs, not silu(gate): recomputing it is cheaper than storing it
        return activations_triton.swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from megascope.kernels import activations_triton

        gate, up = ctx.saved_tensors
        return activations_triton.swiglu_backward(gate, up, dout.contiguous())


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
        from megascope.kernels import activations_triton

        ctx.save_for_backward(x, bias)  # x + bias is recomputed in the backward, not stored
        ctx.approximate = approximate
        out_dtype = torch.promote_types(x.dtype, bias.dtype)
        return activations_triton.bias_gelu_forward(x, bias, approximate, out_dtype)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from megascope.kernels import activations_triton

        x, bias = ctx.saved_tensors
        dx, dbias = activations_triton.bias_gelu_backward(x, bias, dout.contiguous(), ctx.approximate)
        return dx, dbias.to(bias.dtype), None
