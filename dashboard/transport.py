"""How a client reaches its agents: plaintext or TLS (with a client certificate for mutual TLS), and the token.

One :class:`Transport` per client process (``megascope dashboard``, ``status``, ``demo``), made from the flags
:func:`add_arguments` adds, and handed to every call in :mod:`megascope.dashboard.connection`:

- ``--tls`` (or any of ``--tls-ca/--tls-cert/--tls-key``): TLS; ``--tls-ca`` is the CA that signed the agents'
  certificates (default: the system's roots), ``--tls-cert/--tls-key`` the client certificate agents started with
  ``--tls-ca`` require, ``--tls-server-name`` the name to expect in the agents' certificates when the address
  does not carry it (an IP address, an SSH tunnel's ``127.0.0.1``).
- The token (``authorization: Bearer TOKEN`` on every call, reads included, for agents started with
  ``--token-reads``): ``--token-file``, else ``$MEGASCOPE_TOKEN``, else ``--token`` (which warns: every user of
  the host sees it in ``ps``).

The agent side of the same rules is ``megascope.agent.auth`` (the dashboard does not import the agent).
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

TOKEN_ENV = "MEGASCOPE_TOKEN"
ARGV_TOKEN_WARNING = (
    "--token on the command line is visible to every user of this host (ps, /proc); "
    "use --token-file PATH or $MEGASCOPE_TOKEN"
)


class TransportError(ValueError):
    """A client credential flag cannot be used; the message names the flag."""


@dataclass(frozen=True)
class Transport:
    """Plaintext and no token unless told otherwise."""

    token: str | None = None
    """Sent with every call when set (control calls need it; reads too on agents with ``--token-reads``)."""
    tls: bool = False
    ca: bytes | None = None
    """PEM roots that signed the agents' certificates; None: the system's roots."""
    cert: bytes | None = None
    key: bytes | None = None
    """The client certificate and key, for agents that require one (mutual TLS)."""
    server_name: str | None = None
    """The name the agents' certificates must carry when it is not the address's host."""

    def with_token(self, token: str | None) -> Transport:
        return replace(self, token=token)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the token, when there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: list[tuple[str, Any]] | None = None) -> Any:
        """A grpc.aio channel to ``address`` (create it inside the event loop that uses it)."""
        import grpc

        opts = list(options or [])
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=opts)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        return grpc.aio.secure_channel(address, credentials, options=opts)

    def describe(self) -> str:
        parts = ["mutual TLS" if self.cert else "TLS" if self.tls else "plaintext"]
        parts.append("token" if self.token else "no token")
        return ", ".join(parts)


PLAINTEXT = Transport()


class _ArgvToken(argparse.Action):
    """``--token TOKEN``: kept for scripts that pass it, remembered so that :func:`from_args` warns."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.token_on_argv = True


def add_arguments(parser: argparse.ArgumentParser | Any, *, token_help: str = "") -> None:
    """The client's transport flags: ``--token-file``, ``--token``, ``--tls``, ``--tls-ca``, ``--tls-cert``,
    ``--tls-key``, ``--tls-server-name``."""
    group = parser.add_argument_group("transport (README: Security model)")
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help="send the token in this file (one line) with every call " + (token_help or "(default: $MEGASCOPE_TOKEN)"),
    )
    group.add_argument(
        "--token",
        action=_ArgvToken,
        default=os.environ.get(TOKEN_ENV) or None,
        metavar="TOKEN",
        help="the token itself (default: $MEGASCOPE_TOKEN; on the command line it is visible to every user in ps)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS (implied by any --tls-* flag)")
    group.add_argument(
        "--tls-ca", metavar="PEM", help="CA that signed the agents' certificates (default: system roots)"
    )
    group.add_argument("--tls-cert", metavar="PEM", help="client certificate, for agents started with --tls-ca")
    group.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name the agents' certificates carry, when the address does not (an IP, an SSH tunnel's 127.0.0.1)",
    )


def _read(path: str, flag: str, pem: bool = True) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise TransportError(f"{flag}: cannot read {path}: {error}") from None
    if pem and b"-----BEGIN" not in data:
        raise TransportError(f"{flag}: {path} is not PEM (no -----BEGIN line)")
    return data


def read_token_file(path: str) -> str:
    """The token in ``path``, one line. Raises TransportError."""
    try:
        token = _read(path, "--token-file", pem=False).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TransportError(f"--token-file: {path} is not text") from None
    if not token:
        raise TransportError(f"--token-file: {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise TransportError(f"--token-file: {path} must hold one token on one line")
    return token


def from_args(args: argparse.Namespace) -> tuple[Transport, list[str]]:
    """The transport the flags describe and the warnings to print. Raises TransportError (a usage error)."""
    warnings: list[str] = []
    token: str | None = args.token
    token_file: str | None = getattr(args, "token_file", None)
    argv = bool(getattr(args, "token_on_argv", False))
    if token_file is None and token is None and getattr(args, "profile_token_file", None):
        # The profile's token_file counts only when neither --token nor $MEGASCOPE_TOKEN gives one for this run.
        try:
            token = read_token_file(args.profile_token_file)
        except TransportError as error:
            raise TransportError(f"the profile's [client] token_file: {error}") from None
    if token_file is not None:
        if argv:
            raise TransportError("give --token-file or --token, not both")
        token = read_token_file(token_file)
        mode = os.stat(token_file).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(
                f"--token-file {token_file} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
            )
    elif argv:
        warnings.append(ARGV_TOKEN_WARNING)
    if token is not None and not token.strip():
        token = None
    ca_file, cert_file, key_file = args.tls_ca, args.tls_cert, args.tls_key
    if (cert_file is None) != (key_file is None):
        raise TransportError("--tls-cert and --tls-key go together")
    tls = bool(args.tls or ca_file or cert_file or args.tls_server_name)
    transport = Transport(
        token=token.strip() if token else None,
        tls=tls,
        ca=_read(ca_file, "--tls-ca") if ca_file else None,
        cert=_read(cert_file, "--tls-cert") if cert_file else None,
        key=_read(key_file, "--tls-key") if key_file else None,
        server_name=args.tls_server_name,
    )
    return transport, warnings
