"""The ``megascope`` command: one entry point whose subcommands live with the part they drive.

This module is the composition root, the one module allowed to import every part: it imports each command's
``*_cli`` module statically, so import-linter sees every edge (pyproject.toml lets exactly these through). A
``*_cli`` module imports argparse and little else at import time (torch, Textual and gRPC load inside ``run``),
so ``megascope --help`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import re
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from types import ModuleType
from typing import Any, NoReturn

from megascope.agent import agent_cli, alert_cli, config_cli, profile
from megascope.dashboard import dashboard_cli, demo_cli, export_cli, replay_cli, report_cli, status_cli
from megascope.engine import train_cli
from megascope.engine.checkpoint import ckpt_cli, merge_cli
from megascope.engine.runtime.faults import FaultError, check_ranks, parse_fault

# name -> module defining ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
_COMMANDS: dict[str, ModuleType] = {
    "demo": demo_cli,
    "train": train_cli,
    "ckpt": ckpt_cli,
    "merge": merge_cli,
    "agent": agent_cli,
    "dashboard": dashboard_cli,
    "status": status_cli,
    "replay": replay_cli,
    "export": export_cli,
    "report": report_cli,
    "alert": alert_cli,
    "config": config_cli,
}

NODE_COMMANDS = frozenset({"agent", "train", "demo", "ckpt", "merge"})
"""Commands that need the ``[node]`` extra; the rest (dashboard, status, config, ...) run on a laptop without it."""
NODE_MODULES = ("torch", "safetensors", "psutil", "pynvml", "grpc_reflection")
"""What the ``[node]`` extra installs that those commands import (Triton only where it has wheels: not checked)."""
NODE_EXTRA = "pip install 'megascope[node]'"


class CommandParser(argparse.ArgumentParser):
    """argparse as every ``megascope`` command uses it: a flag is spelled out in full (no prefix matching, so
    ``--ckpt`` never silently means ``--ckpt-dir``), and an unknown flag is reported by the (sub)command it was
    given to, with that command's usage and the closest flag it has ("did you mean --ckpt-keep?").

    Subcommand parsers are made with the class of their parent (argparse's default), so every level is one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            # The innermost command reports it: argparse would hand the leftovers up to `megascope`, whose usage
            # says nothing about the flags of the command that was mistyped.
            self.error(unrecognized(self, extras))
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        choice = _INVALID_CHOICE.search(message)
        if choice:  # a mistyped command or choice: argparse lists them all; name the nearest
            given, options = choice.group(1), [o.strip(" '") for o in choice.group(2).split(",")]
            close = difflib.get_close_matches(given, options, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from ([^)]*)\)")


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's "unrecognized arguments" message, with the nearest flag of ``parser`` for each unknown one."""
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], flags, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else "")


def build_parser(defaults: Mapping[str, Mapping[str, Any]] | None = None) -> argparse.ArgumentParser:
    """The ``megascope`` parser; ``defaults``: command -> {flag destination: value} from the profile."""
    parser = CommandParser(
        prog="megascope",
        description="Monitor, diagnose and control large-model training from a terminal.",
    )
    parser.add_argument("--version", action="version", version=f"megascope {version('megascope')}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in _COMMANDS.items():
        sub = subcommands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
        sub.set_defaults(**(defaults or {}).get(name, {}))
    # The demo may not import the engine (import contracts), so the composition root hands it the engine's
    # fault grammar: a bad --inject is refused before any agent starts or any run directory is made.
    subcommands.choices["demo"].set_defaults(check_faults=check_fault_specs)
    return parser


def check_fault_specs(specs: Sequence[str], world_size: int) -> str | None:
    """Why these ``--inject`` values cannot run in a job of ``world_size`` ranks, or None when they can."""
    try:
        check_ranks([parse_fault(spec) for spec in specs], world_size)
    except FaultError as error:
        return f"--inject: {error}"
    return None


def with_profile(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed again with the profile's values as the flags' defaults, for the commands that read it (a flag
    on the command line wins). Raises ProfileError."""
    if args.command not in profile.SECTIONS_OF:
        return args
    defaults = profile.load(args.config).defaults_for(args.command)
    return build_parser({args.command: defaults}).parse_args(argv) if defaults else args


def missing_node_modules() -> list[str]:
    """The modules of the ``[node]`` extra that are not installed (found without importing them)."""
    return [name for name in NODE_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command in NODE_COMMANDS and (missing := missing_node_modules()):
        print(
            f"megascope {args.command}: needs the node extra, which is not installed here (no {', '.join(missing)}): "
            f"{NODE_EXTRA}",
            file=sys.stderr,
        )
        return 2
    try:
        args = with_profile(args, argv)
    except profile.ProfileError as error:
        print(f"megascope {args.command}: error: {error}", file=sys.stderr)
        return 2
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
