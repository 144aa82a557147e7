"""The agent's credential rules (agent/auth.py) and the client's (dashboard/transport.py), without a server."""

from __future__ import annotations

import argparse
import hmac
import os
from pathlib import Path

import grpc
import pytest

from megascope.agent import auth
from megascope.agent.agent_cli import add_arguments as add_agent_arguments
from megascope.dashboard import transport as transports

AGENT = "/megascope.v1.AgentService/"
BEARER = (("authorization", "Bearer s3cret"),)


# -- which calls need the token ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["SaveCheckpoint", "Restart", "DumpStacks", "StartMerge", "CancelMerge", "NewOne"])
def test_control_methods_and_unknown_ones_need_the_token(method: str) -> None:
    assert auth.needs_token(AGENT + method, reads=False)
    assert auth.refusal(AGENT + method, (), "s3cret", reads=False) is not None
    assert auth.refusal(AGENT + method, BEARER, "s3cret", reads=False) is None


@pytest.mark.parametrize("method", sorted(auth.READ_METHODS))
def test_reads_need_the_token_only_with_token_reads(method: str) -> None:
    assert auth.refusal(AGENT + method, (), "s3cret", reads=False) is None
    missing = auth.refusal(AGENT + method, (), "s3cret", reads=True)
    assert missing is not None and missing[0] is grpc.StatusCode.UNAUTHENTICATED
    wrong = auth.refusal(AGENT + method, (("authorization", "Bearer guess"),), "s3cret", reads=True)
    assert wrong is not None and wrong[0] is grpc.StatusCode.PERMISSION_DENIED
    assert auth.refusal(AGENT + method, BEARER, "s3cret", reads=True) is None


def test_health_and_the_worker_service_never_need_it() -> None:
    for method in ("/grpc.health.v1.Health/Check", "/megascope.v1.WorkerService/Attach"):
        assert not auth.needs_token(method, reads=True)
        assert auth.refusal(method, (), "s3cret", reads=True) is None


def test_no_token_means_no_check() -> None:
    assert auth.refusal(AGENT + "Restart", (), None, reads=True) is None


def test_the_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert auth.refusal(AGENT + "Restart", BEARER, "s3cret", reads=False) is None
    assert auth.refusal(AGENT + "Restart", (("authorization", "Bearer s3creX"),), "s3cret", reads=False) is not None
    assert calls == [(b"Bearer s3cret", b"Bearer s3cret"), (b"Bearer s3creX", b"Bearer s3cret")]
    assert not auth.token_matches("Bearer \udcff", "s3cret")  # not UTF-8: refused, never a crash


# -- where the token comes from ------------------------------------------------------------------------------------


def test_token_from_file_env_and_argv(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    token_file.chmod(0o600)
    assert auth.choose_token(None, str(token_file), {}) == auth.TokenChoice("from-file", "--token-file")
    assert auth.choose_token(None, None, {"MEGASCOPE_TOKEN": "from-env"}).token == "from-env"
    from_argv = auth.choose_token("on-argv", None, {"MEGASCOPE_TOKEN": "from-env"})
    assert from_argv.token == "on-argv" and from_argv.warnings == (auth.ARGV_TOKEN_WARNING,)
    assert "ps" in auth.ARGV_TOKEN_WARNING
    assert auth.choose_token(None, None, {}) == auth.TokenChoice(None, "none")
    token_file.chmod(0o644)
    assert "chmod 600" in auth.choose_token(None, str(token_file), {}).warnings[0]


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "is empty"), ("two words\n", "one line"), (None, "cannot read")],
    ids=["empty", "spaces", "missing"],
)
def test_a_bad_token_file_is_a_flag_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(auth.AuthError, match=message) as raised:
        auth.choose_token(None, str(path), {})
    assert "--token-file" in str(raised.value)


def test_token_file_and_argv_token_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(auth.AuthError, match="not both"):
        auth.choose_token("x", str(tmp_path / "t"), {})


def test_the_agent_no_longer_reads_the_token_into_argv_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGASCOPE_TOKEN", "from-env")
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    args = parser.parse_args([])
    assert args.token is None and args.token_file is None and not args.token_reads and not args.insecure


# -- where the agent may listen ------------------------------------------------------------------------------------


def _resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    return lambda host: table.get(host, [])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
        ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("node7", False), ("unknown", False),
    ],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    resolve = _resolver({"localhost": ["127.0.0.1", "::1"], "node7": ["127.0.1.1", "10.0.0.7"]})
    assert auth.is_loopback(host, resolve) is loopback


def test_non_loopback_without_tls_or_token_is_refused_unless_insecure() -> None:
    resolve = _resolver({})
    refused = auth.listen_refusal("0.0.0.0", tls=False, token=False, insecure=False, resolve=resolve)
    assert refused is not None and "\n" not in refused
    for flag in ("--tls-cert", "--tls-key", "--token-file", "--insecure"):
        assert flag in refused
    assert auth.listen_refusal("0.0.0.0", tls=False, token=False, insecure=True, resolve=resolve) is None
    assert auth.listen_refusal("0.0.0.0", tls=True, token=False, insecure=False, resolve=resolve) is None
    assert auth.listen_refusal("0.0.0.0", tls=False, token=True, insecure=False, resolve=resolve) is None
    assert auth.listen_refusal("127.0.0.1", tls=False, token=False, insecure=False, resolve=resolve) is None
    assert "clear text" in auth.listen_warnings("0.0.0.0", tls=False, token=True, insecure=False, resolve=resolve)[0]
    assert auth.listen_warnings("127.0.0.1", tls=False, token=False, insecure=False, resolve=resolve) == []


def test_tls_flags_go_together(tmp_path: Path) -> None:
    assert auth.ServerTLS.from_flags(None, None, None) is None
    with pytest.raises(auth.AuthError, match="--tls-cert and --tls-key"):
        auth.ServerTLS.from_flags("c.pem", None, None)
    with pytest.raises(auth.AuthError, match="--tls-ca needs"):
        auth.ServerTLS.from_flags(None, None, "ca.pem")
    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(auth.AuthError, match="--tls-cert: .* is not PEM"):
        auth.ServerTLS(str(tmp_path / "c.pem"), str(tmp_path / "c.pem")).credentials()
    (tmp_path / "good.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(auth.AuthError, match="--tls-key: cannot read"):
        auth.ServerTLS(str(tmp_path / "good.pem"), str(tmp_path / "nope")).credentials()


# -- the client's flags (dashboard, status) --------------------------------------------------------------------------


def _client(argv: list[str]) -> tuple[transports.Transport, list[str]]:
    parser = argparse.ArgumentParser()
    transports.add_arguments(parser)
    return transports.from_args(parser.parse_args(argv))


def test_client_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEGASCOPE_TOKEN", raising=False)
    assert _client([]) == (transports.PLAINTEXT, [])
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    os.chmod(token_file, 0o600)
    assert _client(["--token-file", str(token_file)]) == (transports.Transport(token="from-file"), [])
    transport, warnings = _client(["--token", "on-argv"])
    assert transport.token == "on-argv" and warnings == [transports.ARGV_TOKEN_WARNING]
    monkeypatch.setenv("MEGASCOPE_TOKEN", "from-env")
    assert _client([]) == (transports.Transport(token="from-env"), [])
    assert _client(["--token-file", str(token_file)])[0].token == "from-file"  # the file wins over the environment
    with pytest.raises(transports.TransportError, match="not both"):
        _client(["--token", "x", "--token-file", str(token_file)])
    assert transports.Transport(token="t").metadata() == (("authorization", "Bearer t"),)
    assert transports.PLAINTEXT.metadata() == ()


def test_client_tls_flags(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n...\n")
    assert _client(["--tls"])[0] == transports.Transport(tls=True)
    flags = ["--tls-ca", str(pem), "--tls-cert", str(pem), "--tls-key", str(pem), "--tls-server-name", "n"]
    transport = _client(flags)[0]
    assert transport.tls and transport.ca and transport.cert and transport.key and transport.server_name == "n"
    with pytest.raises(transports.TransportError, match="--tls-cert and --tls-key go together"):
        _client(["--tls-cert", str(pem)])
    with pytest.raises(transports.TransportError, match="--tls-ca: cannot read"):
        _client(["--tls-ca", str(tmp_path / "missing.pem")])


def test_the_agent_keeps_its_token_from_the_ranks_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks and a user's script inherit the agent's environment: the token is taken out of it once read."""
    from megascope.agent.agent_cli import _security

    monkeypatch.setenv("MEGASCOPE_TOKEN", "from-env")
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    token, tls = _security(parser.parse_args(["--host", "127.0.0.1"]))
    assert token == "from-env" and tls is None and "MEGASCOPE_TOKEN" not in os.environ


def test_every_agent_service_method_is_either_a_read_or_control() -> None:
    """A new AgentService method needs the token (control) unless it is named a read: this fails to make the
    choice a conscious one."""
    from megascope.protos.megascope.v1 import agent_pb2

    methods = {m.name for m in agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods}
    assert methods >= auth.READ_METHODS
    assert methods - auth.READ_METHODS == {"SaveCheckpoint", "Restart", "DumpStacks", "StartMerge", "CancelMerge"}
