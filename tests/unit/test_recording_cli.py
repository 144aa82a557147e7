"""``megascope replay``, ``export`` and ``report`` on bad input: each says what is wrong, names the path, and exits 2;
a damaged record still replays up to the damage, with a warning."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from megascope.dashboard import export_cli, replay_cli, report_cli
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos.megascope.v1 import telemetry_pb2
from megascope.protos.recording import RecordWriter

T0 = float(int(time.time()) - 600)
COMMANDS = {"replay": replay_cli.main, "export": export_cli.main, "report": report_cli.main}


def main(argv: list[str]) -> int:
    """The command as ``megascope COMMAND ...`` runs it (each module's own entry point: the dispatcher's other
    commands are not loaded)."""
    return COMMANDS[argv[0]](argv[1:])


def _record(run_dir: Path, node: str = "node0", run_id: str = "run-a", steps: int = 5) -> Path:
    path = run_paths.record_file(run_dir, node)
    writer = RecordWriter(path, node=node, run_id=run_id)
    for step in range(steps):
        report = telemetry_pb2.StepReport(node=node, rank=0, world_size=1, step=step, loss=1.0, wall_time=T0 + step)
        writer.add_batch(telemetry_pb2.Telemetry(step_reports=[report]))
    writer.close()
    return path


@pytest.mark.parametrize("command", ["replay", "export", "report"])
def test_a_run_directory_without_a_record_is_named(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"megascope {command}: error: {tmp_path}: no record in {tmp_path / 'record'}" in err


@pytest.mark.parametrize("command", ["replay", "report"])
def test_records_of_different_runs_are_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(tmp_path / "a", run_id="run-a")
    _record(tmp_path / "b", run_id="run-b")
    assert main([command, str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "different runs" in capsys.readouterr().err


def test_a_file_that_is_no_database_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run_paths.record_file(tmp_path, "node0")
    path.parent.mkdir(parents=True)
    path.write_text("half a file\n" * 500)
    assert main(["replay", str(tmp_path), "--once"]) == 2
    assert f"{path}: not a megascope record" in capsys.readouterr().err


def test_a_damaged_record_replays_up_to_the_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _record(tmp_path, steps=3000)
    data = bytearray(path.read_bytes())
    start, end = len(data) * 30 // 100 // 4096 * 4096, len(data) * 35 // 100 // 4096 * 4096
    data[start:end] = bytes(end - start)
    path.write_bytes(bytes(data))
    assert main(["replay", str(tmp_path), "--once", "--at", "step 3"]) == 0
    captured = capsys.readouterr()
    assert "megascope replay: warning:" in captured.err and "damaged" in captured.err
    assert "step 3" in captured.out


def test_parquet_without_pyarrow_says_how_to_get_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import pyarrow  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        _record(tmp_path)
        assert main(["export", str(tmp_path), "--format", "parquet"]) == 2
        assert "pip install 'megascope[parquet]'" in capsys.readouterr().err
    else:
        pytest.skip("pyarrow is installed: the message is for when it is not")
