"""Alert webhooks: which events page, and the queue that deduplicates, rate-limits, retries and stays bounded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from megascope.agent.alerts import Alert, AlertPolicy, AlertQueue, AlertService, alert_for, check_webhook, redact
from megascope.agent.state import NodeState
from megascope.protos import events
from megascope.protos.megascope.v1 import telemetry_pb2 as pb
from megascope.protos.megascope.v1 import worker_pb2

URL = "https://hooks.example.com/services/T000/B000/SECRETSECRET"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def alert(kind: str = "crash", step: int = 5, rank: int = 1) -> Alert:
    return Alert(kind=kind, node="node0", text=f"{kind} at {step}", rank=rank, step=step)


def queue(clock: Clock, **policy: float) -> AlertQueue:
    return AlertQueue([URL], AlertPolicy(**policy), clock=clock)  # type: ignore[arg-type]


def test_the_same_incident_twice_is_sent_once_until_the_dedup_window_passes() -> None:
    clock = Clock()
    q = queue(clock, dedup_seconds=300)
    assert q.offer(alert()) and not q.offer(alert())
    assert q.duplicates == 1 and len(q) == 1
    clock.now += 301
    assert q.offer(alert())


def test_past_the_burst_alerts_are_held_back_and_the_next_one_says_how_many() -> None:
    clock = Clock()
    q = queue(clock, burst=2, per_minute=1)
    for step in range(5):
        q.offer(alert(step=step))
    assert len(q) == 2 and q.rate_limited == 3
    clock.now += 60  # one token back
    q.offer(alert(step=99))
    deliveries = [q.due() for _ in range(3)]
    assert [d.suppressed for d in deliveries if d is not None] == [0, 0, 3]
    assert "3 more alert(s) held back" in deliveries[2].alert.payload(deliveries[2].suppressed)["text"]  # type: ignore[union-attr]


def test_a_failed_delivery_is_retried_with_doubling_backoff_then_given_up() -> None:
    clock = Clock()
    q = queue(clock, attempts=4, backoff_seconds=1, max_backoff_seconds=3)
    q.offer(alert())
    backoffs = []
    while True:
        delivery = q.due()
        assert delivery is not None
        backoff = q.failed_attempt(delivery, retry=True)
        if backoff is None:
            break
        backoffs.append(backoff)
        assert q.due() is None  # not before its backoff
        clock.now += backoff
    assert backoffs == [1, 2, 3]
    assert q.failed == 1 and len(q) == 0


def test_a_delivery_refused_for_good_is_not_retried() -> None:
    q = queue(Clock())
    q.offer(alert())
    delivery = q.due()
    assert delivery is not None
    assert q.failed_attempt(delivery, retry=False) is None and len(q) == 0


def test_a_webhook_that_is_down_holds_at_most_max_pending_deliveries() -> None:
    clock = Clock()
    q = queue(clock, max_pending=3, burst=100, per_minute=6000)
    for step in range(10):
        q.offer(alert(step=step))
    assert len(q) == 3 and q.dropped == 7
    assert [d.alert.step for d in (q.due(), q.due(), q.due()) if d is not None] == [7, 8, 9]


def test_every_webhook_gets_each_alert() -> None:
    q = AlertQueue([URL, "http://127.0.0.1:9/hook"], clock=Clock())
    q.offer(alert())
    assert sorted(d.url for d in (q.due(), q.due()) if d is not None) == sorted([URL, "http://127.0.0.1:9/hook"])


def test_payload_is_slack_compatible_and_carries_the_numbers() -> None:
    body = Alert(kind="restart", node="n1", text="restarted", step=40, mttr_seconds=3.5, steps_lost=2).payload()
    assert body["text"] == "[megascope] n1: restarted"
    assert (body["kind"], body["node"], body["step"], body["mttr_seconds"], body["steps_lost"]) == (
        "restart", "n1", 40, 3.5, 2,
    )  # fmt: skip
    assert "rank" not in body  # absent, not null, when unknown


def test_a_webhook_url_is_never_printed_whole() -> None:
    assert redact(URL) == "https://hooks.example.com/…"
    assert "SECRET" not in (check_webhook("ftp://x/SECRET") or "")
    assert check_webhook(URL) is None


def event(detail: object, rank: int | None = None, step: int | None = None) -> pb.Event:
    return events.make_event("text", detail, node="node0", rank=rank, step=step)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("detail", "ranks", "kind"),
    [
        (pb.CrashDetail(exit_code=1), [2, 3], "crash"),
        (pb.HangDetail(verdict=pb.HangDetail.VERDICT_CULPRIT, culprit_rank=3), [2, 3], "hang"),
        (pb.HangDetail(verdict=pb.HangDetail.VERDICT_ELSEWHERE), [0, 1], None),
        (pb.HangDetail(verdict=pb.HangDetail.VERDICT_NO_CULPRIT), [0, 1], "hang"),
        (pb.HangDetail(verdict=pb.HangDetail.VERDICT_NO_CULPRIT), [2, 3], None),
        (pb.RestartDetail(phase=pb.RestartDetail.PHASE_DONE, mttr_seconds=2.0, steps_lost=1), [0, 1], "restart"),
        (pb.RestartDetail(phase=pb.RestartDetail.PHASE_REQUESTED), [0, 1], None),
        (pb.JobDetail(phase=pb.JobDetail.PHASE_FAILED), [0, 1], "job_failed"),
        (pb.JobDetail(phase=pb.JobDetail.PHASE_FAILED), [2, 3], None),
        (pb.JobDetail(phase=pb.JobDetail.PHASE_PEER_FAILED), [0, 1], None),
        (pb.JobDetail(phase=pb.JobDetail.PHASE_NODE_EVICTED), [2, 3], "node_evicted"),
        (pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_FAILED, step=8), [0, 1], "checkpoint_failed"),
        (pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_FAILED, step=8), [2, 3], None),
        (pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_SAVED, step=8), [0, 1], None),
    ],
)
def test_one_node_alerts_per_incident(detail: object, ranks: list[int], kind: str | None) -> None:
    made = alert_for(event(detail, rank=ranks[-1]), ranks)
    assert (made.kind if made else None) == kind


def test_a_hang_alert_names_the_culprit_and_every_ranks_failed_save_is_one_alert() -> None:
    hang = alert_for(event(pb.HangDetail(verdict=pb.HangDetail.VERDICT_CULPRIT, culprit_rank=3), rank=3), [2, 3])
    assert hang is not None and hang.payload()["culprit"] == 3
    failed = [
        alert_for(event(pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_FAILED, step=8), rank=r), [0, 1])
        for r in (0, 1)
    ]
    q = AlertQueue([URL], clock=Clock())
    assert [q.offer(a) for a in failed if a is not None] == [True, False]


async def test_a_webhook_that_never_answers_blocks_nothing_and_holds_bounded_memory() -> None:
    release = threading.Event()
    posted: list[dict[str, object]] = []

    def stuck(url: str, body: dict[str, object]) -> int:
        posted.append(body)
        release.wait(30)
        return 200

    state = NodeState(pb.NodeInfo(node="node0"))
    state.rank_attached(worker_pb2.Hello(rank=0, pid=1, world_size=1))
    service = AlertService(state, [URL], AlertPolicy(max_pending=10, burst=1000, per_minute=1e6), send=stuck)
    service.start()
    try:
        state.event("crash", pb.CrashDetail(exit_code=1), rank=0, step=0)
        service.check()
        await asyncio.wait_for(_until(lambda: len(posted) == 1), 30)  # the sender now waits on the webhook
        for step in range(1, 200):
            state.event("crash", pb.CrashDetail(exit_code=1), rank=0, step=step)
            service.check()  # on the loop: returns at once
        assert len(service.queue) == 10 and service.queue.dropped == 189
        release.set()
        await asyncio.wait_for(_until(lambda: len(posted) == 11), 30)
        assert [body["step"] for body in posted] == [0, *range(190, 200)]
    finally:
        release.set()
        await service.stop()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)
