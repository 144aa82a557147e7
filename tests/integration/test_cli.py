"""`megascope` command-line contract: subcommands listed, bad input gets a clear error and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import run_megascope


def test_help_lists_the_subcommands() -> None:
    result = run_megascope("--help")
    assert result.returncode == 0
    assert "train" in result.stdout


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--preset", "huge"], "--preset"),
        (["--steps", "0"], "--steps"),
        (["--data", "/nonexistent/megascope-data"], "--data"),
        (["--batch-tokens", "1"], "--batch-tokens"),
        (["--nproc-per-node", "0"], "--nproc-per-node"),
        (["--nnodes", "2"], "--rdzv-endpoint"),
        (["--nnodes", "x:y"], "--nnodes"),
        (["--lr", "-1"], "--lr"),
    ],
)
def test_bad_flag_gives_clear_error_naming_it(args: list[str], flag: str) -> None:
    result = run_megascope("train", *args, timeout=60)
    assert result.returncode == 2
    assert flag in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_data_directory_without_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "empty.txt").write_text("")
    result = run_megascope("train", "--data", str(tmp_path), timeout=60)
    assert result.returncode == 2
    assert "--data" in result.stderr and "no text" in result.stderr
    assert "Traceback" not in result.stderr


def test_batch_larger_than_the_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_text("hello world\n" * 10)
    result = run_megascope("train", "--data", str(tmp_path), "--batch-tokens", "4096", timeout=60)
    assert result.returncode == 2
    assert "--batch-tokens" in result.stderr


@pytest.mark.parametrize(
    ("inject", "reason"),
    [
        ("crash:rank=9,step=3", "the job has ranks 0..3, so rank 9 never runs"),
        ("bogus", "unknown fault kind 'bogus'"),
        ("crash:rank=1", "step"),
    ],
)
def test_demo_refuses_a_bad_inject_before_starting_anything(tmp_path: Path, inject: str, reason: str) -> None:
    run_dir = tmp_path / "demo"
    result = run_megascope("demo", "--headless", "--run-dir", str(run_dir), "--inject", inject, timeout=60)
    assert result.returncode == 2
    assert "--inject" in result.stderr and reason in result.stderr
    assert not run_dir.exists()  # no agent started, no empty run directory left
    assert "logs in" not in result.stdout + result.stderr
