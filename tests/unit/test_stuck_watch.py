"""A survivor that never sees its collective fail leaves for a replacement (StuckWatch), and only such a one.

The watched rank is a real process with a real recovery store client (its exit is the behaviour under test): its
main thread sleeps, as a rank blocked in a gloo collective would, or sits in its recovery."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch.distributed as dist

from megascope.engine.recovery import Recovery
from megascope.engine.runtime import recovery_env

PREFIX = recovery_env.store_prefix({})
RANK_PROCESS = textwrap.dedent(
    """
    import sys, time
    from datetime import timedelta
    from megascope.engine.recovery import Recovery, StuckWatch

    recovery = Recovery("gloo", 1, 2, timedelta(seconds=30))
    watch = StuckWatch(recovery, lambda: 0.2)
    if sys.argv[1] == "recovering":
        with watch.recovering():
            print("ready", flush=True)
            time.sleep(3)
    else:
        print("ready", flush=True)
        time.sleep(3 if sys.argv[1] == "healthy" else 600)
    watch.stop()
    """
)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[dist.TCPStore]:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    monkeypatch.setenv(recovery_env.RECOVERY_STORE_ENV, f"127.0.0.1:{server.port}")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    yield server


def start_rank(how: str) -> subprocess.Popen[str]:
    """Rank 1 of two, watched, its main thread doing ``how``; returns once its watch runs."""
    process = subprocess.Popen(
        [sys.executable, "-c", RANK_PROCESS, how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n", process.communicate()
    return process


def ended(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def test_a_rank_that_does_not_begin_recovering_after_an_announcement_leaves_for_a_replacement(
    store: dist.TCPStore,
) -> None:
    stuck = start_rank("stuck")
    store.add(PREFIX + "generation", 1)  # rank 0's replacement announced generation 1
    code, err = ended(stuck)
    assert code == recovery_env.STUCK_SURVIVOR_EXIT, err
    assert "never saw its collective fail" in err
    assert store.get(PREFIX + "rejoin/rank1") == b"1"


def test_the_replacement_of_a_stuck_rank_joins_the_generation_it_left_for_without_opening_one(
    store: dist.TCPStore,
) -> None:
    store.add(PREFIX + "generation", 1)
    store.set(PREFIX + "rejoin/rank1", "1")  # what the stuck rank 1 left
    assert Recovery("gloo", 1, 2, timedelta(seconds=30)).announce() == 1
    assert int(store.add(PREFIX + "generation", 0)) == 1
    # ... once only: the next replacement of rank 1 replaces a dead rank, and opens a generation.
    assert Recovery("gloo", 1, 2, timedelta(seconds=30)).announce() == 2


def test_a_rank_already_recovering_is_not_taken_for_stuck(store: dist.TCPStore) -> None:
    recovering = start_rank("recovering")
    store.add(PREFIX + "generation", 1)
    code, err = ended(recovering)
    assert code == 0, err
    assert not store.check([PREFIX + "rejoin/rank1"])


def test_a_rank_with_no_newer_generation_is_left_alone(store: dist.TCPStore) -> None:
    code, err = ended(start_rank("healthy"))
    assert code == 0, err
