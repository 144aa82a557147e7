"""``megascope alert test URL``: post one test alert to a webhook, to check it before an incident does."""

from __future__ import annotations

import argparse
import socket
import sys
import time

HELP = "send a test alert to a webhook (the JSON an agent's --alert-webhook posts)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    test = actions.add_parser("test", help=HELP, description=HELP)
    test.add_argument("url", metavar="URL", help="the webhook (Slack incoming webhook, or any HTTP endpoint)")
    test.add_argument("--node", help="the node named in the alert (default: the hostname)")


def run(args: argparse.Namespace) -> int:
    from megascope.agent.alerts import Alert, DeliveryError, check_webhook, post, redact

    problem = check_webhook(args.url)
    if problem is not None:
        print(f"megascope alert: error: {problem.replace('--alert-webhook', 'URL')}", file=sys.stderr)
        return 2
    node = args.node or socket.gethostname()
    alert = Alert(
        kind="test",
        node=node,
        text="test alert from `megascope alert test`: this webhook receives megascope's alerts",
        severity="info",
        wall_time=time.time(),
    )
    try:
        status = post(args.url, alert.payload())
    except DeliveryError as error:
        print(f"megascope alert: error: {error}", file=sys.stderr)
        return 1
    print(f"megascope alert: sent a test alert to {redact(args.url)} (HTTP {status})")
    return 0
