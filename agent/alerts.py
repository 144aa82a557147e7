"""Alert webhooks (``megascope agent --alert-webhook URL``): a JSON POST per incident, Slack-compatible.

Three parts, so each can be tested alone:

- :func:`alert_for` decides which events page someone, and makes sure one agent per incident does: a crash and a
  hang with a culprit are reported only by the culprit's node (the others say ``peer_failed`` and ``stalled``,
  which page no one); a restart only by the node that runs rank 0 (agent/incidents.py); a hang with no culprit,
  a job that gave up and a failed checkpoint save, which every node may see, only by the node that runs rank 0;
  an eviction by the node evicted; a straggler raised and cleared by the node that runs the rank (each agent judges
  only its own node's ranks: agent/stragglers.py).
- :class:`AlertQueue` (pure, injected clock) deduplicates (one alert per key in :attr:`AlertPolicy.dedup_seconds`),
  rate-limits (a token bucket per webhook; what is held back is counted and said in the next alert), retries with
  exponential backoff, and is bounded: past :attr:`AlertPolicy.max_pending` the oldest delivery is dropped, counted.
- :class:`AlertService` runs it: on the agent's loop it reads new events (cheap, twice a second); one thread posts
  (blocking HTTP never touches the loop or the ranks, who never wait on the agent anyway).

A webhook URL is a secret (Slack's carries the key in its path): it is never printed whole, only
:func:`redact`'s scheme and host.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from megascope.agent.event_cursor import EventCursor
from megascope.agent.state import NodeState
from megascope.protos import events
from megascope.protos.megascope.v1 import telemetry_pb2

Clock = Callable[[], float]
_Hang = telemetry_pb2.HangDetail
_Job = telemetry_pb2.JobDetail
_Restart = telemetry_pb2.RestartDetail
_Checkpoint = telemetry_pb2.CheckpointDetail
_SEVERITIES = {events.INFO: "info", events.WARNING: "warning", events.ERROR: "error", events.CRITICAL: "critical"}
_CAUSES = {_Restart.CAUSE_CRASH: "crash", _Restart.CAUSE_HANG: "hang", _Restart.CAUSE_REQUESTED: "requested",
           _Restart.CAUSE_NODE_LEFT: "node_left"}  # fmt: skip
POLL_SECONDS = 0.5
"""How often the agent's loop looks for new events to alert on."""


@dataclass(frozen=True)
class Alert:
    kind: str
    """crash, hang, restart, job_failed, checkpoint_failed, node_evicted, straggler, straggler_cleared, test."""
    node: str
    text: str
    severity: str = "error"
    rank: int | None = None
    step: int | None = None
    culprit: int | None = None
    """The rank judged to cause a hang (or the crashed rank)."""
    mttr_seconds: float | None = None
    steps_lost: int | None = None
    wall_time: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    """The event's other numbers by name (its typed detail)."""

    @property
    def key(self) -> tuple[str, str, int | None, int | None]:
        """What makes two alerts the same incident (e.g. every rank's failed save of one step)."""
        return (self.kind, self.node, self.culprit if self.culprit is not None else self.rank, self.step)

    def payload(self, suppressed: int = 0) -> dict[str, Any]:
        """The JSON body: Slack reads ``text``; the rest is for programs (PagerDuty rules, a bot)."""
        text = f"[megascope] {self.node}: {self.text}"
        if suppressed:
            text += f" ({suppressed} more alert(s) held back by the rate limit; see the dashboard's events)"
        body: dict[str, Any] = {
            "text": text,
            "source": "megascope",
            "kind": self.kind,
            "severity": self.severity,
            "node": self.node,
            "wall_time": self.wall_time,
            "suppressed": suppressed,
        }
        for name in ("rank", "step", "culprit", "mttr_seconds", "steps_lost"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.fields:
            body["detail"] = self.fields
        return body


def _runs_rank_zero(ranks: Sequence[int]) -> bool:
    return 0 in ranks


def alert_for(event: telemetry_pb2.Event, ranks: Sequence[int]) -> Alert | None:
    """The alert this node sends for ``event`` (``ranks``: the ranks this node runs), or None."""
    which = event.WhichOneof("detail")
    rank = event.rank if event.HasField("rank") else None
    step = event.step if event.HasField("step") else None
    base: dict[str, Any] = {
        "node": event.node,
        "text": event.text,
        "severity": _SEVERITIES.get(event.severity, "error"),
        "rank": rank,
        "step": step,
        "wall_time": event.wall_time,
        "fields": events.detail_fields(event),
    }
    if which == "crash":
        return Alert(kind="crash", culprit=rank, **base)
    if which == "hang":
        hang = event.hang
        if hang.verdict == _Hang.VERDICT_CULPRIT:
            return Alert(kind="hang", culprit=hang.culprit_rank, **base)
        if hang.verdict == _Hang.VERDICT_NO_CULPRIT and _runs_rank_zero(ranks):
            return Alert(kind="hang", **base)
        return None  # stalled: the culprit's node reports it
    if which == "restart" and event.restart.phase == _Restart.PHASE_DONE:
        restart = event.restart
        base["fields"]["cause"] = _CAUSES.get(restart.cause, "unknown")
        return Alert(
            kind="restart",
            mttr_seconds=restart.mttr_seconds if restart.HasField("mttr_seconds") else None,
            steps_lost=restart.steps_lost if restart.HasField("steps_lost") else None,
            **base,
        )
    if which == "job" and event.job.phase == _Job.PHASE_FAILED and _runs_rank_zero(ranks):
        return Alert(kind="job_failed", **base)
    if which == "job" and event.job.phase == _Job.PHASE_NODE_EVICTED:
        return Alert(kind="node_evicted", **base)
    if which == "checkpoint" and event.checkpoint.phase == _Checkpoint.PHASE_FAILED and _runs_rank_zero(ranks):
        base["step"] = event.checkpoint.step
        base["rank"] = None  # one alert per failed save, whichever ranks said so
        return Alert(kind="checkpoint_failed", **base)
    if which == "straggler":
        # Raised or cleared by the agent that runs the rank, judged among its own node's ranks: one agent per flag.
        return Alert(kind=events.kind_of(event), **base)
    return None


def redact(url: str) -> str:
    """A webhook URL fit to print: its scheme and host; the path and query (where the secret is) left out."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return "a URL with no scheme or host"
    return f"{parts.scheme}://{parts.hostname}/…"


def check_webhook(url: str) -> str | None:
    """Why ``url`` cannot be a webhook (one line), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"--alert-webhook must be an http(s) URL with a host (https://hooks.slack.com/...), got {redact(url)}"
    return None


@dataclass(frozen=True)
class AlertPolicy:
    dedup_seconds: float = 300.0
    """An alert with the key of one sent this recently is dropped (a crash loop pages once, not per attempt)."""
    burst: int = 5
    per_minute: float = 6.0
    """Per webhook: up to ``burst`` at once, then this many a minute; the rest are counted and dropped."""
    attempts: int = 5
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    """Retries after a failure (a 5xx, 429 or no connection): 1 s, 2 s, 4 s, ... up to the maximum."""
    max_pending: int = 100
    """Deliveries waiting (a webhook that is down): past this the oldest is dropped, counted."""


@dataclass
class Delivery:
    alert: Alert
    url: str
    due: float
    attempt: int = 0
    suppressed: int = 0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class AlertQueue:
    """Deliveries to make, deduplicated, rate-limited, retried and bounded. Thread-safe; the clock is injected."""

    def __init__(self, urls: Sequence[str], policy: AlertPolicy | None = None, clock: Clock = time.monotonic) -> None:
        self.urls = list(urls)
        self.policy = policy or AlertPolicy()
        self.clock = clock
        self._pending: deque[Delivery] = deque()
        self._sent_keys: dict[tuple[Any, ...], float] = {}
        self._buckets = {url: _Bucket(float(self.policy.burst), clock()) for url in self.urls}
        self._held_back = dict.fromkeys(self.urls, 0)
        self._lock = threading.Lock()
        self.wakeup = threading.Condition(self._lock)
        self.duplicates = self.rate_limited = self.dropped = self.failed = self.delivered = 0
        self.in_flight = 0
        """Deliveries taken by :meth:`due` and not yet told :meth:`sent` or :meth:`failed_attempt`."""

    def offer(self, alert: Alert) -> bool:
        """Queue ``alert`` for every webhook; False when it duplicates a recent one."""
        with self._lock:
            now = self.clock()
            for key, when in list(self._sent_keys.items()):
                if now - when >= self.policy.dedup_seconds:
                    del self._sent_keys[key]
            if alert.key in self._sent_keys:
                self.duplicates += 1
                return False
            self._sent_keys[alert.key] = now
            for url in self.urls:
                if not self._take_token(url, now):
                    self.rate_limited += 1
                    self._held_back[url] += 1
                    continue
                self._pending.append(Delivery(alert, url, due=now, suppressed=self._held_back[url]))
                self._held_back[url] = 0
                while len(self._pending) > self.policy.max_pending:
                    self._pending.popleft()
                    self.dropped += 1
            self.wakeup.notify()
            return True

    def _take_token(self, url: str, now: float) -> bool:
        bucket = self._buckets[url]
        rate = self.policy.per_minute / 60.0
        bucket.tokens = min(float(self.policy.burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def due(self) -> Delivery | None:
        """The delivery to make now (taken off the queue), or None."""
        with self._lock:
            return self._due_locked()

    def _due_locked(self) -> Delivery | None:
        now = self.clock()
        for delivery in self._pending:
            if delivery.due <= now:
                self._pending.remove(delivery)
                self.in_flight += 1
                return delivery
        return None

    def next_due_in(self) -> float | None:
        """Seconds until the next delivery is due (0: now, or one is being made); None when nothing waits."""
        with self._lock:
            if self.in_flight:
                return 0.0
            if not self._pending:
                return None
            return max(0.0, min(d.due for d in self._pending) - self.clock())

    def sent(self, delivery: Delivery) -> None:
        with self._lock:
            self.in_flight -= 1
            self.delivered += 1

    def failed_attempt(self, delivery: Delivery, retry: bool) -> float | None:
        """A delivery failed; with ``retry`` it is queued again after its backoff (returned), if attempts are left."""
        with self._lock:
            self.in_flight -= 1
            delivery.attempt += 1
            if not retry or delivery.attempt >= self.policy.attempts:
                self.failed += 1
                return None
            backoff = min(self.policy.max_backoff_seconds, self.policy.backoff_seconds * 2 ** (delivery.attempt - 1))
            delivery.due = self.clock() + backoff
            self._pending.append(delivery)
            while len(self._pending) > self.policy.max_pending:
                self._pending.popleft()
                self.dropped += 1
            return backoff

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


class DeliveryError(Exception):
    def __init__(self, text: str, retry: bool) -> None:
        super().__init__(text)
        self.retry = retry


def post(url: str, body: dict[str, Any], timeout: float = 5.0) -> int:
    """POST ``body`` as JSON; the HTTP status. Raises DeliveryError (``retry``: a 5xx, a 429, no connection)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "megascope-alerts"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        retry = error.code >= 500 or error.code == 429
        raise DeliveryError(f"{redact(url)} answered HTTP {error.code}", retry) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DeliveryError(f"{redact(url)}: {reason}", retry=True) from None


class AlertService:
    """Reads the node's new events on the agent's loop and posts their alerts from one thread."""

    def __init__(
        self,
        state: NodeState,
        urls: Sequence[str],
        policy: AlertPolicy | None = None,
        send: Callable[[str, dict[str, Any]], int] = post,
    ) -> None:
        self.state = state
        self.queue = AlertQueue(urls, policy)
        self._send = send
        # Only what happens from now on: an agent restarted on a run does not page again for its record.
        self._cursor = EventCursor(state.events, from_start=False)
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._deliver_forever, name="megascope-alerts", daemon=True)
        self._closing = False

    def start(self) -> None:
        self._thread.start()
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(POLL_SECONDS)

    def check(self) -> None:
        """Offer the alerts of the events recorded since the last check (call on the agent's loop)."""
        ranks = list(self.state.ranks)
        for event in self._cursor.read():
            alert = alert_for(event, ranks)
            if alert is not None:
                self.queue.offer(alert)

    def _deliver_forever(self) -> None:
        queue = self.queue
        while True:
            with queue.wakeup:
                delivery = queue._due_locked()
                while delivery is None:
                    if self._closing:
                        return
                    wait = None
                    if queue._pending:
                        wait = max(0.0, min(d.due for d in queue._pending) - queue.clock())
                    queue.wakeup.wait(wait)
                    delivery = queue._due_locked()
            try:
                self._send(delivery.url, delivery.alert.payload(delivery.suppressed))
            except DeliveryError as error:
                backoff = queue.failed_attempt(delivery, error.retry)
                then = f"retrying in {backoff:g} s" if backoff is not None else "giving up on this alert"
                print(f"megascope agent: alert {delivery.alert.kind}: {error}; {then}", file=sys.stderr, flush=True)
            else:
                queue.sent(delivery)

    async def stop(self, flush_seconds: float = 3.0) -> None:
        """Stop reading events; deliveries due within ``flush_seconds`` (the shutdown's own alerts) still go."""
        if self._task is not None:
            self._task.cancel()
            self.check()
        deadline = time.monotonic() + flush_seconds
        while time.monotonic() < deadline:
            waiting = self.queue.next_due_in()
            if waiting is None or waiting > deadline - time.monotonic():
                break
            await asyncio.sleep(0.05)
        with self.queue.wakeup:
            self._closing = True
            self.queue.wakeup.notify()
