"""``megascope replay``: the dashboard on recorded runs (every node's record merged), with a time cursor.

Imports here stay cheap (argparse only): Textual loads inside ``run`` so ``megascope --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys

HELP = "Replay recorded runs in the dashboard: every node's record merged, with a time cursor (read-only)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="the run directories of the agents (their --run-dir)"
    )
    parser.add_argument(
        "--at",
        default=None,
        metavar="WHERE",
        help="start the cursor here: HH:MM[:SS], +SECONDS from the start, 'step N', or an incident kind such as "
        "'hang' or 'crash' (its first); default: the start of the record",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="print the cluster as it was at --at (the text of `megascope status`) and exit, without the TUI",
    )
    parser.add_argument(
        "--theme", default=None, metavar="NAME", help="Textual theme, e.g. textual-light (default textual-dark)"
    )


def run(args: argparse.Namespace) -> int:
    from megascope.dashboard.replay import Replay, ReplayError, resolve_at

    try:
        replay = Replay.open(args.run_dirs)
    except ReplayError as error:
        print(f"megascope replay: error: {error}", file=sys.stderr)
        return 2
    for warning in replay.warnings:
        print(f"megascope replay: warning: {warning}", file=sys.stderr)
    if args.at is not None:
        target = resolve_at(replay, args.at)
        if isinstance(target, str):
            print(f"megascope replay: error: --at: {target}", file=sys.stderr)
            return 2
        replay.seek(target)
    if args.once:
        from megascope.dashboard.status_cli import render_text

        print(render_text(replay.model))
        return 0
    from megascope.dashboard.app import DashboardApp

    app = DashboardApp(replay=replay, theme=args.theme)
    app.run()
    replay.close()
    return app.return_code or 0


def main(argv: list[str] | None = None) -> int:
    """Run the command without the ``megascope`` dispatcher."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="megascope replay", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
