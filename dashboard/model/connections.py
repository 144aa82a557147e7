"""The dashboard's link to each agent: a small state machine, and the events it is worth logging.

    CONNECTING --first batch--> CONNECTED --agent ends the stream--> DISCONNECTED
                                    |
                                    +--stream breaks or goes silent--> LOST

A down agent (DISCONNECTED or LOST) keeps the state it went down in while retries fail, so a node that vanished
stays LOST, and since when, until it answers again. Each change that a person should see in the log comes back
as a :class:`LinkChange` (an ``AgentLinkDetail`` phase, a severity and a text); the cluster model logs it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from megascope.protos import events as wire_events
from megascope.protos.megascope.v1 import telemetry_pb2

_LINK = telemetry_pb2.AgentLinkDetail


class ConnectionState(enum.Enum):
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    DISCONNECTED = "DISCONNECTED"
    """Never reached, or its agent ended the stream itself (it was stopped)."""
    LOST = "LOST"
    """Was connected, then its stream broke or went silent for the heartbeat window: the node vanished."""


@dataclass
class AgentState:
    """One agent the dashboard was told about, and how talking to it goes."""

    address: str
    state: ConnectionState = ConnectionState.CONNECTING
    error: str = ""
    """Why the last connection failed or ended; empty while none has."""
    since: float = 0.0
    """Wall time of the last state change."""
    batches: int = 0
    """Telemetry batches received over all connections."""
    last_batch: float = 0.0
    """Model clock when the last batch arrived."""
    ever_connected: bool = False

    @property
    def down(self) -> bool:
        """Disconnected or lost: its ranks cannot be seen, so nothing waits for them."""
        return self.state in (ConnectionState.DISCONNECTED, ConnectionState.LOST)


@dataclass(frozen=True)
class LinkChange:
    """A change of an agent's link worth an event in the log."""

    address: str
    phase: telemetry_pb2.AgentLinkDetail.Phase.ValueType
    severity: int
    text: str

    def event(self, node: str, wall_time: float) -> telemetry_pb2.Event:
        """The dashboard's own event for it (kind ``connected``, ``node_lost`` or ``disconnected``)."""
        detail = telemetry_pb2.AgentLinkDetail(phase=self.phase, address=self.address)
        return wire_events.make_event(self.text, detail, severity=self.severity, node=node, wall_time=wall_time)


class Connections:
    """Every agent's link state. ``changed`` is called on every change (the model bumps its version)."""

    def __init__(self, clock: Callable[[], float], changed: Callable[[], None]) -> None:
        self.clock = clock
        self._changed = changed
        self.agents: dict[str, AgentState] = {}

    def add(self, address: str) -> tuple[AgentState, bool]:
        """The agent at ``address``, and whether it is new."""
        agent = self.agents.get(address)
        if agent is not None:
            return agent, False
        agent = self.agents[address] = AgentState(address=address, since=self.clock())
        self._changed()
        return agent, True

    def get(self, address: str) -> AgentState | None:
        return self.agents.get(address)

    def __iter__(self) -> Iterator[AgentState]:
        return iter(self.agents.values())

    def connected(self) -> int:
        return sum(a.state is ConnectionState.CONNECTED for a in self.agents.values())

    def received(self, address: str) -> AgentState:
        """A batch came from ``address``."""
        agent, _ = self.add(address)
        agent.batches += 1
        agent.last_batch = self.clock()
        return agent

    def set_connecting(self, address: str) -> None:
        agent, _ = self.add(address)
        if agent.state is not ConnectionState.CONNECTING:
            self._set_state(agent, ConnectionState.CONNECTING, agent.error)

    def set_connected(self, address: str) -> LinkChange | None:
        agent, _ = self.add(address)
        if agent.state is ConnectionState.CONNECTED:
            return None
        self._set_state(agent, ConnectionState.CONNECTED, "")
        agent.ever_connected = True
        return LinkChange(address, _LINK.PHASE_CONNECTED, wire_events.INFO, "agent connected")

    def set_disconnected(
        self, address: str, error: str, *, lost: bool, job_done: bool = False
    ) -> tuple[bool, LinkChange | None]:
        """The agent's stream ended, or could not be opened; ``lost``: it broke or went silent (not closed by the
        agent). Only a connected agent becomes LOST. Returns whether it went down just now (steps waiting for its
        ranks wait no more) and the change to log: the loss of a live agent once, not every failed retry after it.
        ``job_done``: its node's job had finished, so an agent closing its stream is a clean shutdown, not an error.
        """
        agent, _ = self.add(address)
        if job_done and not lost:
            error = "agent stopped after its job finished"
        was_connected = agent.state is ConnectionState.CONNECTED
        went_down = not agent.down
        if went_down:
            state = ConnectionState.LOST if lost and was_connected else ConnectionState.DISCONNECTED
            self._set_state(agent, state, error)
        elif agent.error != error:
            agent.error = error  # still down, for a new reason: keep "since" at when it went down
            self._changed()
        if not was_connected:
            return went_down, None
        if agent.state is ConnectionState.LOST:
            return went_down, LinkChange(address, _LINK.PHASE_LOST, wire_events.ERROR, f"agent lost: {error}")
        if job_done and not lost:
            return went_down, LinkChange(address, _LINK.PHASE_STOPPED, wire_events.INFO, error)
        return went_down, LinkChange(address, _LINK.PHASE_STOPPED, wire_events.ERROR, f"agent went away: {error}")

    def _set_state(self, agent: AgentState, state: ConnectionState, error: str) -> None:
        agent.state = state
        agent.error = error
        agent.since = self.clock()
        self._changed()
