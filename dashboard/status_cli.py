"""``megascope status``: one snapshot of the cluster for scripts, CI and terminals without a TTY.

It reads each agent's Watch back-fill (up to ``--timeout`` seconds) into the same cluster model the
dashboard draws, prints it as text or as one JSON object, and exits 0 if every agent answered, 1 if any
could not be reached (still printing what it has).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from megascope.agent import profile
from megascope.dashboard import transport as transports
from megascope.dashboard.dashboard_cli import (
    add_agents_argument,
    add_straggler_arguments,
    agents_or_error,
    client_transport,
    straggler_config,
)

if TYPE_CHECKING:  # the real imports happen inside the functions: `megascope --help` must stay fast
    from megascope.dashboard.model.cluster import ClusterModel

HELP = "Print one snapshot of the cluster (text, or --json for scripts); exit 1 if an agent is unreachable."


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_agents_argument(parser)
    profile.add_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="S",
        help="seconds to wait for each agent (default 5)",
    )
    add_straggler_arguments(parser)
    transports.add_arguments(
        parser, token_help="(reads need it on agents started with --token-reads; default: $MEGASCOPE_TOKEN)"
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from megascope.dashboard.connection import collect_all
    from megascope.dashboard.model.cluster import ClusterModel, ConnectionState

    agents = agents_or_error(args, "status")
    stragglers = straggler_config(args, "status")
    if agents is None or stragglers is None:
        return 2
    transport = client_transport(args, "status")
    if transport is None:
        return 2
    model = ClusterModel(agents, log_connections=False, stragglers=stragglers)
    asyncio.run(collect_all(model, agents, args.timeout, transport))
    snapshot = snapshot_dict(model)
    if args.json:
        print(json.dumps(snapshot, indent=2, allow_nan=False))
    else:
        print(render_text(model))
    unreachable = [a for a in model.agents.values() if a.state is not ConnectionState.CONNECTED]
    for agent in unreachable:
        print(f"megascope status: agent {agent.address} unreachable: {agent.error}", file=sys.stderr)
    return 1 if unreachable else 0


def _plain(value: Any) -> Any:
    """JSON-safe: enums by value, non-finite floats as null (strict JSON has no NaN), tuples as lists."""
    import enum
    import math

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def snapshot_dict(model: ClusterModel) -> dict[str, Any]:
    """``{"agents", "header", "ranks", "nodes", "stragglers", "events"}`` from a ClusterModel, JSON-ready.

    ``header.ettr`` is the run's effective training time ratio (0..1; null before a step with a time is in).

    ``stragglers`` holds every straggler flag raised in the history the agents sent (``active``: still standing);
    each rank's entry also carries its standing flag as ``straggler`` (null when none).
    """
    from dataclasses import asdict

    from megascope.dashboard.model.cluster import ConnectionState

    agents = [
        {"address": a.address, "connected": a.state is ConnectionState.CONNECTED, "error": a.error or None}
        for a in model.agents.values()
    ]
    nodes = []
    for row in model.node_rows():
        node = asdict(row)
        node["memory_percent"] = row.memory_percent
        node["gpu_memory_percent"] = row.gpu_memory_percent
        nodes.append(node)
    return _plain(
        {
            "agents": agents,
            "header": asdict(model.header()),
            "ranks": [asdict(r) for r in model.rank_rows()],
            "nodes": nodes,
            "stragglers": [{**asdict(flag), "active": flag.active} for flag in model.straggler_flags()],
            "events": [_event_dict(asdict(e)) for e in model.events(limit=50)],
        }
    )


def _event_dict(event: dict[str, Any]) -> dict[str, Any]:
    """An event row as JSON: its detail's fields under ``attributes``, the name the demo summary uses too (a
    recovery's breakdown is there already: its view for the screens is left out)."""
    event["attributes"] = event.pop("detail")
    event.pop("recovery")
    return event


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def render_text(model: ClusterModel) -> str:
    """The human snapshot: job header, ranks, nodes, the last events."""
    from megascope.dashboard import formatting as fmt

    h = model.header()
    step = fmt.number(h.step) + (f"/{h.total_steps:,}" if h.total_steps else "")
    mfu = fmt.percent(None if h.mfu is None else 100 * h.mfu, 1)
    parts = [
        f"step {step}",
        f"tok/s {fmt.number(h.tokens_per_second)}",
        f"MFU {mfu}",
        f"loss {fmt.loss(h.loss)}",
        f"ETA {fmt.duration(h.eta_seconds)}",
        f"up {fmt.duration(h.uptime_seconds)}",
        f"agents {h.connected_agents}/{h.total_agents}",
    ]
    if h.restarts:
        parts.append(f"restarts {h.restarts}")
    if h.ettr is not None:
        parts.append(f"ETTR {fmt.percent(100 * h.ettr, 1)}")
    out = ["megascope status: " + " | ".join(parts), ""]
    rank_rows = [
        [
            str(r.rank),
            r.node,
            r.status.value,
            fmt.number(r.step),
            fmt.number(r.step_ms),
            fmt.percent(r.data_wait_percent, 1),
            fmt.percent(r.comm_wait_percent, 1),
            fmt.loss(r.loss),
            fmt.number(r.tokens_per_second),
            f"SLOW {r.straggler.cause.value}" if r.straggler is not None else "-",
        ]
        for r in model.rank_rows()
    ]
    headers = ["rank", "node", "status", "step", "step_ms", "data", "comm", "loss", "tok/s", "straggler"]
    out.append(_table(headers, rank_rows) if rank_rows else "(no ranks reported)")
    out.append("")
    node_rows = []
    for n in model.node_rows():
        connection = n.connection.value  # the reason goes to stderr, one line per agent
        memory = "-"
        if n.memory_used_bytes is not None:
            memory = f"{fmt.size(n.memory_used_bytes)}/{fmt.size(n.memory_total_bytes)}"
        if n.gpu_count:
            gpu = f"{n.gpu_count}x {fmt.percent(n.gpu_utilization_percent)} {n.gpu_temperature_celsius:.0f}C"
        else:
            gpu = "no GPU" if n.gpu_available is False else "-"
        node_rows.append([n.node, n.agent, connection, fmt.percent(n.cpu_percent), memory, gpu])
    out.append(_table(["node", "agent", "connection", "cpu", "memory", "gpu"], node_rows))
    flags = model.straggler_flags(active_only=True)
    out.append("")
    out.append(f"stragglers: {len(flags)} (threshold {model.stragglers.config.threshold:g}x the median rank)")
    out.extend(f"  {flag.describe()}" for flag in flags)
    events = model.events(limit=10)
    if events:
        out.append("")
        for e in events:
            rank = "" if e.rank is None else f" rank {e.rank}"
            out.append(f"{fmt.clock(e.wall_time)} [{e.severity}] {e.node}{rank} {e.kind}: {e.text}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run ``status`` without the ``megascope`` dispatcher (``python -m megascope.dashboard.status_cli``)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="megascope status", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
