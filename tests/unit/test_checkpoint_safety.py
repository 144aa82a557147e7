"""Issue 17, data safety, in one process: each test makes its own damaged checkpoint, full disk or hostile name.

Resume falls back past a damaged newest checkpoint (and never tries it again), a failed save is a warning and
leaves nothing behind, retention makes room before writing on a short disk, verify checksums the safetensors
header too, metadata and ``latest`` cannot point outside the checkpoint, and ``ckpt ls``/``verify`` answer a
permission error or a truncated file with one line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from support.damage import damage, denied, escape, flip, header_length
from support.manager_rank import Rank

from megascope.engine.checkpoint import Checkpointer, CheckpointError, ckpt_cli, committed_steps, load_state, verify
from megascope.engine.checkpoint import checkpointer as checkpointer_module
from megascope.engine.checkpoint.format import BLOCK_BYTES, LATEST, METADATA, read_metadata, step_dir_name
from megascope.protos.events import ERROR, WARNING
from megascope.protos.megascope.v1 import telemetry_pb2

# --- a rank, as the trainer drives its manager ---------------------------------------------------------


def a_rank(tmp_path: Path) -> Rank:
    """A rank with a 64x64 model, saving every second step and keeping them all."""
    return Rank(tmp_path, features=(64, 64), every=2, keep_last=0)


def trained(tmp_path: Path) -> Path:
    """Checkpoints at steps 2, 4, 6 (all kept)."""
    first = a_rank(tmp_path)
    first.manager.load()
    first.run(range(1, 7))
    return tmp_path / "ckpt"


DAMAGES = {
    # damage -> (the step resumed from, the checkpoint set aside as damaged, if any)
    "truncated": (4, 6),
    "flipped data byte": (4, 6),
    "flipped header byte": (4, 6),
    "no metadata.json": (4, None),
    "latest on a missing directory": (6, None),
    "latest absolute, into another run": (6, None),
    "file name escaping the checkpoint": (4, 6),
}


@pytest.mark.parametrize("how", list(DAMAGES))
def test_resume_falls_back_to_the_newest_checkpoint_that_verifies_says_why_and_never_retries_it(
    tmp_path: Path, how: str
) -> None:
    root = trained(tmp_path)
    damage(root, 6, how, tmp_path / "outside")
    resumed_from, set_aside = DAMAGES[how]

    rank = a_rank(tmp_path)
    assert rank.manager.load() == resumed_from
    assert rank.data.state == {"consumed": resumed_from}
    (skipped,) = rank.of_kind("resume_skipped")
    assert skipped.severity == WARNING and skipped.resume.error and "\n" not in skipped.text
    assert rank.of_kind("resumed")[0].resume.step == resumed_from
    if set_aside is not None:
        assert skipped.resume.set_aside == str(root / f"{step_dir_name(set_aside)}.damaged")
        assert set_aside not in committed_steps(root)
    # latest now names a real checkpoint; a second start (an automatic restart) skips nothing: no loop.
    assert (root / (root / LATEST).read_text().strip() / METADATA).is_file()
    rank.manager.close()
    again = a_rank(tmp_path)
    assert again.manager.load() == resumed_from
    assert not again.of_kind("resume_skipped")
    again.manager.close()


def test_a_damaged_checkpoint_a_restart_asked_for_falls_back_to_an_older_one(tmp_path: Path) -> None:
    from megascope.engine.runtime.run_dir import write_restart_request

    root = trained(tmp_path)
    damage(root, 4, "truncated", tmp_path / "outside")
    (tmp_path / "run").mkdir(exist_ok=True)
    write_restart_request(tmp_path / "run", 4)
    rank = a_rank(tmp_path)
    assert rank.manager.load() == 2
    assert [e.resume.step for e in rank.of_kind("resume_skipped")] == [4]
    rank.manager.close()


def test_when_no_checkpoint_verifies_the_start_fails_with_one_line_naming_each(tmp_path: Path) -> None:
    root = trained(tmp_path)
    for step in (2, 4, 6):
        damage(root, step, "truncated", tmp_path / "outside")
    rank = a_rank(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be resumed from") as raised:
        rank.manager.load()
    message = str(raised.value)
    assert "\n" not in message and all(step_dir_name(s) in message for s in (2, 4, 6)) and "--no-resume" in message
    assert committed_steps(root) == [2, 4, 6]  # nothing set aside when there is nothing to fall back to


# --- failed saves -----------------------------------------------------------------------------------------


def test_a_failed_commit_is_a_warning_and_leaves_no_tmp_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[telemetry_pb2.Event] = []
    checkpointer = Checkpointer(tmp_path, on_event=events.append)
    checkpointer.save(1, {"w": torch.ones(4)})
    checkpointer.wait()
    real_replace = os.replace

    def full_disk(source: object, target: object) -> None:
        if str(source).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        real_replace(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpointer_module.os, "replace", full_disk)
    checkpointer.save(2, {"w": torch.zeros(4)})
    figures = checkpointer.wait()
    checkpointer.close()
    assert figures is not None and figures.error and "No space left" in figures.error
    failed = events[-1]
    assert failed.kind == "checkpoint_failed" and failed.severity == WARNING
    assert not list(tmp_path.glob("*.tmp")), "a failed commit left its step_*.tmp directory"
    assert (tmp_path / LATEST).read_text().strip() == "step_00000001"


def test_a_start_whose_saves_all_failed_says_so_as_an_error(tmp_path: Path) -> None:
    rank = a_rank(tmp_path)
    rank.manager.load()
    for step in (2, 4, 6):  # a file where each save wants its directory: every save fails
        (tmp_path / "ckpt" / f"{step_dir_name(step)}.tmp").write_text("in the way")
    rank.run(range(1, 7))
    failed = rank.of_kind("checkpoint_failed")
    assert len(failed) == 4 and all(e.severity == WARNING for e in failed[:3])
    assert failed[-1].severity == ERROR and "every checkpoint save" in failed[-1].text


Usage = namedtuple("Usage", "total used free")


def test_retention_makes_room_before_writing_when_the_disk_is_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk with room for 3 checkpoints and not quite a fourth (simulated: disk_usage reports the directory's
    own bytes against a capacity), --ckpt-keep 3: each save from the fourth on needs the room of the oldest,
    which retention removes before writing rather than after."""
    mib = 1 << 20
    state = {"w": torch.randn(256, 1024)}  # 1 MiB
    needed = int(1.05 * mib) + mib  # the estimate: the previous save's size, plus 5% and 1 MiB of margin
    capacity = 3 * mib + needed - mib // 2

    def disk_usage(path: object) -> Usage:
        used = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
        return Usage(capacity, used, capacity - used)

    monkeypatch.setattr(checkpointer_module.shutil, "disk_usage", disk_usage)
    events: list[telemetry_pb2.Event] = []
    checkpointer = Checkpointer(tmp_path, keep_last=3, on_event=events.append)
    for step in range(1, 6):
        checkpointer.save(step, state)
        checkpointer.wait()
    checkpointer.close()
    made_room = [e for e in events if e.kind == "checkpoint_made_room"]
    assert made_room and all(e.severity == WARNING for e in made_room)
    assert [list(e.checkpoint.removed) for e in made_room] == [[1], [2]] and made_room[0].checkpoint.bytes > mib
    assert not [e for e in events if e.kind == "checkpoint_failed"]
    assert committed_steps(tmp_path) == [3, 4, 5]


# --- verify: every byte ---------------------------------------------------------------------------------


def saved(tmp_path: Path) -> Path:
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, {"big": torch.randn(700, 200), "small": torch.randn(3)})
    checkpointer.close()
    return tmp_path / "step_00000001"


@pytest.mark.parametrize("where", ["length", "json", "padding"])
def test_verify_fails_on_a_flipped_safetensors_header_byte(tmp_path: Path, where: str) -> None:
    step_dir = saved(tmp_path)
    data = step_dir / "rank0.safetensors"
    length = header_length(data)
    position = {"length": 1, "json": 8 + length // 2, "padding": 8 + length - 1}[where]
    if where == "padding" and data.read_bytes()[position : position + 1] != b" ":
        position = 8 + length - 2  # the JSON's closing brace: still a header byte
    flip(data, position)
    with pytest.raises(CheckpointError, match="header"):
        verify(step_dir)
    with pytest.raises(CheckpointError):
        load_state(step_dir)


def test_a_checkpoint_written_before_header_checksums_still_verifies_and_its_header_is_still_checked(
    tmp_path: Path,
) -> None:
    step_dir = saved(tmp_path)
    raw = json.loads((step_dir / METADATA).read_text())
    del raw["headers"]
    (step_dir / METADATA).write_text(json.dumps(raw))
    assert verify(step_dir).step == 1 and not read_metadata(step_dir).headers
    data = step_dir / "rank0.safetensors"
    text = data.read_bytes()
    at = text.index(b"[700,200]")
    data.write_bytes(text[:at] + b"[700,201]" + text[at + 9 :])  # same length: sizes still match
    with pytest.raises(CheckpointError, match="header"):
        verify(step_dir)


# --- confinement ----------------------------------------------------------------------------------------


def test_metadata_file_names_cannot_point_outside_the_checkpoint(tmp_path: Path) -> None:
    step_dir = saved(tmp_path / "run")
    name = escape(step_dir, tmp_path / "outside")
    assert name.startswith("../../outside") or "outside" in name
    for attempt in (lambda: verify(step_dir), lambda: load_state(step_dir), lambda: read_metadata(step_dir)):
        with pytest.raises(CheckpointError, match="outside the checkpoint"):
            attempt()


@pytest.mark.parametrize("latest", ["absolute", "../other/step_00000001", "step_00000001/../../other/step_00000001"])
def test_latest_cannot_hold_an_absolute_path_or_lead_into_another_run(tmp_path: Path, latest: str) -> None:
    saved(tmp_path / "other")
    saved(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "step_00000001")
    target = str(tmp_path / "other" / "step_00000001") if latest == "absolute" else latest
    (tmp_path / "run" / LATEST).write_text(target + "\n")
    with pytest.raises(CheckpointError, match="not a step directory"):
        load_state(tmp_path / "run")


# --- ckpt ls and verify: one line ------------------------------------------------------------------------


def cli(action: str, path: Path) -> int:
    args = argparse.Namespace(ckpt_command=action, dir=path, path=path)
    return ckpt_cli.run(args)


def test_ckpt_ls_shows_a_step_with_a_truncated_or_missing_file_as_damaged_not_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpointer = Checkpointer(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        checkpointer.save(step, {"w": torch.randn(300, 300)})
        checkpointer.wait()
    checkpointer.close()
    data = tmp_path / "step_00000003" / "rank0.safetensors"
    data.write_bytes(data.read_bytes()[:-BLOCK_BYTES])
    (tmp_path / "step_00000002" / "rank0.safetensors").unlink()
    assert cli("ls", tmp_path) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "complete" in rows["1"] and "DAMAGED" in rows["2"] and "missing" in rows["2"]
    assert "DAMAGED" in rows["3"] and "truncated" in rows["3"] and "complete" not in rows["3"]


def test_ckpt_ls_and_verify_answer_a_permission_error_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    step_dir = saved(tmp_path)
    with denied(step_dir):
        assert cli("ls", tmp_path) == 0
        listing = capsys.readouterr()
        assert "UNREADABLE" in listing.out and "Permission denied" in listing.out and not listing.err
        assert cli("verify", step_dir) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "Permission denied" in error and "Traceback" not in error
    with denied(tmp_path):
        assert cli("ls", tmp_path) == 1
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "Permission denied" in error
