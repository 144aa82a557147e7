"""``megascope dashboard``: the live terminal dashboard over one or more agents.

Imports here stay cheap (argparse only): Textual and gRPC load inside ``run`` so ``megascope --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from megascope.agent import profile
from megascope.dashboard import transport as transports

if TYPE_CHECKING:
    from megascope.dashboard.model.stragglers import StragglerConfig
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


class _Agents(argparse.Action):
    """``--agents``: repeated flags add up, and the first one replaces the profile's list (argparse's ``extend``
    would add to it)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: Any = None
    ) -> None:
        given = getattr(namespace, "agents_on_argv", False)
        addresses: list[str] = list(getattr(namespace, self.dest) or []) if given else []
        addresses += [address for address in values if address not in addresses]
        setattr(namespace, self.dest, addresses)
        namespace.agents_on_argv = True


def add_agents_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agents",
        type=parse_agents,
        action=_Agents,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="the agents to connect to, comma-separated (the flag may also be repeated; default: agents in the "
        "profile's [client])",
    )


def add_straggler_arguments(parser: argparse.ArgumentParser) -> None:
    """The straggler rule's tunables (the profile's ``[dashboard]`` too); the rule's own defaults otherwise."""
    parser.add_argument(
        "--straggler-threshold",
        type=float,
        metavar="X",
        help="a rank is slow when busy at least X times the median rank (more than 1; default 1.05)",
    )
    parser.add_argument(
        "--straggler-window", type=int, metavar="STEPS", help="steps a slowdown must last to be flagged (default 6)"
    )


def agents_or_error(args: argparse.Namespace, command: str) -> list[str] | None:
    """The agents to reach, or None after printing why there are none (the command then exits 2)."""
    if args.agents:
        return list(args.agents)
    where = args.config or profile.default_path()
    print(
        f"megascope {command}: error: no agents: give --agents HOST:PORT[,HOST:PORT...] or set agents = "
        f'["HOST:PORT", ...] under [client] in {where}',
        file=sys.stderr,
    )
    return None


def straggler_config(args: argparse.Namespace, command: str) -> StragglerConfig | None:
    """The straggler rule's settings from the flags (and profile), or None after printing why they cannot be used."""
    from dataclasses import replace

    from megascope.dashboard.model.stragglers import DEFAULT_CONFIG

    changes = {
        name: value
        for name, value in (("threshold", args.straggler_threshold), ("window", args.straggler_window))
        if value is not None
    }
    try:
        return replace(DEFAULT_CONFIG, **changes)
    except ValueError as error:
        print(f"megascope {command}: error: --straggler-threshold/--straggler-window: {error}", file=sys.stderr)
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_agents_argument(parser)
    profile.add_argument(parser)
    parser.add_argument("--readonly", action="store_true", help="watch only: never send a control command to an agent")
    parser.add_argument(
        "--theme", default=None, metavar="NAME", help="Textual theme, e.g. textual-light (default textual-dark)"
    )
    add_straggler_arguments(parser)
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
    stragglers: StragglerConfig | None = None,
) -> int:
    """Run the dashboard in this process until the user quits; returns the exit status."""
    from megascope.dashboard.app import DashboardApp
    from megascope.dashboard.model.cluster import ClusterModel

    model = ClusterModel(stragglers=stragglers) if stragglers is not None else None
    app = DashboardApp(agents, readonly=readonly, theme=theme, token=token, transport=transport, model=model)
    app.run()
    return app.return_code or 0


def run(args: argparse.Namespace) -> int:
    agents = agents_or_error(args, "dashboard")
    stragglers = straggler_config(args, "dashboard")
    if agents is None or stragglers is None:
        return 2
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
    return run_dashboard(agents, readonly=args.readonly, theme=args.theme, transport=transport, stragglers=stragglers)


def main(argv: list[str] | None = None) -> int:
    """Run the command without the ``megascope`` dispatcher (``python -m megascope.dashboard.dashboard_cli``)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="megascope dashboard", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
