"""Why an agent cannot be reached, in words a person can act on: each reason from a real failed connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from support.certs import Pki, make_pki

from megascope.dashboard.connection import describe_error, describe_rpc_error
from megascope.dashboard.transport import PLAINTEXT, Transport


async def _failure(transport: Transport, address: str) -> str:
    channel = transport.channel(address)
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    except grpc.aio.AioRpcError as error:
        return describe_error(error)
    finally:
        await channel.close()
    raise AssertionError("the call succeeded")


async def _serve(credentials: grpc.ServerCredentials | None) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = (
        server.add_secure_port("127.0.0.1:0", credentials)
        if credentials is not None
        else server.add_insecure_port("127.0.0.1:0")
    )
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
async def tls_agent(pki: Pki) -> AsyncIterator[str]:
    credentials = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())])
    server, address = await _serve(credentials)
    yield address
    await server.stop(None)


@pytest.fixture
async def plaintext_agent() -> AsyncIterator[str]:
    server, address = await _serve(None)
    yield address
    await server.stop(None)


async def test_nothing_listening_is_refused_with_the_loopback_hint() -> None:
    reason = await _failure(PLAINTEXT, "127.0.0.1:1")
    assert reason.startswith("refused: nothing listens") and "127.0.0.1 only, unless started with --host" in reason


async def test_plaintext_to_a_tls_agent_says_it_may_serve_tls(tls_agent: str) -> None:
    assert "pass --tls and --tls-ca" in await _failure(PLAINTEXT, tls_agent)


async def test_tls_to_a_plaintext_agent_says_to_leave_out_tls(plaintext_agent: str, pki: Pki) -> None:
    reason = await _failure(Transport(tls=True, ca=pki.ca.read_bytes()), plaintext_agent)
    assert reason.startswith("TLS: the agent speaks plaintext")


async def test_a_certificate_from_another_authority_names_tls_ca(tls_agent: str, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", "other")
    reason = await _failure(Transport(tls=True, ca=other.ca.read_bytes()), tls_agent)
    assert reason.startswith("TLS: the agent's certificate is not signed by --tls-ca")


async def test_an_unknown_host_says_its_name_does_not_resolve() -> None:
    assert (await _failure(PLAINTEXT, "no-such-host.invalid:50051")).startswith("unknown host")


def test_a_missing_or_wrong_token_says_where_the_token_comes_from() -> None:
    missing = describe_rpc_error(grpc.StatusCode.UNAUTHENTICATED, "this call needs the agent's token")
    wrong = describe_rpc_error(grpc.StatusCode.PERMISSION_DENIED, "wrong token")
    assert missing.startswith("no token") and wrong.startswith("wrong token")
    assert all("--token-file or $MEGASCOPE_TOKEN" in reason for reason in (missing, wrong))


def test_a_silent_stream_says_how_long_it_was_silent() -> None:
    assert describe_error(asyncio.TimeoutError()) == "no telemetry for 15s"
