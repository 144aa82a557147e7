"""``/metrics``: the node's telemetry for Prometheus (``megascope agent --metrics-port``).

Nothing is updated per step report: a scrape reads :class:`~megascope.agent.state.NodeState` as it is (the newest
report of each rank, the newest host and GPU samples, the events since the last scrape), so an agent nobody scrapes
pays nothing. The HTTP server runs on a thread of its own; a scrape hands the reading to the agent's asyncio loop
(where the state changes, without locks) and waits for it.

Labels are bounded: ``node``, ``rank``, ``gpu`` and ``phase`` (the fixed step phases, checkpoint stages); never a step
number or free text. GPU samples carry the rank that trains on the GPU (from the device each rank reported at its
start), so a GPU's temperature joins a rank's step time in one query.

Counters (crashes, hangs, restarts, steps lost, checkpoint failures) count this node's reports since the agent
started: each incident is reported by one node (the culprit's for a crash or hang, rank 0's for a restart; see
agent/incidents.py), so ``sum()`` over nodes counts each once.

Stragglers (``megascope_rank_straggler``, ``megascope_rank_straggler_cost_seconds``) are this agent's judgement of
its own node's ranks (agent/stragglers.py): a rank slower than its node-mates. A node slow as a whole is not
flagged here; the dashboard's job-wide view sets it against the other nodes.

Access follows the gRPC port's rules: on a non-loopback ``--metrics-host`` the page needs TLS (the agent's
certificate) or the token (``Authorization: Bearer``, Prometheus' ``authorization`` scrape setting), or --insecure.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from megascope.agent.auth import ServerTLS
from megascope.agent.event_cursor import EventCursor
from megascope.agent.state import NodeState
from megascope.agent.stragglers import NodeStragglers
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

SCRAPE_WAIT_SECONDS = 10.0
"""How long a scrape waits for the agent's loop; Prometheus' default scrape timeout is 10 s."""
_STEP_PHASES = ("data_wait", "forward", "backward", "comm_wait", "optimizer", "other")
_CHECKPOINT_STAGES = ("block", "stage", "write", "total")
_RANK_STATES = {
    telemetry_pb2.RANK_STATE_STARTING: "starting",
    telemetry_pb2.RANK_STATE_RUNNING: "running",
    telemetry_pb2.RANK_STATE_EXITED: "exited",
    telemetry_pb2.RANK_STATE_FAILED: "failed",
    telemetry_pb2.RANK_STATE_HUNG: "hung",
}
_MERGE_STATES = {value: name.removeprefix("MERGE_STATE_").lower() for name, value in agent_pb2.MergeState.items()}
_CUDA_DEVICE = re.compile(r"^cuda:(\d+)$")
_Checkpoint = telemetry_pb2.CheckpointDetail


@dataclass
class _Counts:
    crashes: int = 0
    hangs: int = 0
    restarts: int = 0
    steps_lost: int = 0
    checkpoint_failures: int = 0
    mttr_seconds: float | None = None
    """The newest restart's time to repair."""
    checkpoint: telemetry_pb2.Event | None = None
    """The newest saved checkpoint's event."""


class NodeMetrics:
    """The metric families of one node, read from its state. Call :meth:`collect` on the agent's loop."""

    def __init__(
        self,
        state: NodeState,
        merge_status: Callable[[], agent_pb2.MergeProgress] | None = None,
        clock: Callable[[], float] = time.time,
        stragglers: NodeStragglers | None = None,
    ) -> None:
        self.state = state
        self.merge_status = merge_status
        self.stragglers = stragglers
        """The node's straggler judge; None: the straggler gauges are left out."""
        self.clock = clock
        self._cursor = EventCursor(state.events)
        self._counts = _Counts()
        self._gpu_of: dict[int, int] = {}
        """Rank -> the CUDA device it trains on, from its ``started`` event (kept: the event may leave the history)."""

    def collect(self) -> list[Metric]:
        self._read_events()
        node = self.state.node_info.node
        families: list[Metric] = []
        info = InfoMetricFamily("megascope_agent", "The agent serving this page.", labels=["node"])
        info.add_metric([node], {"version": self.state.node_info.agent_version, "run_id": self.state.node_info.run_id})
        families.append(info)
        families += self._ranks(node)
        families += self._stragglers(node)
        families += self._host(node)
        families += self._gpus(node)
        families += self._incidents(node)
        families += self._merge(node)
        return families

    # --- events: counters, checkpoints, which GPU each rank uses -------------------------------------------------

    def _read_events(self) -> None:
        counts = self._counts
        for event in self._cursor.read():
            which = event.WhichOneof("detail")
            if which == "crash":
                counts.crashes += 1
            elif which == "hang" and event.hang.verdict != telemetry_pb2.HangDetail.VERDICT_ELSEWHERE:
                counts.hangs += 1  # "stalled" is the other nodes' view of a hang counted where its culprit is
            elif which == "restart" and event.restart.phase == telemetry_pb2.RestartDetail.PHASE_DONE:
                counts.restarts += 1
                counts.steps_lost += event.restart.steps_lost
                if event.restart.HasField("mttr_seconds"):
                    counts.mttr_seconds = event.restart.mttr_seconds
            elif which == "checkpoint" and event.checkpoint.phase == _Checkpoint.PHASE_FAILED:
                counts.checkpoint_failures += 1
            elif which == "checkpoint" and event.checkpoint.phase == _Checkpoint.PHASE_SAVED:
                counts.checkpoint = event
            elif which == "run" and event.HasField("rank"):
                device = _CUDA_DEVICE.match(event.run.device)
                if device is not None:
                    self._gpu_of[event.rank] = int(device.group(1))

    def _incidents(self, node: str) -> Iterator[Metric]:
        counts = self._counts
        for name, value, text in (
            ("crashes", counts.crashes, "Rank crashes this node reported (the culprit's node reports each)."),
            ("hangs", counts.hangs, "Hangs this node reported (the culprit's node; rank 0's when none was found)."),
            ("restarts", counts.restarts, "Job restarts completed (reported by the node that runs rank 0)."),
            ("steps_lost", counts.steps_lost, "Steps done again after restarts."),
            ("checkpoint_failures", counts.checkpoint_failures, "Checkpoint saves that failed on this node's ranks."),
        ):
            counter = CounterMetricFamily(f"megascope_{name}", text, labels=["node"])
            counter.add_metric([node], value)
            yield counter
        if counts.mttr_seconds is not None:
            yield _gauge("megascope_restart_mttr_seconds", "The newest restart's time from fault to first step.", node)(
                counts.mttr_seconds
            )
        saved = counts.checkpoint
        if saved is None:
            return
        detail = saved.checkpoint
        yield _gauge("megascope_checkpoint_step", "The newest checkpoint saved.", node)(detail.step)
        yield _gauge("megascope_checkpoint_age_seconds", "Seconds since the newest checkpoint was saved.", node)(
            max(0.0, self.clock() - saved.wall_time)
        )
        yield _gauge("megascope_checkpoint_bytes", "Bytes the newest checkpoint wrote.", node)(detail.bytes)
        stages = GaugeMetricFamily(
            "megascope_checkpoint_duration_seconds",
            "The newest save: training blocked, staging copy, background writes, whole save.",
            labels=["node", "phase"],
        )
        for stage in _CHECKPOINT_STAGES:
            stages.add_metric([node, stage], getattr(detail, f"{stage}_seconds"))
        yield stages

    # --- ranks ---------------------------------------------------------------------------------------------------

    def _latest_reports(self) -> dict[int, telemetry_pb2.StepReport]:
        """Each rank's newest step report: the history is walked back until every rank known is found."""
        wanted = {rank for rank, status in self.state.ranks.items() if status.HasField("last_step")}
        latest: dict[int, telemetry_pb2.StepReport] = {}
        for report in reversed(self.state.step_reports):
            if report.rank not in latest:
                latest[report.rank] = report
                if len(latest) >= len(wanted) and wanted <= latest.keys():
                    break
        return latest

    def _ranks(self, node: str) -> Iterator[Metric]:
        labels = ["node", "rank"]
        latest = self._latest_reports()
        now = self.clock()
        step = GaugeMetricFamily("megascope_rank_step", "The newest step the rank completed.", labels=labels)
        step_seconds = GaugeMetricFamily("megascope_rank_step_seconds", "The newest step's wall time.", labels=labels)
        phases = GaugeMetricFamily(
            "megascope_rank_phase_seconds",
            "The newest step's time by phase (comm_wait: exposed communication).",
            labels=["node", "rank", "phase"],
        )
        loss = GaugeMetricFamily("megascope_rank_loss", "The newest step's training loss.", labels=labels)
        tokens = GaugeMetricFamily("megascope_rank_tokens_per_second", "The newest step's throughput.", labels=labels)
        mfu = GaugeMetricFamily(
            "megascope_rank_mfu", "Model FLOPs utilisation of the newest step (0..1).", labels=labels
        )
        age = GaugeMetricFamily(
            "megascope_rank_last_step_age_seconds",
            "Seconds since the rank last made progress (a step; output, for ranks that report no steps).",
            labels=labels,
        )
        restarts = GaugeMetricFamily(
            "megascope_rank_restart_count", "torch elastic's restart count of the rank's process.", labels=labels
        )
        state = GaugeMetricFamily(
            "megascope_rank_state", "1 for the rank's state (starting, running, hung, exited, failed).",
            labels=["node", "rank", "state"],
        )  # fmt: skip
        for rank, status in sorted(self.state.ranks.items()):
            key = [node, str(rank)]
            for name, value in _RANK_STATES.items():
                state.add_metric([*key, value], 1.0 if status.state == name else 0.0)
            restarts.add_metric(key, status.restart_count)
            if status.last_progress_wall_time:
                age.add_metric(key, max(0.0, now - status.last_progress_wall_time))
            report = latest.get(rank)
            if report is None:
                continue
            step.add_metric(key, report.step)
            step_seconds.add_metric(key, report.step_seconds)
            for phase in _STEP_PHASES:
                phases.add_metric([*key, phase], getattr(report, f"{phase}_seconds"))
            loss.add_metric(key, report.loss)
            tokens.add_metric(key, report.tokens_per_second)
            if report.HasField("mfu"):
                mfu.add_metric(key, report.mfu)
        yield from (state, restarts, step, step_seconds, phases, loss, tokens, mfu, age)

    def _stragglers(self, node: str) -> Iterator[Metric]:
        if self.stragglers is None:
            return
        labels = ["node", "rank"]
        flagged = GaugeMetricFamily(
            "megascope_rank_straggler",
            "1 while the rank is flagged as a straggler among this node's ranks (the straggler rules), else 0.",
            labels=labels,
        )
        cost = GaugeMetricFamily(
            "megascope_rank_straggler_cost_seconds",
            "Step time the job loses to the rank per step (its busy time over the median rank's); 0 unless flagged.",
            labels=labels,
        )
        active = {flag.rank: flag for flag in self.stragglers.active()}
        for rank in sorted(self.state.ranks.keys() | active.keys()):
            key = [node, str(rank)]
            flag = active.get(rank)
            flagged.add_metric(key, 0.0 if flag is None else 1.0)
            cost.add_metric(key, 0.0 if flag is None else flag.cost_seconds)
        yield from (flagged, cost)

    # --- host and GPUs -------------------------------------------------------------------------------------------

    def _host(self, node: str) -> Iterator[Metric]:
        if not self.state.host_samples:
            return
        sample = self.state.host_samples[-1]
        for field, text in (
            ("cpu_percent", "Host CPU use, percent of all cores."),
            ("memory_used_bytes", "Host memory in use."),
            ("memory_total_bytes", "Host memory."),
            ("disk_read_bytes_per_second", "Disk reads."),
            ("disk_write_bytes_per_second", "Disk writes."),
            ("net_recv_bytes_per_second", "Network received."),
            ("net_sent_bytes_per_second", "Network sent."),
            ("load_average_1m", "Load average over one minute."),
        ):
            yield _gauge(f"megascope_host_{field}", text, node)(getattr(sample, field))

    def _gpus(self, node: str) -> Iterator[Metric]:
        newest: dict[int, telemetry_pb2.GpuSample] = {}
        for sample in reversed(self.state.gpu_samples):
            if sample.index in newest:
                break  # samples come a whole sweep at a time: a GPU seen twice means every GPU was seen
            newest[sample.index] = sample
        if not newest:
            return
        rank_on = {gpu: rank for rank, gpu in sorted(self._gpu_of.items(), reverse=True)}
        labels = ["node", "gpu", "rank"]
        families = {
            field: GaugeMetricFamily(f"megascope_gpu_{field}", text, labels=labels)
            for field, text in (
                ("utilization_percent", "GPU utilisation."),
                ("memory_used_bytes", "GPU memory in use."),
                ("memory_total_bytes", "GPU memory."),
                ("temperature_celsius", "GPU temperature."),
                ("power_watts", "GPU power draw."),
                ("power_limit_watts", "GPU power limit."),
                ("sm_clock_mhz", "SM clock."),
                ("ecc_errors_corrected", "Corrected ECC errors (volatile)."),
                ("ecc_errors_uncorrected", "Uncorrected ECC errors (volatile)."),
            )
        }
        throttled = GaugeMetricFamily(
            "megascope_gpu_throttled", "1 while the GPU's clocks are throttled.", labels=labels
        )
        xid = GaugeMetricFamily("megascope_gpu_xid_errors", "XID errors in the newest sample.", labels=labels)
        for index, sample in sorted(newest.items()):
            # "": no rank of this node reported that it trains on this GPU (a CPU run, or another job's GPU).
            key = [node, str(index), str(rank_on[index]) if index in rank_on else ""]
            for field, family in families.items():
                family.add_metric(key, getattr(sample, field))
            throttled.add_metric(key, 1.0 if sample.throttle_reasons else 0.0)
            xid.add_metric(key, len(sample.xid_errors))
        yield from (*families.values(), throttled, xid)

    def _merge(self, node: str) -> Iterator[Metric]:
        if self.merge_status is None:
            return
        progress = self.merge_status()
        if progress.state == agent_pb2.MERGE_STATE_UNSPECIFIED:
            return
        state = GaugeMetricFamily("megascope_merge_state", "1 for the merge's state.", labels=["node", "state"])
        for value, name in _MERGE_STATES.items():
            if value != agent_pb2.MERGE_STATE_UNSPECIFIED:
                state.add_metric([node, name], 1.0 if progress.state == value else 0.0)
        yield state
        total = progress.bytes_total or progress.tensors_total
        done = progress.bytes_done if progress.bytes_total else progress.tensors_done
        yield _gauge("megascope_merge_progress_ratio", "The merge's share done (bytes, else tensors; 0..1).", node)(
            done / total if total else 0.0
        )
        yield _gauge("megascope_merge_bytes_done", "Bytes the merge has written.", node)(progress.bytes_done)
        yield _gauge("megascope_merge_bytes_total", "Bytes the merge will write.", node)(progress.bytes_total)


def _gauge(name: str, text: str, node: str) -> Callable[[float], GaugeMetricFamily]:
    def family(value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(name, text, labels=["node"])
        gauge.add_metric([node], value)
        return gauge

    return family


class _LoopCollector(Collector):
    """Collects on the agent's loop: the HTTP thread must not read the state while the loop changes it."""

    def __init__(self, metrics: NodeMetrics, loop: asyncio.AbstractEventLoop) -> None:
        self.metrics, self.loop = metrics, loop

    def collect(self) -> Iterable[Metric]:
        async def on_loop() -> list[Metric]:
            return self.metrics.collect()

        return asyncio.run_coroutine_threadsafe(on_loop(), self.loop).result(SCRAPE_WAIT_SECONDS)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that fails the TLS handshake or hangs up mid-request: nothing to report on the agent's stderr."""


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class names it so)
        """Every scrape would print a line: say nothing."""


def _with_token(app: Any, token: str) -> Any:
    """A WSGI app that answers 401 unless the request carries ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"megascope agent: /metrics needs the agent's token: Authorization: Bearer <token>\n"]

    return guarded


class MetricsServer:
    """The HTTP server of ``/metrics``, on a thread; start and stop it from the agent's loop."""

    def __init__(
        self,
        metrics: NodeMetrics,
        host: str,
        port: int,
        *,
        token: str | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        self.metrics, self.host, self.port, self.token, self.tls = metrics, host, port, token, tls
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/metrics"

    def start(self) -> None:
        """Listen (``port`` 0 picks a free one, then ``port`` says which); raises OSError when it cannot."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_LoopCollector(self.metrics, asyncio.get_running_loop()))
        app = make_wsgi_app(registry)
        if self.token is not None:
            app = _with_token(app, self.token)
        server_class = _Server6 if ":" in self.host else _Server
        server = make_server(self.host, self.port, app, server_class, handler_class=_QuietHandler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
            if self.tls.ca_file:
                context.load_verify_locations(self.tls.ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
            # The handshake happens in the request's own thread: a client that never completes one holds that thread,
            # not the accepting one (which would stop every other scrape).
            server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="megascope-metrics", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        server = self._server
        if server is None:
            return
        self._server = None
        # shutdown() waits for serve_forever to return; a scrape in flight may be waiting on this very loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
