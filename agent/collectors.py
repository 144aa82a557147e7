"""Host (psutil) and GPU (NVML through pynvml) samplers, called once a second by the agent.

Rates (disk and network bytes per second) are differences between consecutive calls, so the first sample
reports zero rates. A machine without a GPU or without NVML is normal: :class:`GpuSampler` says why once
(``status``) and then returns no samples; it never raises.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import psutil

from megascope.protos.megascope.v1 import telemetry_pb2


class HostSampler:
    def __init__(self, node: str) -> None:
        self._node = node
        self._last_time = time.monotonic()
        self._last_disk = psutil.disk_io_counters()
        self._last_net = psutil.net_io_counters()
        psutil.cpu_percent(percpu=True)  # the first call only sets the reference point

    def sample(self) -> telemetry_pb2.HostSample:
        now = time.monotonic()
        elapsed = max(now - self._last_time, 1e-6)
        disk, net = psutil.disk_io_counters(), psutil.net_io_counters()
        per_cpu = psutil.cpu_percent(percpu=True)
        memory = psutil.virtual_memory()
        sample = telemetry_pb2.HostSample(
            node=self._node,
            wall_time=time.time(),
            cpu_percent=sum(per_cpu) / max(len(per_cpu), 1),
            cpu_percents=per_cpu,
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            load_average_1m=os.getloadavg()[0],
        )
        # Either counter can be None on machines without disks or network interfaces.
        if disk is not None and self._last_disk is not None:
            sample.disk_read_bytes_per_second = (disk.read_bytes - self._last_disk.read_bytes) / elapsed
            sample.disk_write_bytes_per_second = (disk.write_bytes - self._last_disk.write_bytes) / elapsed
        if net is not None and self._last_net is not None:
            sample.net_recv_bytes_per_second = (net.bytes_recv - self._last_net.bytes_recv) / elapsed
            sample.net_sent_bytes_per_second = (net.bytes_sent - self._last_net.bytes_sent) / elapsed
        self._last_time, self._last_disk, self._last_net = now, disk, net
        return sample


class GpuSampler:
    """One sample per GPU; ``available`` is False and ``status`` says why when there is nothing to sample."""

    def __init__(self, node: str) -> None:
        self._node = node
        self._handles: list[Any] = []
        self.available = False
        self.status = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as error:  # NVMLError_LibraryNotFound, driver not loaded, no device...
            self.status = f"no GPU: {error}"
            return
        if not self._handles:
            self.status = "no GPU: NVML found no devices"
            return
        self.available = True
        self.status = f"{len(self._handles)} GPU(s): {self._nvml.nvmlDeviceGetName(self._handles[0])}"

    def sample(self) -> list[telemetry_pb2.GpuSample]:
        now = time.time()
        return [self._sample_one(index, handle, now) for index, handle in enumerate(self._handles)]

    def _sample_one(self, index: int, handle: Any, now: float) -> telemetry_pb2.GpuSample:
        nvml = self._nvml
        sample = telemetry_pb2.GpuSample(node=self._node, wall_time=now, index=index)
        # Each query can be unsupported on a given board; a missing field stays zero rather than failing all.
        readers = {
            "name": lambda: nvml.nvmlDeviceGetName(handle),
            "uuid": lambda: nvml.nvmlDeviceGetUUID(handle),
            "utilization_percent": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "memory_used_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used,
            "memory_total_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total,
            "temperature_celsius": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "power_watts": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "power_limit_watts": lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "ecc_errors_corrected": lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC
            ),
            "ecc_errors_uncorrected": lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
            ),
        }
        for name, read in readers.items():
            try:
                setattr(sample, name, read())
            except Exception:
                continue
        with contextlib.suppress(Exception):
            reasons = nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)
            sample.throttle_reasons.extend(
                label for bit, label in _THROTTLE_REASONS.items() if reasons & getattr(nvml, bit, 0)
            )
        return sample

    def close(self) -> None:
        if self.available:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


_THROTTLE_REASONS = {
    "nvmlClocksThrottleReasonSwPowerCap": "sw_power_cap",
    "nvmlClocksThrottleReasonHwSlowdown": "hw_slowdown",
    "nvmlClocksThrottleReasonHwThermalSlowdown": "hw_thermal",
    "nvmlClocksThrottleReasonSwThermalSlowdown": "sw_thermal",
    "nvmlClocksThrottleReasonHwPowerBrakeSlowdown": "power_brake",
}
