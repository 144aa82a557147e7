"""The run directory's paths, named once, and its restart request."""

from __future__ import annotations

from pathlib import Path

from megascope.engine.runtime import run_dir


def test_every_path_is_under_the_run_directory_by_its_documented_name(tmp_path: Path) -> None:
    assert run_dir.config_file(tmp_path) == tmp_path / "config.json"
    assert run_dir.telemetry_file(tmp_path, 3) == tmp_path / "telemetry" / "rank3.jsonl"
    assert run_dir.stacks_file(tmp_path, 3) == tmp_path / "stacks" / "rank3.txt"
    assert run_dir.logs_dir(tmp_path) == tmp_path / "logs"
    assert run_dir.logs_dir(tmp_path, "node1") == tmp_path / "logs" / "node1"
    assert run_dir.restart_request_file(tmp_path) == tmp_path / "restart_from.json"
    assert run_dir.checkpoints_dir(str(tmp_path)) == tmp_path / "checkpoints"


def test_telemetry_files_are_every_ranks_in_name_order(tmp_path: Path) -> None:
    for rank in (1, 0):
        run_dir.telemetry_file(tmp_path, rank).parent.mkdir(parents=True, exist_ok=True)
        run_dir.telemetry_file(tmp_path, rank).touch()
    (tmp_path / "telemetry" / "notes.txt").touch()
    assert [path.name for path in run_dir.telemetry_files(tmp_path)] == ["rank0.jsonl", "rank1.jsonl"]


def test_a_restart_request_is_read_back_once_cleared_and_zero_when_absent(tmp_path: Path) -> None:
    assert run_dir.read_restart_request(tmp_path) == 0
    run_dir.write_restart_request(tmp_path, 40)
    assert run_dir.read_restart_request(tmp_path) == 40
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, through a file renamed into place
    run_dir.clear_restart_request(tmp_path)
    run_dir.clear_restart_request(tmp_path)  # a second rank clearing it finds nothing: fine
    assert run_dir.read_restart_request(tmp_path) == 0
