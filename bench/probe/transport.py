"""The transport area of issue 17's probe: TLS, mutual TLS, the token on control calls and on reads, and where an
agent agrees to listen.

Agents are served in this process (``AgentServer`` on 127.0.0.1, port 0) with certificates made here (the tests'
own maker, tests/support/certs.py, which needs the ``cryptography`` dev dependency); the listening rules run the
real ``megascope agent`` command. A case is handled when the agent refuses with the right status (UNAVAILABLE for
a failed handshake, UNAUTHENTICATED without a token, PERMISSION_DENIED with a wrong one), acts on nothing, and
still answers a proper client afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from probe import Case

_REPO = Path(__file__).resolve().parents[2]
AREA = "transport"
TOKEN = "probe-token-0123456789"
CONTROL = {
    "SaveCheckpoint": ("unary", "SaveCheckpointRequest"),
    "Restart": ("unary", "RestartRequest"),
    "DumpStacks": ("unary", "DumpStacksRequest"),
    "CancelMerge": ("unary", "CancelMergeRequest"),
    "StartMerge": ("stream", "StartMergeRequest"),
}
READS = {
    "GetSnapshot": ("unary", "GetSnapshotRequest"),
    "GetEvents": ("unary", "GetEventsRequest"),
    "ListCheckpoints": ("unary", "ListCheckpointsRequest"),
    "GetMergeStatus": ("unary", "GetMergeStatusRequest"),
    "Watch": ("stream", "WatchRequest"),
}


def run(workdir: Path) -> list[Case]:
    sys.path.insert(0, str(_REPO / "tests"))
    from support.certs import make_pki

    good = make_pki(workdir / "pki")
    other = make_pki(workdir / "other", name="other")
    cases = asyncio.run(_served_cases(good, other))
    cases += _listening_cases(workdir)
    return cases


async def _served_cases(good, other) -> list[Case]:  # type: ignore[no-untyped-def]
    from megascope.agent.auth import ServerTLS
    from megascope.agent.server import AgentServer
    from megascope.agent.state import NodeState
    from megascope.dashboard.transport import PLAINTEXT, Transport
    from megascope.protos.megascope.v1 import telemetry_pb2

    def tls_client(pki, *, cert_from=None, token: str | None = TOKEN) -> Transport:  # type: ignore[no-untyped-def]
        return Transport(
            tls=True,
            ca=pki.ca.read_bytes(),
            cert=cert_from.client_cert.read_bytes() if cert_from else None,
            key=cert_from.client_key.read_bytes() if cert_from else None,
            token=token,
        )

    cases: list[Case] = []

    async def serve(tls: ServerTLS | None, token: str | None, reads: bool) -> AgentServer:
        state = NodeState(telemetry_pb2.NodeInfo(node="probe"))
        server = AgentServer(state, "127.0.0.1", 0, token=token, token_reads=reads, tls=tls)
        await server.start()
        return server

    async def expect(name: str, server: AgentServer, call: Callable[[], Awaitable[object]], code: grpc.StatusCode,
                     proper: Transport) -> None:  # fmt: skip
        events_before = len(server.state.events)
        try:
            await call()
            cases.append(Case(AREA, name, False, "answered: the call went through"))
            return
        except grpc.aio.AioRpcError as error:
            got = error.code()
            detail = f"{got.name}: {(error.details() or '').splitlines()[0] if error.details() else ''}"
        try:
            await _call(server.address, proper, "GetSnapshot")
            serving = True
        except grpc.aio.AioRpcError as error:
            serving, detail = False, f"{detail}; then a proper client was refused: {error.code().name}"
        acted = len(server.state.events) != events_before
        handled = got == code and serving and not acted
        if got != code:
            detail = f"expected {code.name}, got {detail}"
        if acted:
            detail += "; the agent logged an event (it acted)"
        cases.append(Case(AREA, name, handled, detail))

    unavailable, unauthenticated, denied = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    )

    # TLS: the handshake fails (UNAVAILABLE) for a client that does not speak TLS or does not trust the agent.
    server = await serve(ServerTLS(str(good.server_cert), str(good.server_key)), TOKEN, False)
    wrong_name = Transport(tls=True, ca=good.ca.read_bytes(), server_name="not-the-agent.test", token=TOKEN)
    try:
        for name, transport in (
            ("plaintext client to a TLS agent", PLAINTEXT.with_token(TOKEN)),
            ("TLS client trusting another CA", tls_client(other)),
            ("TLS client expecting another server name", wrong_name),
        ):
            await expect(name, server, _reader(server.address, transport, "GetSnapshot"), unavailable, tls_client(good))
    finally:
        await server.stop(0.1)

    # Mutual TLS: no client certificate, or one another CA signed, fails the handshake; the token is still needed.
    server = await serve(ServerTLS(str(good.server_cert), str(good.server_key), str(good.ca)), TOKEN, True)
    proper = tls_client(good, cert_from=good)
    try:
        for name, transport, method, code in (
            ("mTLS agent, client without a certificate", tls_client(good), "GetSnapshot", unavailable),
            ("mTLS agent, certificate from another CA", tls_client(good, cert_from=other), "GetSnapshot", unavailable),
            ("mTLS agent, plaintext client", PLAINTEXT.with_token(TOKEN), "GetSnapshot", unavailable),
            ("mTLS agent, right certificate, no token", tls_client(good, cert_from=good, token=None), "Watch",
             unauthenticated),
        ):  # fmt: skip
            await expect(name, server, _reader(server.address, transport, method), code, proper)
    finally:
        await server.stop(0.1)

    # The token, on every control call and (with --token-reads) every read: missing, wrong, near misses.
    server = await serve(None, TOKEN, True)
    proper = PLAINTEXT.with_token(TOKEN)
    wrongs = {
        "no token": PLAINTEXT,
        "wrong token": PLAINTEXT.with_token("guess"),
        "the token with a suffix": PLAINTEXT.with_token(TOKEN + "x"),
        "a prefix of the token": PLAINTEXT.with_token(TOKEN[:-1]),
    }
    malformed = {"'bearer' in lower case": f"bearer {TOKEN}", "the bare token": TOKEN, "an empty bearer": "Bearer "}
    try:
        for method in (*CONTROL, *READS):
            kind = "control" if method in CONTROL else "read (--token-reads)"
            for label, transport in wrongs.items():
                code = unauthenticated if label == "no token" else denied
                await expect(
                    f"{kind} {method}, {label}", server, _reader(server.address, transport, method), code, proper
                )
        for label, value in malformed.items():
            raw = _raw(server.address, "Restart", b"", (("authorization", value),))
            await expect(f"control Restart, {label}", server, raw, denied, proper)
        garbage = _raw(server.address, "Restart", b"\xff\xfe garbage", ())
        await expect("garbage bytes to Restart without a token", server, garbage, unauthenticated, proper)
    finally:
        await server.stop(0.1)
    return cases


def _reader(address: str, transport, method: str) -> Callable[[], Awaitable[object]]:  # type: ignore[no-untyped-def]
    return lambda: _call(address, transport, method)


async def _call(address: str, transport, method: str) -> object:  # type: ignore[no-untyped-def]
    from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc

    kind, request_name = {**CONTROL, **READS}[method]
    request = getattr(agent_pb2, request_name)()
    async with transport.channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        if kind == "stream":
            call = getattr(stub, method)(request, timeout=20, metadata=transport.metadata())
            return await call.read()
        return await getattr(stub, method)(request, timeout=20, metadata=transport.metadata())


def _raw(
    address: str, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...]
) -> Callable[[], Awaitable[object]]:
    """A call that sends ``payload`` as the request's bytes, with ``metadata`` as given."""

    async def call() -> object:
        async with grpc.aio.insecure_channel(address) as channel:
            method_call = channel.unary_unary(f"/megascope.v1.AgentService/{method}")
            return await method_call(payload, timeout=20, metadata=metadata)

    return call


def _listening_cases(workdir: Path) -> list[Case]:
    """The real command: a non-loopback --host with neither TLS nor a token is refused (exit 2, one line)."""
    env = {k: v for k, v in os.environ.items() if k != "MEGASCOPE_TOKEN"}
    cases = []
    for host in ("0.0.0.0", "::"):
        result = subprocess.run(
            [sys.executable, "-m", "megascope.agent.cli", "agent", "--no-launch", "--host", host, "--port", "0",
             "--run-dir", str(workdir / "run")],
            capture_output=True, text=True, timeout=120, cwd=_REPO, env=env,
        )  # fmt: skip
        lines = result.stderr.strip().splitlines()
        handled = result.returncode == 2 and len(lines) == 1 and "--insecure" in lines[0] and not result.stdout
        detail = f"exit {result.returncode}: {lines[-1] if lines else '(nothing on stderr)'}"
        cases.append(Case(AREA, f"agent on {host} with neither TLS nor a token", handled, detail))
    return cases
