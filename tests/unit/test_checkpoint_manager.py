"""The checkpoint manager decides what a run saves and where it starts from; one process, no job started."""

from __future__ import annotations

from pathlib import Path

import torch
from support.manager_rank import Rank

from megascope.engine.checkpoint import committed_steps
from megascope.engine.runtime.run_dir import restart_request_file, write_restart_request


def test_the_schedule_saves_every_n_steps_and_the_last_one(tmp_path: Path) -> None:
    rank = Rank(tmp_path, steps=7, every=3)
    rank.manager.load()
    assert [step for step in range(1, 8) if rank.manager.should_save(step)] == [3, 6, 7]
    assert rank.manager.should_save(2, last=True)  # where a STOP ends the run
    rank.manager.close()


def test_without_a_checkpoint_directory_nothing_is_saved_and_a_request_is_refused(tmp_path: Path) -> None:
    rank = Rank(tmp_path, dir=None)
    assert rank.manager.load() == 0
    assert not rank.manager.should_save(6)
    assert rank.manager.request_save(3, 1) == (False, "a checkpoint was requested, but this run has no --ckpt-dir")
    (refused,) = rank.events
    assert refused.kind == "checkpoint_refused" and refused.checkpoint.step == 3 and refused.step == 1
    rank.manager.close()


def test_a_requested_save_is_accepted_until_its_step_is_done(tmp_path: Path) -> None:
    rank = Rank(tmp_path, steps=10)
    rank.manager.load()
    assert rank.manager.request_save(4, 2) == (True, "will save after step 4")
    assert rank.manager.request_save(4, 4)[0]  # the step just done is not saved yet: in time
    assert rank.manager.request_save(3, 4) == (False, "the request to save step 3 came too late")
    assert not rank.manager.request_save(11, 4)[0]  # the run never gets there
    assert rank.kinds() == ["checkpoint_refused", "checkpoint_refused"]
    rank.run(range(1, 6))
    assert committed_steps(tmp_path / "ckpt") == [4]


def test_a_save_resumes_bit_exactly_with_the_data_position_and_events_with_numbers(tmp_path: Path) -> None:
    first = Rank(tmp_path, steps=6, every=2)
    assert first.manager.load() == 0
    first.run(range(1, 5))
    assert first.kinds() == ["checkpoint_started", "checkpoint"] * 2
    saved = first.events[-1]
    assert saved.checkpoint.step == 4 and saved.checkpoint.bytes > 0 and saved.checkpoint.total_seconds > 0

    second = Rank(tmp_path, steps=6, every=2, seed=1)  # other initial weights: all must come from the save
    assert second.manager.load() == 4
    assert second.manager.resumed_from == 4
    assert torch.equal(second.model.weight, first.model.weight) and torch.equal(second.model.bias, first.model.bias)
    for a, b in zip(first.optimizer.state.values(), second.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    assert second.data.state == {"consumed": 4}
    (resumed,) = second.events
    assert resumed.kind == "resumed" and resumed.resume.step == 4 and resumed.resume.bytes_read > 0
    second.manager.close()


def test_retention_keeps_the_newest_and_every_nth(tmp_path: Path) -> None:
    rank = Rank(tmp_path, steps=6, every=1, keep_last=2, keep_every=3)
    rank.manager.load()
    rank.run(range(1, 7))
    assert committed_steps(tmp_path / "ckpt") == [3, 5, 6]


def test_a_restart_resumes_the_step_it_asked_for_once_or_the_newest_when_that_step_is_missing(tmp_path: Path) -> None:
    first = Rank(tmp_path, steps=6, every=2)
    first.manager.load()
    first.run(range(1, 7))
    run_dir = Path(first.config.run_dir)
    run_dir.mkdir()

    write_restart_request(run_dir, 4)
    asked = Rank(tmp_path, steps=6, every=2)
    assert asked.manager.load() == 4
    assert not restart_request_file(run_dir).exists()  # for one restart only
    asked.manager.close()

    write_restart_request(run_dir, 3)
    missing = Rank(tmp_path, steps=6, every=2)
    assert missing.manager.load() == 6
    assert missing.kinds() == ["restart_from_missing", "resumed"]
    assert missing.events[0].resume.step == 3
    missing.manager.close()


def test_unfinished_saves_of_an_earlier_attempt_are_removed_with_an_event(tmp_path: Path) -> None:
    unfinished = tmp_path / "ckpt" / "step_00000009.tmp"
    unfinished.mkdir(parents=True)
    rank = Rank(tmp_path)
    rank.manager.load()
    rank.manager.close()
    assert not unfinished.exists()
    (cleanup,) = rank.events
    assert cleanup.kind == "checkpoint_cleanup" and cleanup.checkpoint.path == str(unfinished)


def test_init_from_takes_the_weights_and_with_keep_the_optimizer_and_starts_at_step_zero(tmp_path: Path) -> None:
    source = Rank(tmp_path / "source", steps=2)
    source.manager.load()
    source.run(range(1, 3))
    checkpoint = tmp_path / "source" / "ckpt" / "step_00000002"

    for optimizer in ("fresh", "keep"):
        rank = Rank(tmp_path / optimizer, seed=1, init_from=str(checkpoint), init_optimizer=optimizer)
        assert rank.manager.load() == 0
        assert torch.equal(rank.model.weight, source.model.weight)
        assert bool(rank.optimizer.state) == (optimizer == "keep")
        (initialized,) = rank.events
        assert initialized.kind == "initialized" and initialized.resume.optimizer == optimizer
        assert initialized.resume.step == 2
        rank.manager.close()
