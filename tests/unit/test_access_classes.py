"""Which calls on the agent's public port need its token (megascope.agent.auth.classify): every service has a
deliberate class, and one nobody classified needs the token."""

from __future__ import annotations

import pytest

from megascope.agent import auth

REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
              "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")  # fmt: skip


@pytest.mark.parametrize("method", REFLECTION)
def test_server_reflection_is_a_read(method: str) -> None:
    assert auth.classify(method) is auth.Access.READ
    assert auth.refusal(method, (), "s3cret", reads=False) is None
    refused = auth.refusal(method, (), "s3cret", reads=True)
    assert refused is not None and refused[0].name == "UNAUTHENTICATED"
    assert auth.refusal(method, (("authorization", "Bearer s3cret"),), "s3cret", reads=True) is None


@pytest.mark.parametrize("method", ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"])
def test_health_is_open_even_with_token_reads(method: str) -> None:
    assert auth.classify(method) is auth.Access.OPEN
    assert not auth.needs_token(method, reads=True)


@pytest.mark.parametrize(
    "method", ["/some.other.v1.Service/Method", "/megascope.v2.AgentService/Watch", "/grpc.health.v1.Health2/Check"]
)
def test_a_service_nobody_classified_needs_the_token(method: str) -> None:
    assert auth.classify(method) is auth.Access.CONTROL
    assert auth.needs_token(method, reads=False)


def test_a_read_method_name_on_another_service_is_not_a_read() -> None:
    assert auth.classify("/megascope.v1.AgentService/Watch") is auth.Access.READ
    assert auth.classify("/other.v1.Service/Watch") is auth.Access.CONTROL
