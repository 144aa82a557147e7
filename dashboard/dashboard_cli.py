"""``megascope dashboard``: the live terminal dashboard over one or more agents.

Imports here stay cheap (argparse only): Textual and gRPC load inside ``run`` so ``megascope --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from megascope.dashboard import transport as transports

if TYPE_CHECKING:
    from megascope.dashboard.transport import Transport

HELP = "Live terminal dashboard: connect to every node's agent and watch the cluster."


def parse_agents(text: str) -> list[str]:
    """``HOST:PORT[,HOST:PORT...]`` -> addresses, in order, without repeats. Raises ArgumentTypeError."""
    addresses: list[str] = []
    for part in text.split(","):
        address = part.strip()
        if not address:
            raise argparse.ArgumentTypeError(f"empty address in {text!r}; expected HOST:PORT[,HOST:PORT...]")
        host, sep, port = address.rpartition(":")
        if not sep or not host:
            raise argparse.ArgumentTypeError(f"{address!r} is not HOST:PORT (for example 127.0.0.1:50051)")
        if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
            raise argparse.ArgumentTypeError(f"{address!r}: write an IPv6 host in brackets, like [::1]:50051")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{address!r}: port must be a number from 1 to 65535")
        if address not in addresses:
            addresses.append(address)
    return addresses


def add_agents_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agents",
        type=parse_agents,
        action="extend",
        required=True,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the agents to connect to, comma-separated (the flag may also be repeated)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_agents_argument(parser)
    parser.add_argument("--readonly", action="store_true", help="watch only: never send a control command to an agent")
    parser.add_argument(
        "--theme", default=None, metavar="NAME", help="Textual theme, e.g. textual-light (default textual-dark)"
    )
    transports.add_arguments(parser)


def client_transport(args: argparse.Namespace, command: str) -> Transport | None:
    """The transport the client flags describe, its warnings printed; None (after printing why) when they cannot
    be used: the command then exits 2."""
    try:
        transport, warnings = transports.from_args(args)
    except transports.TransportError as error:
        print(f"megascope {command}: error: {error}", file=sys.stderr)
        return None
    for warning in warnings:
        print(f"megascope {command}: warning: {warning}", file=sys.stderr)
    return transport


def run_dashboard(
    agents: list[str],
    readonly: bool = False,
    theme: str | None = None,
    token: str | None = None,
    transport: Transport = transports.PLAINTEXT,
) -> int:
    """Run the dashboard in this process until the user quits; returns the exit status."""
    from megascope.dashboard.app import DashboardApp

    app = DashboardApp(agents, readonly=readonly, theme=theme, token=token, transport=transport)
    app.run()
    return app.return_code or 0


def run(args: argparse.Namespace) -> int:
    if args.theme is not None:
        from textual.app import App

        themes = App().available_themes
        if args.theme not in themes:
            names = ", ".join(sorted(themes))
            print(f"megascope dashboard: error: --theme: unknown theme {args.theme!r}; one of {names}", file=sys.stderr)
            return 2
    transport = client_transport(args, "dashboard")
    if transport is None:
        return 2
    return run_dashboard(args.agents, readonly=args.readonly, theme=args.theme, transport=transport)


def main(argv: list[str] | None = None) -> int:
    """Run the command without the ``megascope`` dispatcher (``python -m megascope.dashboard.dashboard_cli``)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="megascope dashboard", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
