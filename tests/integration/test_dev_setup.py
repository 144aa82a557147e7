"""Set-up in two commands: README's quick start is `.ci/dev demo` and `.ci/dev test` over one virtual environment,
`.ci/dev` installs only what is missing (a second run installs nothing), and CI runs exactly README's test command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from support import REPO

DEV = REPO / ".ci" / "dev"


def _quick_start() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"^## Quick start\n.*?```bash\n(.*?)```", readme, re.MULTILINE | re.DOTALL)
    assert block, "README has a Quick start section with a bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.split("#", 1)[0].strip()]


def _dev(*args: str, venv_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MEGASCOPE_FRESH"}
    env.update(MEGASCOPE_VENV=str(venv_dir), PYTHON=sys.executable)
    return subprocess.run([str(DEV), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def test_the_quick_start_is_two_commands_demo_then_the_test_suite() -> None:
    assert _quick_start() == [".ci/dev demo", ".ci/dev test"]


def test_ci_runs_exactly_the_readmes_test_command_in_a_fresh_environment() -> None:
    script = (REPO / ".ci" / "run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == _quick_start()[1]
    assert "MEGASCOPE_FRESH=1" in script


def test_a_dry_run_says_what_it_would_install_and_does_nothing(tmp_path: Path) -> None:
    target = tmp_path / "venv"
    result = _dev("--dry-run", "test", "-x", venv_dir=target)
    assert result.returncode == 0, result.stderr
    said = result.stderr
    assert f"+ {sys.executable} -m venv {target}" in said
    assert f"-m pip install --quiet -e {REPO}[dev]" in said
    assert f"+ {target}/bin/python -m pytest -q -x" in said
    if shutil.which("nvidia-smi") is None:  # no GPU: the CPU build, pinned with its label
        assert "torch==2.13.0+cpu" in said
    assert not target.exists()


def test_an_unknown_command_prints_the_usage_and_fails() -> None:
    result = _dev("tset", venv_dir=Path("/nonexistent"))
    assert result.returncode == 2
    assert "unknown command 'tset'" in result.stderr and "usage: .ci/dev" in result.stderr


@pytest.mark.timeout(900)
def test_a_second_set_up_installs_nothing(tmp_path: Path) -> None:
    # The environment sees this interpreter's packages (a .pth naming them: system_site_packages would show the
    # base interpreter's, bare on a fresh CI machine), so the first set-up finds torch and the dependencies there
    # (no download) and installs megascope itself; the second must find it all up to date.
    target = tmp_path / "venv"
    venv.create(target, with_pip=True)
    (site,) = target.glob("lib/python*/site-packages")
    (site / "_test_parent.pth").write_text("\n".join(p for p in sys.path if p.endswith("site-packages")) + "\n")
    first = _dev("setup", venv_dir=target, timeout=800)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pip install" in first.stderr
    second = _dev("setup", venv_dir=target)
    assert second.returncode == 0, second.stderr
    assert "is up to date (nothing to install)" in second.stderr
    assert "pip" not in second.stderr
