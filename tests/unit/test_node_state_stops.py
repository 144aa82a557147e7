"""A rank the agent stopped on purpose (a requested restart, a hang's remedy) ended as intended: not FAILED, no
'went away without finishing' warning."""

from __future__ import annotations

from megascope.agent.state import NodeState
from megascope.protos import events
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2


def _node_with_rank(pid: int = 4242) -> NodeState:
    state = NodeState(telemetry_pb2.NodeInfo(node="node0"))
    state.rank_attached(worker_pb2.Hello(rank=0, world_size=1, pid=pid))
    return state


def test_a_rank_stopped_for_a_requested_restart_is_shown_stopped_not_failed() -> None:
    state = _node_with_rank()
    state.stopping(4242, "restart requested")
    state.rank_exited(worker_pb2.ExitReport(rank=0, pid=4242, signal="SIGKILL"))
    status = state.ranks[0]
    assert (status.state, status.exit_reason) == (telemetry_pb2.RANK_STATE_EXITED, "stopped: restart requested")


def test_the_stream_of_a_rank_stopped_on_purpose_ends_without_a_warning() -> None:
    state = _node_with_rank()
    state.stopping(4242, "restart requested")
    state.rank_detached(0, 4242)
    assert state.ranks[0].state == telemetry_pb2.RANK_STATE_EXITED
    assert [e.kind for e in state.events if e.kind == events.RANK_LOST] == []


def test_a_rank_killed_by_someone_else_still_failed() -> None:
    state = _node_with_rank()
    state.rank_exited(worker_pb2.ExitReport(rank=0, pid=4242, signal="SIGKILL"))
    assert (state.ranks[0].state, state.ranks[0].exit_reason) == (telemetry_pb2.RANK_STATE_FAILED, "SIGKILL")
