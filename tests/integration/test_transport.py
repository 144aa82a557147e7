"""Transport and defaults (issue 17): TLS and mutual TLS handshakes with certificates made here, the token on reads,
the token from a file or the environment, and an agent that will not serve beyond loopback unprotected."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
import pytest
from support import REPO, run_megascope
from support.agent_process import AgentProcess
from support.certs import Pki, make_pki

from megascope.agent.auth import ServerTLS
from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.dashboard.connection import collect_once
from megascope.dashboard.model.cluster import ClusterModel, ConnectionState
from megascope.dashboard.transport import PLAINTEXT, Transport
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2

TOKEN = "correct-horse-battery-staple"
READS = {
    "GetSnapshot": agent_pb2.GetSnapshotRequest(),
    "GetEvents": agent_pb2.GetEventsRequest(),
    "ListCheckpoints": agent_pb2.ListCheckpointsRequest(),
    "GetMergeStatus": agent_pb2.GetMergeStatusRequest(),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """An unrelated CA with its own server and client certificates: what a wrong CA looks like."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), name="other")


def client(pki: Pki, *, ca: bool = True, cert: bool = False, token: str | None = None, **fields: object) -> Transport:
    return Transport(
        tls=True,
        ca=pki.ca.read_bytes() if ca else None,
        cert=pki.client_cert.read_bytes() if cert else None,
        key=pki.client_key.read_bytes() if cert else None,
        token=token,
        **fields,  # type: ignore[arg-type]
    )


async def serve(tls: ServerTLS | None = None, token: str | None = None, token_reads: bool = False) -> AgentServer:
    server = AgentServer(
        NodeState(telemetry_pb2.NodeInfo(node="node0")), "127.0.0.1", 0, token=token, token_reads=token_reads, tls=tls
    )
    await server.start()
    return server


@pytest.fixture
async def tls_agent(pki: Pki) -> AsyncIterator[AgentServer]:
    server = await serve(ServerTLS(str(pki.server_cert), str(pki.server_key)))
    yield server
    await server.stop(0.1)


@pytest.fixture
async def mtls_agent(pki: Pki) -> AsyncIterator[AgentServer]:
    server = await serve(ServerTLS(str(pki.server_cert), str(pki.server_key), str(pki.ca)), TOKEN, token_reads=True)
    yield server
    await server.stop(0.1)


async def snapshot(address: str, transport: Transport, method: str = "GetSnapshot") -> object:
    """One read over ``transport``; raises grpc.aio.AioRpcError. The deadline only bounds a refused handshake."""
    async with transport.channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        return await getattr(stub, method)(READS[method], timeout=20, metadata=transport.metadata())


async def refused(address: str, transport: Transport, method: str = "GetSnapshot") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await snapshot(address, transport, method)
    return raised.value


# -- TLS ---------------------------------------------------------------------------------------------------------


async def test_tls_handshake_with_the_right_ca(tls_agent: AgentServer, pki: Pki) -> None:
    reply = await snapshot(tls_agent.address, client(pki))
    assert reply.node_info.node == "node0"  # type: ignore[attr-defined]
    # The name in the certificate, when the address does not carry it (an SSH tunnel's 127.0.0.1, an IP).
    port = tls_agent.port
    assert (await snapshot(f"127.0.0.1:{port}", client(pki, server_name="agent.test"))) is not None


async def test_tls_agent_refuses_a_plaintext_client_and_a_wrong_ca(tls_agent: AgentServer, other_pki: Pki) -> None:
    assert (await refused(tls_agent.address, PLAINTEXT)).code() == grpc.StatusCode.UNAVAILABLE
    assert (await refused(tls_agent.address, client(other_pki))).code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_client_refuses_a_certificate_for_another_name(tls_agent: AgentServer, pki: Pki) -> None:
    error = await refused(tls_agent.address, client(pki, server_name="someone-else.test"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


# -- mutual TLS ----------------------------------------------------------------------------------------------------


async def test_mtls_handshake_with_a_client_certificate(mtls_agent: AgentServer, pki: Pki) -> None:
    reply = await snapshot(mtls_agent.address, client(pki, cert=True, token=TOKEN))
    assert reply.node_info.node == "node0"  # type: ignore[attr-defined]


async def test_mtls_refuses_no_client_certificate_and_one_from_another_ca(
    mtls_agent: AgentServer, pki: Pki, other_pki: Pki
) -> None:
    assert (await refused(mtls_agent.address, client(pki, token=TOKEN))).code() == grpc.StatusCode.UNAVAILABLE
    foreign = Transport(
        tls=True,
        ca=pki.ca.read_bytes(),
        cert=other_pki.client_cert.read_bytes(),
        key=other_pki.client_key.read_bytes(),
        token=TOKEN,
    )
    assert (await refused(mtls_agent.address, foreign)).code() == grpc.StatusCode.UNAVAILABLE
    assert (await refused(mtls_agent.address, PLAINTEXT)).code() == grpc.StatusCode.UNAVAILABLE


async def test_the_dashboards_collector_reads_an_mtls_agent_with_its_token(mtls_agent: AgentServer, pki: Pki) -> None:
    model = ClusterModel([mtls_agent.address])
    await collect_once(model, mtls_agent.address, 20, client(pki, cert=True, token=TOKEN))
    assert model.agents[mtls_agent.address].state is ConnectionState.CONNECTED
    model = ClusterModel([mtls_agent.address])
    await collect_once(model, mtls_agent.address, 20, client(pki, cert=True))  # no token: reads need it here
    agent = model.agents[mtls_agent.address]
    assert agent.state is not ConnectionState.CONNECTED and agent.error.startswith("no token")


# -- the token on reads ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(READS))
async def test_token_reads_covers_every_read(method: str) -> None:
    server = await serve(token=TOKEN, token_reads=True)
    try:
        assert (await refused(server.address, PLAINTEXT, method)).code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = await refused(server.address, Transport(token="guess"), method)
        assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED
        await snapshot(server.address, Transport(token=TOKEN), method)
    finally:
        await server.stop(0.1)


async def test_token_reads_covers_watch_and_without_it_reads_stay_open() -> None:
    guarded, open_reads = await serve(token=TOKEN, token_reads=True), await serve(token=TOKEN)
    try:
        async with grpc.aio.insecure_channel(guarded.address) as channel:
            call = agent_pb2_grpc.AgentServiceStub(channel).Watch(agent_pb2.WatchRequest())
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call.read()
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await snapshot(open_reads.address, PLAINTEXT)
        error = await refused_control(open_reads.address, PLAINTEXT)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await guarded.stop(0.1)
        await open_reads.stop(0.1)


async def refused_control(address: str, transport: Transport) -> grpc.aio.AioRpcError:
    async with transport.channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Restart(agent_pb2.RestartRequest(), timeout=20, metadata=transport.metadata())
        return raised.value


async def test_an_unauthenticated_caller_learns_nothing_from_garbage() -> None:
    """The token is checked before the bytes are parsed: garbage without it is UNAUTHENTICATED."""
    server = await serve(token=TOKEN)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.unary_unary("/megascope.v1.AgentService/Restart")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(b"\xff\xff\xff garbage", timeout=20)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(0.1)


# -- the real commands: where the agent may listen, the token from a file and from the environment -----------------


def test_agent_refuses_a_non_loopback_address_without_tls_or_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEGASCOPE_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--no-launch", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megascope agent: error: refusing to serve on 0.0.0.0")
    for flag in ("--tls-cert", "--token-file", "--insecure"):
        assert flag in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
        (["--token-reads"], "--token-reads needs a token"),
        (["--token-file", "/nonexistent-token"], "--token-file: cannot read"),
    ],
    ids=["half-tls", "token-reads-without-token", "missing-token-file"],
)
def test_agent_credential_flags_that_cannot_work_exit_2(flags: list[str], message: str) -> None:
    result = run_megascope("agent", "--no-launch", "--port", "0", *flags, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_insecure_lets_the_agent_serve_on_every_interface_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEGASCOPE_TOKEN"}
    agent = AgentProcess("--host", "0.0.0.0", "--insecure", "--run-dir", str(tmp_path / "run"), env=env)
    try:
        result = run_megascope("status", "--agents", f"127.0.0.1:{agent.port}", "--json", "--timeout", "20")
        assert result.returncode == 0, result.stderr
    finally:
        stderr = agent.stop()
    assert "with neither TLS nor a token (--insecure)" in stderr


def test_token_from_the_environment_on_the_agent_and_from_a_file_on_status(tmp_path: Path, pki: Pki) -> None:
    """mTLS and --token-reads on a real agent whose token comes from $MEGASCOPE_TOKEN; `megascope status` with the
    client certificate and --token-file gets in, without the token or the certificate it does not."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca)]
    agent = AgentProcess(
        *tls, "--token-reads", "--run-dir", str(tmp_path / "run"), env={**os.environ, "MEGASCOPE_TOKEN": TOKEN}
    )
    client_tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    try:
        base = ["status", "--agents", agent.address, "--json", "--timeout", "20", *client_tls]
        env_without = {k: v for k, v in os.environ.items() if k != "MEGASCOPE_TOKEN"}
        ok = _status([*base, "--token-file", str(token_file)], env_without)
        assert ok.returncode == 0, ok.stderr
        no_token = _status(base, env_without)
        assert no_token.returncode == 1 and "no token" in no_token.stderr
        from_env = _status(base, {**env_without, "MEGASCOPE_TOKEN": TOKEN})
        assert from_env.returncode == 0, from_env.stderr
        on_argv = _status([*base, "--token", TOKEN], env_without)
        assert on_argv.returncode == 0 and "visible to every user" in on_argv.stderr
        no_cert = _status(
            ["status", "--agents", agent.address, "--json", "--timeout", "5", "--tls-ca", str(pki.ca),
             "--token-file", str(token_file)],
            env_without,
        )  # fmt: skip
        assert no_cert.returncode == 1
    finally:
        agent.stop()


def _status(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "megascope.agent.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def test_agent_warns_of_a_token_file_others_can_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if k != "MEGASCOPE_TOKEN"}
    agent = AgentProcess("--token-file", str(token_file), "--run-dir", str(tmp_path / "run"), env=env)
    stderr = agent.stop()
    assert "readable by others" in stderr and "chmod 600" in stderr


async def test_a_tls_agent_answers_health_checks_over_tls(tls_agent: AgentServer, pki: Pki) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with client(pki).channel(tls_agent.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_demos_agents_require_the_token_it_generates_and_its_client_sends_it(tmp_path: Path) -> None:
    from megascope.dashboard.local_cluster import LocalCluster

    cluster = LocalCluster(nodes=1, ranks_per_node=1, train_args=["--no-launch"], run_dir=str(tmp_path / "demo"))
    with cluster:
        await asyncio.to_thread(cluster.start)
        address, token = cluster.addresses[0], cluster.transport.token
        assert token and len(token) >= 32
        assert (await refused_control(address, PLAINTEXT)).code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await refused_control(address, Transport(token="guess"))).code() == grpc.StatusCode.PERMISSION_DENIED
        # With the demo's token the call gets past the check (and is refused for having no ranks to restart).
        assert (await refused_control(address, cluster.transport)).code() == grpc.StatusCode.FAILED_PRECONDITION
        assert all(token not in _command_line(pid) for pid in cluster.pids())  # never on a command line
        assert cluster.token_file.read_text().strip() == token and cluster.token_file.stat().st_mode & 0o077 == 0


def _command_line(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:  # gone already
        return ""
