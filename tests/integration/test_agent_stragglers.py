"""A real agent judges its own node's ranks: with ``--inject slow:rank=1,factor=2.5`` on a job of four ranks, its
/metrics page flags rank 1 (and no other) with a cost, and its webhook receives one straggler alert for it.

(The judge itself is tested without processes in tests/unit/test_node_stragglers.py.)
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.ops import running_agent, webhook_receiver

pytestmark = pytest.mark.slow

STEPS = 60
FACTOR = 2.5
"""Four ranks share the test machine's two cores, so each rank's busy time swings by about 25% from step to step
(tests/integration/test_demo_stragglers.py); 2.5x stands far above that, so the flag is raised once and stays."""
DEADLINE_SECONDS = 480
"""A guard against hanging only: the job takes about a minute."""


def rank_samples(url: str) -> dict[tuple[str, str], float]:
    """(metric, rank) -> value of the straggler gauges on the page; ("exited", rank) -> 1 for a rank that exited."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("megascope_rank_straggler"):
                samples[(sample.name, sample.labels["rank"])] = sample.value
            elif sample.name == "megascope_rank_state" and sample.labels["state"] == "exited":
                samples[("exited", sample.labels["rank"])] = sample.value
    return samples


@pytest.mark.timeout(DEADLINE_SECONDS + 120)
def test_the_agent_flags_its_slow_rank_on_metrics_and_sends_one_straggler_alert(tmp_path: Path) -> None:
    with webhook_receiver() as hook, running_agent(
        tmp_path, "--nproc-per-node", "4", "--steps", str(STEPS), "--batch-tokens", "1024",
        "--inject", f"slow:rank=1,factor={FACTOR}", "--metrics-port", "0", "--alert-webhook", hook.url,
    ) as agent:  # fmt: skip
        assert agent.metrics_url is not None, "".join(agent.lines)
        deadline = time.monotonic() + DEADLINE_SECONDS
        samples = rank_samples(agent.metrics_url)
        while samples.get(("megascope_rank_straggler", "1")) != 1 or not hook.bodies("straggler"):
            assert time.monotonic() < deadline, "".join(agent.lines[-40:])
            assert agent.process.poll() is None, "".join(agent.lines[-40:])
            time.sleep(1)
            samples = rank_samples(agent.metrics_url)
        # Let the job run to its end: no second alert and no other rank flagged on the way.
        while any(samples.get(("exited", str(rank))) != 1 for rank in range(4)):
            assert time.monotonic() < deadline, "".join(agent.lines[-40:])
            time.sleep(1)
            samples = rank_samples(agent.metrics_url)
        time.sleep(2)  # the alerts service reads new events twice a second
    assert {rank: samples[("megascope_rank_straggler", str(rank))] for rank in range(4)} == {0: 0, 1: 1, 2: 0, 3: 0}
    assert samples[("megascope_rank_straggler_cost_seconds", "1")] > 0
    [alert] = hook.bodies("straggler")
    assert alert["node"] == "node0" and alert["rank"] == 1 and alert["severity"] == "warning"
    assert alert["text"].startswith("[megascope] node0: rank 1 on node0 is a straggler")
    assert alert["detail"]["cost_seconds"] > 0
    assert hook.bodies("straggler_cleared") == []
