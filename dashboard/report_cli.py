"""``megascope report``: a recorded run's postmortem as a Markdown page with PNG plots (dashboard/report.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "Write a postmortem of a recorded run: incident timeline, stragglers, ETTR, checkpoints, plots (Markdown + PNG)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the run directories of the agents")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write it (default FIRST_RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    from megascope.dashboard.replay import ReplayError
    from megascope.dashboard.report import gather, write

    try:
        facts = gather(args.run_dirs)
    except ReplayError as error:
        print(f"megascope report: error: {error}", file=sys.stderr)
        return 2
    for warning in facts.warnings:
        print(f"megascope report: warning: {warning}", file=sys.stderr)
    page = write(facts, Path(args.out) if args.out else Path(args.run_dirs[0]) / "report")
    print(f"megascope report: {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="megascope report", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
