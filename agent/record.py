"""The agent's recorder: everything its node state streams, and every stack dump, into the node's record.

The recorder is one more subscriber of the node state (as a Watch stream is): every ``FLUSH_SECONDS`` it takes
what accumulated and queues it to the record's writer thread (megascope.protos.recording), which serializes and
commits off the event loop. Stack dumps (a hang diagnosis, the dashboard's ``s``) come from the supervisor.

An agent restarted on the same run directory appends to the same record. The record also answers the back-fill
of a dashboard that connects after memory stopped reaching back (:meth:`Recorder.archive`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from megascope.agent.state import NodeState, Subscription
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos import events
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2
from megascope.protos.recording import Part, RecordError, RecordReader, RecordWriter

FLUSH_SECONDS = 0.5
RECORD_FAILED = "record_failed"
"""The kind of the warning event when the record cannot be opened or written (the agent goes on without it)."""
ARCHIVE_STEP_REPORTS = 50_000
"""The most step reports a back-fill reads from the record (the dashboard keeps far fewer)."""


class Recorder:
    def __init__(self, state: NodeState, run_dir: str | Path, **writer_options: float) -> None:
        self.state = state
        self.path = run_paths.record_file(run_dir, state.node_info.node)
        self.writer = RecordWriter(
            self.path,
            node=state.node_info.node,
            run_id=state.node_info.run_id,
            **writer_options,  # type: ignore[arg-type]
        )
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._told_error = False

    @classmethod
    def open(cls, state: NodeState, run_dir: str | Path) -> Recorder | None:
        """A recorder, or None (with the reason as an event and on stderr) when the record cannot be written: the
        agent supervises its ranks with or without one."""
        try:
            return cls(state, run_dir)
        except (RecordError, OSError) as error:
            message = f"not recording this node: {error}"
            print(f"megascope agent: warning: {message}", file=sys.stderr, flush=True)
            state.event(message, kind=RECORD_FAILED, severity=events.WARNING)
            return None

    def start(self) -> None:
        self._sub, backfill = self.state.subscribe(0.0)
        for batch in backfill:
            self.writer.add_batch(batch)
        self._task = asyncio.ensure_future(self._run())

    def add_stacks(self, stacks: agent_pb2.DumpStacksResponse) -> None:
        self.writer.add_stacks(stacks, time.time())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self._flush()

    def _flush(self) -> None:
        if self._sub is None:
            return
        for batch in self.state.take(self._sub):
            self.writer.add_batch(batch)
        if self.writer.error is not None and not self._told_error:
            self._told_error = True
            self.state.event(self.writer.error, kind=RECORD_FAILED, severity=events.WARNING)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._flush()
        if self._sub is not None:
            self.state.unsubscribe(self._sub)
        await asyncio.to_thread(self.writer.close)

    def archive(self, since: float, until: float) -> Iterator[telemetry_pb2.Telemetry]:
        """The recorded step reports, samples and events in ``[since, until)`` as back-fill batches (what memory no
        longer holds: an agent restarted, or history older than the memory keeps)."""
        try:
            reader = RecordReader(self.path)
        except RecordError:
            return
        with reader:
            batch = telemetry_pb2.Telemetry(backfill=True)
            steps = 0
            for row in reader.rows([Part.EVENT, Part.HOST, Part.GPU, Part.STEP], since, until):
                if row.part == Part.STEP:
                    steps += 1
                    if steps > ARCHIVE_STEP_REPORTS:
                        continue
                    batch.step_reports.append(row.message())  # type: ignore[arg-type]
                elif row.part == Part.EVENT:
                    batch.events.append(row.message())  # type: ignore[arg-type]
                elif row.part == Part.HOST:
                    batch.host_samples.append(row.message())  # type: ignore[arg-type]
                else:
                    batch.gpu_samples.append(row.message())  # type: ignore[arg-type]
                if len(batch.step_reports) + len(batch.events) + len(batch.host_samples) >= 500:
                    yield batch
                    batch = telemetry_pb2.Telemetry(backfill=True)
            if batch.ByteSize() > 2:
                yield batch
