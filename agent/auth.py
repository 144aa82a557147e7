"""Who may talk to an agent: its token (and which calls need it), its TLS credentials, and where it may listen.

- **Token**: a shared secret sent as ``authorization: Bearer TOKEN`` metadata. Control calls on ``AgentService``
  (SaveCheckpoint, Restart, DumpStacks, StartMerge, CancelMerge, and any method added later) need it when the
  agent has one; with ``--token-reads`` the reading calls (:data:`READ_METHODS`) need it too. It is checked in one
  place, :class:`TokenCheck`, a server interceptor, compared in constant time (:func:`hmac.compare_digest`), and
  read from ``--token-file`` or ``$MEGASCOPE_TOKEN`` (``--token`` on the command line still works but warns: every
  user of the host sees it in ``ps``). Server reflection is a read. The health service and the ranks'
  ``WorkerService`` are not covered: the ranks have their own channel and secret. Any other service needs the
  token (:func:`classify`).
- **TLS**: ``--tls-cert/--tls-key`` serve TLS; ``--tls-ca`` also requires every client to present a certificate
  signed by that CA (mutual TLS). :func:`server_credentials`.
- **Where**: :func:`listen_refusal` refuses a non-loopback address that has neither TLS nor a token unless
  ``--insecure`` says so.

Pure functions apart from :class:`TokenCheck` (gRPC) and the file reads, so the rules are unit-tested.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "MEGASCOPE_TOKEN"
AGENT_SERVICE_PREFIX = "/megascope.v1.AgentService/"
READ_METHODS = frozenset({"Watch", "GetSnapshot", "GetEvents", "ListCheckpoints", "GetMergeStatus", "GetRankLog"})
"""AgentService methods that only read; every other AgentService method is control (a new method needs the token
unless it is named here)."""


class Access(enum.Enum):
    """What a call may do, which decides whether it needs the token."""

    OPEN = "open"
    """Never needs it: health (probes and load balancers carry no token) and the ranks' WorkerService (their own
    secret, on their own channel)."""
    READ = "read"
    """Needs it with ``--token-reads`` only."""
    CONTROL = "control"
    """Needs it whenever the agent has one."""


OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "megascope.v1.WorkerService"})
READ_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})
"""Server reflection describes the services (grpcurl's ``list`` and ``describe``): a read, like telemetry."""
ARGV_TOKEN_WARNING = (
    "--token on the command line is visible to every user of this host (ps, /proc); "
    "use --token-file PATH or $MEGASCOPE_TOKEN"
)


class AuthError(ValueError):
    """A credential flag cannot be used; the message names the flag."""


# -- the token ---------------------------------------------------------------------------------------------------


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace and the trailing newline dropped). Raises AuthError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AuthError(f"--token-file: cannot read {path}: {error}") from None
    token = text.strip()
    if not token:
        raise AuthError(f"--token-file: {path} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise AuthError(f"--token-file: {path} must hold one token on one line (no spaces or control characters)")
    return token


def token_file_warning(path: str) -> str | None:
    """A warning when others than the owner may read the token file (as ssh says of a private key)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"--token-file {path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
    return None


@dataclass(frozen=True)
class TokenChoice:
    token: str | None
    """None: no token (no check)."""
    source: str
    """``--token-file``, ``--token``, ``$MEGASCOPE_TOKEN`` or ``none``."""
    warnings: tuple[str, ...] = ()


def choose_token(
    argv_token: str | None, token_file: str | None, environ: dict[str, str] | os._Environ[str] | None = None
) -> TokenChoice:
    """The token from ``--token-file``, else ``--token`` (with a warning), else ``$MEGASCOPE_TOKEN``.

    Raises AuthError for both ``--token`` and ``--token-file``, an unreadable or empty file, or an empty token.
    """
    env = os.environ if environ is None else environ
    if token_file is not None and argv_token is not None:
        raise AuthError("give --token-file or --token, not both")
    if token_file is not None:
        warning = token_file_warning(token_file)
        return TokenChoice(read_token_file(token_file), "--token-file", (warning,) if warning else ())
    if argv_token is not None:
        if not argv_token.strip():
            raise AuthError("--token is empty")
        return TokenChoice(argv_token, "--token", (ARGV_TOKEN_WARNING,))
    from_env = env.get(TOKEN_ENV)
    if from_env is not None and from_env.strip():
        return TokenChoice(from_env.strip(), f"${TOKEN_ENV}")
    return TokenChoice(None, "none")


def bearer(token: str) -> str:
    return f"Bearer {token}"


def token_matches(given: str | bytes | None, token: str) -> bool:
    """Whether the ``authorization`` value ``given`` carries ``token``: compared in constant time (how long the
    comparison takes tells nothing about how much of a guess was right)."""
    if given is None:
        return False
    given_bytes = given if isinstance(given, bytes) else given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given_bytes, bearer(token).encode("utf-8"))


def classify(method: str) -> Access:
    """The access of gRPC ``method`` (``/package.Service/Method``). A service or method named nowhere here is
    control: whatever is added to the public port later needs the token until someone decides otherwise."""
    service, _, name = method.lstrip("/").partition("/")
    if service in OPEN_SERVICES:
        return Access.OPEN
    if service in READ_SERVICES:
        return Access.READ
    if method.startswith(AGENT_SERVICE_PREFIX) and name in READ_METHODS:
        return Access.READ
    return Access.CONTROL


def needs_token(method: str, reads: bool) -> bool:
    """Whether a call of ``method`` needs the agent's token: control always, reads (AgentService's and server
    reflection) with ``reads``; never health or the ranks' WorkerService (:func:`classify`)."""
    access = classify(method)
    return access is Access.CONTROL or (reads and access is Access.READ)


def refusal(
    method: str, metadata: Iterable[tuple[str, str | bytes]] | None, token: str | None, reads: bool
) -> tuple[grpc.StatusCode, str] | None:
    """The status and message a call of ``method`` is refused with, or None when it may proceed."""
    if not token or not needs_token(method, reads):
        return None
    return token_refusal(metadata, token)


def token_refusal(
    metadata: Iterable[tuple[str, str | bytes]] | None, token: str | None
) -> tuple[grpc.StatusCode, str] | None:
    """The status and message a call that needs ``token`` is refused with, or None when its metadata has it."""
    if not token:
        return None
    given = None
    for key, value in metadata or ():
        if key == "authorization":
            given = value
    if given is None:
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            "this agent requires a token: send metadata 'authorization: Bearer TOKEN' "
            "(megascope dashboard/status: --token-file or $MEGASCOPE_TOKEN)",
        )
    if not token_matches(given, token):
        return grpc.StatusCode.PERMISSION_DENIED, "wrong token for this agent"
    return None


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses AgentService calls without the agent's token (control calls; reads too with ``reads``) before any
    servicer code runs: UNAUTHENTICATED when none is sent, PERMISSION_DENIED when it is wrong."""

    def __init__(self, token: str | None, reads: bool = False) -> None:
        self._token = token
        self._reads = reads

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        details = handler_call_details
        refused = refusal(details.method, details.invocation_metadata, self._token, self._reads)
        if refused is None:
            return handler
        return _refusing_handler(handler, *refused)


def _refusing_handler(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as ``handler`` that only aborts with ``code``."""
    kind = (handler.request_streaming, handler.response_streaming)
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    async def abort(context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    if kind == (False, False):

        async def unary_unary(request, context):  # type: ignore[no-untyped-def]
            await abort(context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **options)
    if kind == (False, True):

        async def unary_stream(request, context):  # type: ignore[no-untyped-def]
            await abort(context)
            yield  # pragma: no cover - abort raises

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
    if kind == (True, False):

        async def stream_unary(requests, context):  # type: ignore[no-untyped-def]
            await abort(context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **options)

    async def stream_stream(requests, context):  # type: ignore[no-untyped-def]
        await abort(context)
        yield  # pragma: no cover - abort raises

    return grpc.stream_stream_rpc_method_handler(stream_stream, **options)


# -- TLS -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTLS:
    cert_file: str
    key_file: str
    ca_file: str | None = None
    """Set: mutual TLS, every client must present a certificate signed by this CA."""

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, ca: str | None) -> ServerTLS | None:
        """The TLS settings of ``--tls-cert/--tls-key/--tls-ca``; None for plaintext. Raises AuthError."""
        if cert is None and key is None:
            if ca is not None:
                raise AuthError("--tls-ca needs --tls-cert and --tls-key (the agent's own certificate)")
            return None
        if cert is None or key is None:
            raise AuthError("--tls-cert and --tls-key go together")
        return cls(cert, key, ca)

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials; raises AuthError naming the flag of a file that cannot be read."""
        cert = _read_pem(self.cert_file, "--tls-cert")
        key = _read_pem(self.key_file, "--tls-key")
        ca = _read_pem(self.ca_file, "--tls-ca") if self.ca_file else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def describe(self) -> str:
        return "mutual TLS (client certificates required)" if self.ca_file else "TLS"


def _read_pem(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise AuthError(f"{flag}: cannot read {path}: {error}") from None
    if b"-----BEGIN" not in data:
        raise AuthError(f"{flag}: {path} is not PEM (no -----BEGIN line)")
    return data


# -- where the agent may listen --------------------------------------------------------------------------------------

Resolver = Callable[[str], Sequence[str]]


def _resolve(host: str) -> list[str]:
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    except OSError:
        return []


def is_loopback(host: str, resolve: Resolver = _resolve) -> bool:
    """Whether serving on ``host`` is reachable from this machine only: a loopback address, or a name whose every
    address is one. The wildcard (``0.0.0.0``, ``::``, empty) is every interface: not loopback."""
    name = host.strip("[]")
    if name in ("", "*"):
        return False
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    addresses = resolve(name)
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def listen_refusal(host: str, tls: bool, token: bool, insecure: bool, resolve: Resolver = _resolve) -> str | None:
    """Why the agent must not serve on ``host`` (a one-line error naming the flags), or None when it may."""
    if insecure or tls or token or is_loopback(host, resolve):
        return None
    return (
        f"refusing to serve on {host or '*'} (reachable from other hosts) with neither TLS nor a token: anyone who "
        "reaches the port could stop, restart or read the job; give --tls-cert/--tls-key (and --tls-ca), "
        "--token-file (or $MEGASCOPE_TOKEN), or --insecure to serve anyway"
    )


def listen_warnings(host: str, tls: bool, token: bool, insecure: bool, resolve: Resolver = _resolve) -> list[str]:
    """What to say at start when the agent serves beyond this host with less than both TLS and a token."""
    if is_loopback(host, resolve):
        return []
    if insecure and not tls and not token:
        where = host or "*"
        return [f"serving on {where} with neither TLS nor a token (--insecure): anyone who reaches it controls the job"]
    if token and not tls:
        return [f"serving on {host or '*'} without TLS: the token and the telemetry cross the network in clear text"]
    return []
