"""The job-wide hang diagnosis: every agent's ``DumpStacks`` reply merged and judged as one job. Pure Python.

Each agent diagnoses its own node's ranks, but a hang's culprit often stands out only beside the other nodes'
ranks (the one rank of the job that issued fewer collectives, the one stack no other rank shares). So the
dashboard runs the agents' own rules (:func:`megascope.agent.hang_rules.diagnose`, the same code, so the two
never disagree on the same input) over every rank of every agent that answered, and groups the ranks by the
signature of their main thread's innermost frames: the groups of one are the odd ones.

Stacks taken while the job is stepping (no rank stalled) name no culprit: on a healthy job one rank's stack
always differs from the others' in some way (it was caught in another layer), and blaming it sends on-call after
the wrong rank. Then the groups are shown without blame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megascope.agent.hang_rules import RankProgress, diagnose
from megascope.dashboard import formatting as fmt
from megascope.protos.megascope.v1 import agent_pb2

UNREADABLE = "(stack text not readable as faulthandler output)"
"""The signature of an answered rank whose stacks the parser could not read and the agent gave none for."""


@dataclass(frozen=True)
class AgentStacks:
    """One agent's answer to DumpStacks: its reply, or (``reply`` None) why there is none."""

    address: str
    node: str
    reply: agent_pb2.DumpStacksResponse | None
    error: str = ""


@dataclass(frozen=True)
class StackRow:
    """One rank: its progress, how its stacks were obtained, and the group its main thread's stack falls in."""

    rank: int
    node: str
    agent: str
    pid: int
    answered: bool
    method: str
    """"signal", "py-spy", or why there are no stacks: "stopped (SIGSTOP)", "exited", "no answer"."""
    last_step: int
    collectives_issued: int
    signature: str
    """The main thread's innermost frames as ``file:function < ...``; empty when the rank did not answer."""
    text: str
    """Every thread's stack; empty when the rank did not answer."""
    group: str
    """The label of its group ("1" is the largest); "-" when the rank did not answer."""


@dataclass(frozen=True)
class StackGroup:
    """Ranks whose main threads stand in the same frames."""

    label: str
    signature: str
    ranks: tuple[int, ...]
    odd: bool
    """A group of one beside a larger group: the one rank whose stack no other rank shares."""


@dataclass(frozen=True)
class JobStacks:
    """Every answering agent's ranks, their stack groups and the job-wide diagnosis."""

    wall_time: float
    """When the stacks were asked for."""
    agents_asked: int
    errors: tuple[tuple[str, str], ...]
    """(agent address, why it gave no stacks), for each agent that failed."""
    rows: tuple[StackRow, ...]
    """By rank."""
    groups: tuple[StackGroup, ...]
    """Largest first."""
    culprit: int | None
    reason: str
    stalled: bool = True
    """The job had stalled when the stacks were taken; if not, no rank is blamed."""

    def row(self, rank: int) -> StackRow | None:
        return next((row for row in self.rows if row.rank == rank), None)

    def summary(self) -> str:
        """One line: the culprit and why, or that no rank stands out."""
        if not self.rows:
            return "no stacks: " + ("; ".join(f"{a}: {e}" for a, e in self.errors) or "no rank is running")
        if not self.stalled:
            return f"no stall: stacks at {fmt.clock(self.wall_time)}, every rank stepping; groups shown without blame"
        if self.culprit is None:
            return f"no culprit: {self.reason}"
        row = self.row(self.culprit)
        where = f" on {row.node}" if row is not None else ""
        return f"culprit: rank {self.culprit}{where}: {self.reason}"


def job_stacks(replies: Sequence[AgentStacks], wall_time: float, stalled: bool = True) -> JobStacks:
    """Merge the agents' replies and diagnose the job as a whole; ``stalled``: the job had stopped stepping when
    they were asked for (if not, nobody is blamed)."""
    answered = [(agent, ranks) for agent in replies if agent.reply is not None for ranks in agent.reply.ranks]
    diagnosis = diagnose(
        [
            RankProgress(
                rank=r.rank,
                last_step=r.last_step,
                collectives_issued=r.collectives_issued,
                stacks=r.text if r.answered else None,
                note=r.method,
            )
            for _, r in answered
        ]
    )
    # The agent's signature stands in where this parser could not read the text (py-spy's format).
    signatures = {
        r.rank: diagnosis.signatures.get(r.rank) or r.signature or UNREADABLE for _, r in answered if r.answered
    }
    by_signature: dict[str, list[int]] = {}
    for rank, signature in sorted(signatures.items()):
        by_signature.setdefault(signature, []).append(rank)
    ordered = sorted(by_signature.items(), key=lambda item: (-len(item[1]), item[1]))
    largest = len(ordered[0][1]) if ordered else 0
    groups = tuple(
        StackGroup(
            label=str(i + 1), signature=signature, ranks=tuple(ranks), odd=stalled and len(ranks) == 1 and largest > 1
        )
        for i, (signature, ranks) in enumerate(ordered)
    )
    label_of = {rank: group.label for group in groups for rank in group.ranks}
    rows = tuple(
        StackRow(
            rank=r.rank,
            node=agent.node,
            agent=agent.address,
            pid=r.pid,
            answered=r.answered,
            method=r.method,
            last_step=r.last_step,
            collectives_issued=r.collectives_issued,
            signature=signatures.get(r.rank, ""),
            text=r.text if r.answered else "",
            group=label_of.get(r.rank, "-"),
        )
        for agent, r in sorted(answered, key=lambda item: item[1].rank)
    )
    return JobStacks(
        wall_time=wall_time,
        agents_asked=len(replies),
        errors=tuple((agent.address, agent.error) for agent in replies if agent.reply is None),
        rows=rows,
        groups=groups,
        culprit=diagnosis.culprit if stalled else None,
        reason=diagnosis.reason if stalled else "no stall",
        stalled=stalled,
    )
