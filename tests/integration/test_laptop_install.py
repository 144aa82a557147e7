"""A laptop install (README: A laptop install): `pip install megascope` without the [node] extra gives the dashboard
and `megascope status`, with neither torch nor Triton; the node's commands say what to install.

One test builds a real virtual environment and installs this repository into it with its base dependencies only,
from the package index (as a user's laptop does), then points it at a live agent started from the test's own
environment. The other checks, in this environment, what the laptop's commands import (python -X importtime).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from support import REPO
from support.agent_process import AgentProcess

pytestmark = pytest.mark.slow

NODE_ONLY = ("torch", "triton", "psutil", "safetensors", "pynvml")
"""Modules of the [node] extra that a laptop command never imports (grpc_reflection, the other, is imported by
grpc's own __init__ wherever it is installed)."""


def _source_tree(destination: Path) -> Path:
    """The files a clone of the repository has (tracked, and new ones not ignored): what `pip install .` sees in CI,
    without this checkout's build outputs and virtual environments."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def _run(*command: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.mark.timeout(1800)  # downloads the base dependencies (textual, grpcio, protobuf, numpy) from the index
def test_a_venv_without_torch_runs_status_against_a_live_agent(tmp_path: Path) -> None:
    environment = tmp_path / "laptop"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = environment / "bin" / "python"
    install = _run(python, "-m", "pip", "install", "--quiet", _source_tree(tmp_path / "src"), timeout=1500)
    assert install.returncode == 0, install.stderr[-4000:]

    torch = _run(python, "-c", "import torch")
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    megascope = environment / "bin" / "megascope"

    with AgentProcess("--node", "laptop-target", "--run-dir", str(tmp_path / "run")) as agent:
        status = _run(megascope, "status", "--agents", agent.address, "--json", "--timeout", "30")
    assert status.returncode == 0, status.stderr
    snapshot = json.loads(status.stdout)
    assert snapshot["agents"] == [{"address": agent.address, "connected": True, "error": None}]
    assert [node["node"] for node in snapshot["nodes"]] == ["laptop-target"]

    node_command = _run(megascope, "agent", "--no-launch")
    assert node_command.returncode == 2
    [line] = node_command.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("megascope agent: needs the node extra, which is not installed here (no torch")
    assert line.endswith(": pip install 'megascope[node]'")


def _imported(*code: str) -> set[str]:
    """The top-level modules a Python process running ``code`` imported (python -X importtime)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    return {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)$", result.stderr, re.M)}


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["status", "--help"], ["dashboard", "--help"], ["config", "show"]],
    ids=lambda argv: " ".join(argv),
)
def test_help_and_config_import_neither_the_node_nor_numpy(argv: list[str]) -> None:
    imported = _imported("-m", "megascope.agent.cli", *argv)
    assert "megascope" in imported  # the parse worked: importtime saw the package
    assert imported.isdisjoint({*NODE_ONLY, "numpy", "grpc", "textual"}), imported & {*NODE_ONLY, "numpy"}


def test_status_and_the_dashboard_import_nothing_of_the_node() -> None:
    status = _imported("-m", "megascope.agent.cli", "status", "--agents", "127.0.0.1:9", "--timeout", "0.5")
    assert "grpc" in status and status.isdisjoint(NODE_ONLY), status & set(NODE_ONLY)
    dashboard = _imported("-c", "import megascope.dashboard.app, megascope.dashboard.dashboard_cli")
    assert "textual" in dashboard and dashboard.isdisjoint(NODE_ONLY), dashboard & set(NODE_ONLY)
