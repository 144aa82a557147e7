"""Shared helpers: run the real `megascope` command in a subprocess, read `status --json` and a run's telemetry."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_megascope(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`megascope ARGS...` as a user would run it, through the installed entry point's module."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "megascope.agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=env,
    )


def status_json(address: str) -> dict[str, Any]:
    """`megascope status --agents ADDRESS --json`, which must succeed, parsed."""
    result = run_megascope("status", "--agents", address, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    snapshot: dict[str, Any] = json.loads(result.stdout)
    return snapshot


def read_telemetry(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Every record of every rank's JSONL telemetry file, by rank."""
    records: dict[int, list[dict[str, Any]]] = {}
    for path in sorted((run_dir / "telemetry").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        records[rank] = [json.loads(line) for line in path.read_text().splitlines()]
    return records


def load_bench_script(name: str) -> ModuleType:
    """A script of bench/ as a module (bench/ is scripts, not a package), registered in ``sys.modules`` first: its
    dataclasses look their module up there. Loaded once: test files share it."""
    loaded = sys.modules.get(f"bench_{name}")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
