"""Fault tolerance at a fault a minute: megascope's agent against plain ``torchrun --max-restarts``, same faults.

    python bench/faults.py [--minutes 10] [--fault-every 60] [--hang-timeout 10] [--pg-timeout 120] [--json]
    python bench/faults.py --minutes 2 --fault-every 30 --pg-timeout 30      # quick, while developing

The job: our trainer, ``tiny`` preset, one node of 4 ranks (gloo on this CPU), ``--batch-tokens`` tokens per rank
per step, a checkpoint every ``--ckpt-every`` steps that restarts resume from. One node, not 2 x 2: every rank then
shares one ``TORCHELASTIC_RESTART_COUNT``, which is how the measurement tells the attempts apart.

1. **Calibration**: a short fault-free ``megascope demo`` of the same job measures the pace (wall seconds per step,
   checkpoints included), the time from launch to the first step done (what a restart costs, roughly) and the
   fault-free ETTR (the ceiling: checkpoints and telemetry between steps).
2. **The plan**: ``minutes * 60 / fault_every`` faults, alternating crash and hang (crash ``how=kill``, then
   ``how=exception``; hang ``how=sleep``, then ``how=stop``, as SIGSTOP leaves no stacks to read), spread over the
   4 ranks. A fault fires when its rank reaches its step, so the steps are chosen from the calibration so that
   on the megascope side the faults land at about ``fault_every * (i + 1/2)`` seconds of wall time: each fault's
   expected cost (detection, restart, steps to redo) is taken off the training time before the next, and each
   is moved by less than half a checkpoint interval so that the steps done since the last checkpoint (the steps
   a restart loses) are spread evenly over the faults, as they would be for faults at random times. The run's
   ``--steps`` makes the megascope side about ``--minutes`` long. The measured fault times are in the table:
   the plan is an estimate, the figures come from what happened.
3. **megascope**: ``megascope demo --headless --json --nodes 1 --ranks-per-node 4 --hang-timeout T ...
   --inject ...``: the agent detects crashes (the rank guard's exit report) and hangs (no step for T seconds;
   stacks, culprit, SIGKILL), and torch elastic under it restarts the ranks.
4. **torchrun**: the same config (``engine/train_cli.py``'s ``build`` from the same flags, so the same steps, data,
   checkpoints and faults), launched as a user would without megascope: ``python -m torch.distributed.run
   --nproc-per-node 4 --max-restarts M --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 -m
   megascope.engine.trainer CONFIG`` (no rank guard, no agent), with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
   (without it restarts under torch elastic fail or hang half the time here: pytorch/pytorch#135712) and
   ``LOGLEVEL=INFO`` (so torchrun logs its restarts; nothing else changes). A hang is noticed only when the
   process group times out: the trainer's ``dist_timeout_seconds`` is set to ``--pg-timeout`` (torch's gloo default
   is 30 minutes, our trainer's 300 s; the default here, 120 s, is generous to torchrun).

What is measured, on both sides from the same sources:

- fault time: the mtime of the fault's marker file (``run_dir/faults/<fault>.0``), created by the rank an instant
  before it kills itself or starts hanging (engine/runtime/faults.py ``claim_firing``).
- detection latency: fault time to the first detection after it. megascope: the agent's ``crash`` or ``hang``
  event (its wall time, in the demo's summary). torchrun: the first line on its stderr (stamped by this script as
  it arrives) that shows it acting on a failed worker: ``Sending process N closing signal SIGTERM`` to the others,
  or ``failed (exitcode ...)`` / ``Worker group FAILED ... will restart worker group``; the last two come only once
  the others are stopped, which for a rank under SIGSTOP is torch's 30 s SIGTERM grace later (that wait counts in
  MTTR; the JSON keeps it as ``restart_line_s``). "seen as" says what each blamed.
- MTTR: fault time to the first step completed after the restart: the lowest attempt
  (``TORCHELASTIC_RESTART_COUNT``) above the fault's that completed a step, its first step, done when the last
  rank recorded it (``run_dir/telemetry/rank*.jsonl``, ``wall_time``).
- steps lost: the last step every rank completed in the fault's attempt minus the step the restart resumed from
  (its first step - 1).
- ETTR (effective training time ratio): useful step time / wall time. Useful step time: for each step index
  1..N once, the execution of it that the final model went through (the one in the latest attempt), its
  ``step_seconds`` (the mean over ranks). Wall time: from the start of step 1 (first attempt, earliest rank) to
  the end of step N (the last rank). Both sides pay the same start-up before step 1, so it is left out of both;
  re-done steps, detection, restarts, checkpoints and gaps between steps all count as wall time only.

Progress goes to stderr; the tables to stdout. With ``--json`` the last stdout line is one object:
``{"megascope": {"detect_s": [...], "mttr_s": [...], "steps_lost": [...], "ettr": x, ...}, "torchrun": {...},
"plan": {...}, "goals": {...}}``; the lists follow the plan's faults, ``null`` where a figure could not be measured.
The machine is shared: one run per side, so the figures carry the other jobs' noise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from megascope.engine.runtime.faults import CrashFault, HangFault
from megascope.engine.runtime.run_dir import checkpoints_dir, fault_marker, telemetry_files

RANKS = 4
PRESET = "tiny"
CALIBRATION_STEPS = 40
CRASH_HOWS = ("kill", "exception")
HANG_HOWS = ("sleep", "stop")
CRASH_DETECT_ESTIMATE_S = 1.0
"""For the plan only: the agent waits up to 1 s for the guard's exit report."""
HANG_STACKS_ESTIMATE_S = 1.0
"""For the plan only: collecting every rank's stacks after the hang timeout."""
GOAL_CRASH_DETECT_S = 2.0
GOAL_HANG_MARGIN_S = 10.0
GOAL_MTTR_S = 60.0
GOAL_ETTR = 0.90
_RESTART_LINE = re.compile(r"Worker group (FAILED|UNHEALTHY)\. .*will restart worker group")
_FAILED_RANK = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
_NOTICED = re.compile(r"closing signal SIG|failed \(exitcode|Worker group (FAILED|UNHEALTHY)")
"""torchrun acting on a failed worker: it stops the others (SIGTERM, and SIGKILL 30 s later if they do not go),
and only then logs the failure and the restart."""
_STOP_GRACE_S = 30.0

Injected: TypeAlias = CrashFault | HangFault


# -- what a run left behind -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One step index run once by every rank of one attempt."""

    step: int
    attempt: int
    start: float
    """Wall time the earliest rank started it."""
    done: float
    """Wall time the last rank recorded it."""
    seconds: float
    """The mean of the ranks' ``step_seconds``: each rank's steps follow one another, so summed over steps this
    never exceeds the wall time (the slowest rank's would: ranks start a step at slightly different times)."""


def read_executions(run_dir: Path) -> list[Execution]:
    """Every (attempt, step) the ranks recorded, from ``telemetry/rank*.jsonl``, in order of completion."""
    ranks: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for path in telemetry_files(run_dir):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("type") == "step":
                ranks[(int(record["restart_count"]), int(record["step"]))].append(record)
    executions = [
        Execution(
            step=step,
            attempt=attempt,
            start=min(r["wall_time"] - r["step_seconds"] for r in records),
            done=max(r["wall_time"] for r in records),
            seconds=statistics.fmean(r["step_seconds"] for r in records),
        )
        for (attempt, step), records in ranks.items()
    ]
    return sorted(executions, key=lambda e: e.done)


def marker_time(run_dir: Path, fault: Injected) -> float | None:
    """When ``fault`` fired: its marker's mtime (engine/runtime/run_dir.py names the marker after ``describe()``)."""
    with contextlib.suppress(FileNotFoundError):
        return fault_marker(run_dir, fault.describe(), 0).stat().st_mtime
    return None


@dataclass(frozen=True)
class Detection:
    time: float
    seen_as: str


@dataclass
class FaultResult:
    fault: Injected
    fired: float | None = None
    detection: Detection | None = None
    last_step: int | None = None
    resumed_step: int | None = None
    recovered: float | None = None
    """Wall time the first step after the restart was done."""

    @property
    def detect_s(self) -> float | None:
        return None if self.fired is None or self.detection is None else self.detection.time - self.fired

    @property
    def mttr_s(self) -> float | None:
        return None if self.fired is None or self.recovered is None else self.recovered - self.fired

    @property
    def steps_lost(self) -> int | None:
        return None if self.last_step is None or self.resumed_step is None else self.last_step - self.resumed_step


@dataclass
class SideResult:
    name: str
    exit_code: int | None
    launched: float
    ended: float
    faults: list[FaultResult]
    total_steps: int
    steps_done: int = 0
    first_step_start: float | None = None
    last_step_done: float | None = None
    useful_seconds: float = 0.0
    restarts: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ettr(self) -> float | None:
        if self.first_step_start is None or self.last_step_done is None:
            return None
        return self.useful_seconds / (self.last_step_done - self.first_step_start)

    @property
    def training_wall_s(self) -> float | None:
        if self.first_step_start is None or self.last_step_done is None:
            return None
        return self.last_step_done - self.first_step_start

    @property
    def completed(self) -> bool:
        return self.exit_code == 0 and self.steps_done == self.total_steps


def measure(
    name: str,
    run_dir: Path,
    faults: Sequence[Injected],
    detections: Sequence[Detection],
    total_steps: int,
    launched: float,
    ended: float,
    exit_code: int | None,
) -> SideResult:
    """The figures of one side (see the module docstring for each definition)."""
    executions = read_executions(run_dir)
    side = SideResult(name, exit_code, launched, ended, [FaultResult(f) for f in faults], total_steps)
    fired = [marker_time(run_dir, f) for f in faults]
    for index, result in enumerate(side.faults):
        result.fired = fired[index]
        if result.fired is None:
            continue
        later = [t for t in fired[index + 1 :] if t is not None]
        until = min(later, default=float("inf"))
        result.detection = next((d for d in detections if result.fired < d.time < until), None)
        before = [e for e in executions if e.done <= result.fired]
        attempt = max((e.attempt for e in before), default=0)
        # The newest step of the fault's attempt that some rank had begun before the fault: the faulty rank fires
        # as it starts the next one, which no rank can finish without it. (In place, a step the faulty rank had
        # already contributed to may still complete on the others: then it counts, and nothing is redone.)
        result.last_step = max((e.step for e in executions if e.attempt == attempt and e.start < result.fired),
                               default=0)  # fmt: skip
        # What came next: a later step of the same attempt (recovered in place: the surviving ranks went on) or
        # the first step of a later attempt (torch elastic restarted every rank, from a checkpoint).
        after = [e for e in executions
                 if (e.attempt == attempt and e.step > result.last_step) or e.attempt > attempt]  # fmt: skip
        if after:
            first = min(after, key=lambda e: (e.attempt, e.step))
            result.resumed_step = first.step - 1
            result.recovered = first.done
    final: dict[int, Execution] = {}
    for execution in executions:  # the latest attempt's run of each step is the one the model kept
        kept = final.get(execution.step)
        if kept is None or execution.attempt >= kept.attempt:
            final[execution.step] = execution
    if final:
        side.steps_done = max(final)
        kept_steps = [final[s] for s in range(1, side.steps_done + 1) if s in final]
        side.useful_seconds = sum(e.seconds for e in kept_steps)
        first_steps = [e for e in executions if e.step == 1]
        side.first_step_start = min(e.start for e in first_steps) if first_steps else None
        side.last_step_done = final[side.steps_done].done
    side.restarts = max((e.attempt for e in executions), default=0)
    return side


# -- running a side ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _stop(process: subprocess.Popen[Any], grace: float = _STOP_GRACE_S) -> None:
    """SIGTERM the process (the demo and torchrun both stop their children on it), then SIGKILL its session."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # started with start_new_session: the pid is the group's
    process.wait()


def _base_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MEGASCOPE_AGENT_ADDRESS", None)  # a plain run must not attach to some agent of the caller's
    return env


def train_flags(steps: int, args: argparse.Namespace) -> list[str]:
    """The training flags both sides share (the demo adds its own ``--ckpt-dir``, ``--run-dir`` and launch flags)."""
    return ["--preset", PRESET, "--steps", str(steps), "--batch-tokens", str(args.batch_tokens), "--val-every", "0",
            "--ckpt-every", str(args.ckpt_every)]  # fmt: skip


def inject_flags(faults: Sequence[Injected]) -> list[str]:
    return [part for fault in faults for part in ("--inject", fault.describe())]


START_ATTEMPTS = 3


def run_megascope(
    run_dir: Path, steps: int, faults: Sequence[Injected], args: argparse.Namespace, limit_s: float
) -> tuple[SideResult, dict[str, Any] | None]:
    """The demo with ``faults``; launched again (up to START_ATTEMPTS) when it failed before its first step.

    The agent's launch of torchrun now and then dies of SIGABRT at once (gRPC and fork: see the note it leaves);
    that is no fault this measures, so the run is started again, and the note says so.
    """
    failed_starts: list[str] = []
    for attempt in range(START_ATTEMPTS):
        side, summary = _run_demo(run_dir, steps, faults, args, limit_s)
        if side.steps_done or attempt == START_ATTEMPTS - 1:
            break
        gave_up = [e["text"] for e in (summary or {}).get("events", []) if e.get("kind") == "job_failed"]
        failed_starts.append(gave_up[0] if gave_up else f"demo exit code {side.exit_code}, no step done")
        aside = run_dir.with_name(f"{run_dir.name}-failed-start-{attempt + 1}")
        for suffix in ("", ".stdout", ".stderr"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{run_dir}{suffix}").rename(f"{aside}{suffix}")
        log(f"megascope: failed before its first step ({failed_starts[-1]}); kept in {aside}; starting again")
    side.notes[:0] = [f"start-up failed before any step, started again: {text}" for text in failed_starts]
    return side, summary


def _run_demo(
    run_dir: Path, steps: int, faults: Sequence[Injected], args: argparse.Namespace, limit_s: float
) -> tuple[SideResult, dict[str, Any] | None]:
    command = [
        sys.executable, "-m", "megascope.agent.cli", "demo", "--headless", "--json", "--nodes", "1",
        "--ranks-per-node", str(RANKS), "--steps", str(steps), "--batch-tokens", str(args.batch_tokens),
        "--ckpt-every", str(args.ckpt_every), "--max-restarts", str(len(faults) + 3),
        "--hang-timeout", str(args.hang_timeout), "--run-dir", str(run_dir), *inject_flags(faults),
    ]  # fmt: skip
    log(f"megascope: {steps} steps, {len(faults)} faults; {run_dir}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    out_path = run_dir.parent / f"{run_dir.name}.stdout"
    # Files, not pipes: the summary line can outgrow a pipe's buffer, and nothing here reads it until the end.
    with open(out_path, "w") as stdout, open(run_dir.parent / f"{run_dir.name}.stderr", "w") as stderr:
        launched = time.time()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=_base_env(), start_new_session=True)
        try:
            process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            log(f"megascope: still running after {limit_s:.0f} s; stopping it and measuring what it did")
            _stop(process)
        except BaseException:
            _stop(process)
            raise
    ended = time.time()
    summary: dict[str, Any] | None = None
    lines = out_path.read_text().strip().splitlines()
    with contextlib.suppress(json.JSONDecodeError, IndexError):
        summary = json.loads(lines[-1])
    events = summary.get("events", []) if summary else []
    detections = [
        Detection(e["time"], f"{e['kind']} rank {e['rank']}" if e.get("rank") is not None else f"{e['kind']} (none)")
        for e in events
        if e.get("kind") in ("crash", "hang")
    ]
    side = measure("megascope", run_dir, faults, detections, steps, launched, ended, process.returncode)
    if summary is None:
        side.notes.append("the demo printed no JSON summary")
    else:
        side.extra["agent_restarts"] = summary.get("restarts")
        failed = [e["text"] for e in events if e.get("kind") == "job_failed"]
        side.notes.extend(f"job_failed: {text}" for text in failed)
        _agent_figures(side, summary)
    return side, summary


def _agent_figures(side: SideResult, summary: dict[str, Any]) -> None:
    """The agent's own figures for each fault (the summary's ``faults``, where this version of the demo has them),
    kept beside ours as a cross-check: the agent times a hang from the last step, a crash from the guard's report."""
    reported = summary.get("faults")
    if not isinstance(reported, list):
        return
    figures: list[dict[str, Any] | None] = []
    for result in side.faults:
        seen = result.detection
        match = next((r for r in reported if seen is not None and abs(r.get("time", 0) - seen.time) < 1e-3), None)
        keys = ("kind", "rank", "detect_seconds", "mttr_seconds", "steps_lost", "resumed_step")
        figures.append({k: match.get(k) for k in keys} if match else None)
    side.extra["agent_reported"] = figures


def write_torchrun_config(run_dir: Path, steps: int, faults: Sequence[Injected], args: argparse.Namespace) -> Path:
    """The run config torchrun's ranks read: what ``megascope train`` would write from the same flags."""
    from megascope.engine.runtime.launch import write_config
    from megascope.engine.train_cli import add_arguments, build

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = [*train_flags(steps, args), "--ckpt-dir", str(checkpoints_dir(run_dir)), "--ckpt-keep", "10",
             "--run-dir", str(run_dir), "--nproc-per-node", str(RANKS), *inject_flags(faults)]  # fmt: skip
    config, _ = build(parser.parse_args(flags))
    return write_config(dataclasses.replace(config, dist_timeout_seconds=float(args.pg_timeout)))


def run_torchrun(
    run_dir: Path, steps: int, faults: Sequence[Injected], args: argparse.Namespace, limit_s: float
) -> SideResult:
    config = write_torchrun_config(run_dir, steps, faults, args)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS),
        "--max-restarts", str(len(faults) + 3), "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0",
        "-m", "megascope.engine.trainer", str(config),
    ]  # fmt: skip
    env = dict(_base_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", LOGLEVEL="INFO")
    log(f"torchrun: {steps} steps, {len(faults)} faults, process group timeout {args.pg_timeout:g} s; {run_dir}")
    stamped: list[tuple[float, str]] = []

    def stamp(stream: Any, out: Any) -> None:
        # torchrun's log lines carry no date or zone; stamping them here, as they arrive, puts them on the same
        # clock as the marker files and the telemetry.
        for line in stream:
            now = time.time()
            stamped.append((now, line))
            out.write(f"{now:.3f} {line}")
            out.flush()

    with open(run_dir / "torchrun.stdout", "w") as stdout, open(run_dir / "torchrun.stderr", "w") as stderr:
        launched = time.time()
        process = subprocess.Popen(
            command, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        reader = threading.Thread(target=stamp, args=(process.stderr, stderr), daemon=True)
        reader.start()
        try:
            process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            log(f"torchrun: still running after {limit_s:.0f} s; stopping it and measuring what it did")
            _stop(process)
        except BaseException:
            _stop(process)
            raise
        reader.join(timeout=10)
    ended = time.time()
    detections: list[Detection] = []
    restart_lines: list[float] = []
    noticed: float | None = None
    blamed = ""
    for when, line in stamped:
        if noticed is None and _NOTICED.search(line):
            noticed = when
        failed = _FAILED_RANK.search(line)
        if failed:
            blamed = blamed or f"rank {failed.group(2)} exit {failed.group(1)}"
        if _RESTART_LINE.search(line):
            detections.append(Detection(noticed if noticed is not None else when, blamed or "worker group failed"))
            restart_lines.append(when)
            noticed, blamed = None, ""
    side = measure("torchrun", run_dir, faults, detections, steps, launched, ended, process.returncode)
    # When torchrun decided to restart, for each fault: up to its SIGTERM grace (30 s) after it noticed the failure.
    side.extra["restart_line_s"] = [
        None
        if r.fired is None
        else next((round(t - r.fired, 3) for t in restart_lines if t > r.fired and r.detection is not None), None)
        for r in side.faults
    ]
    if process.returncode != 0:
        side.notes.append(f"torchrun exited with code {process.returncode}")
    return side


# -- calibration and plan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    pace_s: float
    """Wall seconds per step once running (checkpoints and telemetry included)."""
    median_step_s: float
    startup_s: float
    """Launch to the first step done: about what a restart costs."""
    ettr: float | None
    """Of this fault-free run: the ceiling for the runs with faults."""


def calibrate(work: Path, args: argparse.Namespace) -> Calibration:
    side, _ = run_megascope(work / "calibration", CALIBRATION_STEPS, [], args, limit_s=600)
    executions = [e for e in read_executions(work / "calibration") if e.attempt == 0]
    done = {e.step: e for e in executions}
    if not side.completed or len(done) < CALIBRATION_STEPS:
        raise SystemExit(f"faults: the calibration run failed (exit {side.exit_code}); see {work}/calibration*")
    warm = 3  # the first steps are slow (allocations, first collectives)
    pace = (done[CALIBRATION_STEPS].done - done[warm].done) / (CALIBRATION_STEPS - warm)
    return Calibration(
        pace_s=pace,
        median_step_s=statistics.median(e.seconds for e in executions if e.step > warm),
        startup_s=done[1].done - side.launched,
        ettr=side.ettr,
    )


@dataclass(frozen=True)
class Plan:
    steps: int
    faults: tuple[Injected, ...]
    expected_at_s: tuple[float, ...]
    """Where each fault should land on the megascope side, seconds after step 1 starts."""


def plan_faults(calibration: Calibration, args: argparse.Namespace) -> Plan:
    """Fault steps that land about every ``fault_every`` s of wall time (see the module docstring)."""
    count = max(1, int(args.minutes * 60 // args.fault_every))
    pace, every = calibration.pace_s, args.ckpt_every
    faults: list[Injected] = []
    expected: list[float] = []
    overhead = 0.0  # wall seconds the faults so far are expected to cost (detection, restart, redone steps)
    previous = 0
    for index in range(count):
        target = args.fault_every * (index + 0.5)
        # Fire at the start of step S, after S - 1 steps. Real faults land anywhere between two checkpoints: the
        # steps done since the last one, (S - 1) % every, are spread evenly over the faults (nearest step with
        # that remainder), not left to whatever the arithmetic gives (it put every hang just after a checkpoint).
        base = round((target - overhead) / pace) + 1
        since_checkpoint = round((index + 0.5) * every / count) % every
        shift = (since_checkpoint - (base - 1)) % every
        step = base + (shift - every if shift > every / 2 else shift)
        while step <= previous + every:  # at least a checkpoint past the previous fault
            step += every
        kind, nth = ("crash", "hang")[index % 2], index // 2
        if kind == "crash":
            faults.append(CrashFault(rank=nth % RANKS, step=step, how=CRASH_HOWS[nth % len(CRASH_HOWS)]))
            detect = CRASH_DETECT_ESTIMATE_S
        else:
            faults.append(HangFault(rank=(nth + 2) % RANKS, step=step, how=HANG_HOWS[nth % len(HANG_HOWS)]))
            detect = args.hang_timeout + HANG_STACKS_ESTIMATE_S
        expected.append((step - 1) * pace + overhead)
        redo = (step - 1) % every  # back to the newest checkpoint at or before S - 1
        overhead += detect + calibration.startup_s + redo * pace
        previous = step
    steps = max(round((args.minutes * 60 - overhead) / pace), previous + every)
    return Plan(steps, tuple(faults), tuple(expected))


# -- report -----------------------------------------------------------------------------------------------------


def _f(value: float | int | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def describe_fault(fault: Injected) -> str:
    return f"{fault.kind} rank {fault.rank} ({fault.how})"


def print_fault_table(plan: Plan, sides: Sequence[SideResult]) -> None:
    origin = {s.name: s.first_step_start or s.launched for s in sides}
    names = " ".join(f"{s.name:>10}" for s in sides)
    print(f"{'':<3} {'fault':<24} {'step':>5} | {'fired at s':^21} | {'detect s':^21} | {'MTTR s':^21} | "
          f"{'steps lost':^21} | seen as")  # fmt: skip
    print(f"{'':<3} {'':<24} {'':>5} | {names} | {names} | {names} | {names} |")
    for index, fault in enumerate(plan.faults):
        results = [s.faults[index] for s in sides]
        fired = " ".join(_f(None if r.fired is None else r.fired - origin[s.name], "10.1f").rjust(10)
                         for s, r in zip(sides, results, strict=True))  # fmt: skip
        detect = " ".join(_f(r.detect_s, "10.2f").rjust(10) for r in results)
        mttr = " ".join(_f(r.mttr_s, "10.1f").rjust(10) for r in results)
        lost = " ".join(_f(r.steps_lost, "10d").rjust(10) for r in results)
        seen = " / ".join(r.detection.seen_as if r.detection else "-" for r in results)
        print(f"{index + 1:<3} {describe_fault(fault):<24} {fault.step:>5} | {fired} | {detect} | {mttr} | {lost} | "
              f"{seen}")  # fmt: skip


def goals(side: SideResult, hang_timeout: float) -> dict[str, Any]:
    crash = [r.detect_s for r in side.faults if r.fault.kind == "crash"]
    hang = [r.detect_s for r in side.faults if r.fault.kind == "hang"]
    mttr = [r.mttr_s for r in side.faults]
    ettr = side.ettr

    def held(values: Sequence[float | None], limit: float) -> bool:
        return bool(values) and all(v is not None and v <= limit for v in values)

    return {
        "crash_detect_le_2s": held(crash, GOAL_CRASH_DETECT_S),
        "hang_detect_le_timeout_plus_10s": held(hang, hang_timeout + GOAL_HANG_MARGIN_S),
        "mttr_le_60s": held(mttr, GOAL_MTTR_S),
        "ettr_ge_90pct": ettr is not None and ettr >= GOAL_ETTR,
    }


def print_summary(sides: Sequence[SideResult], args: argparse.Namespace, calibration: Calibration) -> dict[str, Any]:
    megascope = next(s for s in sides if s.name == "megascope")
    met = goals(megascope, args.hang_timeout)
    rows: list[tuple[str, list[str], str]] = []

    def figures(kind: str | None, attr: str) -> list[list[float | int | None]]:
        return [[getattr(r, attr) for r in s.faults if kind is None or r.fault.kind == kind] for s in sides]

    def verdict(key: str) -> str:
        return "met" if met[key] else "MISSED"

    for label, kind, attr, spec, goal in (
        ("crash detection s", "crash", "detect_s", ".2f",
         f"<= {GOAL_CRASH_DETECT_S:g} s: {verdict('crash_detect_le_2s')}"),
        ("hang detection s", "hang", "detect_s", ".1f",
         f"<= {args.hang_timeout + GOAL_HANG_MARGIN_S:g} s: {verdict('hang_detect_le_timeout_plus_10s')}"),
        ("MTTR, crash s", "crash", "mttr_s", ".1f", ""),
        ("MTTR, hang s", "hang", "mttr_s", ".1f", ""),
        ("MTTR, all s", None, "mttr_s", ".1f", f"<= {GOAL_MTTR_S:g} s: {verdict('mttr_le_60s')}"),
        ("steps lost", None, "steps_lost", ".0f", ""),
    ):  # fmt: skip
        rows.append((f"{label}, median (max)",
                     [f"{_f(_median(v), spec)} ({_f(_max(v), spec)})" for v in figures(kind, attr)], goal))  # fmt: skip
    rows.append(("ETTR", [_f(None if s.ettr is None else 100 * s.ettr, ".1f") + "%" for s in sides],
                 f">= {100 * GOAL_ETTR:.0f}%: {verdict('ettr_ge_90pct')}"))  # fmt: skip
    rows.append(("faults fired / detected",
                 [f"{sum(r.fired is not None for r in s.faults)}/{len(s.faults)} / "
                  f"{sum(r.detection is not None for r in s.faults)}" for s in sides], ""))  # fmt: skip
    rows.append(("fault interval s, median",
                 [_f(_median(_intervals(s)), ".0f") for s in sides], f"planned {args.fault_every:g} s"))  # fmt: skip
    rows.append(("steps done / restarts", [f"{s.steps_done}/{s.total_steps} / {s.restarts}" for s in sides], ""))
    rows.append(("training wall time (step 1 to last) s", [_f(s.training_wall_s, ".0f") for s in sides], ""))
    rows.append(("useful step time s", [f"{s.useful_seconds:.0f}" for s in sides], ""))
    rows.append(("whole run (launch to exit) s", [f"{s.ended - s.launched:.0f}" for s in sides], ""))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':<{width}}  " + "  ".join(f"{s.name:>16}" for s in sides) + "  goal (megascope)")
    for label, values, goal in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{v:>16}" for v in values) + f"  {goal}")
    ceiling = _f(None if calibration.ettr is None else 100 * calibration.ettr, ".1f")
    print(f"(ETTR of the fault-free calibration run: {ceiling}%: checkpoints and telemetry between steps)")
    for side in sides:
        for note in side.notes:
            print(f"{side.name}: {note}")
    return met


def _intervals(side: SideResult) -> list[float]:
    fired = [r.fired for r in side.faults if r.fired is not None]
    return [b - a for a, b in zip(fired, fired[1:], strict=False)]


def side_json(side: SideResult) -> dict[str, Any]:
    start = side.first_step_start or side.launched
    ettr = side.ettr
    return {
        "detect_s": [None if r.detect_s is None else round(r.detect_s, 3) for r in side.faults],
        "mttr_s": [None if r.mttr_s is None else round(r.mttr_s, 3) for r in side.faults],
        "steps_lost": [r.steps_lost for r in side.faults],
        "ettr": None if ettr is None else round(ettr, 4),
        "fired_at_s": [None if r.fired is None else round(r.fired - start, 2) for r in side.faults],
        "seen_as": [r.detection.seen_as if r.detection else None for r in side.faults],
        "last_step": [r.last_step for r in side.faults],
        "resumed_step": [r.resumed_step for r in side.faults],
        "steps_done": side.steps_done,
        "steps": side.total_steps,
        "restarts": side.restarts,
        "completed": side.completed,
        "exit_code": side.exit_code,
        "useful_s": round(side.useful_seconds, 2),
        "training_wall_s": None if side.training_wall_s is None else round(side.training_wall_s, 2),
        "run_wall_s": round(side.ended - side.launched, 2),
        "notes": side.notes,
        **side.extra,
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the megascope side (default: 10)")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults (default: 60)")
    parser.add_argument("--hang-timeout", type=float, default=10.0, help="megascope's --hang-timeout (default: 10)")
    parser.add_argument(
        "--pg-timeout", type=float, default=120.0, help="torchrun side: process group timeout, s (default: 120)"
    )
    parser.add_argument("--ckpt-every", type=int, default=20, help="checkpoint every N steps (default: 20)")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per rank per step (default: 1024)")
    parser.add_argument("--only", choices=["megascope", "torchrun"], help="run one side only")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary directory, removed)")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the run in progress is stopped (its processes live in their own sessions).
    signal.signal(signal.SIGTERM, _interrupt)
    if args.minutes <= 0 or args.fault_every <= 0 or args.hang_timeout <= 0 or args.pg_timeout <= 0:
        parser.error("--minutes, --fault-every, --hang-timeout and --pg-timeout must be positive")
    if args.ckpt_every < 1:
        parser.error("--ckpt-every must be at least 1 (restarts resume from checkpoints)")

    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="megascope-faults-")))
        calibration = calibrate(work, args)
        log(f"calibration: {calibration.pace_s:.3f} s a step (median step {calibration.median_step_s:.3f} s), "
            f"{calibration.startup_s:.1f} s from launch to the first step")  # fmt: skip
        plan = plan_faults(calibration, args)
        log(f"plan: {plan.steps} steps; " + ", ".join(f.describe() for f in plan.faults))
        hangs = sum(f.kind == "hang" for f in plan.faults)
        budget = args.minutes * 60 + calibration.startup_s
        sides: list[SideResult] = []
        summary: dict[str, Any] | None = None
        if args.only in (None, "megascope"):
            side, summary = run_megascope(work / "megascope", plan.steps, plan.faults, args, limit_s=3 * budget + 600)
            sides.append(side)
        if args.only in (None, "torchrun"):
            (work / "torchrun").mkdir(parents=True, exist_ok=True)
            limit = 3 * (budget + hangs * (args.pg_timeout + 60)) + 600
            sides.append(run_torchrun(work / "torchrun", plan.steps, plan.faults, args, limit_s=limit))

    print(
        f"\nFault tolerance: {PRESET} model, 1 node x {RANKS} ranks (gloo, CPU), {args.batch_tokens} tokens/rank/step "
        f"({calibration.median_step_s:.2f} s median step), checkpoint every {args.ckpt_every} steps; "
        f"{len(plan.faults)} faults planned every ~{args.fault_every:g} s over ~{args.minutes:g} min"
    )
    print(
        f"megascope: agent --hang-timeout {args.hang_timeout:g} s; torchrun: plain torch.distributed.run "
        f"--max-restarts {len(plan.faults) + 3}, process group timeout {args.pg_timeout:g} s (a hang is seen then)"
    )
    print("(times in seconds; 'fired at' counts from the start of step 1 on that side)\n")
    print_fault_table(plan, sides)
    met = print_summary(sides, args, calibration) if any(s.name == "megascope" for s in sides) else {}
    if args.json:
        result: dict[str, Any] = {s.name: side_json(s) for s in sides}
        result["plan"] = {
            "steps": plan.steps,
            "faults": [f.describe() for f in plan.faults],
            "expected_at_s": [round(t, 1) for t in plan.expected_at_s],
            "minutes": args.minutes,
            "fault_every_s": args.fault_every,
            "hang_timeout_s": args.hang_timeout,
            "pg_timeout_s": args.pg_timeout,
            "ckpt_every": args.ckpt_every,
            "batch_tokens": args.batch_tokens,
            "ranks": RANKS,
            "pace_s": round(calibration.pace_s, 4),
            "median_step_s": round(calibration.median_step_s, 4),
            "startup_s": round(calibration.startup_s, 2),
            "ettr_no_faults": None if calibration.ettr is None else round(calibration.ettr, 4),
        }
        result["goals"] = met
        if summary is not None:
            result["megascope"]["demo_ok"] = summary.get("ok")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
