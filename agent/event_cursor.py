"""New events of a node, read where they are kept: a reader that costs nothing until it reads.

The metrics page (counters of incidents) and the alert webhooks both need every event the node records, once. A
:class:`~megascope.agent.state.Subscription` would do it, but it also queues every step report for a reader that
may never come; this cursor instead walks the node's event history back from its newest entry to the last one it
saw, each time it is asked. Events are only ever appended (the oldest dropped past the history's bounds), so the
walk is as long as what is new. Run it on the agent's loop: that is where the history changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from megascope.protos.megascope.v1 import telemetry_pb2


class EventCursor:
    def __init__(self, events: Sequence[telemetry_pb2.Event], *, from_start: bool = True) -> None:
        """``from_start``: the history already kept counts as new at the first read (else only what comes after)."""
        self._events = events
        self._last: telemetry_pb2.Event | None = None if from_start or not events else events[-1]
        self.missed = False
        """Set when the last event read was dropped from the history before the next read (more than the history
        holds arrived in between): events between the two reads may have been missed."""

    def read(self) -> list[telemetry_pb2.Event]:
        """The events recorded since the last read, oldest first."""
        fresh: list[telemetry_pb2.Event] = []
        for event in reversed(self._events):
            if event is self._last:
                break
            fresh.append(event)
        else:
            self.missed = self._last is not None
        if fresh:
            self._last = fresh[0]
        fresh.reverse()
        return fresh
