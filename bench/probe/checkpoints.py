"""Checkpoints under hostile conditions (issue 17, "Data safety and visible failures"); every input made here
(the damage by tests/support/damage.py, as the tests make it).

- resume with only the newest checkpoint damaged (truncated, a flipped data byte, a flipped header byte, no
  metadata.json, ``latest`` on a missing directory, ``latest`` holding an absolute path into another run, a
  file name escaping the checkpoint): the run's own :class:`CheckpointManager`, in this process, must resume
  from the newest good one, say which it skipped (a warning) and not try it again at the next start; plus one
  real ``megascope train`` on a truncated newest checkpoint (exit 0, one warning line, no traceback);
- every save failing (a file where each save wants its directory): ``megascope train`` must say so, exit 1;
- a full disk: a real 4.5 MiB tmpfs in a private mount namespace (``unshare -m``) when one can be had, else
  the same sizes simulated through ``shutil.disk_usage``: saves must go on by retention before writing;
- a commit failing with ENOSPC (injected at the rename): no ``step_*.tmp`` left, a warning;
- ``ckpt verify`` on a flipped header byte, a metadata file name ``../../outside/r1.safetensors``, an absolute
  ``latest``; ``ckpt ls`` on a truncated file; ``ckpt ls``/``verify`` on permission errors (a real chmod 000
  when not root, else denied in-process);
- a merge started through the agent's MergeRunner, then the "agent" killed with SIGKILL: the merge must stop
  and publish nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

from probe import Case

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the probe makes the damage the tests make

from support.agents import AGENT_WITH_A_MERGE  # noqa: E402
from support.damage import damage, denied, escape, flip, header_length  # noqa: E402
from support.manager_rank import Rank  # noqa: E402

AREA = "checkpoints"
REPO = Path(__file__).resolve().parents[2]
STAND_IN = REPO / "tests" / "support" / "merge_stand_in.py"
TRAIN = ("train", "--nproc-per-node", "1", "--preset", "tiny", "--batch-tokens", "256", "--val-every", "0",
         "--val-batches", "0", "--log-every", "100", "--no-self-check")  # fmt: skip


def megascope(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "megascope.agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str]) -> bool:
    return result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def trying(name: str, attempt: Callable[[], tuple[bool, str]]) -> Case:
    try:
        handled, detail = attempt()
    except Exception as error:  # the probe's own failure to try is a case not handled, not a crash of the table
        handled, detail = False, f"{type(error).__name__}: {error}"
    return Case(AREA, name, handled, " ".join(detail.split())[:300])


# --- resume, in process ---------------------------------------------------------------------------------


def _rank(workdir: Path) -> Rank:
    """The run's own manager, as its trainer drives it: saving every second step, keeping them all."""
    return Rank(workdir, features=(32, 32), every=2, keep_last=0)


def resume_case(workdir: Path, how: str) -> tuple[bool, str]:
    from megascope.protos.events import WARNING

    first = _rank(workdir)
    first.manager.load()
    first.run(range(1, 7))
    damage(workdir / "ckpt", 6, _DAMAGE.get(how, how), workdir / "outside")
    rank = _rank(workdir)
    try:
        step = rank.manager.load()
    except Exception as error:
        return False, f"the start failed: {type(error).__name__}: {error}"
    finally:
        rank.manager.close()
    skipped = rank.of_kind("resume_skipped")
    second = _rank(workdir)
    second_step = second.manager.load()
    second.manager.close()
    retried = second.of_kind("resume_skipped")
    expected = 6 if how.startswith("latest") else 4
    handled = (step == expected and len(skipped) == 1 and skipped[0].severity == WARNING and not retried
               and second_step == expected)  # fmt: skip
    said = skipped[0].text if skipped else "nothing said"
    return handled, f"resumed from {step} (expected {expected}); {said}; next start skipped {len(retried)}"


def resume_with_train(workdir: Path) -> tuple[bool, str]:
    ckpt = workdir / "ckpt"
    first = megascope(*TRAIN, "--steps", "6", "--ckpt-dir", str(ckpt), "--ckpt-every", "2",
                      "--run-dir", str(workdir / "first"))  # fmt: skip
    if first.returncode != 0:
        return False, f"the first run failed: {first.stderr[-300:]}"
    data = ckpt / "step_00000006" / "rank0.safetensors"
    data.write_bytes(data.read_bytes()[:-100])
    resumed = megascope(*TRAIN, "--steps", "8", "--ckpt-dir", str(ckpt), "--run-dir", str(workdir / "resumed"))
    output = resumed.stdout + resumed.stderr
    lines = [line for line in output.splitlines() if "resume_skipped" in line]
    handled = resumed.returncode == 0 and "Traceback" not in output and len(lines) == 1
    return handled, f"exit {resumed.returncode}; " + (lines[0] if lines else output[-200:])


# --- saves ----------------------------------------------------------------------------------------------


def all_saves_fail(workdir: Path) -> tuple[bool, str]:
    ckpt = workdir / "ckpt"
    ckpt.mkdir(parents=True)
    for step in (2, 4):
        (ckpt / f"step_{step:08d}.tmp").write_text("in the way")
    result = megascope(*TRAIN, "--steps", "4", "--ckpt-dir", str(ckpt), "--ckpt-every", "2",
                       "--run-dir", str(workdir / "run"))  # fmt: skip
    output = result.stdout + result.stderr
    said = [line for line in result.stderr.splitlines() if "every checkpoint save failed" in line]
    handled = result.returncode != 0 and bool(said) and "[warning] checkpoint_failed" in output.lower()
    return handled, f"exit {result.returncode}; " + (said[0] if said else "nothing said")


_SMALL_DISK = textwrap.dedent(
    """
    import json, pathlib, sys, torch
    from megascope.engine.checkpoint import Checkpointer, committed_steps
    kinds = []
    checkpointer = Checkpointer(sys.argv[1], keep_last=3, on_event=lambda e: kinds.append(e.kind))
    for step in range(1, 7):
        checkpointer.save(step, {"w": torch.full((256, 1024), float(step))})
        checkpointer.wait()
    checkpointer.close()
    root = pathlib.Path(sys.argv[1])
    print(json.dumps({"kinds": kinds, "steps": committed_steps(root), "tmp": [p.name for p in root.glob("*.tmp")]}))
    """
)


def full_disk(workdir: Path) -> tuple[bool, str]:
    disk = workdir / "disk"
    disk.mkdir()
    unshare = shutil.which("unshare")
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    how = "simulated through shutil.disk_usage"
    if unshare is not None:
        script = 'mount -t tmpfs -o size=4608k tmpfs "$1" && exec "$2" -c "$3" "$1"'
        result = subprocess.run([unshare, *flags, "sh", "-c", script, "sh", str(disk), sys.executable, _SMALL_DISK],
                                capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
        if result.returncode == 0:
            outcome = json.loads(result.stdout.splitlines()[-1])
            how = "a real 4.5 MiB tmpfs"
        elif "mount" not in result.stderr:
            return False, result.stderr[-300:]
    if how.startswith("simulated"):
        outcome = _simulated_disk(disk)
    kinds = outcome["kinds"]
    handled = "checkpoint_failed" not in kinds and kinds.count("checkpoint") == 6 and not outcome["tmp"]
    return handled, (f"{how}: {kinds.count('checkpoint')} of 6 saved, {kinds.count('checkpoint_made_room')} made "
                     f"room, {kinds.count('checkpoint_failed')} failed, kept {outcome['steps']}")  # fmt: skip


def _simulated_disk(disk: Path) -> dict[str, Any]:
    import torch

    from megascope.engine.checkpoint import Checkpointer, committed_steps
    from megascope.engine.checkpoint import checkpointer as module

    usage = namedtuple("usage", "total used free")
    capacity = 4608 * 1024

    def disk_usage(path: object) -> Any:
        used = sum(f.stat().st_size for f in disk.rglob("*") if f.is_file())
        return usage(capacity, used, capacity - used)

    kinds: list[str] = []
    real = module.shutil.disk_usage
    module.shutil.disk_usage = disk_usage  # type: ignore[assignment]
    try:
        checkpointer = Checkpointer(disk, keep_last=3, on_event=lambda e: kinds.append(e.kind))
        for step in range(1, 7):
            checkpointer.save(step, {"w": torch.full((256, 1024), float(step))})
            checkpointer.wait()
        checkpointer.close()
    finally:
        module.shutil.disk_usage = real  # type: ignore[assignment]
    return {"kinds": kinds, "steps": committed_steps(disk), "tmp": [p.name for p in disk.glob("*.tmp")]}


def failed_commit(workdir: Path) -> tuple[bool, str]:
    import torch

    from megascope.engine.checkpoint import Checkpointer
    from megascope.engine.checkpoint import checkpointer as module
    from megascope.protos.events import WARNING

    events: list[Any] = []
    checkpointer = Checkpointer(workdir, on_event=events.append)
    real = module.os.replace

    def enospc(source: Any, target: Any) -> None:
        if str(source).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        real(source, target)

    module.os.replace = enospc  # type: ignore[assignment]
    try:
        checkpointer.save(1, {"w": torch.ones(1000)})
        checkpointer.wait()
    finally:
        module.os.replace = real  # type: ignore[assignment]
        checkpointer.close()
    left = [p.name for p in workdir.glob("*.tmp")]
    failed = [e for e in events if e.kind == "checkpoint_failed"]
    handled = not left and bool(failed) and failed[0].severity == WARNING
    return handled, f"left {left or 'nothing'}; " + (failed[0].text if failed else "no event")


# --- ckpt ls / verify ------------------------------------------------------------------------------------


def _saved(root: Path, steps: tuple[int, ...] = (1,)) -> Path:
    import torch

    from megascope.engine.checkpoint import Checkpointer

    checkpointer = Checkpointer(root, keep_last=0)
    for step in steps:
        checkpointer.save(step, {"w": torch.randn(300, 300), "b": torch.zeros(3)})
        checkpointer.wait()
    checkpointer.close()
    return root / f"step_{steps[-1]:08d}"


def header_flip(workdir: Path) -> tuple[bool, str]:
    step_dir = _saved(workdir)
    data = step_dir / "rank0.safetensors"
    flip(data, 8 + header_length(data) // 2)
    result = megascope("ckpt", "verify", str(step_dir), timeout=60)
    return result.returncode == 1 and one_line(result), f"exit {result.returncode}: {result.stderr.strip()}"


def escaping_name(workdir: Path) -> tuple[bool, str]:
    step_dir = _saved(workdir / "a" / "b")
    escape(step_dir, workdir / "a" / "outside")
    result = megascope("ckpt", "verify", str(step_dir), timeout=60)
    refused = result.returncode == 1 and one_line(result) and "outside" in result.stderr
    return refused, f"exit {result.returncode}: {result.stderr.strip()}"


def absolute_latest(workdir: Path) -> tuple[bool, str]:
    other = _saved(workdir / "other")
    _saved(workdir / "run")
    shutil.rmtree(workdir / "run" / other.name)
    (workdir / "run" / "latest").write_text(str(other) + "\n")
    result = megascope("ckpt", "verify", str(workdir / "run"), timeout=60)
    return result.returncode == 1 and one_line(result), f"exit {result.returncode}: {result.stderr.strip()}"


def truncated_in_ls(workdir: Path) -> tuple[bool, str]:
    step_dir = _saved(workdir, (1, 2))
    data = step_dir / "rank0.safetensors"
    data.write_bytes(data.read_bytes()[:-1000])
    result = megascope("ckpt", "ls", str(workdir), timeout=60)
    row = next((line for line in result.stdout.splitlines() if line.startswith("2 ")), "")
    return result.returncode == 0 and "DAMAGED" in row and "complete" not in row, row


def permission(workdir: Path, action: str) -> tuple[bool, str]:
    step_dir = _saved(workdir)
    if os.geteuid() != 0:  # the real thing
        step_dir.chmod(0)
        try:
            result = megascope("ckpt", action, str(workdir if action == "ls" else step_dir), timeout=60)
        finally:
            step_dir.chmod(0o755)
        text = result.stdout + result.stderr
        ok = "Traceback" not in text and (result.returncode == 1 and one_line(result) if action == "verify"
                                          else result.returncode == 0 and "complete" not in result.stdout)  # fmt: skip
        return ok, f"chmod 000, exit {result.returncode}: {text.strip()[-200:]}"
    from megascope.engine.checkpoint import ckpt_cli

    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(ckpt_command=action, dir=workdir, path=step_dir)
    with denied(step_dir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = ckpt_cli.run(args)
        except Exception as error:
            return False, f"denied in process (root): {type(error).__name__}: {error}"
    text = out.getvalue() + err.getvalue()
    ok = "Traceback" not in text and (code == 1 and err.getvalue().count("\n") == 1 if action == "verify"
                                      else code == 0 and "UNREADABLE" in text)  # fmt: skip
    return ok, f"denied in process (root), exit {code}: {text.strip()[-200:]}"


# --- the agent's merge -----------------------------------------------------------------------------------


def agent_killed_during_merge(workdir: Path) -> tuple[bool, str]:
    import psutil

    _saved(workdir / "ckpt", (1, 2))
    env = dict(os.environ, STAND_IN_SECONDS="20")
    script = [sys.executable, "-c", AGENT_WITH_A_MERGE, str(workdir / "ckpt"), str(STAND_IN), str(workdir / "m")]
    agent = subprocess.Popen(script, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        assert agent.stdout is not None
        pid, out_text = agent.stdout.readline().split()
        merge, out = psutil.Process(int(pid)), Path(out_text)
        deadline = time.monotonic() + 60
        while not out.with_name(out.name + ".tmp").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
        try:
            merge.wait(timeout=15)
        except psutil.TimeoutExpired:
            merge.kill()
            return False, "the merge outlived its agent (killed by the probe after 15 s)"
        return not out.exists(), "the merge stopped with its agent; " + (
            "published!" if out.exists() else "nothing published"
        )
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


_DAMAGE = {"truncated file": "truncated"}
"""A case's name for a damage, where it is not the name :func:`support.damage.damage` knows it by."""

RESUME_DAMAGES = ("truncated file", "flipped data byte", "flipped header byte", "no metadata.json",
                  "latest on a missing directory", "latest absolute, into another run",
                  "file name escaping the checkpoint")  # fmt: skip


def run(workdir: Path) -> list[Case]:
    cases = []
    for n, how in enumerate(RESUME_DAMAGES):
        where = workdir / f"resume-{n}"
        cases.append(trying(f"resume, newest checkpoint: {how}", functools.partial(resume_case, where, how)))
    steps: list[tuple[str, Callable[[Path], tuple[bool, str]]]] = [
        ("megascope train resumes past a truncated newest checkpoint", resume_with_train),
        ("megascope train whose saves all fail", all_saves_fail),
        ("full disk: saves go on by retention before writing", full_disk),
        ("a commit failing with ENOSPC leaves no step_*.tmp", failed_commit),
        ("ckpt verify: a flipped safetensors header byte", header_flip),
        ("metadata file name ../../outside/r1.safetensors", escaping_name),
        ("latest holding an absolute path into another run", absolute_latest),
        ("ckpt ls: a truncated file", truncated_in_ls),
        ("ckpt ls: permission denied", functools.partial(permission, action="ls")),
        ("ckpt verify: permission denied", functools.partial(permission, action="verify")),
        ("agent killed (SIGKILL) during a merge", agent_killed_during_merge),
    ]
    for n, (name, attempt) in enumerate(steps):
        where = workdir / f"case-{n}"
        where.mkdir(parents=True)
        cases.append(trying(name, functools.partial(attempt, where)))
    return cases
