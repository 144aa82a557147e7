"""The warm parent (engine/runtime/warm_parent.py), driven through the guard's end of its pipes, with real processes
running a tiny module (tests/support/scripts/warm_rank.py); and the choices around it: which ranks run under one
(the rank guard's gate), when a rank is replaced (its policy) and when recovery is in place (the launcher's default).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from megascope.engine.config import ConfigError
from megascope.engine.runtime import recovery_env
from megascope.engine.runtime.launch import LaunchOptions, launcher_environment, recovery_mode
from megascope.engine.runtime.rank_guard import (
    REPEAT_FAULT_SECONDS,
    REPEAT_FAULT_SECONDS_ENV,
    TRAINER_MODULE,
    WARM_MODULES_ENV,
    repeat_fault_seconds,
    should_replace,
    uses_warm_parent,
)
from megascope.engine.runtime.warm_parent import EXITED_MARK, WarmParentLink

_TESTS = Path(__file__).resolve().parent.parent
_RANK = "support.scripts.warm_rank"
_DEADLINE = 120.0
"""Only a guard against hanging forever."""


@pytest.fixture(autouse=True)
def importable_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(_TESTS))
    monkeypatch.delenv(recovery_env.REPLACEMENT_ENV, raising=False)


@pytest.fixture
def links() -> Iterator[list[WarmParentLink]]:
    started: list[WarmParentLink] = []
    yield started
    for link in started:
        link.quit()


def start(links: list[WarmParentLink], directory: Path, *args: str) -> WarmParentLink:
    link = WarmParentLink(["-m", _RANK, str(directory), *args])
    links.append(link)
    return link


def record(directory: Path, pid: int) -> dict[str, Any]:
    """What the rank of ``pid`` wrote when it started."""
    path = directory / f"rank0-{pid}.json"
    deadline = time.monotonic() + _DEADLINE
    while not path.exists():
        assert time.monotonic() < deadline, f"rank {pid} never started"
        time.sleep(0.02)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_the_first_rank_is_forked_at_once_from_the_preloaded_module_and_its_clean_exit_is_reported(
    tmp_path: Path, links: list[WarmParentLink]
) -> None:
    link = start(links, tmp_path, "wait")
    kind, pid, _ = link.read() or ("none", 0, 0)
    assert kind == "started" and pid != link.process.pid
    started = record(tmp_path, pid)
    # preload ran once, in the warm parent; the rank is its child and runs main with no replacement count
    assert started["preloaded_by"] == link.process.pid == psutil.Process(pid).ppid()
    assert started["replacement"] == 0
    (tmp_path / "stop").touch()
    assert link.read() == ("exited", pid, 0)
    assert link.quit() == 0


def test_a_rank_that_exits_with_a_code_is_reported_with_that_code(tmp_path: Path, links: list[WarmParentLink]) -> None:
    link = start(links, tmp_path, "exit", "3")
    _, pid, _ = link.read() or ("none", 0, 0)
    assert link.read() == ("exited", pid, 3)


def test_an_exception_in_main_exits_1_with_its_traceback_on_stderr_before_the_mark(
    tmp_path: Path, links: list[WarmParentLink]
) -> None:
    link = start(links, tmp_path, "raise")
    _, pid, _ = link.read() or ("none", 0, 0)
    assert link.read() == ("exited", pid, 1)
    link.quit()
    assert link.process.stderr is not None
    err = link.process.stderr.read()
    assert err.index(b"RuntimeError: the rank failed on purpose") < err.index(EXITED_MARK)


def test_a_replacement_is_forked_with_its_replacement_count_set(tmp_path: Path, links: list[WarmParentLink]) -> None:
    link = start(links, tmp_path, "exit", "3")
    _, first, _ = link.read() or ("none", 0, 0)
    assert link.read() == ("exited", first, 3)
    assert link.fork(1)
    kind, second, _ = link.read() or ("none", 0, 0)
    assert kind == "started" and second != first
    replacement = record(tmp_path, second)
    assert replacement["replacement"] == 1 and replacement["preloaded_by"] == link.process.pid
    assert link.read() == ("exited", second, 3)


def test_sigterm_to_the_warm_parent_is_forwarded_to_its_rank(tmp_path: Path, links: list[WarmParentLink]) -> None:
    link = start(links, tmp_path, "wait")
    _, pid, _ = link.read() or ("none", 0, 0)
    record(tmp_path, pid)  # running main
    link.process.send_signal(signal.SIGTERM)
    assert link.read() == ("exited", pid, -signal.SIGTERM)
    assert link.process.poll() is None  # the warm parent waits for its guard's word
    assert link.quit() == 0


def test_the_warm_parent_and_its_rank_end_when_their_guard_dies(tmp_path: Path) -> None:
    guard = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time\n"
            "from megascope.engine.runtime.warm_parent import WarmParentLink\n"
            f"link = WarmParentLink(['-m', {_RANK!r}, sys.argv[1], 'wait'])\n"
            "print(link.process.pid, link.read()[1], flush=True)\n"
            "time.sleep(3600)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert guard.stdout is not None
    warm, rank = map(int, guard.stdout.readline().split())
    record(tmp_path, rank)
    guard.kill()
    guard.wait()
    deadline = time.monotonic() + _DEADLINE
    while any(_alive(pid) for pid in (warm, rank)):
        assert time.monotonic() < deadline, "the warm parent or its rank outlived their guard"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_rank_starts_as_a_fresh_process_when_a_thread_runs_at_the_fork(
    tmp_path: Path, links: list[WarmParentLink]
) -> None:
    link = start(links, tmp_path, "exit", "0", "--thread")
    _, pid, _ = link.read() or ("none", 0, 0)
    assert record(tmp_path, pid)["preloaded_by"] == pid  # it imported and preloaded the module itself
    assert link.read() == ("exited", pid, 0)
    link.quit()
    assert link.process.stderr is not None
    assert b"starts as a fresh process instead" in link.process.stderr.read()


# --- the choices around it ------------------------------------------------------------------------------------------


def test_only_our_trainer_runs_under_a_warm_parent_and_only_when_recovery_is_in_place() -> None:
    store = {recovery_env.RECOVERY_STORE_ENV: "127.0.0.1:5000"}
    assert uses_warm_parent(["-m", TRAINER_MODULE, "config.json"], store)
    assert not uses_warm_parent(["-m", TRAINER_MODULE, "config.json"], {})
    assert not uses_warm_parent(["train.py"], store)
    assert not uses_warm_parent(["-m", _RANK], store)
    assert uses_warm_parent(["-m", _RANK], {**store, WARM_MODULES_ENV: f"other, {_RANK}"})


def test_a_first_fault_is_replaced_but_a_repeated_one_a_failed_recovery_or_a_stop_is_not() -> None:
    assert should_replace(-signal.SIGKILL, replacements=0, lived_seconds=1.0, stopping=False)
    assert should_replace(1, replacements=3, lived_seconds=REPEAT_FAULT_SECONDS, stopping=False)
    assert not should_replace(1, replacements=1, lived_seconds=REPEAT_FAULT_SECONDS / 2, stopping=False)
    assert not should_replace(recovery_env.RECOVERY_FAILED_EXIT, replacements=0, lived_seconds=1.0, stopping=False)
    assert not should_replace(-signal.SIGTERM, replacements=0, lived_seconds=1.0, stopping=True)
    assert not should_replace(0, replacements=0, lived_seconds=1.0, stopping=False)


def test_a_stuck_survivor_that_left_is_replaced_even_soon_after_its_own_start() -> None:
    exit_code = recovery_env.STUCK_SURVIVOR_EXIT
    assert should_replace(exit_code, replacements=1, lived_seconds=REPEAT_FAULT_SECONDS / 2, stopping=False)
    assert not should_replace(exit_code, replacements=1, lived_seconds=1.0, stopping=True)


def test_recovery_is_in_place_by_default_for_our_trainer_on_one_node_and_a_restart_otherwise() -> None:
    trainer = ["-m", TRAINER_MODULE, "config.json"]
    assert recovery_mode(LaunchOptions(nproc_per_node=4), trainer) == recovery_env.INPLACE
    assert recovery_mode(LaunchOptions(), ["train.py"]) == recovery_env.RESTART
    multi = LaunchOptions(nnodes="1:2", rdzv_endpoint="node0:29400")
    assert recovery_mode(multi, trainer) == recovery_env.RESTART
    assert recovery_mode(LaunchOptions(recovery="restart"), trainer) == recovery_env.RESTART
    assert recovery_mode(LaunchOptions(recovery="inplace"), ["train.py"]) == recovery_env.INPLACE
    assert recovery_mode(LaunchOptions(nproc_per_node=1), trainer) == recovery_env.RESTART  # no rank to take it from


def test_in_place_recovery_asked_for_several_nodes_is_refused_naming_the_way_out() -> None:
    with pytest.raises(ConfigError, match="--recovery inplace needs a job of one node.*--recovery restart"):
        LaunchOptions(nnodes="2", rdzv_endpoint="node0:29400", recovery="inplace").validate()


def test_in_place_recovery_asked_for_one_rank_is_refused_naming_the_way_out() -> None:
    with pytest.raises(ConfigError, match="--recovery inplace needs at least 2 ranks.*--recovery restart"):
        LaunchOptions(nproc_per_node=1, recovery="inplace").validate()


def test_the_launcher_environment_names_the_mode_and_drops_an_outer_jobs_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(recovery_env.RECOVERY_STORE_ENV, "127.0.0.1:1")
    monkeypatch.setenv(recovery_env.REPLACEMENT_ENV, "2")
    env = launcher_environment(LaunchOptions(nproc_per_node=2), entry=["-m", TRAINER_MODULE, "config.json"])
    assert env[recovery_env.RECOVERY_ENV] == recovery_env.INPLACE
    assert recovery_env.RECOVERY_STORE_ENV not in env and recovery_env.REPLACEMENT_ENV not in env
    assert os.environ[recovery_env.RECOVERY_STORE_ENV] == "127.0.0.1:1"  # this process's own is left alone


def test_the_agent_refuses_in_place_recovery_for_a_users_script() -> None:
    agent = [
        sys.executable,
        "-m",
        "megascope.agent.cli",
        "agent",
        "--port",
        "0",
        "--nproc-per-node",
        "2",
        "--recovery",
        "inplace",
        "--",
    ]
    done = subprocess.run([*agent, "train.py"], capture_output=True, text=True, timeout=_DEADLINE)
    assert done.returncode == 2
    assert "only megascope's trainer recovers in place" in done.stderr and "--recovery restart" in done.stderr


@pytest.mark.parametrize(("value", "seconds"), [("", 60.0), ("2.5", 2.5), ("0", 0.0), ("abc", 60.0), ("-1", 60.0),
                                                ("nan", 60.0)])  # fmt: skip
def test_the_repeated_fault_window_is_read_from_the_environment_and_a_bad_value_falls_back(
    value: str, seconds: float
) -> None:
    assert repeat_fault_seconds({REPEAT_FAULT_SECONDS_ENV: value}) == seconds
