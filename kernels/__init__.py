"""Kernels the engine calls: one public function per operation, a fused Triton path behind each.

Every function takes ``kernels="auto" | "triton" | "torch"`` (keyword only): Triton for CUDA tensors, the
PyTorch reference for CPU tensors, unless ``TRITON_INTERPRET=1`` runs the Triton code on CPU (tests); see
``backend.py``. Importing this package does not import triton.
"""

from megascope.kernels.activations import bias_gelu, swiglu
from megascope.kernels.attention import varlen_attention
from megascope.kernels.backend import KERNEL_CHOICES, KernelChoice, check_choice
from megascope.kernels.norms import add_layer_norm, add_rms_norm
from megascope.kernels.tile_sparse import TileSparseWeight, tile_prune, tile_sparse_matmul

__all__ = [
    "KERNEL_CHOICES",
    "KernelChoice",
    "TileSparseWeight",
    "add_layer_norm",
    "add_rms_norm",
    "bias_gelu",
    "check_choice",
    "swiglu",
    "tile_prune",
    "tile_sparse_matmul",
    "varlen_attention",
]
