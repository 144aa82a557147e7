"""``megascope config``: the profile (the TOML config file) the other commands read.

``megascope config show`` prints every setting as the commands see it before their flags: the file's value or the
default, each with where it came from. ``megascope config path`` prints the file that would be read. No token is
ever printed: the file cannot hold one, and ``$MEGASCOPE_TOKEN`` is only said to be set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from megascope.agent import profile

HELP = "show the profile (TOML config file) the commands read: every setting, its value and where it came from"
TOKEN_ENV = "MEGASCOPE_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print the merged settings and the origin of each")
    profile.add_argument(show)
    show.add_argument(
        "--json", action="store_true", help="one JSON object: {file, environment, section: {key: {value, origin}}}"
    )
    path = actions.add_parser("path", help="print the config file that would be read (whether or not it exists)")
    profile.add_argument(path)


def run(args: argparse.Namespace) -> int:
    if args.action == "path":
        print("none (--no-config)" if args.config == profile.NO_FILE else args.config or profile.default_path())
        return 0
    try:
        loaded = profile.load(args.config)
    except profile.ProfileError as error:
        print(f"megascope config: error: {error}", file=sys.stderr)
        return 2
    print(as_json(loaded) if args.json else as_toml(loaded))
    return 0


def as_json(loaded: profile.Profile) -> str:
    document: dict[str, Any] = {
        "file": None if loaded.path is None else str(loaded.path),
        # Whether the token's variable is set, never its value.
        "environment": {TOKEN_ENV: "set (not shown)" if os.environ.get(TOKEN_ENV) else None},
    }
    for section, values in loaded.values.items():
        document[section] = {
            key: {"value": value, "origin": loaded.origins[section][key]} for key, value in values.items()
        }
    return json.dumps(document, indent=2)


def as_toml(loaded: profile.Profile) -> str:
    """The settings as a config file would hold them (unset ones commented out), each line's origin after it."""
    if loaded.path is None:
        lines = [f"# no config file read (the default: {profile.default_path()}): every value is the default"]
    else:
        lines = [f"# config file: {loaded.path}"]
    if os.environ.get(TOKEN_ENV):
        lines.append(f"# ${TOKEN_ENV} is set (not shown): it wins over any token_file below")
    for section, values in loaded.values.items():
        lines += ["", f"[{section}]"]
        rows = [(_assignment(key, value), loaded.origins[section][key]) for key, value in values.items()]
        width = max(len(text) for text, _ in rows)
        lines += [f"{text.ljust(width)}  # {origin}" for text, origin in rows]
    return "\n".join(lines)


def _assignment(key: str, value: Any) -> str:
    if value is None:
        return f"# {key} = (not set)"
    # TOML's strings, booleans, numbers and arrays of strings are written as JSON writes them.
    return f"{key} = {json.dumps(value)}"
