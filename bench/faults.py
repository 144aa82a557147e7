"""Fault tolerance at a fault a minute: megascope recovering in place, megascope restarting every rank, and plain
``torchrun --max-restarts``, with the same faults, each side run several times, alternating.

    python bench/faults.py [--minutes 10] [--fault-every 60] [--hang-timeout S] [--repeats 3]
                           [--sides megascope,megascope-restart,torchrun,torchft] [--steady-state 3] [--json]
    python bench/faults.py --minutes 2 --fault-every 30 --repeats 1 --sides megascope     # quick, while developing

The job: our trainer, ``tiny`` preset, one node of 4 ranks (gloo on this CPU), ``--batch-tokens`` tokens per rank
per step, a checkpoint every ``--ckpt-every`` steps that restarts resume from. One node, not 2 x 2: every rank then
shares one ``TORCHELASTIC_RESTART_COUNT``, which is how the measurement tells the attempts apart.

The sides (``--sides``, comma-separated, run in that order in each round; ``--only NAME`` for one):

- **megascope**: ``megascope demo --headless --json --nodes 1 --ranks-per-node 4 --recovery inplace --inject ...``
  (and ``--hang-timeout T`` when given; by default the agent's own timeout, which in place comes down toward the
  job's pace: agent/incidents.py). The agent detects crashes (the rank guard's exit report) and hangs (no step for T;
  stacks, culprit, SIGKILL of that rank only); the failed rank's guard forks a replacement from its warm parent, the
  other ranks form the process group again with it and hand it the newest state; the step in flight is redone.
  What cannot be recovered in place falls back to a restart of every rank (counted in "restarts").
- **megascope-restart**: the same with ``--recovery restart``: torch elastic restarts every rank from the newest
  checkpoint (megascope before in-place recovery).
- **torchrun**: the same config (``engine/train_cli.py``'s ``build`` from the same flags, so the same steps, data,
  checkpoints and faults), launched as a user would without megascope: ``python -m torch.distributed.run
  --nproc-per-node 4 --max-restarts M --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0 -m
  megascope.engine.trainer CONFIG`` (no rank guard, no agent), with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
  (without it restarts under torch elastic fail or hang half the time here: pytorch/pytorch#135712) and
  ``LOGLEVEL=INFO`` (so torchrun logs its restarts; nothing else changes). A hang is noticed only when the
  process group times out: the trainer's ``dist_timeout_seconds`` is set to ``--pg-timeout`` (torch's gloo default
  is 30 minutes, our trainer's 300 s; the default here, 120 s, is generous to torchrun).
- **torchft** (``pip install torchft-nightly``; the side is left out, saying so, without it): the same job with
  torchft's fault tolerance instead, as its users run it: a lighthouse (``torchft_lighthouse --min_replicas 1``,
  a quorum tick of 100 ms and a join timeout of 1 s, where torchft's default of 60 s suits large jobs), 4 replica
  groups of one rank each (bench/torchft_replica.py: the same model, data, optimizer, schedule and faults, read
  from the config the torchrun side runs; gloo, torchft's ``Manager``, ``DistributedDataParallel`` and
  ``OptimizerWrapper``, the process group's timeout ``--pg-timeout``) and a supervisor in this script that starts
  a replica again, cold, when it exits abnormally, as torchx or Kubernetes would, or when, once it has logged a
  step, it logs none for ``--pg-timeout`` s (a liveness probe: torchft routes around a hung replica, which under
  ``how=sleep`` even goes on heartbeating, but never ends it). A replica that starts again takes the model and
  optimizer from a peer (torchft's healing) and goes on from the peers' step; the others never stop: a step
  without a replica commits without its batch (skipped), a step that fails is not committed by the replicas it
  failed on. No checkpoints.

The steps:

1. **Calibration**: a short fault-free ``megascope demo`` (in place) of the same job measures the pace (wall seconds
   per step, checkpoints included), the time from launch to the first step done and the fault-free ETTR (the
   ceiling: checkpoints and telemetry between steps).
2. **Steady state** (``--steady-state K``, off by default): K fault-free pairs of ``--steady-steps`` steps, in place
   against restart, the order within a pair swapped every other pair; the pace of each and the overhead of the warm
   parent and the recovery machinery: the median over the pairs of (in-place pace / restart pace) - 1, with the
   pairs' range; called inconclusive with fewer than 3 pairs or a range wider than twice the goal (on a busy
   machine one run's pace moves by far more than the 1% it is to show).
3. **The plan**: ``minutes * 60 / fault_every`` faults, alternating crash and hang (crash ``how=kill``, then
   ``how=exception``; hang ``how=sleep``, then ``how=stop``, as SIGSTOP leaves no stacks to read), spread over the
   4 ranks. A fault fires when its rank reaches its step, so the steps are chosen from the calibration so that
   on the megascope side the faults land at about ``fault_every * (i + 1/2)`` seconds of wall time if it meets its
   MTTR goals (each fault's goal is taken off the training time before the next); each is moved by less than half
   a checkpoint interval so that the steps done since the last checkpoint (the steps a restart loses) are spread
   evenly over the faults, as they would be for faults at random times. The run's ``--steps`` makes the megascope
   side about ``--minutes`` long. The same plan (in steps) runs on every side; the measured fault times and
   intervals are in the tables: the plan is an estimate, the figures come from what happened.
4. **The runs**: ``--repeats N`` rounds, each running every side once (m, t, m, t, ...), so that a change in the
   machine's load falls on all sides alike; the 1-minute load average is printed as each run starts and ends.

What is measured, on every side from the same sources:

- fault time: the mtime of the fault's marker file (``run_dir/faults/<fault>.0``), created by the rank an instant
  before it kills itself or starts hanging (engine/runtime/faults.py ``claim_firing``).
- detection latency: fault time to the first detection after it. megascope: the agent's ``crash`` or ``hang``
  event (its wall time, in the demo's summary). torchrun: the first line on its stderr (stamped by this script as
  it arrives) that shows it acting on a failed worker: ``Sending process N closing signal SIGTERM`` to the others,
  or ``failed (exitcode ...)`` / ``Worker group FAILED ... will restart worker group``; the last two come only once
  the others are stopped, which for a rank under SIGSTOP is torch's 30 s SIGTERM grace later (that wait counts in
  MTTR; the JSON keeps it as ``restart_line_s``). "seen as" says what each blamed.
- MTTR: fault time to the first step completed after it, done when the last rank recorded it
  (``run_dir/telemetry/rank*.jsonl``, ``wall_time``): in place, the next step of the same attempt
  (``TORCHELASTIC_RESTART_COUNT``); after a restart, the first step of the next attempt that completed one.
- steps redone: the step in flight at the fault (its rank fires as it starts it, so no rank can finish it) plus the
  completed steps lost, the last step every rank completed minus the step the recovery resumed from: 1 in place
  when nothing older is lost, 1 + the steps since the last checkpoint after a restart (``steps_lost`` in the JSON:
  the completed steps alone).
- torchft: detection: a surviving replica's first step after the fault that did not commit or committed with a
  smaller quorum than before it (its telemetry line, ``run_dir/telemetry/replica*.jsonl``; not torchft's log), or,
  when sooner, the supervisor noticing the faulty replica's exit or killing it as hung.
  MTTR: the fault to the first step every replica committed with all 4 in the quorum (when the last recorded it).
  Nothing is redone; instead the replica-steps lost: from the fault to that step, the replicas' batches of the
  steps the job committed that they did not commit (skipped), plus the surviving replicas' step attempts that did
  not commit (thrown away). ETTR by committed tokens: the tokens the replicas committed over what 4 healthy replicas
  would have committed in the training wall time at the fault-free pace of the same job (the calibration's, whose
  checkpoints torchft does not make); the torchft side's own pace before the first fault is in the JSON.
- ETTR (effective training time ratio): useful step time / wall time. Useful step time: for each step index
  1..N once, the execution of it that the final model went through (the latest), its ``step_seconds`` (the mean
  over ranks). Wall time: from the start of step 1 (first attempt, earliest rank) to the end of step N (the last
  rank). Every side pays the same start-up before step 1, so it is left out of all; re-done steps, detection,
  recovery, restarts, checkpoints and gaps between steps all count as wall time only.

The tables: each fault on each side (the first run of each), each run (ETTR, MTTR, steps redone, load), and per
side the median and the range (min-max) over its runs of ETTR, MTTR of a crash and of a hang (each run's median),
detection and steps redone, with issue 18's goals for the megascope side: ETTR >= 90% (aim 95%), MTTR <= 3 s for
a crash and <= hang timeout + 1 s for a hang (the medians over the runs; without --hang-timeout, the agent's
hang detection stands for the timeout), at most 1 step redone and every fault
recovered (on every fault of every run), and, with ``--steady-state``, an overhead <= 1%. The goals before issue
18 (crash detection <= 2 s, hang detection <= hang timeout + 10 s, MTTR <= 60 s) follow as secondary lines.

Progress goes to stderr; the tables to stdout. With ``--json`` the last stdout line is one object:
``{"megascope": {"detect_s": [...], "mttr_s": [...], "steps_lost": [...], "steps_redone": [...], "ettr": x, ...},
"megascope-restart": {...}, "torchrun": {...}, "torchft": {...}`` (the first run of each side), ``"runs": {side:
[one per run]}, "summary": {side: {"ettr": {"median", "min", "max", "runs"}, "mttr_crash_s": ..., ...}}, "load": [...],
"steady_state": {...} or null, "plan": {...}, "goals": {...}}``; the per-fault lists follow the plan's faults,
``null`` where a figure could not be measured. The machine may be shared: the load averages say how busy it was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
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
from megascope.engine.runtime.recovery_env import INPLACE, RESTART
from megascope.engine.runtime.run_dir import checkpoints_dir, fault_marker, telemetry_dir, telemetry_files

RANKS = 4
PRESET = "tiny"
CALIBRATION_STEPS = 40
CRASH_HOWS = ("kill", "exception")
HANG_HOWS = ("sleep", "stop")
SIDES = ("megascope", "megascope-restart", "torchrun", "torchft")
"""The demo recovering in place (its default on one node), the demo restarting every rank, plain torchrun, torchft."""
DEFAULT_SIDES = "megascope,torchrun"
GOAL_ETTR = 0.90
AIM_ETTR = 0.95
GOAL_MTTR_CRASH_S = 3.0
GOAL_MTTR_HANG_MARGIN_S = 1.0
"""A hang's MTTR: at most the hang timeout (the detection) plus this."""
GOAL_STEPS_REDONE = 1
GOAL_STEADY_OVERHEAD_PCT = 1.0
STEADY_MIN_PAIRS = 3
GOAL_CRASH_DETECT_S = 2.0
GOAL_HANG_DETECT_MARGIN_S = 10.0
GOAL_MTTR_OLD_S = 60.0
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

    @property
    def steps_redone(self) -> int | None:
        """The steps run again: the one in flight (the fault fires as its rank starts a step, which no rank can then
        finish) and the completed steps lost (a restart goes back to the last checkpoint)."""
        lost = self.steps_lost
        return None if lost is None else lost + 1


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
    load_start: float | None = None
    """The 1-minute load average as the run started, and as it ended: the machine is shared."""
    load_end: float | None = None

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
    run_dir: Path,
    steps: int,
    faults: Sequence[Injected],
    args: argparse.Namespace,
    limit_s: float,
    recovery: str = INPLACE,
    name: str = "megascope",
) -> tuple[SideResult, dict[str, Any] | None]:
    """The demo with ``faults`` and ``--recovery recovery``; launched again (up to START_ATTEMPTS) when it failed
    before its first step.

    The agent's launch of torchrun now and then dies of SIGABRT at once (gRPC and fork: see the note it leaves);
    that is no fault this measures, so the run is started again, and the note says so.
    """
    failed_starts: list[str] = []
    for attempt in range(START_ATTEMPTS):
        side, summary = _run_demo(run_dir, steps, faults, args, limit_s, recovery, name)
        if side.steps_done or attempt == START_ATTEMPTS - 1:
            break
        gave_up = [e["text"] for e in (summary or {}).get("events", []) if e.get("kind") == "job_failed"]
        failed_starts.append(gave_up[0] if gave_up else f"demo exit code {side.exit_code}, no step done")
        aside = run_dir.with_name(f"{run_dir.name}-failed-start-{attempt + 1}")
        for suffix in ("", ".stdout", ".stderr"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{run_dir}{suffix}").rename(f"{aside}{suffix}")
        log(f"{name}: failed before its first step ({failed_starts[-1]}); kept in {aside}; starting again")
    side.notes[:0] = [f"start-up failed before any step, started again: {text}" for text in failed_starts]
    return side, summary


def _run_demo(
    run_dir: Path,
    steps: int,
    faults: Sequence[Injected],
    args: argparse.Namespace,
    limit_s: float,
    recovery: str,
    name: str,
) -> tuple[SideResult, dict[str, Any] | None]:
    command = [
        sys.executable, "-m", "megascope.agent.cli", "demo", "--headless", "--json", "--nodes", "1",
        "--ranks-per-node", str(RANKS), "--steps", str(steps), "--batch-tokens", str(args.batch_tokens),
        "--ckpt-every", str(args.ckpt_every), "--max-restarts", str(len(faults) + 3),
        *(["--hang-timeout", str(args.hang_timeout)] if args.hang_timeout is not None else []),
        "--recovery", recovery, "--run-dir", str(run_dir), *inject_flags(faults),
    ]  # fmt: skip
    log(f"{name}: {steps} steps, {len(faults)} faults, --recovery {recovery}; {run_dir}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    out_path = run_dir.parent / f"{run_dir.name}.stdout"
    # Files, not pipes: the summary line can outgrow a pipe's buffer, and nothing here reads it until the end.
    with open(out_path, "w") as stdout, open(run_dir.parent / f"{run_dir.name}.stderr", "w") as stderr:
        launched = time.time()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=_base_env(), start_new_session=True)
        try:
            process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            log(f"{name}: still running after {limit_s:.0f} s; stopping it and measuring what it did")
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
    side = measure(name, run_dir, faults, detections, steps, launched, ended, process.returncode)
    if summary is None:
        side.notes.append("the demo printed no JSON summary")
    else:
        side.extra["agent_restarts"] = summary.get("restarts")
        side.extra["demo_ok"] = summary.get("ok")
        # Each recovery in place as the new generation's rank 0 reported it: its breakdown (re-form, transfer,
        # replacement ready, total from the failure to training again), beside the figures measured here.
        side.extra["recoveries"] = [
            {"time": e.get("time"), **(e.get("attributes") or {})} for e in events if e.get("kind") == "recovered"
        ]
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


TORCHFT_JOIN_TIMEOUT_MS = 1000
"""The lighthouse's wait for a heartbeating replica that has not asked to join the quorum (torchft's default, 60 s,
suits large jobs: here a quorum without a dead or hung replica forms after this)."""
TORCHFT_QUORUM_TICK_MS = 100
_LIGHTHOUSE_ADDRESS = re.compile(r"Lighthouse listening on: (\S+)")
TORCHFT_INSTALL = "pip install torchft-nightly (it installs beside torch, leaving torch as it is)"


def torchft_missing() -> str | None:
    """Why the torchft side cannot run here, or None when it can."""
    if importlib.util.find_spec("torchft") is None:
        return f"torchft is not installed: {TORCHFT_INSTALL}"
    if _lighthouse_command() is None:
        return f"torchft is installed but its torchft_lighthouse command is not on PATH: {TORCHFT_INSTALL}"
    return None


def _lighthouse_command() -> str | None:
    beside = Path(sys.executable).parent / "torchft_lighthouse"  # the environment's bin, when it is not on PATH
    return shutil.which("torchft_lighthouse") or (str(beside) if beside.exists() else None)


def drop_unavailable(names: Sequence[str], missing: str | None) -> list[str]:
    """The sides that can run: ``torchft`` is left out (with a line saying why) when ``missing`` says so."""
    if missing is None or "torchft" not in names:
        return list(names)
    log(f"torchft: side skipped: {missing}")
    return [name for name in names if name != "torchft"]


@dataclass(frozen=True)
class ReplicaStep:
    """One step attempt of one torchft replica (bench/torchft_replica.py's telemetry line)."""

    replica: int
    step: int
    done: float
    seconds: float
    committed: bool
    participants: int
    tokens: int

    @property
    def start(self) -> float:
        return self.done - self.seconds


def read_replica_steps(run_dir: Path) -> list[ReplicaStep]:
    """Every step attempt the replicas recorded, in order of completion."""
    steps: list[ReplicaStep] = []
    for path in sorted(telemetry_dir(run_dir).glob("replica*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            steps.append(ReplicaStep(int(record["replica"]), int(record["step"]), float(record["wall_time"]),
                                     float(record["step_seconds"]), bool(record["committed"]),
                                     int(record["participants"]), int(record["tokens"])))  # fmt: skip
    return sorted(steps, key=lambda s: s.done)


def _all_committed(steps: Sequence[ReplicaStep], after: float) -> list[tuple[int, float]]:
    """(step, when the last replica recorded it) for each step every replica committed with all of them in the
    quorum, counting only the attempts that started after ``after``; in step order. (Started: a marker file's mtime
    comes from the kernel's coarse clock, a few ms behind ``time.time()``, so the step every replica ended as the
    fault fired can seem to end after it.)"""
    done: dict[int, dict[int, float]] = defaultdict(dict)
    for s in steps:
        if s.committed and s.participants == RANKS and s.start > after:
            done[s.step][s.replica] = s.done
    return sorted((step, max(by.values())) for step, by in done.items() if len(by) == RANKS)


def measure_torchft(
    run_dir: Path,
    faults: Sequence[Injected],
    total_steps: int,
    launched: float,
    ended: float,
    exit_code: int | None,
    tokens_per_s: float,
    supervisor: Sequence[dict[str, Any]] = (),
) -> SideResult:
    """The torchft side's figures (see the module docstring): ETTR by committed tokens against ``tokens_per_s``
    (what every replica healthy would commit), detection and MTTR from the replicas' step lines, and the
    ``supervisor``'s actions (``{"time", "replica", "what"}``: a restart or a liveness kill) as detections too."""
    steps = read_replica_steps(run_dir)
    side = SideResult("torchft", exit_code, launched, ended, [FaultResult(f) for f in faults], total_steps)
    fired = [marker_time(run_dir, f) for f in faults]
    committers: dict[int, set[int]] = defaultdict(set)
    for s in steps:
        if s.committed:
            committers[s.step].add(s.replica)
    lost: list[int | None] = []
    for index, result in enumerate(side.faults):
        result.fired = fired[index]
        if result.fired is None:
            lost.append(None)
            continue
        until = min((t for t in fired[index + 1 :] if t is not None), default=float("inf"))
        # Detection: a surviving replica's first step after the fault that did not commit or had a smaller quorum
        # than its last step before the fault (smaller than 4 when an earlier fault still keeps a replica out).
        quorum_before = {s.replica: s.participants for s in steps if s.done <= result.fired}
        seen = next((s for s in steps if result.fired < s.done < until and s.replica != result.fault.rank
                     and (not s.committed or s.participants < quorum_before.get(s.replica, RANKS))),
                    None)  # fmt: skip
        if seen is not None:
            what = "not committed" if not seen.committed else f"quorum of {seen.participants}"
            result.detection = Detection(seen.done, f"replica {seen.replica} step {seen.step}: {what}")
        # Or the supervisor acting on the faulty replica first: a replica that crashes while another is out can be
        # back in the next quorum before any survivor saw a smaller one (the lighthouse waits for a majority).
        acted = next((e for e in supervisor if e["replica"] == result.fault.rank and result.fired < e["time"] < until
                      and (seen is None or e["time"] < seen.done)), None)  # fmt: skip
        if acted is not None:
            result.detection = Detection(acted["time"], f"supervisor: replica {acted['replica']} {acted['what']}")
        recovered = next(iter(_all_committed(steps, result.fired)), None)
        result.recovered = None if recovered is None else recovered[1]
        # Torchft redoes no step; what a fault costs instead, until every replica commits again: the replicas'
        # batches of the steps the job committed meanwhile that they did not commit (skipped), and the step
        # attempts that did not commit (thrown away).
        end = result.recovered if result.recovered is not None else ended
        window = [s for s in steps if result.fired < s.done <= end]
        moved = {s.step for s in window if s.committed}
        lost.append(sum(RANKS - len(committers[step]) for step in moved) + sum(not s.committed for s in window))
    side.extra["replica_steps_lost"] = lost
    committed = [s for s in steps if s.committed]
    if committed:
        side.steps_done = max(s.step for s in committed)
        side.first_step_start = min(s.start for s in steps)
        side.last_step_done = max(s.done for s in committed if s.step == side.steps_done)
        tokens = sum(s.tokens for s in committed if s.done <= side.last_step_done)
        # ETTR by committed tokens: SideResult.ettr is useful seconds over the training wall time, so the useful
        # seconds are the time every replica healthy, at the fault-free pace, would take to commit them.
        side.useful_seconds = tokens / tokens_per_s
        side.extra["committed_tokens"] = tokens
    side.extra["fault_free_tokens_per_s"] = round(tokens_per_s, 1)
    before = min((t for t in fired if t is not None), default=ended)
    full = [done for _, done in _all_committed([s for s in steps if s.done < before], 0.0)]
    gaps = [b - a for a, b in zip(full, full[1:], strict=False)]
    own_pace = statistics.median(gaps) if gaps else None
    side.extra["pace_s_before_faults"] = None if own_pace is None else round(own_pace, 4)
    # The same ETTR against torchft's own fault-free pace (its steps before the first fault), as a cross-check:
    # the calibration's pace is megascope's (checkpoints included), on the machine as loaded at that time.
    ettr = side.ettr
    calibration_pace = RANKS * max((s.tokens for s in steps), default=0) / tokens_per_s
    side.extra["ettr_own_pace"] = (
        None if ettr is None or own_pace is None else round(ettr * own_pace / calibration_pace, 4)
    )
    return side


@dataclass
class Replica:
    """One replica process under the supervisor."""

    index: int
    process: subprocess.Popen[Any] | None = None
    started: float = 0.0
    starts: int = 0
    finished: bool = False
    gave_up: int | None = None
    """The exit code it was left with (a replica that failed after another had finished is not started again)."""


def run_torchft(
    run_dir: Path,
    steps: int,
    faults: Sequence[Injected],
    args: argparse.Namespace,
    limit_s: float,
    calibration: Calibration,
) -> SideResult:
    """The torchft side: a lighthouse, RANKS replica processes (bench/torchft_replica.py) and a supervisor that
    starts a replica again, cold, when it exits abnormally or, once started, logs no step for ``--pg-timeout``
    seconds."""
    config = write_torchrun_config(run_dir, steps, faults, args)
    logs = run_dir / "torchft"
    logs.mkdir(parents=True, exist_ok=True)
    liveness_s = float(args.pg_timeout)
    lighthouse_command = _lighthouse_command()
    if lighthouse_command is None:
        raise SystemExit(f"faults: torchft_lighthouse not found: {TORCHFT_INSTALL}")
    log(f"torchft: {steps} steps, {len(faults)} faults, {RANKS} replica groups of 1 rank, process group timeout and "
        f"liveness {args.pg_timeout:g} s; {run_dir}")  # fmt: skip
    supervisor: list[dict[str, Any]] = []
    with open(logs / "lighthouse.log", "w") as lighthouse_log:
        lighthouse = subprocess.Popen(
            [lighthouse_command, "--min_replicas", "1", "--bind", "127.0.0.1:0",
             "--join_timeout_ms", str(TORCHFT_JOIN_TIMEOUT_MS), "--quorum_tick_ms", str(TORCHFT_QUORUM_TICK_MS)],
            stdout=lighthouse_log, stderr=subprocess.STDOUT, env=_base_env(), start_new_session=True,
        )  # fmt: skip
    replicas = [Replica(r) for r in range(RANKS)]
    launched = time.time()
    try:
        address = _lighthouse_address(lighthouse, logs / "lighthouse.log")
        env = dict(_base_env(), TORCHFT_LIGHTHOUSE=address)
        # The threads each rank gets on the other sides (megascope's launcher, as torchrun does): the cores shared out.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // RANKS)))
        replica_script = Path(__file__).resolve().parent / "torchft_replica.py"

        def start(replica: Replica) -> None:
            with open(logs / f"replica{replica.index}.{replica.starts}.log", "w") as out:
                replica.process = subprocess.Popen(
                    [sys.executable, str(replica_script), str(config), "--replica", str(replica.index),
                     "--replicas", str(RANKS)],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    env=dict(env, TORCHFT_BENCH_START=str(replica.starts)),
                )  # fmt: skip
            replica.started = time.time()
            replica.starts += 1

        for replica in replicas:
            start(replica)
        first_finish: float | None = None
        while time.time() - launched < limit_s:
            now = time.time()
            for replica in replicas:
                process = replica.process
                if process is None or replica.finished or replica.gave_up is not None:
                    continue
                code = process.poll()
                if code is None:
                    # The probe counts from the last step this start logged; a cold start (imports, the first
                    # quorum, a heal) has no deadline, as with Kubernetes' separate startup probe.
                    telemetry = telemetry_dir(run_dir) / f"replica{replica.index}.jsonl"
                    last = telemetry.stat().st_mtime if telemetry.exists() else 0.0
                    if last < replica.started or now - last < liveness_s:
                        continue
                    # A liveness probe's kill, as Kubernetes would do: torchft itself never ends a hung replica.
                    _stop(process, grace=0)
                    code = process.returncode
                    supervisor.append(
                        {"time": now, "replica": replica.index, "what": f"no step for {now - last:.0f} s: killed"}
                    )
                if code == 0:
                    replica.finished = True
                    first_finish = first_finish or now
                elif first_finish is not None:  # the others are done: a fresh start would train alone from step 0
                    replica.gave_up = code
                else:
                    supervisor.append({"time": now, "replica": replica.index, "what": f"exit {code}: started again"})
                    log(f"torchft: replica {replica.index} exited with {code}; starting it again")
                    start(replica)
            live = [r for r in replicas if not r.finished and r.gave_up is None]
            if not live or (first_finish is not None and now - first_finish > _STOP_GRACE_S):
                break
            time.sleep(0.2)
        else:
            log(f"torchft: still running after {limit_s:.0f} s; stopping it and measuring what it did")
    finally:
        for replica in replicas:
            if replica.process is not None:
                _stop(replica.process, grace=5)
        _stop(lighthouse, grace=5)
    ended = time.time()
    codes = [0 if r.finished else (r.gave_up if r.gave_up is not None else None) for r in replicas]
    # The job is done when a replica has committed the last step (the others may have been down then).
    exit_code = 0 if any(r.finished for r in replicas) else next((c for c in codes if c), None)
    tokens_per_s = RANKS * args.batch_tokens / calibration.pace_s
    side = measure_torchft(run_dir, faults, steps, launched, ended, exit_code, tokens_per_s, supervisor)
    side.restarts = sum(r.starts - 1 for r in replicas)
    side.extra["supervisor"] = supervisor
    side.extra["lighthouse"] = {"join_timeout_ms": TORCHFT_JOIN_TIMEOUT_MS, "quorum_tick_ms": TORCHFT_QUORUM_TICK_MS}
    side.extra["liveness_s"] = liveness_s
    own, own_ettr = side.extra["pace_s_before_faults"], side.extra["ettr_own_pace"]
    side.notes.append(
        f"ETTR by committed tokens, against the calibration's pace ({calibration.pace_s:.3f} s a step, megascope "
        f"with checkpoints); torchft's own before the first fault: {_f(own, '.3f')} s a step, against which its "
        f"ETTR is {_f(None if own_ettr is None else 100 * own_ettr)}%"
    )
    if any(c != 0 for c in codes):
        side.notes.append(f"the replicas ended with {codes} (None: still running, stopped)")
    return side


def _lighthouse_address(process: subprocess.Popen[Any], log_path: Path, timeout: float = 60.0) -> str:
    """The lighthouse's address, from its first log lines (it binds port 0 and says which port it got)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = _LIGHTHOUSE_ADDRESS.search(log_path.read_text())
        if found:
            return found.group(1)
        if process.poll() is not None:
            raise SystemExit(f"faults: torchft_lighthouse exited with {process.returncode}; see {log_path}")
        time.sleep(0.1)
    raise SystemExit(f"faults: torchft_lighthouse gave no address in {timeout:.0f} s; see {log_path}")


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


WARM_STEPS = 3
"""The first steps are slow (allocations, first collectives): the pace is taken after them."""


def pace(executions: Sequence[Execution], steps: int) -> tuple[float, float]:
    """Of a fault-free run of ``steps`` steps (one attempt): wall seconds per step from the end of step WARM_STEPS to
    the end of the last (checkpoints and telemetry between steps included), and the median step after WARM_STEPS."""
    done = {e.step: e for e in executions if e.attempt == 0}
    if steps <= WARM_STEPS or any(s not in done for s in (WARM_STEPS, steps)):
        raise ValueError(f"a pace needs steps {WARM_STEPS} and {steps} done, and more than {WARM_STEPS} steps")
    per_step = (done[steps].done - done[WARM_STEPS].done) / (steps - WARM_STEPS)
    return per_step, statistics.median(e.seconds for e in done.values() if e.step > WARM_STEPS)


def calibrate(work: Path, args: argparse.Namespace) -> Calibration:
    side, _ = run_megascope(work / "calibration", CALIBRATION_STEPS, [], args, limit_s=600)
    executions = [e for e in read_executions(work / "calibration") if e.attempt == 0]
    done = {e.step: e for e in executions}
    if not side.completed or len(done) < CALIBRATION_STEPS:
        raise SystemExit(f"faults: the calibration run failed (exit {side.exit_code}); see {work}/calibration*")
    per_step, median_step = pace(executions, CALIBRATION_STEPS)
    return Calibration(
        pace_s=per_step, median_step_s=median_step, startup_s=done[1].done - side.launched, ettr=side.ettr
    )


@dataclass(frozen=True)
class SteadyRun:
    """One fault-free run of the steady-state comparison."""

    recovery: str
    pace_s: float
    median_step_s: float
    ettr: float | None
    load: tuple[float, float]
    """The 1-minute load average at its start and end."""


def steady_state(work: Path, args: argparse.Namespace) -> list[tuple[SteadyRun, SteadyRun]]:
    """``--steady-state K`` fault-free pairs of the same job, in place against restart (the warm parent, the
    recovery store and the trainer's recovery hooks against none of them): K (in place, restart) pairs, the order
    within a pair swapped every other pair so that a drift in the machine's load favours neither side."""
    pairs: list[tuple[SteadyRun, SteadyRun]] = []
    for index in range(args.steady_state):
        order = (INPLACE, RESTART) if index % 2 == 0 else (RESTART, INPLACE)
        runs: dict[str, SteadyRun] = {}
        for mode in order:
            run_dir = work / f"steady-{mode}-{index + 1}"
            start = os.getloadavg()[0]
            side, _ = run_megascope(run_dir, args.steady_steps, [], args, limit_s=600, recovery=mode,
                                    name=f"steady-state {mode}")  # fmt: skip
            end = os.getloadavg()[0]
            if not side.completed:
                raise SystemExit(f"faults: the steady-state run {run_dir} failed (exit {side.exit_code})")
            per_step, median_step = pace(read_executions(run_dir), args.steady_steps)
            runs[mode] = SteadyRun(mode, per_step, median_step, side.ettr, (start, end))
            log(f"steady state {index + 1}/{args.steady_state} {mode}: {per_step:.4f} s a step, "
                f"load {start:.2f} -> {end:.2f}")  # fmt: skip
        pairs.append((runs[INPLACE], runs[RESTART]))
    return pairs


def steady_overhead_pct(pairs: Sequence[tuple[SteadyRun, SteadyRun]]) -> float | None:
    """The cost of in-place recovery's machinery when nothing fails: the median over the pairs of the in-place
    pace over the restart pace, as a percentage above 1 (negative: in place was faster, i.e. noise)."""
    if not pairs:
        return None
    return 100 * (statistics.median(inplace.pace_s / restart.pace_s for inplace, restart in pairs) - 1)


def steady_spread_pct(pairs: Sequence[tuple[SteadyRun, SteadyRun]]) -> tuple[float, float] | None:
    """The lowest and highest of the pairs' overheads, in %: how far the machine's noise moves one pair."""
    if not pairs:
        return None
    ratios = [100 * (inplace.pace_s / restart.pace_s - 1) for inplace, restart in pairs]
    return min(ratios), max(ratios)


def steady_conclusive(pairs: Sequence[tuple[SteadyRun, SteadyRun]]) -> bool:
    """Whether the median can be told from noise at the goal's scale: at least STEADY_MIN_PAIRS pairs, spread over
    no more than twice the goal (a busy machine moves one run's pace by far more than 1%)."""
    spread = steady_spread_pct(pairs)
    return (
        len(pairs) >= STEADY_MIN_PAIRS and spread is not None and spread[1] - spread[0] <= 2 * GOAL_STEADY_OVERHEAD_PCT
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
    # Wall seconds the faults so far are expected to cost on the megascope side, which recovers in place: its MTTR
    # goals (a fault to the first step after it: detection, recovery and the step redone). Where it misses them
    # the faults land sooner than planned; the table gives the measured interval.
    overhead = 0.0
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
            cost = GOAL_MTTR_CRASH_S
        else:
            faults.append(HangFault(rank=(nth + 2) % RANKS, step=step, how=HANG_HOWS[nth % len(HANG_HOWS)]))
            cost = planned_hang_timeout(args, calibration) + GOAL_MTTR_HANG_MARGIN_S
        expected.append((step - 1) * pace + overhead)
        overhead += cost
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
    """One line per fault and side (the first run of each side)."""
    width = max(len(s.name) for s in sides)
    print(f"{'':<3} {'fault':<24} {'step':>5}  {'side':<{width}} {'fired at':>9} {'detect':>7} {'MTTR':>7} "
          f"{'redone':>6}  seen as")  # fmt: skip
    for index, fault in enumerate(plan.faults):
        for row, side in enumerate(sides):
            result = side.faults[index]
            origin = side.first_step_start or side.launched
            head = f"{index + 1:<3} {describe_fault(fault):<24} {fault.step:>5}" if row == 0 else " " * 34
            fired = None if result.fired is None else result.fired - origin
            seen = result.detection.seen_as if result.detection else "-"
            lost = side.extra.get("replica_steps_lost")
            if lost is not None and lost[index] is not None:
                seen += f"; {lost[index]} replica-steps lost"
            print(f"{head}  {side.name:<{width}} {_f(fired, '9.1f'):>9} {_f(result.detect_s, '7.2f'):>7} "
                  f"{_f(result.mttr_s, '7.2f'):>7} {_f(result.steps_redone, '6d'):>6}  {seen}")  # fmt: skip


def run_figures(side: SideResult) -> dict[str, float | int | None]:
    """The figures of one run that the summary gives the median and range of (None: nothing to measure)."""

    def of(kind: str, attr: str) -> list[float | None]:
        return [getattr(r, attr) for r in side.faults if r.fault.kind == kind]

    recoveries: list[dict[str, Any]] = side.extra.get("recoveries", [])

    return {
        "ettr": side.ettr,
        "mttr_crash_s": _median(of("crash", "mttr_s")),
        "mttr_hang_s": _median(of("hang", "mttr_s")),
        "detect_crash_s": _median(of("crash", "detect_s")),
        "detect_hang_s": _median(of("hang", "detect_s")),
        "steps_redone_max": _max([r.steps_redone for r in side.faults]),
        "steps_lost_total": (
            None if "replica_steps_lost" in side.extra else sum(r.steps_lost or 0 for r in side.faults)
        ),  # torchft loses no completed step: its replica-steps lost are below
        "faults_recovered": sum(r.recovered is not None for r in side.faults),
        "fault_interval_s": _median(_intervals(side)),
        "replica_steps_lost_total": (
            sum(n or 0 for n in side.extra["replica_steps_lost"]) if "replica_steps_lost" in side.extra else None
        ),
        **{key: _median([r.get(source) for r in recoveries]) for key, source in RECOVERY_FIGURES},
    }


def _intervals(side: SideResult) -> list[float]:
    fired = [r.fired for r in side.faults if r.fired is not None]
    return [b - a for a, b in zip(fired, fired[1:], strict=False)]


FIGURES: tuple[tuple[str, str, float, str], ...] = (
    ("ETTR %", "ettr", 100.0, ".1f"),
    ("MTTR crash s (run median)", "mttr_crash_s", 1.0, ".2f"),
    ("MTTR hang s (run median)", "mttr_hang_s", 1.0, ".2f"),
    ("detection crash s (run median)", "detect_crash_s", 1.0, ".2f"),
    ("detection hang s (run median)", "detect_hang_s", 1.0, ".2f"),
    ("steps redone a fault (run max)", "steps_redone_max", 1.0, ".0f"),
    ("completed steps lost (run total)", "steps_lost_total", 1.0, ".0f"),
    ("faults recovered", "faults_recovered", 1.0, ".0f"),
    ("fault interval s (run median)", "fault_interval_s", 1.0, ".0f"),
    ("torchft: replica-steps lost (run total)", "replica_steps_lost_total", 1.0, ".0f"),
    ("in place: failure to training s", "recovery_total_s", 1.0, ".2f"),
    ("in place: replacement ready s", "replacement_ready_s", 1.0, ".2f"),
    ("in place: group re-formed s", "reform_s", 1.0, ".2f"),
    ("in place: state transfer s", "transfer_s", 1.0, ".3f"),
)
"""The summary's rows: label, run_figures key, scale, format."""
RECOVERY_FIGURES = (
    ("recovery_total_s", "total_seconds"),
    ("replacement_ready_s", "replacement_ready_seconds"),
    ("reform_s", "reform_seconds"),
    ("transfer_s", "transfer_seconds"),
)
"""The breakdown of a recovery in place (the ``recovered`` events' attributes; each run's median)."""


def spread(values: Sequence[float | int | None]) -> dict[str, float | int] | None:
    """Median and range of the runs' values (the runs that measured it: ``runs`` says how many)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present), "runs": len(present)}


def summarize(runs: Sequence[SideResult]) -> dict[str, dict[str, float | int] | None]:
    figures = [run_figures(r) for r in runs]
    return {key: spread([f[key] for f in figures]) for _, key, _, _ in FIGURES}


def _cell(value: dict[str, float | int] | None, scale: float, spec: str) -> str:
    if value is None:
        return "-"
    median, low, high = (format(scale * value[k], spec) for k in ("median", "min", "max"))
    return median if len(set((median, low, high))) == 1 else f"{median} ({low}-{high})"


def planned_hang_timeout(args: argparse.Namespace, calibration: Calibration) -> float:
    """The hang timeout to plan with: ``--hang-timeout``, else about what the agent comes down to in place (its
    default follows the job's pace: 5 median steps, at least 2 s; agent/incidents.py)."""
    return args.hang_timeout if args.hang_timeout is not None else max(2.0, 5 * calibration.median_step_s)


def applied_hang_timeout(runs: Sequence[SideResult], hang_timeout: float | None) -> float:
    """The hang timeout the goals are judged against: ``--hang-timeout``, else the agent's own, as it applied it
    (the median of its hang detections: the timeout plus the stack collection, a little more than the timeout)."""
    if hang_timeout is not None:
        return hang_timeout
    detections = [r.detect_s for side in runs for r in side.faults if r.fault.kind == "hang" and r.detect_s]
    return statistics.median(detections) if detections else float("nan")


def goals(runs: Sequence[SideResult], hang_timeout: float | None) -> dict[str, bool]:
    """Issue 18's goals, on the megascope (in place) side over all its runs; ETTR and MTTR are judged on the median
    over the runs (of each run's median for MTTR), steps redone on every fault of every run (at most the step in
    flight), and every planned fault must have fired and been recovered from. The older goals follow, on every fault
    of every run."""
    summary = summarize(runs)
    faults = [r for side in runs for r in side.faults]
    hang_timeout = applied_hang_timeout(runs, hang_timeout)

    def median_at_most(key: str, limit: float) -> bool:
        value = summary[key]
        return value is not None and value["median"] <= limit

    def every(values: Sequence[float | int | None], limit: float) -> bool:
        return bool(values) and all(v is not None and v <= limit for v in values)

    ettr = summary["ettr"]
    return {
        "ettr_ge_90pct": ettr is not None and ettr["median"] >= GOAL_ETTR,
        "ettr_ge_95pct_aim": ettr is not None and ettr["median"] >= AIM_ETTR,
        "mttr_crash_le_3s": median_at_most("mttr_crash_s", GOAL_MTTR_CRASH_S),
        "mttr_hang_le_timeout_plus_1s": median_at_most("mttr_hang_s", hang_timeout + GOAL_MTTR_HANG_MARGIN_S),
        "steps_redone_le_1": every([r.steps_redone for r in faults], GOAL_STEPS_REDONE),
        "every_fault_recovered": bool(faults) and all(r.fired is not None and r.recovered is not None for r in faults),
        # Before issue 18 (a full restart's goals), kept as secondary lines:
        "crash_detect_le_2s": every([r.detect_s for r in faults if r.fault.kind == "crash"], GOAL_CRASH_DETECT_S),
        "hang_detect_le_timeout_plus_10s": every(
            [r.detect_s for r in faults if r.fault.kind == "hang"], hang_timeout + GOAL_HANG_DETECT_MARGIN_S
        ),
        "mttr_le_60s": every([r.mttr_s for r in faults], GOAL_MTTR_OLD_S),
    }


def print_runs_table(runs: dict[str, list[SideResult]]) -> None:
    print(f"\n{'side':<18} {'run':>3} {'ETTR %':>7} {'MTTR crash':>10} {'MTTR hang':>9} {'redone max':>10} "
          f"{'steps / restarts':>16} {'load 1 min start -> end':>24}")  # fmt: skip
    for name, sides in runs.items():
        for index, side in enumerate(sides):
            figures = run_figures(side)
            ettr = figures["ettr"]
            load = f"{_f(side.load_start, '.2f')} -> {_f(side.load_end, '.2f')}"
            print(f"{name:<18} {index + 1:>3} {_f(None if ettr is None else 100 * ettr, '7.1f'):>7} "
                  f"{_f(figures['mttr_crash_s'], '10.2f'):>10} {_f(figures['mttr_hang_s'], '9.2f'):>9} "
                  f"{_f(figures['steps_redone_max'], '10.0f'):>10} "
                  f"{f'{side.steps_done}/{side.total_steps} / {side.restarts}':>16} {load:>24}")  # fmt: skip


def print_summary(
    runs: dict[str, list[SideResult]],
    args: argparse.Namespace,
    calibration: Calibration,
    pairs: Sequence[tuple[SteadyRun, SteadyRun]],
) -> dict[str, Any]:
    """The summary table (median (min-max) over each side's runs) and, with a megascope side, its goals."""
    met = goals(runs["megascope"], args.hang_timeout) if "megascope" in runs else {}
    timeout = applied_hang_timeout(runs.get("megascope", []), args.hang_timeout)
    timeout_name = "hang timeout" if args.hang_timeout is not None else "the agent's hang detection"
    summaries = {name: summarize(sides) for name, sides in runs.items()}

    def verdict(key: str) -> str:
        return ("met" if met[key] else "MISSED") if met else ""

    goal_of = {
        "ettr": f">= {100 * GOAL_ETTR:.0f}%: {verdict('ettr_ge_90pct')} (aim {100 * AIM_ETTR:.0f}%: "
        f"{verdict('ettr_ge_95pct_aim')})",
        "mttr_crash_s": f"<= {GOAL_MTTR_CRASH_S:g} s: {verdict('mttr_crash_le_3s')}",
        "mttr_hang_s": f"<= {timeout_name} + {GOAL_MTTR_HANG_MARGIN_S:g} = "
        f"{timeout + GOAL_MTTR_HANG_MARGIN_S:.1f} s: {verdict('mttr_hang_le_timeout_plus_1s')}",
        "steps_redone_max": f"<= {GOAL_STEPS_REDONE} (the step in flight): {verdict('steps_redone_le_1')}",
        "faults_recovered": f"all {len(next(iter(runs.values()))[0].faults)}: {verdict('every_fault_recovered')}",
        "fault_interval_s": f"planned {args.fault_every:g} s",
    }
    width = max(len(label) for label, _, _, _ in FIGURES)
    cell = 22
    print(f"\n{'median (min-max) over the runs':<{width}}  " + "  ".join(f"{n:>{cell}}" for n in runs)
          + ("  goal (megascope)" if met else ""))  # fmt: skip
    for label, key, scale, spec in FIGURES:
        cells = "  ".join(f"{_cell(summaries[n][key], scale, spec):>{cell}}" for n in runs)
        print(f"{label:<{width}}  {cells}  {goal_of.get(key, '') if met else ''}".rstrip())
    print(f"{'runs':<{width}}  " + "  ".join(f"{len(sides):>{cell}}" for sides in runs.values()))
    if met:
        old = (("crash_detect_le_2s", f"crash detection <= {GOAL_CRASH_DETECT_S:g} s"),
               ("hang_detect_le_timeout_plus_10s",
                f"hang detection <= {timeout + GOAL_HANG_DETECT_MARGIN_S:.1f} s"),
               ("mttr_le_60s", f"MTTR <= {GOAL_MTTR_OLD_S:g} s"))  # fmt: skip
        print("secondary (the goals before issue 18, every fault): "
              + "; ".join(f"{text}: {verdict(key)}" for key, text in old))  # fmt: skip
    ceiling = _f(None if calibration.ettr is None else 100 * calibration.ettr, ".1f")
    print(f"fault-free ETTR (the calibration run, in place): {ceiling}% (the ceiling: checkpoints and telemetry "
          "between steps)")  # fmt: skip
    if pairs:
        overhead = steady_overhead_pct(pairs)
        spread = steady_spread_pct(pairs)
        conclusive = steady_conclusive(pairs)
        if met:
            # Noise is no measurement: an inconclusive set of pairs meets no goal, whatever its median says.
            held = overhead is not None and overhead <= GOAL_STEADY_OVERHEAD_PCT
            met["steady_overhead_le_1pct"] = conclusive and held
            met["steady_overhead_conclusive"] = conclusive
        print(f"\nsteady state, fault-free, {args.steady_steps} steps ({len(pairs)} pairs, in place vs restart):")
        for index, (inplace, restart) in enumerate(pairs):
            print(f"  pair {index + 1}: in place {inplace.pace_s:.4f} s/step (ETTR {_f(_pct(inplace.ettr))}%, load "
                  f"{inplace.load[0]:.2f} -> {inplace.load[1]:.2f}), restart {restart.pace_s:.4f} s/step (ETTR "
                  f"{_f(_pct(restart.ettr))}%, load {restart.load[0]:.2f} -> {restart.load[1]:.2f}), "
                  f"ratio {inplace.pace_s / restart.pace_s:.4f}")  # fmt: skip
        verdict_text = (f": {verdict('steady_overhead_le_1pct')}" if conclusive else ": not judged") if met else ""
        low, high = spread if spread is not None else (None, None)
        print(f"  overhead of the warm parent and the recovery machinery (median of the ratios): "
              f"{_f(overhead, '+.2f')}% (pairs {_f(low, '+.2f')}% to {_f(high, '+.2f')}%)  "
              f"goal <= {GOAL_STEADY_OVERHEAD_PCT:g}%{verdict_text}")  # fmt: skip
        if not conclusive:
            print(f"  inconclusive: fewer than {STEADY_MIN_PAIRS} pairs, or they spread over more than "
                  f"{2 * GOAL_STEADY_OVERHEAD_PCT:g}% (noise): run more pairs on a quiet machine")  # fmt: skip
    for sides in runs.values():
        for index, side in enumerate(sides):
            for note in side.notes:
                print(f"{side.name} run {index + 1}: {note}")
    return met


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def side_json(side: SideResult) -> dict[str, Any]:
    start = side.first_step_start or side.launched
    ettr = side.ettr
    return {
        "detect_s": [None if r.detect_s is None else round(r.detect_s, 3) for r in side.faults],
        "mttr_s": [None if r.mttr_s is None else round(r.mttr_s, 3) for r in side.faults],
        "steps_lost": [r.steps_lost for r in side.faults],
        "steps_redone": [r.steps_redone for r in side.faults],
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
        "load_start": side.load_start,
        "load_end": side.load_end,
        "notes": side.notes,
        **side.extra,
    }


def steady_json(pairs: Sequence[tuple[SteadyRun, SteadyRun]], steps: int) -> dict[str, Any] | None:
    if not pairs:
        return None
    overhead = steady_overhead_pct(pairs)
    spread = steady_spread_pct(pairs)
    return {
        "steps": steps,
        "overhead_pct_range": None if spread is None else [round(v, 3) for v in spread],
        "conclusive": steady_conclusive(pairs),
        "pairs": [
            {
                run.recovery: {
                    "pace_s": round(run.pace_s, 5),
                    "median_step_s": round(run.median_step_s, 5),
                    "ettr": None if run.ettr is None else round(run.ettr, 4),
                    "load": run.load,
                }
                for run in pair
            }
            for pair in pairs
        ],  # fmt: skip
        "overhead_pct": None if overhead is None else round(overhead, 3),
    }


def parse_sides(text: str) -> list[str]:
    """``--sides a,b``: known names, each once, in the order given (the order they run in, round after round)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SIDES]
    if unknown or not names:
        raise ValueError(f"--sides: unknown side(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(SIDES)}, comma-separated")  # fmt: skip
    if len(set(names)) != len(names):
        raise ValueError(f"--sides: a side named twice in {text!r}; use --repeats for more runs of a side")
    return names


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_side(name: str, run_dir: Path, plan: Plan, args: argparse.Namespace, calibration: Calibration) -> SideResult:
    """One run of one side with the plan's faults, the load average taken as it starts and ends."""
    load_start = os.getloadavg()[0]
    log(f"{name}: load average {load_start:.2f} at the start")
    budget = args.minutes * 60 + calibration.startup_s
    if name in ("torchrun", "torchft"):  # a hang is seen only at the process group timeout (or the probe's)
        run_dir.mkdir(parents=True, exist_ok=True)
        hangs = sum(f.kind == "hang" for f in plan.faults)
        limit = 3 * (budget + hangs * (args.pg_timeout + 60)) + 600
        if name == "torchrun":
            side = run_torchrun(run_dir, plan.steps, plan.faults, args, limit_s=limit)
        else:
            side = run_torchft(run_dir, plan.steps, plan.faults, args, limit, calibration)
    else:
        recovery = RESTART if name == "megascope-restart" else INPLACE
        side, _ = run_megascope(run_dir, plan.steps, plan.faults, args, limit_s=3 * budget + 600, recovery=recovery,
                                name=name)  # fmt: skip
    side.load_start, side.load_end = load_start, os.getloadavg()[0]
    ettr = side.ettr
    log(f"{name}: ETTR {_f(None if ettr is None else 100 * ettr)}%, {side.steps_done}/{side.total_steps} steps; "
        f"load average {side.load_end:.2f} at the end")  # fmt: skip
    return side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the megascope side (default: 10)")
    parser.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults (default: 60)")
    parser.add_argument(
        "--hang-timeout",
        type=float,
        help="megascope's --hang-timeout (default: the agent's own: in place, it follows the job's pace)",
    )
    parser.add_argument(
        "--pg-timeout", type=float, default=120.0, help="torchrun side: process group timeout, s (default: 120)"
    )
    parser.add_argument("--ckpt-every", type=int, default=20, help="checkpoint every N steps (default: 20)")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per rank per step (default: 1024)")
    parser.add_argument(
        "--sides",
        help=f"the sides to run, comma-separated, from: {', '.join(SIDES)} (default: megascope,torchrun)",
    )
    parser.add_argument("--only", choices=SIDES, help="run one side only (the same as --sides NAME)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, the sides alternating (default: 3)")
    parser.add_argument(
        "--steady-state",
        type=int,
        default=0,
        metavar="K",
        help="also K fault-free pairs, in place against restart: the overhead of the recovery machinery (default: 0)",
    )
    parser.add_argument("--steady-steps", type=int, default=100, help="steps of each steady-state run (default: 100)")
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary directory, removed)")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the run in progress is stopped (its processes live in their own sessions).
    signal.signal(signal.SIGTERM, _interrupt)
    if args.minutes <= 0 or args.fault_every <= 0 or (args.hang_timeout or 1) <= 0 or args.pg_timeout <= 0:
        parser.error("--minutes, --fault-every, --hang-timeout and --pg-timeout must be positive")
    if args.ckpt_every < 1:
        parser.error("--ckpt-every must be at least 1 (restarts resume from checkpoints)")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.steady_state < 0:
        parser.error(f"--steady-state must be 0 (none) or more pairs, got {args.steady_state}")
    if args.steady_steps <= 2 * WARM_STEPS:
        parser.error(f"--steady-steps must be more than {2 * WARM_STEPS} (the pace is taken after the first "
                     f"{WARM_STEPS}), got {args.steady_steps}")  # fmt: skip
    if args.only is not None and args.sides is not None:
        parser.error("give --only NAME or --sides A,B, not both")
    try:
        names = [args.only] if args.only is not None else parse_sides(args.sides or DEFAULT_SIDES)
    except ValueError as error:
        parser.error(str(error))
    missing = torchft_missing() if "torchft" in names else None
    names = drop_unavailable(names, missing)
    if not names:
        parser.error(f"no side left to run: {missing}")

    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir).resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="megascope-faults-")))
        calibration = calibrate(work, args)
        log(f"calibration: {calibration.pace_s:.3f} s a step (median step {calibration.median_step_s:.3f} s), "
            f"{calibration.startup_s:.1f} s from launch to the first step")  # fmt: skip
        pairs = steady_state(work, args)
        plan = plan_faults(calibration, args)
        log(f"plan: {plan.steps} steps; " + ", ".join(f.describe() for f in plan.faults))
        runs: dict[str, list[SideResult]] = {name: [] for name in names}
        for repeat in range(args.repeats):  # alternating: each round runs every side once
            for name in names:
                log(f"run {repeat + 1}/{args.repeats} of {name}")
                runs[name].append(run_side(name, work / f"{name}-{repeat + 1}", plan, args, calibration))

    print(
        f"\nFault tolerance: {PRESET} model, 1 node x {RANKS} ranks (gloo, CPU), {args.batch_tokens} tokens/rank/step "
        f"({calibration.median_step_s:.2f} s median step), checkpoint every {args.ckpt_every} steps; "
        f"{len(plan.faults)} faults planned every ~{args.fault_every:g} s over ~{args.minutes:g} min; "
        f"{args.repeats} run(s) of each side, alternating"
    )
    print(
        f"megascope: the demo, agent --hang-timeout {'default' if args.hang_timeout is None else args.hang_timeout}, "
        "--recovery inplace (megascope) or "
        f"restart (megascope-restart); torchrun: plain torch.distributed.run --max-restarts {len(plan.faults) + 3}, "
        f"process group timeout {args.pg_timeout:g} s (a hang is seen then)"
        + (
            f"; torchft: {RANKS} replica groups of 1 rank, lighthouse join timeout {TORCHFT_JOIN_TIMEOUT_MS} ms, "
            f"a replica started again cold on a failure or after {args.pg_timeout:g} s without a step; its ETTR by "
            "committed tokens, the replica-steps a fault lost after what it was seen as"
            if "torchft" in runs
            else ""
        )
    )
    print("(the first run of each side; times in seconds, 'fired at' from the start of step 1 of that run; "
          "'redone': the step in flight and the completed steps lost)\n")  # fmt: skip
    print_fault_table(plan, [sides[0] for sides in runs.values()])
    print_runs_table(runs)
    met = print_summary(runs, args, calibration, pairs)
    if args.json:
        result: dict[str, Any] = {name: side_json(sides[0]) for name, sides in runs.items()}
        result["runs"] = {name: [side_json(side) for side in sides] for name, sides in runs.items()}
        result["summary"] = {name: summarize(sides) for name, sides in runs.items()}
        result["load"] = [
            {"side": name, "run": index + 1, "start": side.load_start, "end": side.load_end}
            for repeat in range(args.repeats)
            for name, sides in runs.items()
            for index, side in enumerate(sides)
            if index == repeat
        ]
        result["steady_state"] = steady_json(pairs, args.steady_steps)
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
            "repeats": args.repeats,
            "sides": names,
            "pace_s": round(calibration.pace_s, 4),
            "median_step_s": round(calibration.median_step_s, 4),
            "startup_s": round(calibration.startup_s, 2),
            "ettr_no_faults": None if calibration.ettr is None else round(calibration.ettr, 4),
        }
        result["goals"] = met
        print(json.dumps(result))


if __name__ == "__main__":
    main()
