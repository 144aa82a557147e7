"""`--alert-webhook`: a real job's crash and restart each reach a real HTTP webhook once, retried after a 500."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support import run_megascope
from support.ops import running_agent, webhook_receiver

pytestmark = pytest.mark.slow


def test_a_crash_and_its_restart_are_each_posted_once_and_a_500_is_retried(tmp_path: Path) -> None:
    with webhook_receiver(500) as hook, running_agent(
        tmp_path, "--nproc-per-node", "2", "--steps", "8", "--max-restarts", "1", "--ckpt-every", "2",
        "--inject", "crash:rank=1,step=3", "--alert-webhook", hook.url, "--exit-when-done",
    ) as agent:  # fmt: skip
        assert agent.process.wait(300) == 0, "".join(agent.lines)
        deadline = time.monotonic() + 30
        while len(hook.bodies("restart")) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
    crashes = hook.bodies("crash")
    assert len(crashes) == 2  # answered 500, then sent again: one incident
    assert crashes[0] == crashes[1]
    assert crashes[0]["rank"] == 1 and crashes[0]["node"] == "node0" and crashes[0]["text"].startswith("[megascope]")
    restarts = hook.bodies("restart")
    assert len(restarts) == 1 and restarts[0]["mttr_seconds"] > 0
    assert "SECRET-PATH" not in "".join(agent.lines)


def test_alert_test_posts_one_alert_and_names_the_host_only() -> None:
    with webhook_receiver() as hook:
        result = run_megascope("alert", "test", hook.url, "--node", "laptop", timeout=60)
    assert result.returncode == 0, result.stderr
    assert [(b["kind"], b["node"]) for b in hook.received] == [("test", "laptop")]
    assert "SECRET-PATH" not in result.stdout and "127.0.0.1" in result.stdout


def test_alert_test_to_a_webhook_that_fails_exits_1_with_the_status() -> None:
    with webhook_receiver(404) as hook:
        result = run_megascope("alert", "test", hook.url, timeout=60)
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr and "SECRET-PATH" not in result.stderr


def test_an_agent_given_a_webhook_that_is_not_http_exits_2_without_printing_its_secret(tmp_path: Path) -> None:
    result = run_megascope(
        "agent", "--no-launch", "--port", "0", "--run-dir", str(tmp_path), "--alert-webhook", "hooks.example/SECRET",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--alert-webhook must be an http(s) URL" in result.stderr and "SECRET" not in result.stderr


def test_a_job_that_gives_up_posts_job_failed_before_the_agent_exits(tmp_path: Path) -> None:
    with webhook_receiver() as hook, running_agent(
        tmp_path, "--nproc-per-node", "1", "--steps", "6", "--max-restarts", "0",
        "--inject", "crash:rank=0,step=2", "--alert-webhook", hook.url, "--exit-when-done",
    ) as agent:  # fmt: skip
        assert agent.process.wait(300) == 1, "".join(agent.lines)
        kinds = [body["kind"] for body in hook.received]  # read once the agent is gone: nothing arrives later
    assert kinds == ["crash", "job_failed"]
    assert "gave up" in hook.bodies("job_failed")[0]["text"]
