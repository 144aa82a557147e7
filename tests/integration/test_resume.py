"""A run stopped at step k and resumed from its checkpoint continues exactly as if it had not stopped."""

from __future__ import annotations

from pathlib import Path

from support import read_telemetry, run_megascope

COMMON = ("train", "--nproc-per-node", "2", "--preset", "tiny", "--batch-tokens", "256", "--val-every", "0",
          "--log-every", "100")  # fmt: skip


def losses(run_dir: Path) -> dict[tuple[int, int], float]:
    return {(rank, r["step"]): r["loss"] for rank, recs in read_telemetry(run_dir).items() for r in recs
            if r["type"] == "step"}  # fmt: skip


def test_resumed_run_reproduces_the_uninterrupted_losses_bit_for_bit(tmp_path: Path) -> None:
    whole = run_megascope(*COMMON, "--steps", "30", "--run-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    first = run_megascope(*COMMON, "--steps", "10", "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "5",
                          "--run-dir", str(tmp_path / "first"))  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_megascope(*COMMON, "--steps", "30", "--ckpt-dir", str(tmp_path / "ckpt"),
                            "--run-dir", str(tmp_path / "resumed"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted({step for _, step in got}) == list(range(11, 31))  # it started after the checkpoint
    assert {key: expected[key] for key in got} == got
    events = [r for r in read_telemetry(tmp_path / "resumed")[0] if r["type"] == "event"]
    assert any(e["kind"] == "resumed" and "step 10" in e["text"] for e in events)
