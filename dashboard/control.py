"""The dashboard's one way to act on its agents: the token, read-only mode, and every call it makes.

Screens and the app never call :mod:`megascope.dashboard.connection` themselves: they are handed this object and
ask it. Every call goes over the dashboard's transport (plaintext or TLS, :mod:`megascope.dashboard.transport`) and
carries its token: control calls (DumpStacks, Restart, SaveCheckpoint, StartMerge, CancelMerge) need it on agents
with a token, reads too on agents started with ``--token-reads``. A ``--readonly`` dashboard refuses control calls
here, in :meth:`DashboardControl.refusal`, before anything is sent: a screen asks ``refusal`` first to say so, and
each call checks it again, so no screen can forget. Reading calls (ListCheckpoints, GetMergeStatus, GetRankLog) are
made in read-only mode too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from megascope.dashboard import connection
from megascope.dashboard.connection import AgentReply
from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.model.connections import ConnectionState
from megascope.dashboard.transport import PLAINTEXT, Transport
from megascope.protos.megascope.v1 import agent_pb2

READ_ONLY = "read-only dashboard (--readonly)"


class ReadOnlyError(RuntimeError):
    """A control call a read-only dashboard does not send; the message says what was not done."""


class DashboardControl:
    """Calls on the agents at ``agents``, as one dashboard: with its token, refused when read-only."""

    def __init__(
        self,
        model: ClusterModel,
        agents: Sequence[str],
        *,
        token: str | None = None,
        readonly: bool = False,
        transport: Transport = PLAINTEXT,
    ) -> None:
        self.model = model
        self.agents = list(agents)
        """Every agent the dashboard watches, ``host:port``."""
        self.transport = transport.with_token(token) if token is not None else transport
        """How every call reaches the agents (TLS or not) and the token it carries."""
        self.token = self.transport.token
        """Sent with every call (``authorization: Bearer TOKEN``): agents with a token require it for control."""
        self._readonly = readonly

    @property
    def readonly(self) -> bool:
        return self._readonly

    def refusal(self, consequence: str) -> str | None:
        """Why a control call is not sent (``read-only dashboard (--readonly): <consequence>``); None when it may be.

        The one place the read-only mode is checked.
        """
        return f"{READ_ONLY}: {consequence}" if self._readonly else None

    def _allow(self, consequence: str) -> None:
        refused = self.refusal(consequence)
        if refused is not None:
            raise ReadOnlyError(refused)

    # -- which agents ----------------------------------------------------------------------------------------

    def connected_agents(self) -> list[str]:
        return [a.address for a in self.model.agents.values() if a.state is ConnectionState.CONNECTED]

    def reachable_agents(self) -> list[str]:
        """The connected agents; all of them while none is yet (a screen may open before the first answer)."""
        return self.connected_agents() or list(self.agents)

    # -- control calls: refused when read-only ----------------------------------------------------------------

    async def dump_stacks(self, addresses: Sequence[str]) -> list[AgentReply[agent_pb2.DumpStacksResponse]]:
        """Every rank's stacks from each agent, all at once (each agent signals its ranks: a control call)."""
        self._allow("stacks are not collected")
        return await connection.dump_stacks(addresses, self.transport)

    async def restart(self, addresses: Sequence[str], step: int = 0) -> list[AgentReply[agent_pb2.RestartResponse]]:
        """Stop every agent's ranks so the job restarts from checkpoint ``step`` (0: the newest)."""
        self._allow("no restart was sent")
        return await connection.restart_job(addresses, self.transport, step)

    async def save_checkpoint(
        self, addresses: Sequence[str], step: int = 0
    ) -> list[AgentReply[agent_pb2.SaveCheckpointResponse]]:
        """Have every agent's ranks save a checkpoint after ``step`` (0: each agent picks; one-node jobs)."""
        self._allow("no checkpoint was requested")
        return await connection.save_checkpoint(addresses, self.transport, step)

    async def start_merge(
        self, address: str, request: agent_pb2.StartMergeRequest
    ) -> AsyncIterator[agent_pb2.MergeProgress]:
        """Start a merge on ``address`` and follow its progress to the end. Raises grpc.aio.AioRpcError."""
        self._allow("no merge was started")
        async for progress in connection.start_merge(address, request, self.transport):
            yield progress

    async def cancel_merge(self, address: str) -> bool:
        """Stop the merge running on ``address``; False when none was. Raises grpc.aio.AioRpcError."""
        self._allow("no cancel was sent")
        return await connection.cancel_merge(address, self.transport)

    # -- reading calls ---------------------------------------------------------------------------------------

    async def list_checkpoints(self, addresses: Sequence[str]) -> list[AgentReply[agent_pb2.ListCheckpointsResponse]]:
        return await connection.list_checkpoints(addresses, self.transport)

    async def rank_log(self, address: str, rank: int, max_lines: int = 0) -> agent_pb2.GetRankLogResponse:
        """Rank ``rank``'s newest output lines from ``address``, its node's agent. Raises grpc.aio.AioRpcError."""
        return await connection.rank_log(address, rank, max_lines, self.transport)

    async def merge_status(self, address: str) -> agent_pb2.MergeProgress:
        """The running or last merge on ``address``. Raises grpc.aio.AioRpcError."""
        return await connection.merge_status(address, self.transport)
