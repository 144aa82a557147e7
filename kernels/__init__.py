"""Kernels the engine calls: one public function per operation, a fused path behind it where one exists."""

from megascope.kernels.attention import varlen_attention

__all__ = ["varlen_attention"]
