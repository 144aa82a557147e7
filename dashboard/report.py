"""The postmortem of a recorded run (``megascope report``): a Markdown page and PNG plots, from the records alone.

The incident timeline is the cluster model's own reading of the recorded events (the faults and restarts the
dashboard shows, a recovery in place as "in place" with its breakdown), with the stacks the agents recorded at each
hang; stragglers and checkpoints come from their events; loss, step time and the straggler heat map from the step
reports (downsampled past the record's retention window: every 10th step), and the ETTR by the steps
(dashboard/model/ettr.py, the benchmark's definition) too. Pure Python (no Textual).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from megascope.dashboard import formatting as fmt
from megascope.dashboard import png
from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.model.diagnosis import AgentStacks, job_stacks
from megascope.dashboard.model.ettr import EttrTracker
from megascope.dashboard.model.incidents import FaultView, RecoveryView, RestartView
from megascope.dashboard.replay import Item, load_items
from megascope.protos.megascope.v1 import telemetry_pb2
from megascope.protos.recording import Part

HEAT_COLUMNS = 200
"""The heat map's step buckets (columns)."""


@dataclass
class RunFacts:
    """What the report says, gathered from the records."""

    run_id: str
    nodes: list[str]
    start: float
    end: float
    warnings: list[str]
    faults: list[FaultView]
    stacks: dict[int, str] = field(default_factory=dict)
    """By fault index: the recorded stacks at that fault, in words (groups, culprit)."""
    stragglers: list[telemetry_pb2.Event] = field(default_factory=list)
    checkpoints: list[telemetry_pb2.Event] = field(default_factory=list)
    first_step: int | None = None
    last_step: int | None = None
    step_seconds: float | None = None
    """The median step time."""
    loss: list[tuple[float, float]] = field(default_factory=list)
    step_time: list[tuple[float, float]] = field(default_factory=list)
    heat: list[list[float | None]] = field(default_factory=list)
    heat_ranks: list[int] = field(default_factory=list)
    recoveries: list[RecoveryView] = field(default_factory=list)
    """Every recovery in place, with its breakdown."""
    step_ettr: tuple[float, float, float] | None = None
    """(ETTR, useful step seconds, wall seconds) by the steps (dashboard/model/ettr.py); None without timed steps."""


def gather(run_dirs: list[str]) -> RunFacts:
    items, warnings, run_id = load_items(run_dirs)
    model = ClusterModel(log_connections=False)
    by_node: dict[str, telemetry_pb2.Telemetry] = defaultdict(telemetry_pb2.Telemetry)
    stacks: list[Item] = []
    steps: dict[int, dict[int, telemetry_pb2.StepReport]] = defaultdict(dict)
    ettr = EttrTracker()
    for item in items:
        if item.part == Part.EVENT:
            by_node[item.address].events.append(item.message)  # type: ignore[arg-type]
        elif item.part == Part.STACKS:
            stacks.append(item)
        elif item.part == Part.STEP:
            report: telemetry_pb2.StepReport = item.message  # type: ignore[assignment]
            steps[report.step][report.rank] = report  # a step redone after a restart: the newest attempt
            ettr.offer(report)
    for address, batch in by_node.items():
        model.ingest(address, batch)
    facts = RunFacts(
        run_id=run_id,
        nodes=sorted({i.address.removeprefix("record:") for i in items}),
        start=items[0].wall_time,
        end=items[-1].wall_time,
        warnings=warnings,
        faults=model.faults(),
        recoveries=model.recoveries(),
    )
    ratio, wall = ettr.ettr(), ettr.wall_seconds()
    if ratio is not None and wall is not None:
        facts.step_ettr = (ratio, ettr.useful_seconds(), wall)
    for event_batch in by_node.values():
        for event in event_batch.events:
            if event.kind == "straggler":
                facts.stragglers.append(event)
            elif event.kind == "checkpoint":
                facts.checkpoints.append(event)
    facts.stragglers.sort(key=lambda e: e.wall_time)
    facts.checkpoints.sort(key=lambda e: e.wall_time)
    for index, fault in enumerate(facts.faults):
        words = _stacks_at(fault, stacks)
        if words:
            facts.stacks[index] = words
    _step_series(facts, steps)
    return facts


def _stacks_at(fault: FaultView, stacks: list[Item]) -> str:
    """The stacks each node recorded nearest the fault (within a minute after it), judged as the dashboard does."""
    if fault.kind != "hang":
        return ""
    newest: dict[str, Item] = {}
    for item in stacks:
        if fault.wall_time - 120 <= item.wall_time <= fault.wall_time + 60:
            newest[item.address] = item
    if not newest:
        return ""
    agents = [AgentStacks(a, a.removeprefix("record:"), i.message) for a, i in sorted(newest.items())]  # type: ignore[arg-type]
    judged = job_stacks(agents, max(i.wall_time for i in newest.values()), stalled=True)
    groups = judged.groups
    culprit = f"culprit rank {judged.culprit}" if judged.culprit is not None else "no culprit"
    odd = [g for g in groups if len(g.ranks) == 1]
    return f"{len(groups)} stack group(s), {len(odd)} of one rank; {culprit}: {judged.reason}"


def _step_series(facts: RunFacts, steps: dict[int, dict[int, telemetry_pb2.StepReport]]) -> None:
    if not steps:
        return
    ordered = sorted(steps)
    facts.first_step, facts.last_step = ordered[0], ordered[-1]
    facts.loss = [(s, statistics.fmean(r.loss for r in steps[s].values())) for s in ordered]
    facts.step_time = [(s, max(r.step_seconds for r in steps[s].values())) for s in ordered]
    facts.step_seconds = statistics.median(t for _, t in facts.step_time)
    ranks = sorted({rank for by_rank in steps.values() for rank in by_rank})
    facts.heat_ranks = ranks
    width = max(1, -(-len(ordered) // HEAT_COLUMNS))
    for rank in ranks:
        row: list[float | None] = []
        for start in range(0, len(ordered), width):
            ratios = []
            for s in ordered[start : start + width]:
                by_rank = steps[s]
                busy = {
                    r: rep.step_seconds - rep.comm_wait_seconds - rep.data_wait_seconds for r, rep in by_rank.items()
                }
                median = statistics.median(busy.values())
                if rank in busy and median > 0:
                    ratios.append(busy[rank] / median)
            row.append(statistics.fmean(ratios) if ratios else None)
        facts.heat.append(row)


def ettr(facts: RunFacts) -> tuple[float, float, float, float] | None:
    """(ETTR, wall seconds, seconds down, seconds of lost steps): the share of the run's time that made progress."""
    wall = facts.end - facts.start
    if wall <= 0:
        return None
    down = sum(f.restart.mttr_seconds or 0.0 for f in facts.faults if f.restart is not None)
    lost_steps = sum(f.restart.steps_lost or 0 for f in facts.faults if f.restart is not None)
    lost = lost_steps * (facts.step_seconds or 0.0)
    return max(0.0, (wall - down - lost) / wall), wall, down, lost


def _when(wall_time: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall_time))


def _restart_when(restart: RestartView) -> str:
    """When the job came back, and how: "in place" for a recovery in place (the others kept their processes)."""
    return f"in place, {_when(restart.wall_time)}" if restart.in_place else _when(restart.wall_time)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def write(facts: RunFacts, out: Path) -> Path:
    """The report page and its plots under ``out``; the page's path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Postmortem of run {facts.run_id or '(no run id)'}", ""]
    lines += [
        f"- nodes: {', '.join(facts.nodes)}",
        f"- recorded: {_when(facts.start)} to {_when(facts.end)} ({(facts.end - facts.start) / 60:.1f} min)",
    ]
    if facts.first_step is not None:
        lines.append(f"- steps: {facts.first_step:,} to {facts.last_step:,}, median step time "
                     f"{1000 * (facts.step_seconds or 0):.0f} ms")  # fmt: skip
    for warning in facts.warnings:
        lines.append(f"- warning: {warning}")
    lines += ["", "## Incident timeline", ""]
    if not facts.faults:
        lines.append("No crash or hang was recorded.")
    else:
        lines += [
            "| # | fault | time | node | rank | after step | detected in | cause | stacks | restart | MTTR "
            "| steps lost |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n, fault in enumerate(facts.faults, 1):
            restart = fault.restart
            cause = fault.cause.replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {n} | {fault.kind} | {_when(fault.wall_time)} | {fault.node} | "
                f"{'-' if fault.rank is None else fault.rank} | {'-' if fault.step is None else fault.step} | "
                f"{_seconds(fault.detect_seconds)} | {cause} | {facts.stacks.get(n - 1, '-')} | "
                f"{_restart_when(restart) if restart else 'none'} | "
                f"{_seconds(restart.mttr_seconds) if restart else '-'} | "
                f"{'-' if restart is None or restart.steps_lost is None else restart.steps_lost} |"
            )
    if facts.recoveries:
        lines += ["", "### Recoveries in place", ""]
        lines += [
            "| time | replaced ranks | generation | went on from step | state from rank | re-form | state transfer "
            "| replacement ready | total | steps redone |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in facts.recoveries:
            lines.append(
                f"| {_when(r.wall_time)} | {', '.join(str(rank) for rank in r.replaced_ranks) or '-'} | "
                f"{r.generation} | {r.step} | {r.donor_rank} | {fmt.seconds(r.reform_seconds)} | "
                f"{fmt.size(r.state_bytes)} in {fmt.seconds(r.transfer_seconds)} | "
                f"{fmt.seconds(r.replacement_ready_seconds)} | {fmt.seconds(r.total_seconds)} | {r.steps_redone} |"
            )
    lines += ["", "## Stragglers", ""]
    if not facts.stragglers:
        lines.append("No straggler was flagged.")
    else:
        lines += [
            "| rank | node | cause | ratio | cost per step | since step | flagged at step | cost |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for event in facts.stragglers:
            d = event.straggler
            end = d.cleared_step if d.HasField("cleared_step") else (facts.last_step or d.flagged_step)
            cost = d.cost_seconds * max(0, end - d.flagged_step)
            flagged = max(0, end - d.flagged_step)
            lines.append(
                f"| {event.rank} | {event.node} | {d.cause} | {d.ratio:.2f}x | {1000 * d.cost_seconds:.0f} ms | "
                f"{d.since_step} | {d.flagged_step} | {cost:.1f} s over {flagged} steps |"
            )
    lines += ["", "## Effective training time", ""]
    figures = ettr(facts)
    if figures is None:
        lines.append("Too short a record to say.")
    else:
        ratio, wall, down, lost = figures
        lines.append(
            f"ETTR {100 * ratio:.1f}%: of {wall:.0f} s recorded, {down:.1f} s from faults to the first step after "
            f"them (MTTR) and {lost:.1f} s redoing lost steps (steps lost x median step time)."
        )
    if facts.step_ettr is not None:
        by_steps, useful, training = facts.step_ettr
        lines += [
            "",
            f"ETTR by the steps {100 * by_steps:.1f}%: {useful:.1f} s of steps the model kept (each step once) of "
            f"{training:.1f} s from the start of the first step to the end of the last (bench/faults.py's "
            "definition; what the dashboard's header shows).",
        ]
    lines += ["", "## Checkpoints", ""]
    if not facts.checkpoints:
        lines.append("No checkpoint was saved.")
    else:
        lines += ["| time | step | bytes | training blocked | total |", "|---|---|---|---|---|"]
        for event in facts.checkpoints:
            c = event.checkpoint
            lines.append(f"| {_when(event.wall_time)} | {c.step} | {c.bytes:,} | {c.block_seconds:.3f} s | "
                         f"{c.total_seconds:.2f} s |")  # fmt: skip
    lines += ["", "## Plots", ""]
    for name, title, series in (("loss", "loss (mean over ranks)", facts.loss),
                                ("step_time", "step time (slowest rank), seconds", facts.step_time)):  # fmt: skip
        canvas, ranges = png.line_chart([series])
        canvas.save(out / f"{name}.png")
        if ranges is not None:
            x0, x1, y0, y1 = ranges
            title += f": steps {x0:,.0f} to {x1:,.0f} (x), {y0:.4g} to {y1:.4g} (y)"
        lines += [f"![{name}]({name}.png)", "", title, ""]
    png.heat_map(facts.heat).save(out / "stragglers.png")
    lines += [
        "![stragglers](stragglers.png)",
        "",
        f"Straggler heat map: a row per rank ({', '.join(str(r) for r in facts.heat_ranks)}, top to bottom), a column "
        "per step bucket; each rank's compute time over the median rank's, green 1.0x to red 2.0x, grey no report.",
        "",
    ]
    page = out / "report.md"
    page.write_text("\n".join(lines))
    return page
