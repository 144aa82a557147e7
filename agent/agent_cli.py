"""``megascope agent``: serve this node's telemetry and supervise its training ranks.

The agent starts its gRPC server first (so ranks can attach the moment they start), prints
``megascope agent: listening on HOST:PORT`` as its first line, launches the node's ranks through torch
elastic (our trainer, or any script given after ``--``), samples host and GPUs once a second, and on
SIGTERM/SIGINT stops gracefully: health NOT_SERVING, ranks stopped (at a step boundary, with a STOP command,
where this node runs the whole job; else by signals), last batches flushed to watchers.
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "run a node's agent: launch and supervise its training ranks, serve their telemetry over gRPC"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megascope.engine.train_cli import add_arguments as add_train_arguments

    agent = parser.add_argument_group("agent")
    agent.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    agent.add_argument("--port", type=int, default=50051, help="port to serve on; 0 picks a free one (default: 50051)")
    agent.add_argument("--node", help="this node's name in the dashboard (default: the hostname)")
    agent.add_argument(
        "--token",
        default=os.environ.get("MEGASCOPE_TOKEN"),
        help="require this token for control RPCs (default: $MEGASCOPE_TOKEN; none: no check)",
    )
    agent.add_argument(
        "--history-seconds",
        type=float,
        default=3600.0,
        help="how much host/GPU history to keep for late dashboards (default: 3600)",
    )
    agent.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit when the ranks finish (default: keep serving until SIGTERM or Ctrl-C)",
    )
    agent.add_argument(
        "--hang-timeout",
        type=float,
        metavar="SECONDS",
        help="ranks that complete no step for this long are hung: stacks collected, culprit named, job restarted "
        "(default: the larger of 30 s and 5 median step times)",
    )
    agent.add_argument(
        "--evict-slow-nodes",
        action="store_true",
        help="leave the job when this node's self-check (at each start of the ranks) finds it far slower than the "
        "other nodes; the job goes on without it when --nnodes MIN:MAX allows",
    )
    agent.add_argument(
        "--no-launch",
        action="store_true",
        help="serve only; ranks started elsewhere attach via MEGASCOPE_AGENT_ADDRESS",
    )
    add_train_arguments(parser)
    parser.add_argument(
        "script",
        nargs=argparse.REMAINDER,
        help="after --: a training script and its arguments to launch instead of megascope's trainer",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import socket

    from megascope.agent.node import DEFAULT_RUN_DIR, Agent, AgentOptions
    from megascope.engine.config import ConfigError
    from megascope.engine.data import DataError
    from megascope.engine.runtime.launch import LaunchOptions, trainer_entry
    from megascope.engine.train_cli import build

    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    ckpt_dir: str | None = args.ckpt_dir  # a script's own flag; for our trainer, its config's (below)
    try:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {args.port}")
        if args.history_seconds <= 0:
            raise ConfigError(f"--history-seconds must be positive, got {args.history_seconds}")
        if args.hang_timeout is not None and not args.hang_timeout > 0:
            raise ConfigError(f"--hang-timeout must be a positive number of seconds, got {args.hang_timeout}")
        if script:
            options = LaunchOptions.from_args(args)
            entry, total_steps = script, 0
            run_dir = args.run_dir or DEFAULT_RUN_DIR
        else:
            config, options = build(args)
            entry, total_steps, run_dir = trainer_entry(config), config.steps, config.run_dir
            ckpt_dir = config.checkpoint.dir
    except (ConfigError, DataError) as error:
        print(f"megascope agent: error: {error}", file=sys.stderr)
        return 2

    agent_options = AgentOptions(
        host=args.host,
        port=args.port,
        node=args.node or socket.gethostname(),
        history_seconds=args.history_seconds,
        exit_when_done=args.exit_when_done,
        launch=None if args.no_launch else options,
        entry=entry,
        run_dir=run_dir,
        total_steps=total_steps,
        token=args.token,
        ckpt_dir=ckpt_dir,
        hang_timeout=args.hang_timeout,
        evict_slow_nodes=args.evict_slow_nodes,
    )
    try:
        return asyncio.run(Agent(agent_options).run())
    except OSError as error:
        print(f"megascope agent: error: {error}", file=sys.stderr)
        return 1
