"""What each rank's guard runs: a user's command line after ``--`` (engine/runtime/launch.py) and the rank's own
command (engine/runtime/rank_guard.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megascope.engine.runtime.launch import LaunchOptions, script_entry, torchrun_command
from megascope.engine.runtime.rank_guard import NO_PYTHON_FLAG, child_command


@pytest.mark.parametrize("interpreter", ["python", "python3", "python3.11", sys.executable])
def test_a_leading_interpreter_is_dropped_so_the_script_runs_with_ours(interpreter: str) -> None:
    assert script_entry([interpreter, "train.py", "--lr", "3"]) == ["train.py", "--lr", "3"]


def test_a_script_or_module_without_an_interpreter_is_kept_as_it_is() -> None:
    assert script_entry(["train.py"]) == ["train.py"]
    assert script_entry(["-m", "pkg.train"]) == ["-m", "pkg.train"]


def test_with_no_python_the_command_is_run_as_given_through_the_guard(tmp_path: Path) -> None:
    entry = script_entry(["python", "train.py"], no_python=True)
    assert entry == ["python", "train.py"]
    command = torchrun_command(LaunchOptions(no_python=True), entry, tmp_path, "run")
    guard = command.index("megascope.engine.runtime.rank_guard")
    assert command[guard + 1 :] == [NO_PYTHON_FLAG, "python", "train.py"]
    assert child_command(command[guard + 1 :]) == ["python", "train.py"]


def test_without_no_python_the_rank_is_this_interpreter_running_the_script_unbuffered() -> None:
    assert child_command(["train.py", "--x"]) == [sys.executable, "-u", "train.py", "--x"]
