"""The recovery's waits on a real recovery store (a TCPStore on loopback), and how a peer's death is told apart."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch.distributed as dist

from megascope.engine.recovery import Recovery, RecoveryFailed, is_peer_failure
from megascope.engine.runtime import recovery_env


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[dist.TCPStore]:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    monkeypatch.setenv(recovery_env.RECOVERY_STORE_ENV, f"127.0.0.1:{server.port}")
    yield server


def rank(number: int, world_size: int = 2) -> Recovery:
    return Recovery("gloo", number, world_size, timedelta(seconds=30))


def test_a_survivor_waits_for_the_generation_a_replacement_announces(store: dist.TCPStore) -> None:
    replacement = rank(1)
    assert replacement.announce() == 1
    assert rank(0).wait_for_generation() == 1


def test_a_survivor_gives_up_when_no_replacement_announces_itself(store: dist.TCPStore) -> None:
    with pytest.raises(RecoveryFailed, match="no replacement rank announced itself"):
        rank(0).wait_for_generation(deadline_seconds=0.05)


def test_a_rank_that_gives_up_makes_every_waiting_rank_give_up(store: dist.TCPStore) -> None:
    with pytest.raises(RecoveryFailed):
        rank(1).fail("the replacement could not start")
    with pytest.raises(RecoveryFailed, match="rank 1: the replacement could not start"):
        rank(0).wait_for_generation()


def test_a_newer_generation_while_the_group_forms_is_a_second_fault(store: dist.TCPStore) -> None:
    first = rank(0, world_size=3)
    first.announce()  # generation 1, which waits for the two other ranks
    rank(1, world_size=3).announce()  # generation 2: a second rank died and was replaced meanwhile
    with pytest.raises(RecoveryFailed, match="generation 2 appeared while generation 1 formed"):
        first.form_group(1)


def test_a_full_restart_starts_again_from_generation_zero(
    store: dist.TCPStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rank(1).announce()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert rank(1).announce() == 1


def test_only_a_lost_peer_counts_as_a_collective_failure() -> None:
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4834"
    )
    assert is_peer_failure(gloo)
    assert is_peer_failure(dist.DistBackendError("NCCL error"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))
