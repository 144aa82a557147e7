"""The agent's /metrics page: read from the node's state at scrape time, parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.certs import make_pki
from support.ops import node_at_step_7

from megascope.agent.auth import ServerTLS
from megascope.agent.metrics import MetricsServer, NodeMetrics
from megascope.agent.state import NodeState
from megascope.protos.megascope.v1 import agent_pb2
from megascope.protos.megascope.v1 import telemetry_pb2 as pb

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(server: MetricsServer, token: str | None = None) -> Samples:
    def get() -> str:
        request = urllib.request.Request(server.url)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
async def served() -> object:
    state = node_at_step_7()
    merge = agent_pb2.MergeProgress(state=agent_pb2.MERGE_STATE_RUNNING, bytes_done=25, bytes_total=100)
    server = MetricsServer(NodeMetrics(state, lambda: merge), "127.0.0.1", 0)
    server.start()
    yield state, server
    await server.stop()


async def test_each_rank_shows_its_newest_step_phases_loss_and_mfu(served: tuple[NodeState, MetricsServer]) -> None:
    _, server = served
    samples = await scrape(server)
    rank1 = (("node", "node0"), ("rank", "1"))
    assert samples[("megascope_rank_step", rank1)] == 7
    assert samples[("megascope_rank_loss", rank1)] == pytest.approx(1.3)
    assert samples[("megascope_rank_step_seconds", rank1)] == 1.5
    assert samples[("megascope_rank_phase_seconds", (("node", "node0"), ("phase", "comm_wait"), ("rank", "1")))] == 0.2
    assert samples[("megascope_rank_mfu", rank1)] == 0.4
    assert samples[("megascope_rank_state", (("node", "node0"), ("rank", "1"), ("state", "running")))] == 1
    assert samples[("megascope_rank_last_step_age_seconds", rank1)] >= 0


async def test_gpu_samples_name_the_rank_that_trains_on_each_gpu(served: tuple[NodeState, MetricsServer]) -> None:
    _, server = served
    samples = await scrape(server)
    assert samples[("megascope_gpu_temperature_celsius", (("gpu", "0"), ("node", "node0"), ("rank", "1")))] == 60
    assert samples[("megascope_gpu_throttled", (("gpu", "1"), ("node", "node0"), ("rank", "0")))] == 1
    assert samples[("megascope_host_cpu_percent", (("node", "node0"),))] == 12.5


async def test_incidents_count_once_and_checkpoint_and_merge_figures_show(
    served: tuple[NodeState, MetricsServer],
) -> None:
    state, server = served
    node = (("node", "node0"),)
    first = await scrape(server)
    state.event("crash", pb.CrashDetail(exit_code=1), rank=0, step=9)
    second = await scrape(server)
    assert (first[("megascope_crashes_total", node)], second[("megascope_crashes_total", node)]) == (1, 2)
    assert second[("megascope_restarts_total", node)] == 1 and second[("megascope_steps_lost_total", node)] == 3
    assert second[("megascope_checkpoint_failures_total", node)] == 1
    assert second[("megascope_checkpoint_step", node)] == 6
    assert second[("megascope_checkpoint_duration_seconds", (("node", "node0"), ("phase", "total")))] == 1.5
    assert second[("megascope_merge_progress_ratio", node)] == 0.25


async def test_labels_never_carry_a_step_or_free_text(served: tuple[NodeState, MetricsServer]) -> None:
    _, server = served
    labels = {name for _, pairs in await scrape(server) for name, _ in pairs}
    assert labels <= {"node", "rank", "gpu", "phase", "state", "version", "run_id"}


async def test_with_a_token_a_scrape_without_it_gets_401_and_with_it_the_page() -> None:
    server = MetricsServer(NodeMetrics(node_at_step_7()), "127.0.0.1", 0, token="s3cret")
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            await scrape(server, token="wrong")
        assert refused.value.code == 401
        assert ("megascope_rank_step", (("node", "node0"), ("rank", "0"))) in await scrape(server, token="s3cret")
    finally:
        await server.stop()


async def test_a_scrape_of_64_ranks_with_a_full_history_shows_each_ranks_newest_step() -> None:
    state = NodeState(pb.NodeInfo(node="big"))
    for step in range(200):
        for rank in range(64):
            state.add_step(pb.StepReport(rank=rank, step=step, step_seconds=0.1))
    metrics = NodeMetrics(state)
    families = {family.name: family for family in metrics.collect()}
    assert len(families["megascope_rank_step"].samples) == 64
    assert {s.value for s in families["megascope_rank_step"].samples} == {199}


async def test_with_mutual_tls_a_client_with_a_certificate_gets_the_page_and_one_without_is_refused(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path)
    tls = ServerTLS(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    server = MetricsServer(NodeMetrics(node_at_step_7()), "127.0.0.1", 0, tls=tls)
    server.start()

    def get(certificate: bool) -> int:
        context = ssl.create_default_context(cafile=str(pki.ca))
        if certificate:
            context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        with urllib.request.urlopen(server.url, timeout=10, context=context) as response:
            return int(response.status)

    try:
        assert server.url.startswith("https://")
        assert await asyncio.to_thread(get, True) == 200
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            await asyncio.to_thread(get, False)
    finally:
        await server.stop()
