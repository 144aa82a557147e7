"""Profiles end to end: a real agent configured by its [agent] section alone, read by `megascope status` configured
by its [client] section alone (agents, token file), with nothing but --config on either command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO
from support.agent_process import AgentProcess

pytestmark = pytest.mark.slow


def _status(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "megascope.agent.cli", "status", "--json", "--timeout", "20", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
    )  # fmt: skip


def test_an_agent_and_status_configured_by_profiles_alone(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("profile-token\n")
    (tmp_path / "token").chmod(0o600)
    node = tmp_path / "node.toml"
    node.write_text('[agent]\nnode = "from-profile"\ntoken_file = "token"\ntoken_reads = true\n')
    env = {k: v for k, v in os.environ.items() if k != "MEGASCOPE_TOKEN"}
    with AgentProcess("--config", str(node), "--run-dir", str(tmp_path / "run"), env=env) as agent:
        laptop = tmp_path / "laptop.toml"
        laptop.write_text(f'[client]\nagents = ["{agent.address}"]\ntoken_file = "token"\n')
        configured = _status("--config", str(laptop), env=env)
        laptop.write_text(f'[client]\nagents = ["{agent.address}"]\n')
        without_token = _status("--config", str(laptop), env=env)

    assert configured.returncode == 0, configured.stderr
    assert [n["node"] for n in json.loads(configured.stdout)["nodes"]] == ["from-profile"]
    # The agent took token_reads and token_file from its profile: reads without the token are refused.
    assert without_token.returncode == 1 and "token" in without_token.stderr
