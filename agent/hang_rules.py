"""Which rank is behind a hang: from each rank's progress and its Python stacks. Pure Python, no I/O.

Used by the agent on its node's ranks and by the dashboard on every rank of the job (the same rules, so the
two never disagree on the same input). The rules, in order, each naming a culprit only when exactly one rank
stands out:

1. progress: the rank whose (last completed step, collectives issued) is behind every other rank's. In a
   synchronous job the ranks that wait have issued the step's collectives; the one they wait for has not;
2. stacks: the rank whose main-thread stack differs from a majority that share one (group identical stacks);
3. waiting: the one rank whose main thread is not inside torch (a collective or backward) while others are;
4. silence: the one rank that did not answer the stack request (stopped, or stuck in the kernel).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+)", re.MULTILINE)
_FRAME = re.compile(r'^\s+File "(.+)", line (\d+) in (.+)$')
_SIGNATURE_FRAMES = 4
_WAITING_MARKERS = ("torch/distributed", "torch/autograd", "torch/nn/parallel")


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str


@dataclass(frozen=True)
class Thread:
    ident: str
    frames: tuple[Frame, ...]
    """Innermost first, as faulthandler prints them."""


def parse_faulthandler(text: str) -> list[Thread]:
    """The threads of one ``faulthandler.dump_traceback(all_threads=True)`` dump."""
    threads: list[Thread] = []
    blocks = _THREAD.split(text)
    # split() gives [before, ident1, body1, ident2, body2, ...]
    for ident, body in zip(blocks[1::2], blocks[2::2], strict=True):
        frames = []
        for line in body.splitlines():
            match = _FRAME.match(line)
            if match:
                frames.append(Frame(match.group(1), int(match.group(2)), match.group(3).strip()))
        threads.append(Thread(ident, tuple(frames)))
    return threads


_PY_SPY_THREAD = re.compile(r'^Thread (\S+) \((?:[^)]*)\)(?:: "(.*)")?\s*$')
_PY_SPY_FRAME = re.compile(r"^\s+(\S.*?) \((.+):(\d+)\)\s*$")


def parse_py_spy(text: str) -> list[Thread]:
    """The threads of one ``py-spy dump`` (the rank's stacks read from outside, for one that cannot answer)."""
    threads: list[Thread] = []
    ident: str | None = None
    frames: list[Frame] = []
    for line in text.splitlines():
        header = _PY_SPY_THREAD.match(line)
        if header:
            if ident is not None:
                threads.append(Thread(ident, tuple(frames)))
            ident, frames = header.group(1), []
            continue
        frame = _PY_SPY_FRAME.match(line)
        if frame and ident is not None:
            frames.append(Frame(frame.group(2), int(frame.group(3)), frame.group(1)))
    if ident is not None:
        threads.append(Thread(ident, tuple(frames)))
    return threads


def parse_stacks(text: str) -> list[Thread]:
    """faulthandler's or py-spy's text, whichever it is."""
    return parse_faulthandler(text) or parse_py_spy(text)


def main_thread(threads: Sequence[Thread]) -> Thread | None:
    """The thread running the program's entry point (its outermost frame is ``<module>``)."""
    for thread in threads:
        if thread.frames and thread.frames[-1].function == "<module>":
            return thread
    return threads[-1] if threads else None


def signature(thread: Thread) -> str:
    """The innermost frames as ``file:function`` (no line numbers: the same wait at another line is the same)."""
    return " < ".join(f"{os.path.basename(f.file)}:{f.function}" for f in thread.frames[:_SIGNATURE_FRAMES])


def is_waiting_in_torch(thread: Thread) -> bool:
    """Whether the innermost frame is inside torch's distributed, autograd or DDP code (blocked on peers)."""
    return bool(thread.frames) and any(marker in thread.frames[0].file for marker in _WAITING_MARKERS)


@dataclass(frozen=True)
class RankProgress:
    rank: int
    last_step: int
    collectives_issued: int
    stacks: str | None = None
    """faulthandler (or py-spy) text of every thread; None when none could be collected."""
    note: str = ""
    """Why there are no stacks, e.g. "stopped (SIGSTOP)"."""


@dataclass(frozen=True)
class Diagnosis:
    culprit: int | None
    reason: str
    groups: list[list[int]] = field(default_factory=list)
    """Ranks with identical main-thread stacks, largest group first; unanswered ranks are not in any."""
    signatures: dict[int, str] = field(default_factory=dict)


def _only(ranks: list[int]) -> int | None:
    return ranks[0] if len(ranks) == 1 else None


def diagnose(ranks: Sequence[RankProgress]) -> Diagnosis:
    signatures: dict[int, str] = {}
    waiting: dict[int, bool] = {}
    for rank in ranks:
        thread = main_thread(parse_stacks(rank.stacks)) if rank.stacks else None
        if thread is not None:
            signatures[rank.rank] = signature(thread)
            waiting[rank.rank] = is_waiting_in_torch(thread)
    by_signature: dict[str, list[int]] = {}
    for rank_id, sig in sorted(signatures.items()):
        by_signature.setdefault(sig, []).append(rank_id)
    groups = sorted(by_signature.values(), key=lambda g: (-len(g), g))

    def found(culprit: int, reason: str) -> Diagnosis:
        return Diagnosis(culprit, reason, groups, signatures)

    if len(ranks) >= 2:
        progress = {r.rank: (r.last_step, r.collectives_issued) for r in ranks}
        lowest = min(progress.values())
        behind = _only([rank for rank, key in progress.items() if key == lowest])
        if behind is not None:
            others = [key for rank, key in progress.items() if rank != behind]
            ahead = min(others)
            return found(
                behind,
                f"rank {behind} lags: step {lowest[0]} with {lowest[1]} collectives issued, the others are at "
                f"step {ahead[0]} with {ahead[1]} or more",
            )
    if len(groups) >= 2 and len(groups[0]) >= 2:
        odd = _only([group[0] for group in groups if len(group) == 1])
        if odd is not None and all(len(group) in (1, len(groups[0])) for group in groups) and len(groups) == 2:
            return found(odd, f"rank {odd}'s stack differs from the {len(groups[0])} others' ({signatures[odd]})")
    if any(waiting.values()):
        not_waiting = _only([rank for rank, is_waiting in waiting.items() if not is_waiting])
        if not_waiting is not None and len(waiting) >= 2:
            return found(
                not_waiting,
                f"rank {not_waiting} is the only rank not waiting on its peers ({signatures[not_waiting]})",
            )
    silent = _only([r.rank for r in ranks if r.stacks is None])
    if silent is not None and len(ranks) >= 2:
        note = next(r.note for r in ranks if r.rank == silent)
        return found(silent, f"rank {silent} did not answer the stack request: {note or 'no reply'}")
    return Diagnosis(None, "no rank stands out: same progress and stacks everywhere", groups, signatures)
