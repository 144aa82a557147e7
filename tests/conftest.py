"""Test-session setup: the repository root off ``sys.path``, no user profile, the integration tier marked ``slow``.

``python -m pytest`` puts the current directory on ``sys.path``, which would make the owner's top-level folders
importable under their bare names: ``kernels/`` then shadows the Hugging Face ``kernels`` package that
transformers imports, and a test could pass against ``engine.x`` instead of the installed ``megascope.engine.x``.
Tests import megascope as users do, and their helpers as ``support`` (this folder is on the path).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _REPO]
# A developer's own profile (~/.config/megascope/config.toml) must not change what the tests' commands do: every
# test, and every process a test starts, reads an empty config home unless the test points it elsewhere.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="megascope-test-config-")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration starts real processes: ``-m "not slow"`` leaves them out."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def utc() -> Iterator[None]:
    """Local time is UTC for the test (snapshots show clock times)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "UTC")
        time.tzset()
        yield
    time.tzset()
