"""The figures of the persistent record (issue 16): what recording costs the agent, how fast the record grows, and
how fast a replay opens and seeks.

    python bench/record.py                 # all three, about two minutes on 2 cores
    python bench/record.py --seconds 60    # a shorter recording-cost run

1. Recording cost: a real agent node state (agent/state.py) and recorder (agent/record.py) on an asyncio loop, fed
   step reports of 4 ranks at 5 steps a second (realistic reports: 8 gradient-bucket collectives and a few
   scalars each) and a host sample a second, for ``--seconds``; the process CPU time with the recorder minus the
   same run without it, as a share of one core.
2. Growth: the record's bytes per rank-day, in full detail (within the retention window) and past it
   (downsampled: every 10th step, one sample per 10 s), from the rows written in (1).
3. Replay: a synthetic 2-node, 1-hour record at that rate (written by the same writer, with a crash and a hang
   with stacks), then ``Replay.open`` (read, merge, first frame) and 40 seeks to random times, half of them
   backwards, with the cursor's model checked against the record.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from megascope.agent.record import Recorder
from megascope.agent.state import NodeState
from megascope.dashboard.replay import Replay
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos import recording
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

RANKS = 4
STEPS_PER_SECOND = 5.0
DAY = 86400.0


def step_report(node: str, rank: int, step: int, wall_time: float) -> telemetry_pb2.StepReport:
    return telemetry_pb2.StepReport(
        node=node, rank=rank, local_rank=rank % 2, world_size=RANKS, step=step, loss=3.0 - step * 1e-4, lr=3e-4,
        grad_norm=1.1, tokens=4096, step_seconds=0.2, data_wait_seconds=0.001, forward_seconds=0.06,
        backward_seconds=0.11, comm_wait_seconds=0.01, optimizer_seconds=0.015, other_seconds=0.004,
        tokens_per_second=20480.0, model_flops=1.2e12, gc_pause_seconds=0.0, wall_time=wall_time,
        collectives_issued=8 * (step + 1), cpu_seconds=0.19,
        collectives=[
            telemetry_pb2.CollectiveTiming(
                name="allreduce", bucket_index=b, bytes=25 << 20, start_offset_seconds=0.07 + 0.01 * b,
                duration_seconds=0.012, blocked_seconds=0.001,
            )
            for b in range(8)
        ],
        scalars={"tokens_seen": 4096.0 * step, "aux_loss": 0.01},
    )  # fmt: skip


def host_sample(node: str, wall_time: float) -> telemetry_pb2.HostSample:
    return telemetry_pb2.HostSample(
        node=node, wall_time=wall_time, cpu_percent=55.0, cpu_percents=[55.0] * 16, memory_used_bytes=40 << 30,
        memory_total_bytes=128 << 30, disk_read_bytes_per_second=1e6, net_recv_bytes_per_second=1e8,
        load_average_1m=8.0,
    )  # fmt: skip


# --- 1 and 2: recording cost and growth ------------------------------------------------------------------------


async def _feed(seconds: float, run_dir: Path | None) -> tuple[float, int, int, int]:
    """Feed a node state for ``seconds``; (CPU seconds used, rows written, bytes, step reports) with a recorder
    when ``run_dir`` is given."""
    info = telemetry_pb2.NodeInfo(node="node0", run_id="bench", ranks=list(range(RANKS)), world_size=RANKS)
    state = NodeState(info)
    recorder = Recorder(state, run_dir) if run_dir is not None else None
    if recorder is not None:
        recorder.start()
    cpu0, start = time.process_time(), time.monotonic()
    step, reports, next_host = 0, 0, 0.0
    while (elapsed := time.monotonic() - start) < seconds:
        now = time.time()
        for rank in range(RANKS):
            state.add_step(step_report("node0", rank, step, now))
            reports += 1
        if elapsed >= next_host:
            state.add_host_sample(host_sample("node0", now))
            next_host += 1.0
        step += 1
        await asyncio.sleep(max(0.0, step / STEPS_PER_SECOND - (time.monotonic() - start)))
    rows = size = 0
    if recorder is not None:
        await recorder.stop()
        rows = recorder.writer.rows_written
        size = recorder.path.stat().st_size
    return time.process_time() - cpu0, rows, size, reports


def recording_cost(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base, _, _, _ = asyncio.run(_feed(seconds, None))
        cpu, rows, size, reports = asyncio.run(_feed(seconds, Path(tmp)))
        path = run_paths.record_file(tmp, "node0")
        import sqlite3

        db = sqlite3.connect(path)
        live = recording.live_bytes(db)
        steps = db.execute("SELECT COUNT(*) FROM records WHERE part = ?", (recording.Part.STEP,)).fetchone()[0]
        db.close()
    share = (cpu - base) / seconds
    print(f"recording cost: {RANKS} ranks x {STEPS_PER_SECOND:g} steps/s for {seconds:g} s: {reports} step reports, "
          f"{rows} rows; agent CPU {base:.2f} s without the recorder, {cpu:.2f} s with it: "
          f"{100 * share:.2f}% of one core")  # fmt: skip
    per_rank_second = live / seconds / RANKS
    full_day = per_rank_second * DAY / 1e6
    # Past the retention window a rank keeps every 10th step and the node one host sample in 10.
    thin_day = full_day / recording.STEP_STRIDE
    retention_h = recording.DEFAULT_RETENTION_SECONDS / 3600
    mixed = (full_day * retention_h / 24) + thin_day * (24 - retention_h) / 24
    print(f"record growth: {live / 1e6:.2f} MB for {steps} step reports in {seconds:g} s ({size / 1e6:.2f} MB file): "
          f"{full_day:.0f} MB per rank-day in full detail, {thin_day:.1f} MB per rank-day downsampled; "
          f"a steady day (last {retention_h:g} h full): {mixed:.1f} MB per rank-day")  # fmt: skip


# --- 3: replay -----------------------------------------------------------------------------------------------


def synthetic_record(run_dir: Path, seconds: float = 3600.0, nodes: int = 2) -> float:
    """A 2-node record of ``seconds`` at the benchmark's rate, with a crash at 1/3 and a hang at 2/3; its start."""
    start = time.time() - seconds - 60
    per_node = RANKS // nodes
    writers = [
        recording.RecordWriter(
            run_paths.record_file(run_dir, f"node{n}"), node=f"node{n}", run_id="bench", commit_seconds=0.2,
            maintenance_seconds=1e9, retention_seconds=10 * DAY,
        )
        for n in range(nodes)
    ]  # fmt: skip
    steps = int(seconds * STEPS_PER_SECOND)
    crash, hang = steps // 3, 2 * steps // 3
    for step in range(steps):
        now = start + step / STEPS_PER_SECOND
        for n, writer in enumerate(writers):
            node = f"node{n}"
            batch = telemetry_pb2.Telemetry(
                step_reports=[step_report(node, n * per_node + r, step, now) for r in range(per_node)],
                rank_statuses=[
                    telemetry_pb2.RankStatus(rank=n * per_node + r, state=telemetry_pb2.RANK_STATE_RUNNING)
                    for r in range(per_node)
                ],
            )  # fmt: skip
            batch.node_info.CopyFrom(
                telemetry_pb2.NodeInfo(node=node, run_id="bench", ranks=[n * per_node + r for r in range(per_node)],
                                       world_size=RANKS, total_steps=steps, start_wall_time=start)
            )  # fmt: skip
            if step % 5 == 0:
                batch.host_samples.append(host_sample(node, now))
            if n == 1 and step == crash:
                batch.events.append(
                    telemetry_pb2.Event(wall_time=now, node=node, kind="crash", severity=3, rank=3, step=step,
                                        text="rank 3 crashed", crash=telemetry_pb2.CrashDetail(signal="SIGKILL"))
                )  # fmt: skip
            if n == 1 and step == hang:
                batch.events.append(
                    telemetry_pb2.Event(wall_time=now, node=node, kind="hang", severity=3, rank=2, step=step,
                                        text="rank 2 hangs", hang=telemetry_pb2.HangDetail(culprit_rank=2))
                )  # fmt: skip
                writer.add_stacks(agent_pb2.DumpStacksResponse(culprit=2, reason="rank 2 lags"), now)
            writer.add_batch(batch)
    for writer in writers:
        writer.close(timeout=600)
    return start


def replay_figures() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        start = synthetic_record(Path(tmp))
        written = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in run_paths.record_files(tmp))
        t0 = time.perf_counter()
        replay = Replay.open([tmp])
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        replay.wait_indexed()
        indexed = time.perf_counter() - t0 + opened
        print(f"replay: 2-node 1-hour record, {len(replay.items):,} messages, {size / 1e6:.1f} MB "
              f"(written in {written:.0f} s); opens (first frame) in {opened:.2f} s; every keyframe "
              f"(one per {replay.keyframe_seconds:g} s) ready {indexed:.1f} s after opening")  # fmt: skip
        rng = random.Random(16)
        forward: list[float] = []
        backward: list[float] = []
        cpu: list[float] = []
        for _ in range(40):
            target = start + rng.uniform(0, replay.end - start)
            back = target < replay.cursor
            t0, c0 = time.perf_counter(), time.thread_time()
            replay.seek(target)
            replay.model.header()  # the first frame's work
            (backward if back else forward).append(time.perf_counter() - t0)
            # CPU time of this thread too: on a shared machine the wall time also counts other processes' turns.
            cpu.append(time.thread_time() - c0)
            step = replay.model.header().step
            expected = int((min(target, replay.end) - start) * STEPS_PER_SECOND)
            assert step is not None and abs(step - expected) <= 1, (step, expected)
        seeks = forward + backward
        print(f"replay seeks: {len(seeks)} to random times ({len(backward)} backwards): "
              f"median {1000 * statistics.median(seeks):.0f} ms, max {1000 * max(seeks):.0f} ms "
              f"(backwards: median {1000 * statistics.median(backward):.0f} ms, "
              f"max {1000 * max(backward):.0f} ms); CPU time per seek: median {1000 * statistics.median(cpu):.0f} ms, "
              f"max {1000 * max(cpu):.0f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the recording-cost run")
    parser.add_argument("--skip-replay", action="store_true")
    args = parser.parse_args(argv)
    recording_cost(args.seconds)
    if not args.skip_replay:
        replay_figures()
    return 0


if __name__ == "__main__":
    sys.exit(main())
