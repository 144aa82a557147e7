"""Which implementation of a kernel runs: the Triton kernel or the PyTorch reference.

Every public function in ``megascope.kernels`` takes ``kernels="auto" | "triton" | "torch"``:

- ``"auto"`` (the default): the Triton kernel for CUDA tensors, the PyTorch reference for CPU tensors, except
  that with ``TRITON_INTERPRET=1`` CPU tensors take the Triton path too, through Triton's interpreter
  (slow; for tests at small shapes).
- ``"triton"``: the Triton kernel, or an error where it cannot run (CPU tensors without the interpreter).
- ``"torch"``: always the PyTorch reference.

The modules holding the ``@triton.jit`` kernels (``*_triton.py``) are imported only when a Triton path first
runs. Triton reads ``TRITON_INTERPRET`` when its decorators run, so the variable must be set before that
first call (not before ``import megascope.kernels``), and importing this package never needs triton.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

KernelChoice = Literal["auto", "triton", "torch"]
KERNEL_CHOICES: tuple[KernelChoice, ...] = ("auto", "triton", "torch")

# What the Triton kernels accept. bf16 only on a GPU: the interpreter computes bf16 wrongly
# (triton-lang/triton#11584), so a bf16 CPU tensor is refused rather than answered with garbage.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def triton_installed() -> bool:
    # Triton ships Linux x86-64 wheels only; elsewhere the reference path is all there is.
    return importlib.util.find_spec("triton") is not None


def check_choice(kernels: str) -> None:
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)} (--kernels); got {kernels!r}")


def use_triton(kernels: str, op: str, *tensors: torch.Tensor) -> bool:
    """True when ``op`` should run its Triton kernel on ``tensors``; raises where ``"triton"`` cannot run."""
    check_choice(kernels)
    if kernels == "torch":
        return False
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device; got {sorted(str(d) for d in devices)}")
    device = tensors[0].device
    runnable = triton_installed() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))
    if kernels == "triton" and not runnable:
        raise RuntimeError(
            f"{op}: kernels='triton' (--kernels triton) needs CUDA tensors and the triton package, or "
            f"TRITON_INTERPRET=1 for CPU tensors; got {device.type} tensors. Use --kernels torch on CPU."
        )
    return runnable


def check_triton_dtype(op: str, name: str, tensor: torch.Tensor) -> None:
    """Refuse a dtype the Triton kernel does not handle, naming the argument."""
    if tensor.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; the Triton kernel takes float16, bfloat16 or float32")
    if tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu":
        raise TypeError(
            f"{op}: {name} is bfloat16 on CPU; Triton's interpreter computes bfloat16 wrongly "
            "(triton-lang/triton#11584): use float16/float32, a GPU, or kernels='torch'"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: exact fp32 for fp32 inputs (tests compare them at tight tolerances); tf32
    would lose ~3 decimal digits. Half-precision inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_programs(rows: int, device: torch.device) -> int:
    """How many programs a row-parallel kernel with a cross-row reduction (weight gradients) should use."""
    if device.type == "cuda":
        # Enough to fill every SM a few times; each writes one partial sum that torch adds up.
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))  # the interpreter: few programs, few partial sums


__all__ = ["KERNEL_CHOICES", "KernelChoice", "check_choice", "interpreting", "use_triton"]
