"""`megascope agent --metrics-port`: a real agent's /metrics page agrees with `megascope status --json`."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import run_megascope
from support.ops import running_agent

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def rank_value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, rank: int) -> float:
    return samples[(name, frozenset({("node", "node0"), ("rank", str(rank))}))]


def test_a_finished_jobs_metrics_match_status_json(tmp_path: Path) -> None:
    with running_agent(tmp_path, "--nproc-per-node", "2", "--steps", "5", "--metrics-port", "0") as agent:
        assert agent.metrics_url is not None, "".join(agent.lines)
        deadline = time.monotonic() + 240
        exited = frozenset({("node", "node0"), ("rank", "1"), ("state", "exited")})
        samples = scrape(agent.metrics_url)
        while (
            samples.get(("megascope_rank_state", exited)) != 1
            or len([k for k in samples if k[0] == "megascope_rank_step"]) < 2
        ):
            assert time.monotonic() < deadline, "".join(agent.lines)
            time.sleep(1)
            samples = scrape(agent.metrics_url)
        status = run_megascope("status", "--agents", agent.address, "--json", timeout=120)
        assert status.returncode == 0, status.stderr
        ranks = {row["rank"]: row for row in json.loads(status.stdout)["ranks"]}
    assert sorted(ranks) == [0, 1]
    for rank, row in ranks.items():
        assert rank_value(samples, "megascope_rank_step", rank) == row["step"] == 5
        assert rank_value(samples, "megascope_rank_loss", rank) == pytest.approx(row["loss"])
        assert rank_value(samples, "megascope_rank_step_seconds", rank) * 1000 == pytest.approx(row["step_ms"])
        assert rank_value(samples, "megascope_rank_tokens_per_second", rank) == pytest.approx(row["tokens_per_second"])
        assert row["status"] == "EXITED"
    assert samples[("megascope_host_memory_total_bytes", frozenset({("node", "node0")}))] > 0
    assert samples[("megascope_crashes_total", frozenset({("node", "node0")}))] == 0


def test_metrics_beyond_loopback_without_tls_or_token_are_refused(tmp_path: Path) -> None:
    result = run_megascope(
        "agent", "--no-launch", "--port", "0", "--run-dir", str(tmp_path), "--metrics-port", "0",
        "--metrics-host", "0.0.0.0", timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "refusing to serve metrics on 0.0.0.0" in result.stderr and "--token-reads" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _query(prometheus: str, expr: str) -> list[dict[str, object]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        result: list[dict[str, object]] = json.load(response)["data"]["result"]
    return result


@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="no prometheus server installed (Debian: apt install prometheus)"
)
def test_a_real_prometheus_scrapes_an_agent_with_its_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    metrics_port = _free_port()
    with running_agent(
        tmp_path, "--no-launch", "--metrics-port", str(metrics_port), "--token-file", str(token), "--token-reads"
    ) as agent:
        assert agent.metrics_url is not None, "".join(agent.lines)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: megascope\n"
            f"    authorization: {{credentials_file: {token}}}\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
        )
        web = _free_port()
        server = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            prometheus, deadline = f"http://127.0.0.1:{web}", time.monotonic() + 120
            found: list[dict[str, object]] = []
            while not found:
                assert time.monotonic() < deadline, "prometheus never scraped the agent"
                time.sleep(1)
                with contextlib.suppress(OSError):
                    found = _query(prometheus, 'megascope_agent_info{node="node0"}')
            assert _query(prometheus, 'up{job="megascope"}')[0]["value"][1] == "1"  # type: ignore[index]
        finally:
            server.terminate()
            server.wait(30)
