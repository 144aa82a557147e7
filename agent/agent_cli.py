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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loaded inside run: `megascope --help` stays fast
    from megascope.agent.auth import ServerTLS

HELP = "run a node's agent: launch and supervise its training ranks, serve their telemetry over gRPC"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megascope.agent.profile import add_argument as add_config_argument
    from megascope.engine.train_cli import add_arguments as add_train_arguments

    add_config_argument(parser)
    agent = parser.add_argument_group("agent")
    agent.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    agent.add_argument("--port", type=int, default=50051, help="port to serve on; 0 picks a free one (default: 50051)")
    agent.add_argument("--node", help="this node's name in the dashboard (default: the hostname)")
    security = parser.add_argument_group("security (README: Security model)")
    security.add_argument(
        "--token-file",
        metavar="PATH",
        help="require the token in this file (one line; chmod 600) for control RPCs (default: $MEGASCOPE_TOKEN; "
        "neither: no check)",
    )
    security.add_argument(
        "--token",
        metavar="TOKEN",
        help="the token itself (deprecated: visible to every user in ps; use --token-file or $MEGASCOPE_TOKEN)",
    )
    security.add_argument(
        "--token-reads",
        action="store_true",
        help="require the token for reading calls too (Watch, GetSnapshot, GetEvents, ListCheckpoints, "
        "GetMergeStatus), not only for control",
    )
    security.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain)")
    security.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    security.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="mutual TLS: require every client to present a certificate signed by this CA",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="serve on a non-loopback --host with neither TLS nor a token (refused without this flag)",
    )
    ops = parser.add_argument_group("ops stack (README: Prometheus and alerts)")
    ops.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://--metrics-host:PORT/metrics; 0 picks a free one (default: off)",
    )
    ops.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the metrics page (default: 127.0.0.1); beyond this host it needs TLS (--tls-cert) or a "
        "token with --token-reads (sent as Authorization: Bearer), or --insecure",
    )
    ops.add_argument(
        "--alert-webhook",
        action="append",
        default=[],
        metavar="URL",
        help="POST a JSON alert (Slack-compatible) to URL on a crash, hang, restart, job failure, failed checkpoint "
        "or eviction; repeatable; check one with `megascope alert test URL`",
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
        help="serve only; ranks started elsewhere attach with MEGASCOPE_AGENT_ADDRESS and MEGASCOPE_AGENT_SECRET, "
        "which the agent writes to RUN_DIR/agent-NODE.worker (mode 600)",
    )
    agent.add_argument(
        "--no-python",
        action="store_true",
        help="run the command after -- as given on each rank (as torchrun --no-python), not as a Python script: "
        "-- bash wrapper.sh, -- accelerate launch train.py; stacks come from the Python process under it",
    )
    add_train_arguments(parser)
    parser.add_argument(
        "script",
        nargs=argparse.REMAINDER,
        help="after --: a training script and its arguments to launch instead of megascope's trainer (with this "
        "interpreter: a leading python, python3 or interpreter path is dropped; -- python train.py runs train.py); "
        "every rank is supervised without changing the script (crash, restart, hang, stacks); step telemetry needs "
        "megascope.step() in it",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import socket

    from megascope.agent.auth import AuthError

    try:  # first, before torch loads: a refusal to serve is immediate and writes nothing
        token, tls = _security(args)
    except AuthError as error:
        print(f"megascope agent: error: {error}", file=sys.stderr)
        return 2

    from megascope.agent.alerts import check_webhook
    from megascope.agent.node import DEFAULT_RUN_DIR, Agent, AgentOptions
    from megascope.engine.config import ConfigError
    from megascope.engine.data import DataError
    from megascope.engine.runtime.launch import LaunchOptions, script_entry, trainer_entry
    from megascope.engine.train_cli import build

    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    ckpt_dir: str | None = args.ckpt_dir  # a script's own flag; for our trainer, its config's (below)
    try:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {args.port}")
        if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port must be in 0..65535, got {args.metrics_port}")
        for url in args.alert_webhook:
            problem = check_webhook(url)
            if problem is not None:
                raise ConfigError(problem)
        if args.history_seconds <= 0:
            raise ConfigError(f"--history-seconds must be positive, got {args.history_seconds}")
        if args.hang_timeout is not None and not args.hang_timeout > 0:
            raise ConfigError(f"--hang-timeout must be a positive number of seconds, got {args.hang_timeout}")
        if args.no_python and not script:
            raise ConfigError("--no-python needs a command after --, e.g. -- bash wrapper.sh")
        if script:
            options = LaunchOptions.from_args(args)
            entry, total_steps = script_entry(script, args.no_python), 0
            if not entry:
                raise ConfigError("after --: give the training script to run, e.g. -- train.py")
            if options.recovery == "inplace":
                raise ConfigError(
                    "--recovery inplace: only megascope's trainer recovers in place; a script after -- is restarted "
                    "with every rank on a fault (--recovery restart, the default for a script)"
                )
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
        token=token,
        token_reads=args.token_reads,
        tls=tls,
        ckpt_dir=ckpt_dir,
        hang_timeout=args.hang_timeout,
        evict_slow_nodes=args.evict_slow_nodes,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        alert_webhooks=tuple(args.alert_webhook),
    )
    try:
        return asyncio.run(Agent(agent_options).run())
    except AuthError as error:  # a TLS file that cannot be read
        print(f"megascope agent: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"megascope agent: error: {error}", file=sys.stderr)
        return 1


def _security(args: argparse.Namespace) -> tuple[str | None, ServerTLS | None]:
    """The token and TLS settings from the flags, warnings printed; raises AuthError (exit 2) for flags that
    cannot be used, and for a non-loopback --host with neither TLS nor a token without --insecure."""
    from megascope.agent.auth import TOKEN_ENV, AuthError, ServerTLS, choose_token, listen_refusal, listen_warnings

    token_file = args.token_file
    from_profile = token_file is None and args.token is None and not os.environ.get(TOKEN_ENV)
    if from_profile:  # the profile's [agent] token_file: --token-file, --token and $MEGASCOPE_TOKEN win over it
        token_file = getattr(args, "profile_token_file", None)
    try:
        choice = choose_token(args.token, token_file)
    except AuthError as error:
        raise AuthError(f"the profile's [agent] token_file: {error}" if from_profile else str(error)) from None
    # The ranks and a user's script inherit this process's environment: they need no token, so it stops here.
    os.environ.pop(TOKEN_ENV, None)
    tls = ServerTLS.from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    if tls is not None:
        tls.credentials()  # an unreadable or non-PEM file is a flag error now, not a failure to serve later
    if args.token_reads and choice.token is None:
        raise AuthError("--token-reads needs a token (--token-file or $MEGASCOPE_TOKEN)")
    refused = listen_refusal(args.host, tls is not None, choice.token is not None, args.insecure)
    if refused is not None:
        raise AuthError(refused)
    if args.metrics_port is not None:
        # The page is read-only, so it asks for the token exactly when reads do.
        guarded = tls is not None or (choice.token is not None and args.token_reads)
        if listen_refusal(args.metrics_host, guarded, False, args.insecure) is not None:
            raise AuthError(
                f"refusing to serve metrics on {args.metrics_host or '*'} (reachable from other hosts) unprotected: "
                "give --tls-cert/--tls-key, or a token (--token-file) with --token-reads (Prometheus sends it with "
                "`authorization: {credentials_file: ...}`), or --insecure; or keep --metrics-host 127.0.0.1"
            )
    warnings = [*choice.warnings, *listen_warnings(args.host, tls is not None, choice.token is not None, args.insecure)]
    for warning in warnings:
        print(f"megascope agent: warning: {warning}", file=sys.stderr)
    return choice.token, tls
