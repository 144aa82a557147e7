"""Generic gRPC clients (grpcurl, grpcui, Postman) on a real agent: server reflection lists and describes its
services from the agent alone, no .proto files at hand, under the same token rules as telemetry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from support.agent_process import AgentProcess

from megascope.agent import auth

pytestmark = pytest.mark.slow

TOKEN = "reflection-token"
AGENT_SERVICE = "megascope.v1.AgentService"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    run_dir = tmp_path_factory.mktemp("run")
    with AgentProcess("--node", "reflected", "--run-dir", str(run_dir)) as process:
        yield process


def test_reflection_lists_the_agent_health_and_reflection_services(agent: AgentProcess) -> None:
    with grpc.insecure_channel(agent.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert services == {AGENT_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_every_service_on_the_public_port_has_a_deliberate_access_class(agent: AgentProcess) -> None:
    """auth.classify makes an unknown service control (fail closed); a service added to the port is named there."""
    with grpc.insecure_channel(agent.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    named = auth.OPEN_SERVICES | auth.READ_SERVICES | {AGENT_SERVICE}
    assert services <= named, f"classify these in megascope.agent.auth: {services - named}"


def test_a_call_built_from_reflected_descriptors_alone_reaches_the_agent(agent: AgentProcess) -> None:
    """What `grpcurl -plaintext HOST:PORT megascope.v1.AgentService/GetSnapshot` does: no generated code."""
    with grpc.insecure_channel(agent.address) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(AGENT_SERVICE).methods_by_name["GetSnapshot"]
        assert method.containing_service.file.name == "megascope/v1/agent.proto"  # the name `protoc -I protos` gives
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{AGENT_SERVICE}/GetSnapshot",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        response = call(request_type(), timeout=30)
    assert response.node_info.node == "reflected"


class _Bearer(grpc.StreamStreamClientInterceptor):
    """Adds the token to the reflection stream (its client takes a channel, not call metadata)."""

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        metadata = [*(client_call_details.metadata or ()), ("authorization", f"Bearer {TOKEN}")]
        return continuation(client_call_details._replace(metadata=metadata), request_iterator)


def test_with_token_reads_reflection_needs_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    flags = ("--run-dir", str(tmp_path / "run"), "--token-file", str(token_file), "--token-reads")
    with AgentProcess(*flags) as agent, grpc.insecure_channel(agent.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with_token = grpc.intercept_channel(channel, _Bearer())
        assert AGENT_SERVICE in ProtoReflectionDescriptorDatabase(with_token).get_services()
