"""The demo without a TUI: one status line a second while it runs, then a summary (optionally JSON).

The summary's keys are a contract that scripts rely on: ``nodes``, ``ranks``, ``steps`` (the last step every
rank completed), ``first_loss``, ``last_loss``, ``tokens_per_s``, ``restarts`` (restarts of the job: one per
``restart`` event, which only the node with rank 0 reports, recoveries in place included), ``stragglers``
(every rank flagged as a straggler during the run, ascending), ``straggler_flags`` (each flag: ``rank``,
``node``, ``cause``, ``ratio``, ``cost_seconds``, ``since_step``, ``flagged_step``, ``cleared_step`` ...),
``faults`` (each crash or hang: ``kind``, ``rank`` (the rank that died, or the hang's culprit; null when none
was found), ``node``, ``step`` (the last step done before it), ``time``, ``detect_seconds``, ``cause``
(``SIGKILL``, ``exit code 1``, or the hang's reason), ``text``, and ``mttr_seconds``, ``steps_lost``,
``resumed_step`` of the restart that ended it, null until there is one, and ``in_place``: whether it recovered
in place), ``restart_details`` (each restart: ``cause``, ``mttr_seconds``, ``steps_lost``, ``resumed_step``,
``node``, ``time``, ``in_place``, ``recovery``: the breakdown of a recovery in place, null otherwise), ``ettr``
(the run's effective training time ratio, 0..1: see dashboard/model/ettr.py) and ``events`` (each ``{"kind",
"rank", "step", "time", "text", "node", "attributes"}``, where ``attributes`` holds the fields of the event's
typed detail, numbers as numbers; a flag is also an event of kind ``straggler``). Fields may be added; these
are never renamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from megascope.dashboard.connection import watch_agent
from megascope.dashboard.local_cluster import LocalCluster
from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.model.incidents import FaultView, RestartView

_STATUS_SECONDS = 1.0


def run_headless(cluster: LocalCluster, steps: int, as_json: bool) -> int:
    return asyncio.run(_run(cluster, steps, as_json))


async def _run(cluster: LocalCluster, steps: int, as_json: bool) -> int:
    model = ClusterModel(cluster.addresses)
    watchers = [
        asyncio.ensure_future(watch_agent(model, address, transport=cluster.transport)) for address in cluster.addresses
    ]
    out = sys.stderr if as_json else sys.stdout
    started = time.monotonic()
    first_loss: float | None = None
    try:
        while any(agent.poll() is None for agent in cluster.agents):
            await asyncio.sleep(_STATUS_SECONDS)
            cluster.remember_processes()
            header = model.header()
            if first_loss is None and header.step is not None:
                first_loss = model.loss_history()[0][1]
            print(_status_line(model, time.monotonic() - started), file=out, flush=True)
    finally:
        for watcher in watchers:
            watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*watchers, return_exceptions=True)

    codes = cluster.wait(timeout=5)
    summary = summarize(model, cluster, first_loss, codes)
    if as_json:
        print(json.dumps(summary))
    else:
        print(_summary_text(summary))
    return 0 if summary["ok"] and summary["steps"] == steps else 1


def _status_line(model: ClusterModel, elapsed: float) -> str:
    h = model.header()
    rows = model.rank_rows()
    running = sum(1 for r in rows if r.status.value == "RUNNING")
    parts = [
        f"[{elapsed:5.1f}s]",
        f"step {h.step if h.step is not None else '-'}/{h.total_steps or '?'}",
        f"loss {h.loss:.4f}" if h.loss is not None else "loss -",
        f"{h.tokens_per_second:,.0f} tok/s" if h.tokens_per_second else "- tok/s",
        f"ranks {running}/{len(rows)} running",
        f"agents {h.connected_agents}/{h.total_agents}",
    ]
    return " | ".join(parts)


def summarize(
    model: ClusterModel, cluster: LocalCluster, first_loss: float | None, codes: list[int | None]
) -> dict[str, Any]:
    header = model.header()
    rows = model.rank_rows()
    loss_at = dict(model.loss_history())
    flags = model.straggler_flags()
    return {
        "nodes": cluster.nodes,
        "ranks": len(rows),
        "steps": header.step or 0,
        "first_loss": first_loss,
        "last_loss": loss_at.get(header.step) if header.step is not None else None,
        "tokens_per_s": header.tokens_per_second,
        "restarts": header.restarts,
        "ettr": header.ettr,
        "stragglers": sorted({flag.rank for flag in flags}),
        "straggler_flags": [{**asdict(flag), "cause": flag.cause.value} for flag in flags],
        "faults": [_fault_dict(fault) for fault in model.faults()],
        "restart_details": [_restart_dict(restart) for restart in model.restarts()],
        "events": [
            {
                "kind": e.kind,
                "rank": e.rank,
                "step": e.step,
                "time": e.wall_time,
                "text": e.text,
                "node": e.node,
                "attributes": e.detail,  # named before events had typed details: the contract keeps the name
            }
            for e in model.events()
        ],
        "agent_exit_codes": codes,
        "ok": all(code == 0 for code in codes),
        "run_dir": str(cluster.run_dir),
    }


def _restart_dict(restart: RestartView) -> dict[str, Any]:
    details = asdict(restart)
    details["time"] = details.pop("wall_time")
    return details


def _fault_dict(fault: FaultView) -> dict[str, Any]:
    """A fault, flat: the restart that ended it as its ``mttr_seconds``, ``steps_lost`` and ``resumed_step``."""
    details = {k: v for k, v in asdict(fault).items() if k != "restart"}
    details["time"] = details.pop("wall_time")
    restart = fault.restart
    details["mttr_seconds"] = restart.mttr_seconds if restart is not None else None
    details["steps_lost"] = restart.steps_lost if restart is not None else None
    details["resumed_step"] = restart.resumed_step if restart is not None else None
    details["in_place"] = restart.in_place if restart is not None else None
    return details


def _summary_text(s: dict[str, Any]) -> str:
    loss = (
        f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
        if s["first_loss"] is not None and s["last_loss"] is not None
        else "no loss reported"
    )
    rate = f"{s['tokens_per_s']:,.0f} tokens/s" if s["tokens_per_s"] else "- tokens/s"
    return (
        f"megascope demo: {'done' if s['ok'] else 'FAILED'}: {s['steps']} steps on {s['ranks']} ranks "
        f"({s['nodes']} nodes), {loss}, {rate}, {s['restarts']} restarts; logs in {s['run_dir']}"
    )
