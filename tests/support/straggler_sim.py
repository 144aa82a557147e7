"""A simulated synchronous data-parallel job: per-rank step timings with realistic noise and injected slowdowns.

No training: each step every rank does its own work (data wait, forward + backward compute, optimizer and host
overhead, now and then a garbage-collection pause), then all of them meet in the gradient all-reduce, so each
rank waits there for the slowest one. That is what a straggler looks like to the detector: its own work takes
longest and it waits least. Used by tests/unit/test_stragglers.py and bench/stragglers.py.

Noise, by default close to what GPU clusters show: every rank's compute varies by ``jitter`` (2%) from step to
step, the whole job by 1% (the same for all ranks: input lengths, clocks), each node by 0.5%; ``spike_rate`` of
the rank-steps take 10-60% longer for one step (an OS hiccup); 1% of rank-steps pause 5-30 ms for GC. The
exposed communication is 3% of the step with its own jitter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from megascope.dashboard.model.stragglers import StepResult, StragglerDetector

Part = Literal["compute", "data", "gc", "host", "launch", "link"]


@dataclass(frozen=True)
class Slowdown:
    """``ranks`` take ``factor`` times as long on ``part`` of their step, for steps ``start`` .. ``start + steps - 1``.

    For ``part="compute"`` the factor multiplies the compute time (device and host); for the others the added
    time is ``(factor - 1) * compute`` (so a 1.3 data slowdown costs as much as a 1.3 compute one) and lands in:
    ``data`` the data wait, ``gc`` garbage-collection pauses, ``host`` the optimizer and host overhead,
    ``launch`` the host-measured compute only (the device idles, waiting for the CPU), ``link`` the wait in
    the all-reduce.
    """

    ranks: tuple[int, ...]
    factor: float
    start: int
    steps: int
    part: Part = "compute"

    def covers(self, step: int) -> bool:
        return self.start <= step < self.start + self.steps


@dataclass
class SimCluster:
    nodes: int
    ranks_per_node: int
    seed: int = 0
    compute_seconds: float = 0.25
    jitter: float = 0.02
    spike_rate: float = 0.002
    gc_rate: float = 0.01
    gpu: bool = False
    """Report device compute times (CUDA events) too."""
    slowdowns: list[Slowdown] = field(default_factory=list)
    rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def rank_nodes(self) -> list[str]:
        return [f"node{r // self.ranks_per_node}" for r in range(self.world_size)]

    def step(self, step: int) -> dict[str, np.ndarray]:
        """Timings of every rank at ``step`` (1-based), as arrays indexed by rank."""
        n, rng = self.world_size, self.rng
        node_of = np.arange(n) // self.ranks_per_node
        job = 1.0 + rng.normal(0.0, 0.01)
        node = 1.0 + rng.normal(0.0, 0.005, self.nodes)[node_of]
        compute = self.compute_seconds * job * node * (1.0 + rng.normal(0.0, self.jitter, n))
        spikes = rng.random(n) < self.spike_rate
        compute[spikes] *= rng.uniform(1.1, 1.6, int(spikes.sum()))
        device = compute.copy()
        data = rng.exponential(0.002, n)
        host = 0.02 * self.compute_seconds * (1.0 + rng.normal(0.0, 0.05, n))
        gc_pause = np.where(rng.random(n) < self.gc_rate, rng.uniform(0.005, 0.03, n), 0.0)
        link = np.zeros(n)
        base = compute.copy()
        for slow in self.slowdowns:
            if not slow.covers(step):
                continue
            ranks = list(slow.ranks)
            extra = (slow.factor - 1.0) * base[ranks]
            if slow.part == "compute":
                compute[ranks] += extra
                device[ranks] += extra
            elif slow.part == "data":
                data[ranks] += extra
            elif slow.part == "gc":
                gc_pause[ranks] += extra
            elif slow.part == "host":
                host[ranks] += extra
            elif slow.part == "launch":
                compute[ranks] += extra
            else:
                link[ranks] += extra
        # A GC pause lands inside whatever phase was running; count it as compute, as the engine would.
        compute = compute + gc_pause
        busy = data + compute + host
        exposed = 0.03 * self.compute_seconds * (1.0 + rng.normal(0.0, 0.1))
        comm = busy.max() - busy + exposed + link
        step_seconds = busy + comm
        timings = {
            "step_seconds": step_seconds,
            "compute_seconds": compute,
            "data_wait_seconds": data,
            "comm_wait_seconds": comm,
            "gc_pause_seconds": gc_pause,
        }
        if self.gpu:
            timings["device_compute_seconds"] = device
        return timings


def feed(
    detector: StragglerDetector,
    cluster: SimCluster,
    steps: range,
    present: np.ndarray | None = None,
) -> list[tuple[int, StepResult]]:
    """Run ``cluster`` for ``steps`` through ``detector``; ``present`` masks the ranks that report (all if None).

    Returns the steps at which something was raised or cleared.
    """
    ranks = list(range(cluster.world_size))
    nodes = cluster.rank_nodes()
    changes = []
    for step in steps:
        t = cluster.step(step)
        if present is not None:
            keep = np.flatnonzero(present)
            t = {k: v[keep] for k, v in t.items()}
            step_ranks = [ranks[i] for i in keep]
            step_nodes = [nodes[i] for i in keep]
        else:
            step_ranks, step_nodes = ranks, nodes
        result = detector.observe_arrays(
            step, step_ranks, step_nodes, t["step_seconds"], t["compute_seconds"], t["data_wait_seconds"],
            t["comm_wait_seconds"], t["gc_pause_seconds"], t.get("device_compute_seconds"), wall_time=1000.0 + step,
        )  # fmt: skip
        if result.raised or result.cleared:
            changes.append((step, result))
    return changes
