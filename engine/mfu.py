"""The peak FLOP rate that model FLOPs utilisation (MFU) is measured against.

GPUs: the vendor's dense (no sparsity) peak for the training dtype, looked up by device name. CPUs have no
such table entry, so the peak is measured: the best of a few large fp32 matmuls on this process's threads.
That makes CPU MFU a share of what this machine's matmul reaches, not of a datasheet figure; the source is
reported with the number so nobody mistakes one for the other. ``--peak-tflops`` overrides both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Dense TFLOPS by substring of torch.cuda.get_device_name(), (bf16/fp16 tensor core, fp32). First match wins,
# so the more specific names come first.
_GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H800", 989.0, 67.0),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
]


@dataclass(frozen=True)
class PeakFlops:
    flops_per_second: float
    source: str
    """Where the figure came from: "flag", "table: <name>", or "measured: fp32 matmul"."""


def device_peak(device: torch.device, low_precision: bool, override_tflops: float | None = None) -> PeakFlops | None:
    """The peak to divide by, or None when unknown (an unlisted GPU without ``--peak-tflops``)."""
    if override_tflops is not None:
        return PeakFlops(override_tflops * 1e12, "flag --peak-tflops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, low, fp32 in _GPU_PEAK_TFLOPS:
            if key in name:
                return PeakFlops((low if low_precision else fp32) * 1e12, f"table: {key}")
        return None
    if device.type == "cpu":
        return PeakFlops(_measured_matmul_flops(), "measured: fp32 matmul")
    return None


def _measured_matmul_flops(size: int = 512, seconds: float = 0.25) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b  # warm up the BLAS
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        elapsed = time.perf_counter() - start
        best = max(best, 2 * size**3 / elapsed)
    return best


def job_peak(peak: PeakFlops | None, group: dist.ProcessGroup | None = None) -> PeakFlops | None:
    """One peak for the whole job: the highest any rank found (a collective: every rank calls it).

    Ranks doing identical work must show identical MFU; a measured CPU peak differs from rank to rank with
    whatever else ran on the cores at that moment (24.5% vs 11% was seen), and a table lookup can differ where
    the devices do. The best figure is the machine's capability, so every rank divides by it. No rank knowing
    a peak leaves MFU unknown everywhere; some ranks not knowing one take the others'.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return peak
    figures: list[tuple[float, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(figures, None if peak is None else (peak.flops_per_second, peak.source), group=group)
    known = [f for f in figures if f is not None]
    if not known:
        return None
    flops, source = max(known)
    return PeakFlops(flops, source if len(known) == 1 else f"{source}, best of {len(known)} ranks")
