"""The last lines each rank wrote, as its guard sent them: what the dashboard's ``l`` shows (``GetRankLog``).

A rank's guard (engine/runtime/rank_guard.py) sends the lines its rank wrote with its progress, about once a second.
The agent keeps the newest of them per rank, bounded by count and by bytes so a chatty rank never grows the agent,
and numbers every line it keeps (``LogLine.seq``), so a client polling the tail appends only what is new and can
tell a gap from a pause. A new process of the rank (a restart) starts with a line of the agent's own, so the lines
of one attempt are never read as the next one's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

_ITEM_OVERHEAD_BYTES = 16
"""A line in an answer costs its text plus its tag, length, stream and number."""


@dataclass(frozen=True)
class RankLogLimits:
    lines: int = 2000
    """Lines kept per rank (the newest)."""
    bytes: int = 512 << 10
    """Bytes of text kept per rank: 2000 lines of the 1 KiB most a line has would be 2 MiB a rank."""


class RankLog:
    """One rank's newest lines, oldest first, and what it lost."""

    def __init__(self, rank: int, limits: RankLogLimits | None = None) -> None:
        self.rank = rank
        self.limits = limits or RankLogLimits()
        self.lines: deque[telemetry_pb2.LogLine] = deque()
        self._sizes: deque[int] = deque()
        self.bytes = 0
        self.numbered = 0
        """Lines numbered so far (the ``seq`` of the newest)."""
        self.dropped = 0
        """Lines lost: by the guard (too many for one message) or pushed out of this log by its bounds."""
        self.pid = 0
        self.restart_count = 0

    def new_process(self, pid: int, restart_count: int) -> None:
        """A process of the rank attached (its guard, or the rank itself): a marker line when it is a new one."""
        if pid == self.pid:
            return
        what = "started" if self.pid == 0 else f"restarted (the previous one was pid {self.pid})"
        self.pid, self.restart_count = pid, restart_count
        self._append(
            f"--- rank {self.rank}: process {pid} {what}, attempt {restart_count} ---", telemetry_pb2.LOG_STREAM_AGENT
        )

    def add(self, lines: list[telemetry_pb2.LogLine], dropped: int) -> None:
        """Lines from the rank's guard (already validated and cut), and how many it could not send."""
        if dropped > 0:
            self.dropped += dropped
            self._append(
                f"--- {dropped} lines not received: the rank wrote them faster than its guard sends them ---",
                telemetry_pb2.LOG_STREAM_AGENT,
            )
        for line in lines:
            self._append(line.text, line.stream)

    def _append(self, text: str, stream: int) -> None:
        self.numbered += 1
        line = telemetry_pb2.LogLine(text=text, stream=stream, seq=self.numbered)  # type: ignore[arg-type]
        size = len(text.encode()) + _ITEM_OVERHEAD_BYTES
        self.lines.append(line)
        self._sizes.append(size)
        self.bytes += size
        while len(self.lines) > self.limits.lines or (self.bytes > self.limits.bytes and len(self.lines) > 1):
            self.lines.popleft()
            self.bytes -= self._sizes.popleft()
            self.dropped += 1

    def answer(self, max_lines: int, budget: int) -> agent_pb2.GetRankLogResponse:
        """The newest ``max_lines`` lines whose sizes add up to at most ``budget`` bytes, oldest first."""
        kept: list[telemetry_pb2.LogLine] = []
        size = 0
        for line, line_size in zip(reversed(self.lines), reversed(self._sizes), strict=True):
            if len(kept) == max_lines or size + line_size > budget:
                break
            kept.append(line)
            size += line_size
        kept.reverse()
        return agent_pb2.GetRankLogResponse(
            rank=self.rank,
            lines=kept,
            lines_left_out=len(self.lines) - len(kept),
            lines_dropped=self.dropped,
            pid=self.pid,
            restart_count=self.restart_count,
        )
