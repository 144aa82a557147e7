"""A finished (or running) run summarised from the telemetry files its ranks wrote."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from megascope.engine.runtime.run_dir import telemetry_files


def read_step_reports(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Step reports by step number (one per rank that reported it), from ``<run_dir>/telemetry/rank*.jsonl``.

    The records are step reports as :func:`megascope.protos.records.message_record` writes them; the
    fields read here kept their names through the move to the proto, so files of older runs read the same.
    """
    by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for path in telemetry_files(run_dir):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if record.get("type") == "step":
                by_step[record["step"]].append(record)
    return dict(by_step)


def summarize(run_dir: Path) -> dict[str, Any]:
    """Steps every rank completed, first/last loss (mean over ranks), job tokens/s (median over steps).

    ``steps`` is the last step completed and ``first_step`` the first: a run that resumed from a checkpoint
    starts past step 1, so the steps it trained are ``first_step..steps``.
    """
    by_step = read_step_reports(run_dir)
    if not by_step:
        return {"steps": 0}
    world = max(r["world_size"] for reports in by_step.values() for r in reports)
    complete = sorted(step for step, reports in by_step.items() if len({r["rank"] for r in reports}) == world)
    if not complete:
        return {"steps": 0}

    def mean_loss(step: int) -> float:
        return statistics.mean(r["loss"] for r in by_step[step])

    # A synchronous job moves at its slowest rank: all ranks' tokens over the longest step time.
    throughput = [sum(r["tokens"] for r in by_step[s]) / max(r["step_seconds"] for r in by_step[s]) for s in complete]
    steady = throughput[1:] or throughput  # step 1 pays for warm-up
    val = [(s, r["val_loss"]) for s in complete for r in by_step[s][:1] if r.get("val_loss") is not None]
    return {
        "steps": complete[-1],
        "first_step": complete[0],
        "ranks": world,
        "first_loss": mean_loss(complete[0]),
        "last_loss": mean_loss(complete[-1]),
        "tokens_per_s": statistics.median(steady),
        "last_val_loss": val[-1][1] if val else None,
    }
