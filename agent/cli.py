"""The ``megascope`` command: one entry point whose subcommands live with the part they drive.

This module is the composition root, the one module allowed to import every part: it imports each command's
``*_cli`` module statically, so import-linter sees every edge (pyproject.toml lets exactly these through). A
``*_cli`` module imports argparse and little else at import time (torch, Textual and gRPC load inside ``run``),
so ``megascope --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from types import ModuleType

from megascope.agent import agent_cli
from megascope.dashboard import dashboard_cli, demo_cli, status_cli
from megascope.engine import train_cli
from megascope.engine.checkpoint import ckpt_cli, merge_cli

# name -> module defining ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
_COMMANDS: dict[str, ModuleType] = {
    "demo": demo_cli,
    "train": train_cli,
    "ckpt": ckpt_cli,
    "merge": merge_cli,
    "agent": agent_cli,
    "dashboard": dashboard_cli,
    "status": status_cli,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megascope",
        description="Monitor, diagnose and control large-model training from a terminal.",
    )
    parser.add_argument("--version", action="version", version=f"megascope {version('megascope')}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _COMMANDS.items():
        sub = subcommands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print(f"megascope {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`megascope ckpt inspect ... | head`): not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
