"""The self-check's judgement: which node, if any, is slow enough to leave the job."""

from __future__ import annotations

from megascope.engine.runtime.selfcheck import NodeCheck, judge, to_detail
from megascope.protos.megascope.v1.telemetry_pb2 import SelfCheckDetail


def _node(
    name: str,
    matmul: float = 100.0,
    memory: float = 10.0,
    disk: float = 500.0,
    allreduce: float = 0.0,
    machine: str = "",
) -> NodeCheck:
    return NodeCheck(
        node=name, matmul_gflops=matmul, memory_gbps=memory, allreduce_gbps=allreduce, disk_mbps=disk, machine=machine
    )


def _nodes(*checks: NodeCheck) -> dict[str, NodeCheck]:
    return {check.node: check for check in checks}


def test_a_node_far_below_the_others_on_one_measure_is_slow() -> None:
    nodes = _nodes(_node("a"), _node("b"), _node("c", matmul=20.0))
    verdict = judge(nodes, "c")
    assert verdict.slow and verdict.below == ["matmul_gflops"]
    assert to_detail(verdict).verdict == SelfCheckDetail.VERDICT_SLOW


def test_the_healthy_nodes_are_ok_beside_a_slow_one() -> None:
    nodes = _nodes(_node("a"), _node("b"), _node("c", matmul=20.0))
    assert [judge(nodes, name).slow for name in ("a", "b")] == [False, False]
    assert to_detail(judge(nodes, "a")).verdict == SelfCheckDetail.VERDICT_OK


def test_of_two_nodes_each_below_the_other_on_some_measure_only_the_furthest_below_is_slow() -> None:
    # Two nodes are each other's only peer: a noisy disk write puts the healthy one below too.
    nodes = _nodes(_node("node0", disk=200.0), _node("node1", matmul=20.0))
    assert judge(nodes, "node1").slow
    healthy = judge(nodes, "node0")
    assert not healthy.slow and healthy.below == ["disk_mbps"]
    assert to_detail(healthy).verdict == SelfCheckDetail.VERDICT_BELOW_PEERS


def test_a_tie_is_broken_the_same_way_on_every_rank() -> None:
    nodes = _nodes(_node("x", matmul=20.0), _node("y", matmul=20.0), _node("z"), _node("w"))
    assert [name for name in nodes if judge(nodes, name).slow] == ["x"]


def test_a_node_alone_has_no_peers_and_is_never_slow() -> None:
    verdict = judge(_nodes(_node("only", matmul=1.0)), "only")
    assert not verdict.slow and verdict.below == []


def test_nodes_within_the_ratio_of_each_other_are_all_ok() -> None:
    nodes = _nodes(_node("a"), _node("b", matmul=60.0, disk=300.0))
    assert [judge(nodes, name).below for name in nodes] == [[], []]


def test_nodes_on_one_machine_are_not_compared_on_what_they_share() -> None:
    # Two agents on one host: their node-local all-reduces ran at the same time on the same cores.
    nodes = _nodes(_node("node0", allreduce=2.0, machine="m"), _node("node1", allreduce=0.3, memory=3.0, machine="m"))
    assert [judge(nodes, name).below for name in nodes] == [[], []]


def test_nodes_on_one_machine_are_still_compared_on_compute() -> None:
    nodes = _nodes(_node("node0", machine="m"), _node("node1", matmul=20.0, machine="m"))
    verdict = judge(nodes, "node1")
    assert verdict.slow and verdict.below == ["matmul_gflops"]


def test_a_shared_measure_is_compared_with_the_nodes_on_other_machines() -> None:
    nodes = _nodes(
        _node("a", allreduce=2.0, machine="m1"),
        _node("b", allreduce=2.0, machine="m1"),
        _node("c", allreduce=0.2, machine="m2"),
    )
    assert judge(nodes, "c").below == ["allreduce_gbps"]
    assert judge(nodes, "a").below == []
