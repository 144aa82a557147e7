"""Issue 17, data safety, through real processes: `megascope train` on damaged checkpoints and failing saves, a
full disk (a real tiny tmpfs, where a mount namespace can be had), `ckpt` one-line errors, and a merge whose
agent is killed with SIGKILL. Each test makes its own damaged input.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from support import REPO, read_telemetry, run_megascope
from support.agents import AGENT_WITH_A_MERGE, write_checkpoints

from megascope.engine.checkpoint import committed_steps
from megascope.engine.checkpoint.format import LATEST, step_dir_name

TRAIN = ("train", "--nproc-per-node", "1", "--preset", "tiny", "--batch-tokens", "256", "--val-every", "0",
         "--val-batches", "0", "--log-every", "100", "--no-self-check")  # fmt: skip


def events(run_dir: Path) -> list[dict[str, object]]:
    return [r for records in read_telemetry(run_dir).values() for r in records if r["type"] == "event"]


def test_train_resumes_from_the_newest_good_checkpoint_with_a_warning_line_and_no_traceback(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    first = run_megascope(*TRAIN, "--steps", "6", "--ckpt-dir", str(ckpt), "--ckpt-every", "2",
                          "--run-dir", str(tmp_path / "first"))  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    data = ckpt / "step_00000006" / "rank0.safetensors"
    data.write_bytes(data.read_bytes()[:-100])  # the newest checkpoint truncated

    resumed = run_megascope(*TRAIN, "--steps", "8", "--ckpt-dir", str(ckpt), "--run-dir", str(tmp_path / "resumed"))
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    warning = [line for line in output.splitlines() if "resume_skipped" in line]
    assert len(warning) == 1 and "step_00000006" in warning[0] and "truncated" in warning[0], output[-3000:]
    kinds = {e["kind"]: e for e in events(tmp_path / "resumed")}
    assert kinds["resume_skipped"]["severity"] == "SEVERITY_WARNING"
    assert "step 4" in str(kinds["resumed"]["text"])
    assert (ckpt / "step_00000006.damaged").is_dir()  # set aside: a restart does not try it again
    assert committed_steps(ckpt)[-1] == 8 and (ckpt / LATEST).read_text().strip() == "step_00000008"

    for step in committed_steps(ckpt):  # now every one damaged: one line naming each, before any rank starts
        data = ckpt / step_dir_name(step) / "rank0.safetensors"
        data.write_bytes(data.read_bytes()[:-100])
    none = run_megascope(*TRAIN, "--steps", "10", "--ckpt-dir", str(ckpt), "--run-dir", str(tmp_path / "none"))
    assert none.returncode != 0 and "Traceback" not in none.stdout + none.stderr
    assert none.stderr.count("\n") == 1 and "no checkpoint in" in none.stderr and "--no-resume" in none.stderr


def test_two_ranks_skip_together_a_checkpoint_only_one_of_them_finds_damaged(tmp_path: Path) -> None:
    two = ("train", "--nproc-per-node", "2", *TRAIN[3:])
    ckpt = tmp_path / "ckpt"
    first = run_megascope(*two, "--steps", "4", "--ckpt-dir", str(ckpt), "--ckpt-every", "2",
                          "--run-dir", str(tmp_path / "first"))  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    data = ckpt / "step_00000004" / "rank1.safetensors"  # only rank 1 reads its own RNG state there
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0x01
    data.write_bytes(bytes(raw))
    resumed = run_megascope(*two, "--steps", "6", "--ckpt-dir", str(ckpt), "--run-dir", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank 1 could not read it" in resumed.stdout
    telemetry = read_telemetry(tmp_path / "resumed")
    for rank in (0, 1):
        kinds = [r["kind"] for r in telemetry[rank] if r["type"] == "event"]
        assert "resume_skipped" in kinds
        resumed_at = [r for r in telemetry[rank] if r["type"] == "event" and r["kind"] == "resumed"]
        assert [r["step"] for r in resumed_at] == [2]  # both ranks from the same, older checkpoint
    own = next(r for r in telemetry[1] if r["type"] == "event" and r["kind"] == "resume_skipped")
    assert "checksum mismatch" in own["text"]
    assert (ckpt / "step_00000004.damaged").is_dir()


def test_a_run_whose_saves_all_fail_says_so_and_exits_nonzero_unless_allowed(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for step in (2, 4):  # a file where each save wants its directory: every save fails
        (ckpt / f"{step_dir_name(step)}.tmp").write_text("in the way")
    failing = run_megascope(*TRAIN, "--steps", "4", "--ckpt-dir", str(ckpt), "--ckpt-every", "2",
                            "--run-dir", str(tmp_path / "failing"))  # fmt: skip
    assert failing.returncode == 1, failing.stderr[-2000:]
    assert "[warning] checkpoint_failed" in (failing.stdout + failing.stderr).lower()
    assert "every checkpoint save failed" in failing.stderr
    assert "Traceback" not in failing.stderr
    allowed = run_megascope(*TRAIN, "--steps", "4", "--ckpt-dir", str(ckpt), "--ckpt-every", "2",
                            "--allow-failed-saves", "--run-dir", str(tmp_path / "allowed"))  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "every checkpoint save failed" in allowed.stderr


SAVES_ON_A_SMALL_DISK = textwrap.dedent(
    """
    import json, sys, torch
    from megascope.engine.checkpoint import Checkpointer, committed_steps
    kinds = []
    checkpointer = Checkpointer(sys.argv[1], keep_last=3, on_event=lambda e: kinds.append(e.kind))
    for step in range(1, 7):
        checkpointer.save(step, {"w": torch.full((256, 1024), float(step))})  # 1 MiB
        checkpointer.wait()
    checkpointer.close()
    import pathlib
    leftovers = [p.name for p in pathlib.Path(sys.argv[1]).glob("*.tmp")]
    print(json.dumps({"kinds": kinds, "steps": committed_steps(pathlib.Path(sys.argv[1])), "tmp": leftovers}))
    """
)


def test_a_full_disk_makes_room_by_retention_before_writing_on_a_real_tiny_tmpfs(tmp_path: Path) -> None:
    """A 4.5 MiB tmpfs (mounted in a private mount namespace: root, or a user namespace) holds three 1 MiB
    checkpoints and not a fourth with its margin; --ckpt-keep 3 must not fail every save from the fourth on."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1): no private mount namespace for a tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    probe = subprocess.run([unshare, *flags, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {disk}"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    script = 'mount -t tmpfs -o size=4608k tmpfs "$1" && exec "$2" -c "$3" "$1"'
    result = subprocess.run([unshare, *flags, "sh", "-c", script, "sh", str(disk), sys.executable,
                             SAVES_ON_A_SMALL_DISK], capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    outcome = json.loads(result.stdout.splitlines()[-1])
    assert "checkpoint_failed" not in outcome["kinds"], outcome
    assert outcome["kinds"].count("checkpoint") == 6 and "checkpoint_made_room" in outcome["kinds"]
    assert outcome["steps"] == [4, 5, 6] and outcome["tmp"] == []


def test_ckpt_verify_and_ls_on_damage_and_escaping_names_answer_in_one_line(tmp_path: Path) -> None:
    write_checkpoints(tmp_path / "ckpt", (1, 2))
    step_dir = tmp_path / "ckpt" / "step_00000002"
    data = step_dir / "rank0.safetensors"
    raw = bytearray(data.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little") // 2] ^= 0x01  # a header byte
    data.write_bytes(bytes(raw))
    verify = run_megascope("ckpt", "verify", str(step_dir), timeout=60)
    assert verify.returncode == 1 and "header" in verify.stderr and verify.stderr.count("\n") == 1

    (tmp_path / "ckpt" / LATEST).write_text(str(tmp_path / "ckpt" / "step_00000001") + "\n")  # absolute
    latest = run_megascope("ckpt", "verify", str(tmp_path / "ckpt"), timeout=60)
    assert latest.returncode == 1 and "not a step directory" in latest.stderr and latest.stderr.count("\n") == 1

    meta = tmp_path / "ckpt" / "step_00000001" / "metadata.json"
    meta.write_text(meta.read_text().replace('"rank0.safetensors"', '"../../outside/r1.safetensors"'))
    escaping = run_megascope("ckpt", "verify", str(tmp_path / "ckpt" / "step_00000001"), timeout=60)
    assert escaping.returncode == 1 and "outside the checkpoint" in escaping.stderr
    assert escaping.stderr.count("\n") == 1

    listing = run_megascope("ckpt", "ls", str(tmp_path / "ckpt"), timeout=60)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    assert "complete" not in listing.stdout  # one with a damaged header... the other names a file outside


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 directory anyway (the unit test covers it)")
def test_ckpt_ls_and_verify_on_an_unreadable_checkpoint_answer_in_one_line(tmp_path: Path) -> None:
    write_checkpoints(tmp_path / "ckpt", (1,))
    step_dir = tmp_path / "ckpt" / "step_00000001"
    step_dir.chmod(0)
    try:
        listing = run_megascope("ckpt", "ls", str(tmp_path / "ckpt"), timeout=60)
        verify = run_megascope("ckpt", "verify", str(step_dir), timeout=60)
    finally:
        step_dir.chmod(0o755)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr and "complete" not in listing.stdout
    assert verify.returncode == 1 and verify.stderr.count("\n") == 1 and "Traceback" not in verify.stderr


def test_a_merge_started_by_the_agent_dies_with_it_and_publishes_nothing(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    write_checkpoints(ckpt, (1, 2))
    stand_in = REPO / "tests" / "support" / "merge_stand_in.py"
    env = dict(os.environ, STAND_IN_SECONDS="20")
    agent = subprocess.Popen([sys.executable, "-c", AGENT_WITH_A_MERGE, str(ckpt), str(stand_in), str(tmp_path / "m")],
                             stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)  # fmt: skip
    try:
        assert agent.stdout is not None
        pid_text, out_text = agent.stdout.readline().split()
        merge, out = psutil.Process(int(pid_text)), Path(out_text)
        deadline = time.monotonic() + 60
        while not out.with_name(out.name + ".tmp").exists():  # the merge is under way
            assert time.monotonic() < deadline and merge.is_running(), "the merge never started"
            time.sleep(0.05)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
        try:
            merge.wait(timeout=15)  # with the tie it stops at once; without it, it would publish after ~20 s
        except psutil.TimeoutExpired:
            merge.kill()
            pytest.fail("the merge outlived its agent")
        assert not out.exists(), "the merge published after its agent was killed"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
