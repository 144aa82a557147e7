"""The ``megascope`` command: one entry point whose subcommands live with the part they drive.

This module is the composition root. It names each subcommand's module as a string and imports only the one
that runs, so ``megascope --help`` stays fast (no torch import) and the parts keep their import boundaries:
each command module depends on its own part alone.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import version

# name -> module defining ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
_COMMANDS: dict[str, str] = {
    "demo": "megascope.dashboard.demo_cli",
    "train": "megascope.engine.train_cli",
    "ckpt": "megascope.engine.checkpoint.ckpt_cli",
    "merge": "megascope.engine.checkpoint.merge_cli",
    "agent": "megascope.agent.agent_cli",
    "dashboard": "megascope.dashboard.dashboard_cli",
    "status": "megascope.dashboard.status_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megascope",
        description="Monitor, diagnose and control large-model training from a terminal.",
    )
    parser.add_argument("--version", action="version", version=f"megascope {version('megascope')}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in _COMMANDS.items():
        module = importlib.import_module(module_name)
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
