"""`megascope train`'s console says what happens to checkpoints (saved, removed by retention, resumed from,
initialized from a merge) and counts the steps a start trained, not the step it ended at."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from megascope.engine.checkpoint import Checkpointer
from megascope.engine.runtime.telemetry import ConsoleSink, Event
from megascope.protos.events import make_event
from megascope.protos.megascope.v1 import telemetry_pb2 as pb


def _lines(*events: Event) -> list[str]:
    stream = io.StringIO()
    sink = ConsoleSink(stream=stream)
    for event in events:
        sink.write_event(event)
    return stream.getvalue().splitlines()


def _finished(steps: int) -> Event:
    return make_event(f"trained {steps} steps", pb.RunDetail(phase=pb.RunDetail.PHASE_FINISHED, steps=steps))


def _resumed(step: int) -> Event:
    detail = pb.ResumeDetail(source=pb.ResumeDetail.SOURCE_RESUME, path=f"ckpt/step_{step:08d}", step=step)
    return make_event(f"resumed from step {step} (ckpt/step_{step:08d}): read 11.1 MB in 0.10s", detail, step=step)


def test_a_fresh_run_finishes_saying_the_steps_it_trained() -> None:
    assert _lines(_finished(40)) == ["[info] finished: trained 40 steps (1..40)"]


def test_a_resumed_run_says_where_it_resumed_and_counts_only_the_steps_after_it() -> None:
    lines = _lines(_resumed(200), _finished(400))
    assert lines[0].startswith("[info] resumed: resumed from step 200 (ckpt/step_00000200)")
    assert lines[1] == "[info] finished: trained 200 steps (201..400, resumed at step 200)"


def test_a_run_resumed_at_its_last_step_says_there_was_nothing_to_train() -> None:
    assert "nothing to train: resumed at step 400" in _lines(_resumed(400), _finished(400))[1]


def test_a_save_and_an_init_from_a_merge_are_said() -> None:
    saved = make_event("saved step 50: 11.1 MB in 0.21s", pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_SAVED))
    init = make_event(
        "model weights from merged (sma merge of steps [40, 50]), fresh optimizer",
        pb.ResumeDetail(source=pb.ResumeDetail.SOURCE_INIT_FROM, path="merged"),
    )
    assert _lines(saved, init) == [
        "[info] checkpoint: saved step 50: 11.1 MB in 0.21s",
        "[info] initialized: model weights from merged (sma merge of steps [40, 50]), fresh optimizer",
    ]


def test_a_staged_save_is_not_a_console_line() -> None:
    # "saving step N" precedes every "saved step N": one line per save is enough.
    started = make_event("saving step 50", pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_STARTED, step=50))
    assert _lines(started) == []


def test_the_save_after_which_retention_removed_checkpoints_names_them(tmp_path: Path) -> None:
    events: list[Event] = []
    checkpointer = Checkpointer(tmp_path, keep_last=2, on_event=events.append)
    for step in (1, 2, 3):
        checkpointer.save(step, {"model/w": torch.full((4,), float(step))}, {"step": step})
        checkpointer.wait()
    checkpointer.close()
    saved = {e.checkpoint.step: e for e in events if e.kind == "checkpoint"}
    assert list(saved[3].checkpoint.removed) == [1]
    assert saved[3].text.endswith("; removed step_00000001 (keeps the newest 2)")
    assert not saved[2].checkpoint.removed and "removed" not in saved[2].text
    assert "removed step_00000001" in _lines(saved[3])[0]
