"""Events on the wire: the one place that names an event's kind from its typed detail, and builds events.

Engine, agent and dashboard all import this module (it depends on the generated code alone), so a kind is
spelled once. Programs read an event's ``detail`` (numbers as numbers); ``kind`` is for display and
filtering, and :func:`kind_of` derives it wherever a detail is set. :func:`detail_fields` flattens a detail for
display and JSON (the demo summary's ``attributes``); nothing reads numbers back out of it.
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf.message import Message

from megascope.protos.megascope.v1 import telemetry_pb2 as pb
from megascope.protos.records import message_record

Event = pb.Event
INFO, WARNING, ERROR, CRITICAL = (
    pb.Event.SEVERITY_INFO,
    pb.Event.SEVERITY_WARNING,
    pb.Event.SEVERITY_ERROR,
    pb.Event.SEVERITY_CRITICAL,
)

# Kinds of events that carry no detail (nothing in them is read by a program).
AGENT_STARTED = "agent_started"
AGENT_STOPPING = "agent_stopping"
NO_GPU = "no_gpu"
# A rank the agent saw attached whose stream ended without a finished or failure message.
RANK_LOST = "rank_lost"

_CHECKPOINT_KINDS = {
    pb.CheckpointDetail.PHASE_REQUESTED: "checkpoint_requested",
    pb.CheckpointDetail.PHASE_STARTED: "checkpoint_started",
    pb.CheckpointDetail.PHASE_SAVED: "checkpoint",
    pb.CheckpointDetail.PHASE_FAILED: "checkpoint_failed",
    pb.CheckpointDetail.PHASE_REFUSED: "checkpoint_refused",
    pb.CheckpointDetail.PHASE_CLEANUP: "checkpoint_cleanup",
    pb.CheckpointDetail.PHASE_MADE_ROOM: "checkpoint_made_room",
}
_RESUME_KINDS = {
    pb.ResumeDetail.SOURCE_RESUME: "resumed",
    pb.ResumeDetail.SOURCE_INIT_FROM: "initialized",
    pb.ResumeDetail.SOURCE_MISSING_STEP: "restart_from_missing",
    pb.ResumeDetail.SOURCE_SKIPPED: "resume_skipped",
}
_MERGE_KINDS = {
    pb.MergeDetail.PHASE_STARTED: "merge_started",
    pb.MergeDetail.PHASE_DONE: "merge_done",
    pb.MergeDetail.PHASE_FAILED: "merge_failed",
    pb.MergeDetail.PHASE_CANCELLED: "merge_cancelled",
}
_RUN_KINDS = {
    pb.RunDetail.PHASE_STARTED: "started",
    pb.RunDetail.PHASE_FINISHED: "finished",
    pb.RunDetail.PHASE_NO_VALIDATION: "no_validation",
}
_JOB_KINDS = {
    pb.JobDetail.PHASE_STARTED: "job_started",
    pb.JobDetail.PHASE_FINISHED: "job_finished",
    pb.JobDetail.PHASE_FAILED: "job_failed",
    pb.JobDetail.PHASE_PEER_FAILED: "peer_failed",
    pb.JobDetail.PHASE_NODE_LEFT: "node_left",
    pb.JobDetail.PHASE_NODE_EVICTED: "node_evicted",
}
_AGENT_LINK_KINDS = {
    pb.AgentLinkDetail.PHASE_CONNECTED: "connected",
    pb.AgentLinkDetail.PHASE_LOST: "node_lost",
    pb.AgentLinkDetail.PHASE_STOPPED: "disconnected",
}
_RESTART_KINDS = {
    pb.RestartDetail.PHASE_REQUESTED: "restart_requested",
    pb.RestartDetail.PHASE_DONE: "restart",
}


def kind_of(event: pb.Event) -> str:
    """The event's kind: derived from its detail where one is set, else the kind it was given."""
    which = event.WhichOneof("detail")
    if which is None:
        return event.kind
    if which == "crash":
        return "crash"
    if which == "hang":
        return "stalled" if event.hang.verdict == pb.HangDetail.VERDICT_ELSEWHERE else "hang"
    if which == "restart":
        return _RESTART_KINDS.get(event.restart.phase, "restart")
    if which == "recovery":
        return "recovered"
    if which == "checkpoint":
        return _CHECKPOINT_KINDS.get(event.checkpoint.phase, "checkpoint")
    if which == "resume":
        return _RESUME_KINDS.get(event.resume.source, "resumed")
    if which == "straggler":
        return "straggler_cleared" if event.straggler.HasField("cleared_step") else "straggler"
    if which == "self_check":
        return "self_check"
    if which == "merge":
        return _MERGE_KINDS.get(event.merge.phase, "merge")
    if which == "run":
        return _RUN_KINDS.get(event.run.phase, "run")
    if which == "job":
        return _JOB_KINDS.get(event.job.phase, "job")
    if which == "fault_injected":
        return "fault_injected"
    if which == "agent_link":
        return _AGENT_LINK_KINDS.get(event.agent_link.phase, "agent_link")
    raise AssertionError(f"kind_of: no kind for detail {which!r}; add it here")


def make_event(
    text: str,
    detail: Message | None = None,
    *,
    kind: str = "",
    severity: int = INFO,
    node: str = "",
    rank: int | None = None,
    step: int | None = None,
    wall_time: float | None = None,
) -> pb.Event:
    """An event with its detail set and its kind derived from it (or ``kind``, for an event with no detail)."""
    event = pb.Event(text=text, severity=severity, node=node, wall_time=time.time() if wall_time is None else wall_time)
    if detail is not None:
        field = _DETAIL_FIELDS.get(type(detail))
        if field is None:
            raise TypeError(f"make_event: {type(detail).__name__} is not an Event detail")
        getattr(event, field).CopyFrom(detail)
    elif not kind:
        raise ValueError("make_event: an event without a detail needs a kind")
    if rank is not None:
        event.rank = rank
    if step is not None:
        event.step = step
    event.kind = kind_of(event) if detail is not None else kind
    return event


def detail_fields(event: pb.Event) -> dict[str, Any]:
    """The detail's fields by name, for display and JSON (empty without a detail). Never parse these back."""
    which = event.WhichOneof("detail")
    return {} if which is None else message_record(getattr(event, which), set_only=True)


_DETAIL_FIELDS: dict[type, str] = {
    type(getattr(pb.Event(), field.name)): field.name for field in pb.Event.DESCRIPTOR.oneofs_by_name["detail"].fields
}
