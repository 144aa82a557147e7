"""``megascope demo``: a whole local cluster in one command, and the dashboard on it.

Starts ``--nodes`` agents on 127.0.0.1 (free ports), each launching ``--ranks-per-node`` training ranks of
the tiny model; all ranks meet in one c10d rendezvous, as the nodes of a real job would. Then either opens
the dashboard on every agent or, with ``--headless``, prints one status line a second and a final summary
(``--json``: the last stdout line is one JSON object; scripts rely on its keys).

The agents require a token the demo generates for them (handed over in their environment, never on a command
line); its own dashboard or headless client sends it.

Everything the demo starts is stopped when it ends, on ``q``, Ctrl-C and SIGTERM: each agent is asked to stop
(it stops its ranks), and any process of the demo's tree still alive after the grace period is killed.
The dashboard side never imports torch: the agents are separate processes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

FaultCheck = Callable[[Sequence[str], int], str | None]
"""Why ``--inject`` values cannot run in a job of N ranks (None: they can); the dispatcher supplies it."""

HELP = "start a local cluster (agents + training ranks of the tiny model) and open the dashboard on it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=2, help="local agents, one per pretend node (default: 2)")
    parser.add_argument("--ranks-per-node", type=int, default=2, help="training ranks per node (default: 2)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    parser.add_argument(
        "--batch-tokens", type=int, default=1024, help="tokens per micro-batch per rank (default: 1024)"
    )
    parser.add_argument("--run-dir", help="config, telemetry and logs (default: runs/demo-TIMESTAMP)")
    parser.add_argument("--headless", action="store_true", help="no TUI: a status line a second, then a summary")
    parser.add_argument("--json", action="store_true", help="with --headless: end stdout with one JSON summary")
    parser.add_argument("--readonly", action="store_true", help="dashboard refuses control actions")
    parser.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="KIND:KEY=VALUE,...",
        help="inject a fault into the training ranks (passed to every agent); repeatable: slow:rank=R,factor=F, "
        "crash:rank=R,step=S[,how=kill|segv|exception|exit][,times=N], hang:rank=R,step=S[,how=sleep|stop]",
    )
    faults = parser.add_argument_group("fault tolerance")
    faults.add_argument(
        "--max-restarts", type=int, default=3, help="restarts of the job after a crash or hang (default: 3)"
    )
    faults.add_argument(
        "--hang-timeout",
        type=float,
        metavar="SECONDS",
        help="no step for this long is a hang (default: the larger of 30 s and 5 median step times)",
    )
    faults.add_argument(
        "--recovery",
        choices=["inplace", "restart"],
        help="after a crash or hang: replace the failed rank, keep the others (inplace; the default with --nodes 1), "
        "or restart every rank from the last checkpoint (restart; the only way across several nodes for now)",
    )
    faults.add_argument(
        "--ckpt-every", type=int, default=20, help="checkpoint every N steps, what a restart resumes from (default: 20)"
    )
    faults.add_argument(
        "--evict-slow-nodes",
        action="store_true",
        help="a node whose self-check is far below the others' leaves the job (with --min-nodes below --nodes)",
    )
    faults.add_argument(
        "--min-nodes",
        type=int,
        help="let the job go on with this many nodes when others are lost (elastic --nnodes MIN:MAX; default: all)",
    )


def run(args: argparse.Namespace) -> int:
    from megascope.dashboard.local_cluster import LocalCluster, LocalClusterError

    errors = [
        f"--{name.replace('_', '-')} must be at least 1, got {value}"
        for name, value in (("nodes", args.nodes), ("ranks_per_node", args.ranks_per_node), ("steps", args.steps))
        if value < 1
    ]
    if args.max_restarts < 0:
        errors.append(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if args.ckpt_every < 1:
        errors.append(f"--ckpt-every must be at least 1 (restarts resume from checkpoints), got {args.ckpt_every}")
    if args.min_nodes is not None and not 1 <= args.min_nodes <= args.nodes:
        errors.append(f"--min-nodes must be in 1..--nodes ({args.nodes}), got {args.min_nodes}")
    if args.recovery == "inplace" and args.nodes > 1:
        errors.append("--recovery inplace needs --nodes 1 (a job across nodes recovers by a restart for now)")
    if args.recovery == "inplace" and args.ranks_per_node < 2:
        errors.append("--recovery inplace needs --ranks-per-node 2 or more (the state comes from a surviving rank)")
    if args.json and not args.headless:
        errors.append("--json needs --headless (the TUI owns the terminal)")
    # The engine's fault grammar, handed over by the `megascope` dispatcher (the dashboard never imports the
    # engine); checked here so a bad --inject starts nothing and leaves no run directory behind.
    check_faults: FaultCheck | None = getattr(args, "check_faults", None)
    if args.inject and check_faults is not None and not errors:
        max_nodes = args.nodes  # with --min-nodes the job still starts with every node's ranks
        problem = check_faults(args.inject, max_nodes * args.ranks_per_node)
        if problem:
            errors.append(problem)
    if errors:
        print(f"megascope demo: error: {'; '.join(errors)}", file=sys.stderr)
        return 2

    cluster = LocalCluster(
        nodes=args.nodes,
        ranks_per_node=args.ranks_per_node,
        train_args=[
            "--preset",
            args.preset,
            "--steps",
            str(args.steps),
            "--batch-tokens",
            str(args.batch_tokens),
            "--val-every",
            "0",
            "--max-restarts",
            str(args.max_restarts),
            "--ckpt-every",
            str(args.ckpt_every),
            *(["--hang-timeout", str(args.hang_timeout)] if args.hang_timeout is not None else []),
            *(["--recovery", args.recovery] if args.recovery is not None else []),
            *(["--evict-slow-nodes"] if args.evict_slow_nodes else []),
            # Checked by the agents (the engine owns the fault grammar; the dashboard never imports the engine).
            *(part for spec in args.inject for part in ("--inject", spec)),
        ],
        run_dir=args.run_dir,
        exit_when_done=args.headless,
        min_nodes=args.min_nodes,
    )
    try:
        with cluster:
            print(
                f"megascope demo: {args.nodes} node(s) x {args.ranks_per_node} rank(s), logs in {cluster.run_dir}",
                file=sys.stderr if args.json else sys.stdout,
                flush=True,
            )  # stdout's last line is the JSON
            cluster.start()
            print(
                f"megascope demo: the agents' token is in {cluster.token_file} (megascope dashboard --token-file)",
                file=sys.stderr if args.json else sys.stdout,
                flush=True,
            )
            if args.headless:
                from megascope.dashboard.headless import run_headless

                return run_headless(cluster, args.steps, as_json=args.json)
            from megascope.dashboard.dashboard_cli import run_dashboard

            return run_dashboard(cluster.addresses, readonly=args.readonly, transport=cluster.transport)
    except LocalClusterError as error:
        print(f"megascope demo: error: {error}", file=sys.stderr)
        return 2 if error.usage else 1
    except KeyboardInterrupt:
        print("megascope demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
