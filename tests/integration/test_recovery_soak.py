"""A soak of in-place recovery: a hundred ranks killed, one after the other, in one real ``megascope train`` job on
one node, each replaced in place; the long-lived processes (rank 0, the rank guards, the warm parents, torchrun's
process) hold no more sockets, file descriptors, threads or memory after the last recovery than after the tenth.

The test starts the job as a user would (``megascope train --nproc-per-node 4``, no agent), in its own session, and
plays the faults itself: it SIGKILLs ranks 1, 2 and 3 in turn (rank 0 is the survivor whose resources are
watched), each once the previous recovery is done and rank 0 has trained two more steps. The ranks are found from
the process tree under the job it started: torchrun's process (engine/runtime/elastic.py), its rank guards, each
guard's warm parent, and the warm parent's live child, the rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import REPO

from megascope.engine.runtime.rank_guard import REPEAT_FAULT_SECONDS_ENV

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

FAULTS = 100
"""Ranks killed and replaced in place over the job."""
WARMED_UP = 10
"""Recoveries after which the first measurement is taken: by then every lazily made thing (gloo's threads, the
recovery store's client, allocator pools) exists, so what grows after it grows with each fault."""
WORLD = 4
STEPS_AFTER_RECOVERY = 2
"""Steps rank 0 trains after a recovery before the next rank is killed: the recovered group is really working."""
COLLECTIVE_TIMEOUT = 20.0
"""The job's collective timeout (``--collective-timeout``). Now and then a broken group's collective is one gloo
never fails (engine/recovery.py): its worker threads and sockets stay until this timeout ends it, after the
recovery; the last measurement waits for them, so a leak is told apart from a group on its way out."""
STEPS = FAULTS * 5 + 300
"""Enough for every fault with room to spare (the job must not finish before the last): a fault takes about three
steps (STEPS_AFTER_RECOVERY, counting the one redone, and at most one more while the test finds the next rank);
then the last measurement may wait COLLECTIVE_TIMEOUT (at four steps a second here, about 80 steps); not many
more, since the job trains what is left before the test ends."""
DEADLINE = 180.0
"""Only a guard against a test hanging for ever: every wait below ends on a condition."""

MORE_FDS = 2
"""Descriptors, sockets or threads a process may hold beyond its first measurement: a connection or a thread that
happens to be in the middle of being replaced when one measurement is taken. A leak of one per fault shows as 90."""
MORE_RSS_MB = {"rank 0": 16.0}
"""Resident memory a process may gain between the measurements. Rank 0's is noisy by a few MB between two points
of a healthy run (the allocator keeps freed pages, gloo's buffers come and go with each group); one that leaked a
process group, a store client or the 11 MB of state it sends to each replacement would gain 90 times that."""
MORE_RSS_MB_DEFAULT = 2.0
"""For the small processes (guards, warm parents, torchrun's): they allocate almost nothing per fault."""


def small_corpus() -> str:
    """A small corpus no one edits while the test runs (the standard library's email package): the job starts in
    seconds, and every process of a rank reads the same text."""
    return str(Path(sysconfig.get_paths()["stdlib"]) / "email")


@dataclass(frozen=True)
class Usage:
    """What one process holds at one moment."""

    pid: int
    fds: int
    sockets: int
    threads: int
    rss_mb: float
    children: int


def usage(process: psutil.Process) -> Usage:
    pid = process.pid
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue  # closed between the listing and the read
    return Usage(
        pid=pid,
        fds=len(targets),
        sockets=sum(target.startswith("socket:") for target in targets),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        rss_mb=process.memory_info().rss / 2**20,
        children=sum(child.status() != psutil.STATUS_ZOMBIE for child in process.children()),
    )


def command_has(process: psutil.Process, module: str) -> bool:
    try:
        return module in process.cmdline()
    except psutil.NoSuchProcess:
        return False


class Job:
    """``megascope train`` on four ranks, started by the test in its own session, and its process tree."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.log = open(run_dir / "train.log", "w")  # noqa: SIM115 (closed by stop)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # A replacement killed again seconds after it started is the test's doing, not a rank that fails over and
        # over: without this the guard would give up on in-place recovery at the second fault of a rank.
        env[REPEAT_FAULT_SECONDS_ENV] = "0"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "megascope.agent.cli", "train", "--nproc-per-node", str(WORLD), "--preset", "tiny",
             "--batch-tokens", "256", "--val-every", "0", "--steps", str(STEPS), "--data", small_corpus(),
             "--no-self-check", "--collective-timeout", str(COLLECTIVE_TIMEOUT), "--run-dir", str(run_dir)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.telemetry = Rank0Telemetry(run_dir / "telemetry" / "rank0.jsonl")

    def torchrun(self) -> psutil.Process:
        """torchrun's process (engine/runtime/elastic.py): the one descendant of the job that runs it."""
        found = [
            p
            for p in psutil.Process(self.process.pid).children(recursive=True)
            if command_has(p, "megascope.engine.runtime.elastic")
        ]
        assert len(found) == 1, f"torchrun's process: {found}"
        return found[0]

    def tree(self) -> dict[str, psutil.Process]:
        """The job's long-lived processes and its ranks, by role: "torchrun", "guard R", "warm parent R", "rank R"."""
        torchrun = self.torchrun()
        roles = {"torchrun": torchrun}
        for guard in torchrun.children():
            if not command_has(guard, "megascope.engine.runtime.rank_guard"):
                continue
            rank = int(guard.environ()["RANK"])
            [warm] = [p for p in guard.children() if command_has(p, "megascope.engine.runtime.warm_parent")]
            live = [p for p in warm.children() if p.status() != psutil.STATUS_ZOMBIE]
            assert len(live) == 1, f"warm parent of rank {rank}: live children {live}"
            roles |= {f"guard {rank}": guard, f"warm parent {rank}": warm, f"rank {rank}": live[0]}
        assert sorted(r for r in roles if r.startswith("rank")) == [f"rank {r}" for r in range(WORLD)], roles
        return roles

    def measure(self) -> dict[str, Usage]:
        """What each long-lived process holds: every role but the ranks that are killed."""
        return {
            role: usage(process)
            for role, process in self.tree().items()
            if not role.startswith("rank") or role == "rank 0"
        }

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not condition():
            ended = self.process.poll()
            assert ended is None, f"the job ended (exit {ended}) before {what}; too few STEPS?\n{self.output()}"
            assert time.monotonic() < deadline, f"never: {what}"
            time.sleep(0.02)

    def stop(self) -> None:
        """End whatever is left of the job: SIGTERM to its session's group (torchrun stops its ranks), then SIGKILL
        to every descendant still there (torch elastic starts each guard in a session of its own)."""
        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for process in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.log.close()

    def output(self) -> str:
        return (self.run_dir / "train.log").read_text()[-6000:]


class Rank0Telemetry:
    """Rank 0's telemetry file read as it grows: its steps and its "recovered" events, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.records: list[dict[str, Any]] = []

    def update(self) -> list[dict[str, Any]]:
        if self.path.exists():
            with self.path.open("rb") as file:
                file.seek(self.offset)
                chunk = file.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written is read next time
            self.offset += len(complete)
            self.records += [json.loads(line) for line in complete.splitlines()]
        return self.records

    def recovered(self) -> list[dict[str, Any]]:
        return [r for r in self.update() if r["type"] == "event" and r["kind"] == "recovered"]

    def steps_since_recovery(self) -> int:
        """Steps rank 0 reported after its newest "recovered" event (since it started, before any)."""
        records = self.update()
        last = max((i for i, r in enumerate(records) if r["type"] == "event" and r["kind"] == "recovered"), default=-1)
        return sum(r["type"] == "step" for r in records[last + 1 :])


def final_digests(run_dir: Path) -> dict[int, set[str]]:
    """The parameter digests each rank's processes reported as they finished (lines a killed rank left half written
    are skipped: only "finished" records are parsed)."""
    digests: dict[int, set[str]] = {}
    for path in sorted((run_dir / "telemetry").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            if '"type": "finished"' in line:
                digests.setdefault(rank, set()).add(json.loads(line)["param_digest"])
    return digests


def growth(before: dict[str, Usage], after: dict[str, Usage]) -> list[str]:
    """Each resource of each process that grew past its tolerance, described."""
    grown = []
    for role, first in before.items():
        last = after[role]
        for name in ("fds", "sockets", "threads"):
            if getattr(last, name) > getattr(first, name) + MORE_FDS:
                grown.append(f"{role}: {name} {getattr(first, name)} -> {getattr(last, name)}")
        if last.children != first.children:
            grown.append(f"{role}: live children {first.children} -> {last.children}")
        if last.rss_mb > first.rss_mb + MORE_RSS_MB.get(role, MORE_RSS_MB_DEFAULT):
            grown.append(f"{role}: RSS {first.rss_mb:.1f} MB -> {last.rss_mb:.1f} MB")
    return grown


def table(before: dict[str, Usage], after: dict[str, Usage]) -> str:
    lines = [f"{'process':<14} {'fds':>9} {'sockets':>9} {'threads':>9} {'RSS MB':>15}"]
    for role, first in before.items():
        last = after[role]
        lines.append(
            f"{role:<14} {first.fds:>4}->{last.fds:<4} {first.sockets:>4}->{last.sockets:<4} "
            f"{first.threads:>4}->{last.threads:<4} {first.rss_mb:>7.1f}->{last.rss_mb:<7.1f}"
        )
    return "\n".join(lines)


@pytest.fixture
def job(tmp_path: Path) -> Iterator[Job]:
    started = Job(tmp_path)
    yield started
    started.stop()


def kill_rank(job: Job, rank: int) -> None:
    """SIGKILL ``rank``'s live process, as the OOM killer would."""
    victim = job.tree()[f"rank {rank}"]
    victim.send_signal(signal.SIGKILL)


def recoveries_reach(job: Job, count: int) -> Callable[[], bool]:
    return lambda: len(job.telemetry.recovered()) >= count


def test_a_hundred_faults_recovered_in_place_leak_no_socket_thread_fd_or_memory(job: Job) -> None:
    began = time.monotonic()
    job.wait_for(lambda: job.telemetry.steps_since_recovery() >= STEPS_AFTER_RECOVERY, "the job trained")
    measured: dict[int, dict[str, Usage]] = {}  # by the recoveries done, every WARMED_UP (the trend, printed)
    stuck = 0  # survivors replaced beside the killed ranks
    for fault in range(1, FAULTS + 1):
        rank = 1 + (fault - 1) % (WORLD - 1)  # 1, 2, 3, 1, ...: rank 0 is the survivor
        kill_rank(job, rank)
        job.wait_for(recoveries_reach(job, fault), f"recovery {fault} (rank {rank} killed)")
        recovered = job.telemetry.recovered()
        assert len(recovered) == fault, f"{len(recovered)} recoveries after {fault} faults"
        replaced = recovered[-1]["recovery"]["replaced_ranks"]
        # Beside the killed rank, a survivor that never saw its collective fail may be replaced too (StuckWatch).
        assert rank in replaced, f"recovery {fault}: replaced {replaced}, killed rank {rank}"
        stuck += len(replaced) - 1
        job.wait_for(
            lambda: job.telemetry.steps_since_recovery() >= STEPS_AFTER_RECOVERY, f"steps after recovery {fault}"
        )
        if fault % WARMED_UP == 0 and fault < FAULTS:
            measured[fault] = job.measure()

    def since_first(late: dict[str, Usage]) -> dict[str, Usage]:
        """Each process's first measurement after it warmed up. Rank 0 itself is replaced now and then, when it is
        the survivor that never saw its collective fail (the other long-lived processes never are); a replacement's
        first measurement is taken while its allocator still grows (~10 MB over its first ten faults), so its
        second is its baseline (its only one when it was replaced late: then it is checked against itself)."""
        first = measured[min(measured)]
        baselines = {}
        for role, last in late.items():
            same = [m[role] for _, m in sorted(measured.items()) if m[role].pid == last.pid]
            replaced = first[role].pid != last.pid
            baselines[role] = same[1] if replaced and len(same) > 2 else same[0]
        return baselines

    def settled() -> bool:  # a broken group's stuck collective ends within COLLECTIVE_TIMEOUT; a leak never does
        measured[FAULTS] = job.measure()
        return not growth(since_first(measured[FAULTS]), measured[FAULTS])

    with contextlib.suppress(AssertionError, psutil.NoSuchProcess):  # said below, with the table, if it never settles
        job.wait_for(settled, "the last measurement shows no growth")
    late = measured[FAULTS]
    early = since_first(late)
    print(
        f"\n{FAULTS} faults recovered in {time.monotonic() - began:.0f} s ({stuck} stuck survivors replaced too); "
        f"after {WARMED_UP} -> after {FAULTS}:"
    )
    print(table(early, late))
    trend = [
        f"{n}: {m['rank 0'].fds}/{m['rank 0'].sockets}/{m['rank 0'].threads}/{m['rank 0'].rss_mb:.1f}"
        for n, m in measured.items()
    ]
    print("rank 0 after N recoveries, N: fds/sockets/threads/RSS MB:", ", ".join(trend))

    assert job.process.wait(timeout=DEADLINE) == 0, job.output()
    records = job.telemetry.update()
    assert len(job.telemetry.recovered()) == FAULTS  # no recovery more than the faults, none missed
    assert {r.get("restart_count", 0) for r in records if r["type"] == "step"} == {0}  # never a full restart
    digests = final_digests(job.run_dir)
    assert sorted(digests) == list(range(WORLD)) and len(set.union(*digests.values())) == 1, digests
    assert not growth(early, late), "\n".join([*growth(early, late), table(early, late)])
