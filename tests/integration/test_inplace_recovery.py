"""In-place recovery with real trainer processes: 4 gloo ranks on CPU, one of them dies, a replacement takes its
place, and the job goes on to the same weights as a run that never failed, bit for bit.

The test plays the launcher's and the guards' part (engine/runtime/elastic.py, rank_guard.py, warm_parent.py):
it hosts the recovery store (a TCPStore on loopback), starts every rank as ``python -m megascope.engine.trainer``
with torch elastic's environment, and starts a replacement (``MEGASCOPE_REPLACEMENT=1``, same RANK) when a rank
dies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import pytest
import torch.distributed as dist
from support import REPO, read_telemetry

from megascope.engine.checkpoint.format import committed_steps, step_dir_name
from megascope.engine.checkpoint.loader import verify
from megascope.engine.config import CheckpointConfig, TrainConfig
from megascope.engine.data import DataConfig
from megascope.engine.model import preset
from megascope.engine.runtime import recovery_env
from megascope.engine.runtime.faults import CRASH_POINT_ENV, CrashFault, Fault, HangFault

WORLD = 4
STEPS = 6
DEADLINE = 120.0
"""Only a guard against a test hanging for ever: every wait below ends on a condition."""


def config(run_dir: Path, *faults: Fault, ckpt_every: int = 0) -> TrainConfig:
    return TrainConfig(
        model=preset("tiny"),
        # A small corpus that no one edits while the test runs (a replacement reads it seconds after the others).
        data=DataConfig(path=str(Path(sysconfig.get_paths()["stdlib"]) / "email"), batch_tokens=256),
        checkpoint=CheckpointConfig(dir=str(run_dir / "ckpt") if ckpt_every else None, every=ckpt_every),
        steps=STEPS,
        val_every=0,
        val_batches=0,
        log_every=0,
        device="cpu",
        kernels="torch",
        run_dir=str(run_dir),
        dist_timeout_seconds=60,
        self_check=False,
        faults=faults,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Job:
    """Four trainer processes and the recovery store, as the launcher and the guards of one node would run them."""

    def __init__(self, run_dir: Path, train: TrainConfig, extra_env: dict[str, str] | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.config_path = run_dir / "config.json"
        self.config_path.write_text(train.to_json())
        self.store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False
        )
        self.master_port = free_port()
        self.extra_env = extra_env or {}
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.ended: list[subprocess.Popen[str]] = []
        self.replacements: dict[int, int] = {}
        self.log_files: list[TextIO] = []
        for rank in range(WORLD):
            self.start(rank)

    def start(self, rank: int) -> None:
        """Start ``rank``, or its replacement once it has died."""
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(self.master_port),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            **{recovery_env.RECOVERY_STORE_ENV: f"127.0.0.1:{self.store.port}"},
            **self.extra_env,
        )
        if rank in self.procs:
            self.ended.append(self.procs[rank])
            self.replacements[rank] = self.replacements.get(rank, 0) + 1
            env[recovery_env.REPLACEMENT_ENV] = str(self.replacements[rank])
        log = open(self.run_dir / f"rank{rank}.{self.replacements.get(rank, 0)}.log", "w")  # noqa: SIM115
        self.log_files.append(log)
        self.procs[rank] = subprocess.Popen(
            [sys.executable, "-m", "megascope.engine.trainer", str(self.config_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_for_death(self, rank: int) -> int:
        """Wait until ``rank``'s process ended; its exit status."""
        return self.procs[rank].wait(timeout=DEADLINE)

    def replace(self, rank: int) -> None:
        """What the rank's guard does when its rank dies: start a replacement with the same RANK."""
        self.wait_for_death(rank)
        self.start(rank)

    def generation(self) -> int:
        return int(self.store.add(recovery_env.store_prefix() + "generation", 0))

    def wait_for_generation(self, generation: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while self.generation() < generation:
            assert time.monotonic() < deadline, "no replacement announced itself"
            time.sleep(0.01)

    def wait_for_fault(self, fault: Fault) -> None:
        """Wait until the fault's firing marker exists (it is written before the fault fires)."""
        marker = self.run_dir / "faults"
        deadline = time.monotonic() + DEADLINE
        while not (marker.is_dir() and any(marker.iterdir())):
            assert time.monotonic() < deadline, f"{fault.describe()} never fired"
            time.sleep(0.01)

    def finish(self) -> dict[int, int]:
        """Wait for every current process; their exit statuses by rank."""
        return {rank: proc.wait(timeout=DEADLINE) for rank, proc in self.procs.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.run_dir.glob("rank*.log")))

    def kill_all(self) -> None:
        for proc in [*self.procs.values(), *self.ended]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self.log_files:
            log.close()


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    started: list[Job] = []
    yield started
    for job in started:
        job.kill_all()


def final_digests(run_dir: Path) -> dict[int, str]:
    digests = {}
    for rank, records in read_telemetry(run_dir).items():
        finished = [r for r in records if r["type"] == "event" and r["kind"] == "finished"]
        assert len(finished) == 1, f"rank {rank}: {len(finished)} 'finished' events"
        digests[rank] = finished[0]["run"]["param_digest"]
    return digests


def recovered_events(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_telemetry(run_dir)[0] if r["type"] == "event" and r["kind"] == "recovered"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final weights of the same job with no fault (the digest every rank ends with)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    job = Job(run_dir, config(run_dir))
    try:
        codes = job.finish()
    finally:
        job.kill_all()
    assert codes == dict.fromkeys(range(WORLD), 0), job.logs()
    digests = set(final_digests(run_dir).values())
    assert len(digests) == 1
    return digests.pop()


def run_crash(jobs: list[Job], run_dir: Path, rank: int, step: int) -> Job:
    fault = CrashFault(rank=rank, step=step, how="kill")
    job = Job(run_dir, config(run_dir, fault))
    jobs.append(job)
    assert job.wait_for_death(rank) == -signal.SIGKILL, job.logs()
    job.start(rank)
    return job


def assert_recovered_to(job: Job, digest: str, replaced: int) -> dict[str, Any]:
    codes = job.finish()
    assert codes == dict.fromkeys(range(WORLD), 0), job.logs()
    assert set(final_digests(job.run_dir).values()) == {digest}, job.logs()
    (event,) = recovered_events(job.run_dir)
    detail: dict[str, Any] = event["recovery"]
    print(f"recovery breakdown: {detail}")
    assert detail["replaced_ranks"] == [replaced]
    return detail


def test_crash_of_rank_0_recovers_in_place_to_identical_weights(
    jobs: list[Job], tmp_path: Path, uninterrupted: str
) -> None:
    job = run_crash(jobs, tmp_path, rank=0, step=3)
    detail = assert_recovered_to(job, uninterrupted, replaced=0)
    assert detail["step"] == 2 and detail["steps_redone"] == 1 and detail["generation"] == 1


def test_crash_of_a_nonzero_rank_recovers_in_place_to_identical_weights(
    jobs: list[Job], tmp_path: Path, uninterrupted: str
) -> None:
    job = run_crash(jobs, tmp_path, rank=2, step=4)
    detail = assert_recovered_to(job, uninterrupted, replaced=2)
    assert detail["step"] == 3 and detail["donor_rank"] == 0 and detail["state_bytes"] > 0


def test_hung_rank_killed_recovers_in_place_to_identical_weights(
    jobs: list[Job], tmp_path: Path, uninterrupted: str
) -> None:
    fault = HangFault(rank=1, step=3)
    job = Job(tmp_path, config(tmp_path, fault))
    jobs.append(job)
    job.wait_for_fault(fault)
    time.sleep(0.5)  # the others are blocked in the step's all-reduce by now (a hang the agent would name)
    job.procs[1].send_signal(signal.SIGKILL)  # what the agent does to the culprit of a hang, and to it alone
    job.replace(1)
    assert_recovered_to(job, uninterrupted, replaced=1)


def test_two_faults_one_after_the_other_recover_in_two_generations(
    jobs: list[Job], tmp_path: Path, uninterrupted: str
) -> None:
    faults = (CrashFault(rank=1, step=2, how="kill"), CrashFault(rank=3, step=4, how="exit"))
    job = Job(tmp_path, config(tmp_path, *faults))
    jobs.append(job)
    job.replace(1)
    job.replace(3)  # dies after the first recovery, in generation 1
    codes = job.finish()
    assert codes == dict.fromkeys(range(WORLD), 0), job.logs()
    assert set(final_digests(tmp_path).values()) == {uninterrupted}
    events = [e["recovery"] for e in recovered_events(tmp_path)]
    assert [(e["generation"], e["replaced_ranks"], e["step"]) for e in events] == [(1, [1], 1), (2, [3], 3)]


def test_second_fault_during_recovery_exits_every_rank_for_a_full_restart(jobs: list[Job], tmp_path: Path) -> None:
    job = Job(tmp_path, config(tmp_path, CrashFault(rank=1, step=3, how="kill")))
    jobs.append(job)
    job.wait_for_death(1)
    job.procs[2].send_signal(signal.SIGKILL)  # a second rank dies before the first recovery is done
    job.replace(1)
    job.wait_for_generation(1)
    job.replace(2)  # its replacement opens generation 2 while generation 1 still waits for rank 2
    codes = job.finish()
    assert codes == dict.fromkeys(range(WORLD), recovery_env.RECOVERY_FAILED_EXIT), job.logs()
    assert not recovered_events(tmp_path)


def test_fault_during_async_save_leaves_only_complete_checkpoints(
    jobs: list[Job], tmp_path: Path, uninterrupted: str
) -> None:
    # Rank 1 dies while writing its part of step 4's save (the others' saves are in flight too).
    train = config(tmp_path, ckpt_every=2)
    job = Job(tmp_path, train, extra_env={CRASH_POINT_ENV: "write:1:4"})
    jobs.append(job)
    job.replace(1)
    assert_recovered_to(job, uninterrupted, replaced=1)
    directory = tmp_path / "ckpt"
    steps = committed_steps(directory)
    assert 4 not in steps and steps[-1] == STEPS
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    for step in steps:  # each one reads back whole, every block matching its checksum
        assert verify(directory / step_dir_name(step)).step == step
