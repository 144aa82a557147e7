"""A node self-check at every start of the ranks, MegaScale-style: seconds, not minutes.

Every rank measures its matmul throughput and memory bandwidth; the ranks of a node all-reduce among
themselves (the node's interconnect); one rank per node writes and fsyncs a file (its disk). The results are
gathered on every rank, each node is compared with the median of the other nodes, and a node below
``SLOW_RATIO`` of it on any measure is below its peers. Of those, only the one furthest below is judged slow:
every rank computes the same judgement from the same gathered figures, so at most one node leaves per start.
With two nodes each is compared with the other alone, and a noisy measure (a disk write beside a busy
neighbour) can put the healthy one below on some measure too; evicting both would end the job. The next start
checks the remaining nodes again, so a second slow node leaves then.

Nodes on one machine (several agents on one host, as in the demo and in tests) share its memory bus, its disk
and its cores: their node-local all-reduces run at the same time and slow each other, so on those measures a
node is compared only with nodes on other machines (none: not compared). Compute (the matmul) is still
compared, as it is what a slow device shows. Local rank 0 of each node reports its node
(a ``self_check`` event for people and a ``SelfCheckResult`` on its Attach stream); the agent acts on a slow
verdict (``--evict-slow-nodes``: that node leaves, the job restarts without it).

A rank with an injected ``slow`` fault is slow here too (a slow GPU is slow at a matmul test as in training).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megascope.engine.runtime.faults import SlowFault
from megascope.protos.megascope.v1 import telemetry_pb2

SLOW_RATIO = 0.5
"""A node below this share of the median node on any measure is slow."""
_MATMUL_SIZE = 256
_MATMUL_SECONDS = 0.2
_COPY_BYTES = 32 << 20
_COPY_SECONDS = 0.1
_ALLREDUCE_BYTES = 4 << 20
_ALLREDUCE_ROUNDS = 3
_DISK_BYTES = 8 << 20
_TRIES = 3
"""Each measure is the best of this many runs: a busy neighbour (another node's ranks on a shared host, a write-back)
only ever makes a run slower, and a verdict must not rest on one unlucky run."""


@dataclass(frozen=True)
class NodeCheck:
    node: str
    matmul_gflops: float
    """The slowest rank's of the node."""
    memory_gbps: float
    allreduce_gbps: float
    disk_mbps: float
    machine: str = ""
    """Which machine the node runs on (its kernel's boot id): nodes on one machine share what SHARED_MEASURES
    measure. Empty when unknown: then the node is taken to be a machine of its own."""


@dataclass(frozen=True)
class Verdict:
    node: NodeCheck
    median: NodeCheck
    below: list[str]
    """Measures where the node is below SLOW_RATIO of the median node, e.g. ["matmul_gflops"]."""
    slow: bool
    """The node furthest below its peers of all nodes below them: the one to leave the job."""
    seconds: float


def _timed_repeat(run: object, seconds: float, device: torch.device) -> tuple[int, float]:
    assert callable(run)
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count, elapsed


def _matmul_gflops(device: torch.device, slow: SlowFault | None) -> float:
    a = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, device=device)
    b = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, device=device)
    best = 0.0
    for _ in range(_TRIES):
        count, elapsed = _timed_repeat(lambda: a @ b, _MATMUL_SECONDS / _TRIES, device)
        if slow is not None:
            extra = slow.extra_seconds(elapsed)
            time.sleep(extra)
            elapsed += extra
        best = max(best, 2 * _MATMUL_SIZE**3 * count / elapsed / 1e9)
    return best


def _memory_gbps(device: torch.device) -> float:
    source = torch.empty(_COPY_BYTES // 4, device=device)
    target = torch.empty_like(source)
    best = 0.0
    for _ in range(_TRIES):
        count, elapsed = _timed_repeat(lambda: target.copy_(source), _COPY_SECONDS / _TRIES, device)
        best = max(best, 2 * _COPY_BYTES * count / elapsed / 1e9)  # read + write
    return best


def _allreduce_gbps(group: dist.ProcessGroup | None, device: torch.device) -> float:
    size = dist.get_world_size(group)
    if size < 2:
        return 0.0
    tensor = torch.ones(_ALLREDUCE_BYTES // 4, device=device)
    dist.all_reduce(tensor, group=group)  # warm up the connections
    start = time.perf_counter()
    for _ in range(_ALLREDUCE_ROUNDS):
        dist.all_reduce(tensor, group=group)
    elapsed = time.perf_counter() - start
    return 2 * (size - 1) / size * _ALLREDUCE_BYTES * _ALLREDUCE_ROUNDS / elapsed / 1e9  # bus bandwidth


def _disk_mbps(directory: Path) -> float:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".selfcheck-{os.getpid()}"
    data = os.urandom(_DISK_BYTES)
    best = 0.0
    try:
        for _ in range(_TRIES):
            start = time.perf_counter()
            with open(path, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            best = max(best, _DISK_BYTES / (time.perf_counter() - start) / 1e6)
        return best
    finally:
        path.unlink(missing_ok=True)


def run(node: str, device: torch.device, disk_dir: Path, slow: SlowFault | None = None) -> Verdict:
    """Measure, gather across the job (a collective: every rank calls it), and judge this rank's node."""
    started = time.perf_counter()
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    # One subgroup per node (torchrun numbers a node's ranks contiguously); every rank must create all of them.
    node_group, _ = dist.new_subgroups(group_size=local_size) if dist.get_world_size() > 1 else (None, None)
    matmul = _matmul_gflops(device, slow)
    memory = _memory_gbps(device)
    allreduce = _allreduce_gbps(node_group, device) if node_group is not None else 0.0
    disk = _disk_mbps(disk_dir) if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 0.0
    mine = {"node": node, "matmul_gflops": matmul, "memory_gbps": memory, "allreduce_gbps": allreduce,
            "disk_mbps": disk, "machine": machine_id()}  # fmt: skip
    everyone: list[dict[str, float | str]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    return judge(_per_node(everyone), node, time.perf_counter() - started)


def judge(nodes: dict[str, NodeCheck], node: str, seconds: float = 0.0) -> Verdict:
    """The verdict on ``node`` among ``nodes``; the same on every rank, as every rank has the same figures."""
    ratios = {name: _ratios_to_peers(nodes, name) for name in nodes}
    below = {name: [m for m, r in node_ratios.items() if r < SLOW_RATIO] for name, node_ratios in ratios.items()}
    flagged = [name for name in nodes if below[name]]
    # Furthest below: the lowest ratio on any measure; the name breaks a tie so every rank picks the same node.
    slowest = min(flagged, key=lambda name: (min(ratios[name].values()), name)) if flagged else None
    return Verdict(nodes[node], _median_of_peers(nodes, node), below[node], node == slowest, seconds)


def _peers(nodes: dict[str, NodeCheck], node: str, measure: str) -> list[NodeCheck]:
    """The nodes ``node`` is compared with on ``measure``: the others, but on a shared measure only those on
    other machines."""
    me = nodes[node]
    shared = measure in SHARED_MEASURES
    return [n for name, n in nodes.items() if name != node and not (shared and me.machine and n.machine == me.machine)]


def _median_of_peers(nodes: dict[str, NodeCheck], node: str) -> NodeCheck:
    """The peers' median on each measure; a measure without peers shows the node's own figure (ratio 1)."""
    figures = {}
    for name in _MEASURES:
        peers = _peers(nodes, node, name) or [nodes[node]]
        figures[name] = statistics.median(getattr(n, name) for n in peers)
    return NodeCheck(node="median of the other nodes", **figures)


def _ratios_to_peers(nodes: dict[str, NodeCheck], node: str) -> dict[str, float]:
    """Each measure of the node over its peers' median, for the measures the peers have (not 0)."""
    median = _median_of_peers(nodes, node)
    return {name: getattr(nodes[node], name) / getattr(median, name) for name in _MEASURES if getattr(median, name) > 0}


_MEASURES = ("matmul_gflops", "memory_gbps", "allreduce_gbps", "disk_mbps")
SHARED_MEASURES = ("memory_gbps", "allreduce_gbps", "disk_mbps")
"""Measures of what nodes on one machine share: compared only between nodes on different machines."""


def machine_id() -> str:
    """This machine's identity: the kernel's boot id (the same in every container on the host), else the hostname."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def _per_node(results: list[dict[str, float | str]]) -> dict[str, NodeCheck]:
    by_node: dict[str, list[dict[str, float | str]]] = {}
    for result in results:
        by_node.setdefault(str(result["node"]), []).append(result)
    nodes = {}
    for node, ranks in by_node.items():
        # The slowest rank sets the node's pace for compute; the disk was measured by one rank (the others say 0).
        nodes[node] = NodeCheck(
            node=node,
            matmul_gflops=min(float(r["matmul_gflops"]) for r in ranks),
            memory_gbps=min(float(r["memory_gbps"]) for r in ranks),
            allreduce_gbps=min(float(r["allreduce_gbps"]) for r in ranks),
            disk_mbps=max(float(r["disk_mbps"]) for r in ranks),
            machine=str(ranks[0].get("machine", "")),
        )
    return nodes


def to_detail(verdict: Verdict) -> telemetry_pb2.SelfCheckDetail:
    """The verdict as the wire's typed detail (numbers as numbers)."""
    if verdict.slow:
        judgement = telemetry_pb2.SelfCheckDetail.VERDICT_SLOW
    elif verdict.below:
        judgement = telemetry_pb2.SelfCheckDetail.VERDICT_BELOW_PEERS
    else:
        judgement = telemetry_pb2.SelfCheckDetail.VERDICT_OK
    return telemetry_pb2.SelfCheckDetail(
        verdict=judgement,
        node=_figures(verdict.node),
        peers_median=_figures(verdict.median),
        slow_measures=verdict.below,
        seconds=verdict.seconds,
    )


def _figures(check: NodeCheck) -> telemetry_pb2.SelfCheckFigures:
    return telemetry_pb2.SelfCheckFigures(**{name: getattr(check, name) for name in _MEASURES})
