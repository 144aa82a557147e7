"""Profiles: the TOML file that holds what a user would otherwise type on every command.

``~/.config/megascope/config.toml`` (``$XDG_CONFIG_HOME/megascope/config.toml`` when that is set), or the file
``--config PATH`` names::

    [client]                      # megascope dashboard and status: how to reach the agents
    agents = ["node0:50051", "node1:50051"]
    token_file = "~/.config/megascope/token"
    tls_ca = "ca.pem"             # relative paths are relative to this file's folder

    [dashboard]                   # the dashboard (and status, for the thresholds)
    theme = "textual-light"
    straggler_threshold = 1.1

    [agent]                       # megascope agent
    host = "10.0.0.5"
    tls_cert = "agent.pem"
    tls_key = "agent.key"
    hang_timeout = 120.0

A value in the file becomes the default of its flag, so a flag given on the command line wins. An unknown section
or key, or a value of the wrong type, is an error that names the file, the key and what is expected. There is no
key for a token itself: a config file is read by tools, backed up and shared; the token lives in a file of its own
(``token_file``, mode 600) or in ``$MEGASCOPE_TOKEN``.

Pure standard library (tomllib, or tomli on Python 3.10): the agent, the dashboard and ``megascope config`` import
it, and a laptop without torch runs it.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_CONFIG_HOME = "XDG_CONFIG_HOME"
FILE_NAME = Path("megascope") / "config.toml"
DEFAULT = "default"
"""The origin of a value no file set."""
NO_FILE = ""
"""``--no-config``: the ``path`` for :func:`load` that reads no file at all."""


class ProfileError(ValueError):
    """The config file cannot be used; the message names the file, the key and what is expected."""


@dataclass(frozen=True)
class Key:
    """One setting: its TOML type, its default (that of the flag it feeds) and what it means."""

    kind: str
    """``str``, ``path``, ``bool``, ``int``, ``port``, ``seconds``, ``ratio`` (a number > 1), ``addresses``."""
    default: Any
    help: str
    dest: str | None = None
    """The argparse destination it feeds, when not the key itself."""


SCHEMA: dict[str, dict[str, Key]] = {
    "client": {
        "agents": Key("addresses", None, "HOST:PORT of every agent (--agents)"),
        # Its own destination: --token or $MEGASCOPE_TOKEN (given for this run) win over the file's token_file.
        "token_file": Key(
            "path", None, "a file holding the token sent with every call (--token-file)", dest="profile_token_file"
        ),
        "tls": Key("bool", False, "connect with TLS (--tls)"),
        "tls_ca": Key("path", None, "CA that signed the agents' certificates (--tls-ca)"),
        "tls_cert": Key("path", None, "client certificate, for agents that require one (--tls-cert)"),
        "tls_key": Key("path", None, "the key of tls_cert (--tls-key)"),
        "tls_server_name": Key("str", None, "the name in the agents' certificates, e.g. behind a tunnel"),
    },
    "dashboard": {
        "theme": Key("str", None, "Textual theme, e.g. textual-light (--theme)"),
        "readonly": Key("bool", False, "never send a control command (--readonly)"),
        "straggler_threshold": Key("ratio", 1.05, "slow when busy this many times the median rank"),
        "straggler_window": Key("int", 6, "steps a slowdown must last to be flagged"),
    },
    "agent": {
        "host": Key("str", "127.0.0.1", "address to serve on (--host)"),
        "port": Key("port", 50051, "port to serve on (--port)"),
        "node": Key("str", None, "this node's name (--node; default: the hostname)"),
        "token_file": Key("path", None, "require the token in this file (--token-file)", dest="profile_token_file"),
        "token_reads": Key("bool", False, "require the token for reads too (--token-reads)"),
        "tls_cert": Key("path", None, "serve TLS with this certificate (--tls-cert)"),
        "tls_key": Key("path", None, "the key of tls_cert (--tls-key)"),
        "tls_ca": Key("path", None, "require client certificates signed by this CA (--tls-ca)"),
        "hang_timeout": Key("seconds", None, "seconds without a step before ranks are hung (--hang-timeout)"),
        "history_seconds": Key("seconds", 3600.0, "host/GPU history kept for late dashboards (--history-seconds)"),
    },
}
"""Every section and key a config file may hold."""

SECTIONS_OF: dict[str, tuple[str, ...]] = {
    "agent": ("agent",),
    "dashboard": ("client", "dashboard"),
    "status": ("client", "dashboard"),
}
"""The sections whose values become a command's flag defaults (status ignores theme and readonly: no such flags)."""

_EXPECTED = {
    "str": "a string",
    "path": "a path (a string)",
    "bool": "true or false",
    "int": "a whole number of at least 1",
    "port": "a port number from 0 to 65535",
    "seconds": "a positive number of seconds",
    "ratio": "a number more than 1",
    "addresses": 'a list of "HOST:PORT" strings, e.g. ["node0:50051"]',
}


@dataclass(frozen=True)
class Profile:
    """The merged settings: every key of :data:`SCHEMA`, from the file or its default, and where each came from."""

    path: Path | None
    """The file read; None when there is none."""
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    origins: dict[str, dict[str, str]] = field(default_factory=dict)
    """``section -> key -> file path or "default"``."""

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def from_file(self, section: str) -> dict[str, Any]:
        """The keys of ``section`` the file set, with their values."""
        return {k: v for k, v in self.values[section].items() if self.origins[section][k] != DEFAULT}

    def defaults_for(self, command: str) -> dict[str, Any]:
        """``{argparse dest: value}`` of what the file set for ``command``'s flags (empty for other commands)."""
        defaults: dict[str, Any] = {}
        for section in SECTIONS_OF.get(command, ()):
            for key, value in self.from_file(section).items():
                defaults[SCHEMA[section][key].dest or key] = value
        return defaults


def default_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/megascope/config.toml``, else ``~/.config/megascope/config.toml``."""
    env = os.environ if environ is None else environ
    home = env.get(ENV_CONFIG_HOME) or ""
    # The XDG spec: a relative $XDG_CONFIG_HOME is invalid and ignored.
    base = Path(home) if home and Path(home).is_absolute() else Path.home() / ".config"
    return base / FILE_NAME


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Profile:
    """The profile from ``path`` (``--config``: it must exist), else from :func:`default_path` when that file exists,
    else the defaults; :data:`NO_FILE` (``--no-config``): the defaults. Raises ProfileError."""
    if path == NO_FILE:
        return _merge(None, {})
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ProfileError(f"--config: {file} does not exist or is not a file")
    else:
        file = default_path(environ)
        if not file.is_file():
            return _merge(None, {})
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ProfileError(f"{file}: cannot read it: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"{file}: not valid TOML: {error}") from None
    return _merge(file, data)


def _merge(file: Path | None, data: dict[str, Any]) -> Profile:
    values = {s: {k: key.default for k, key in keys.items()} for s, keys in SCHEMA.items()}
    origins = {s: dict.fromkeys(keys, DEFAULT) for s, keys in SCHEMA.items()}
    for section, table in data.items():
        if section not in SCHEMA:
            raise ProfileError(f"{file}: unknown section [{section}]{_nearest(section, SCHEMA)}; "
                               f"the sections are {', '.join(f'[{s}]' for s in SCHEMA)}")  # fmt: skip
        if not isinstance(table, dict):
            raise ProfileError(f"{file}: {section} must be a table ([{section}] with keys under it)")
        for key, value in table.items():
            if key == "token":
                raise ProfileError(f"{file}: [{section}] token: a token is never kept in the config file; put it "
                                   "in a file of its own (chmod 600) and name it with token_file")  # fmt: skip
            spec = SCHEMA[section].get(key)
            if spec is None:
                raise ProfileError(f"{file}: [{section}] {key}: unknown key{_nearest(key, SCHEMA[section])}; "
                                   f"[{section}] has {', '.join(SCHEMA[section])}")  # fmt: skip
            values[section][key] = _checked(file, section, key, spec, value)
            origins[section][key] = str(file)
    return Profile(file, values, origins)


def _nearest(given: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _checked(file: Path | None, section: str, key: str, spec: Key, value: Any) -> Any:
    """``value`` as the flag takes it (a path resolved against the file's folder), or ProfileError."""
    check = _CHECKS[spec.kind]
    converted = check(value)
    if converted is None:
        raise ProfileError(
            f"{file}: [{section}] {key}: expected {_EXPECTED[spec.kind]}, got {value!r} ({_toml_type(value)})"
        )
    if spec.kind == "path" and file is not None:
        converted = str(file.parent / Path(converted).expanduser())
    return converted


def _toml_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _port(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535 else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _seconds(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and number > 0 else None


def _ratio(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and number > 1 else None


def _addresses(value: Any) -> list[str] | None:
    if not isinstance(value, list) or not value:
        return None
    addresses: list[str] = []
    for item in value:
        if not isinstance(item, str):
            return None
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            return None
        if item.strip() not in addresses:
            addresses.append(item.strip())
    return addresses


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "str": _string,
    "path": _string,
    "bool": _bool,
    "int": _int,
    "port": _port,
    "seconds": _seconds,
    "ratio": _ratio,
    "addresses": _addresses,
}


# -- the --config flag ------------------------------------------------------------------------------------------


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--config PATH`` (and ``--no-config``) on a command that reads the profile."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--config",
        metavar="PATH",
        help=f"the profile to read (TOML; default: {_default_shown()}); flags override it",
    )
    group.add_argument(
        "--no-config",
        dest="config",
        action="store_const",
        const=NO_FILE,
        help="read no profile: flags and built-in defaults only (what `megascope demo` gives its agents)",
    )


def _default_shown() -> str:
    return f"${ENV_CONFIG_HOME}/{FILE_NAME.as_posix()} or ~/.config/{FILE_NAME.as_posix()}"
