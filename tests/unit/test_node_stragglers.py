"""The agent's own straggler judge (agent/stragglers.py): step reports of its node's ranks in, events, alerts and
``/metrics`` gauges out. Timings come from the simulated synchronous job of tests/support/straggler_sim.py, fed
through ``NodeState.add_step`` as the agent's server does."""

from __future__ import annotations

from collections.abc import Iterable

from support.straggler_sim import SimCluster, Slowdown

from megascope.agent.alerts import alert_for
from megascope.agent.metrics import NodeMetrics
from megascope.agent.state import NodeState
from megascope.agent.stragglers import MAX_PENDING, NodeStragglers
from megascope.dashboard.model.cluster import ClusterModel
from megascope.protos.megascope.v1 import telemetry_pb2 as pb
from megascope.protos.megascope.v1 import worker_pb2

SLOW_FROM, SLOW_STEPS = 30, 40
"""Rank 1 computes 1.5x longer for these steps (after the rules have measured the noise), then recovers."""


def node(ranks: int) -> tuple[NodeState, NodeStragglers]:
    """A node's state with its straggler judge hooked in as the agent does, and ``ranks`` ranks attached."""
    state = NodeState(pb.NodeInfo(node="node0", ranks=list(range(ranks))))
    judge = NodeStragglers(state)
    state.step_observers.append(judge.add_step)
    for rank in range(ranks):
        state.rank_attached(worker_pb2.Hello(rank=rank, pid=100 + rank, world_size=ranks))
    return state, judge


def reports(cluster: SimCluster, steps: Iterable[int]) -> list[list[pb.StepReport]]:
    """Each step's reports, one per rank in rank order."""
    out = []
    for step in steps:
        t = cluster.step(step)
        out.append([
            pb.StepReport(
                node="node0", rank=rank, step=step, step_seconds=t["step_seconds"][rank],
                forward_seconds=t["compute_seconds"][rank], data_wait_seconds=t["data_wait_seconds"][rank],
                comm_wait_seconds=t["comm_wait_seconds"][rank], gc_pause_seconds=t["gc_pause_seconds"][rank],
                wall_time=1000.0 + step,
            )
            for rank in range(cluster.world_size)
        ])  # fmt: skip
    return out


def slow_rank_one(ranks: int = 4, seed: int = 5) -> SimCluster:
    return SimCluster(nodes=1, ranks_per_node=ranks, seed=seed, slowdowns=[Slowdown((1,), 1.5, SLOW_FROM, SLOW_STEPS)])


def feed(state: NodeState, steps: list[list[pb.StepReport]]) -> None:
    for step in steps:
        for report in step:
            state.add_step(report)


def straggler_events(state: NodeState) -> list[tuple[str, int, int]]:
    """(kind, rank, step) of the node's straggler events, oldest first."""
    return [(e.kind, e.rank, e.step) for e in state.events if e.WhichOneof("detail") == "straggler"]


def test_a_slow_rank_is_raised_once_and_cleared_once_as_the_nodes_events() -> None:
    state, judge = node(4)
    feed(state, reports(slow_rank_one(), range(1, SLOW_FROM + SLOW_STEPS + 30)))
    found = straggler_events(state)
    assert [(kind, rank) for kind, rank, _ in found] == [("straggler", 1), ("straggler_cleared", 1)]
    raised = next(e for e in state.events if e.kind == "straggler")
    assert SLOW_FROM <= raised.step < SLOW_FROM + 20 and raised.straggler.cost_seconds > 0
    assert raised.node == "node0" and "judged among the 4 ranks of node0" in raised.text
    cleared = next(e for e in state.events if e.kind == "straggler_cleared")
    assert cleared.straggler.cleared_reason == "recovered" and cleared.step >= SLOW_FROM + SLOW_STEPS
    assert judge.active() == []


def test_reports_arriving_in_any_rank_order_are_judged_as_in_order() -> None:
    in_order, _ = node(4)
    feed(in_order, reports(slow_rank_one(), range(1, 100)))
    shuffled, _ = node(4)
    steps = reports(slow_rank_one(), range(1, 100))
    # Rank 3 reports each step only after the others have reported the next one (it lags a step behind).
    for index, step in enumerate(steps):
        for report in step[:3]:
            shuffled.add_step(report)
        if index:
            shuffled.add_step(steps[index - 1][3])
    shuffled.add_step(steps[-1][3])
    assert straggler_events(shuffled) == straggler_events(in_order) != []


def test_a_node_of_two_ranks_is_not_judged() -> None:
    state, judge = node(2)
    feed(state, reports(slow_rank_one(ranks=2), range(1, 100)))
    assert straggler_events(state) == [] and judge.detector.last_step is None


def test_a_rank_that_goes_silent_holds_judging_up_for_at_most_max_pending_steps() -> None:
    state, judge = node(4)
    steps = reports(slow_rank_one(), range(1, 60))
    feed(state, steps[:20])
    for step in steps[20:]:
        for report in step[:3]:  # rank 3 stopped reporting after step 20
            state.add_step(report)
    assert judge.detector.last_step is not None and judge.detector.last_step >= 59 - MAX_PENDING - 1
    # Once left out, it is not waited for: the steps after that are judged as soon as the others report them.
    [step_60] = reports(slow_rank_one(seed=6), [60])
    for report in step_60[:3]:
        state.add_step(report)
    assert judge.detector.last_step == 60


def test_steps_redone_after_a_restart_are_judged_again() -> None:
    state, judge = node(4)
    cluster = slow_rank_one()
    feed(state, reports(cluster, range(1, 51)))
    assert judge.detector.last_step == 50
    feed(state, reports(cluster, range(41, 46)))  # restarted from the checkpoint of step 40
    assert judge.detector.last_step == 45


def test_metrics_show_each_ranks_flag_and_the_flagged_ranks_cost() -> None:
    state, judge = node(4)
    feed(state, reports(slow_rank_one(), range(1, SLOW_FROM + 20)))
    [flag] = judge.active()
    samples = {
        (sample.name, sample.labels["rank"]): sample.value
        for family in NodeMetrics(state, stragglers=judge).collect()
        for sample in family.samples
        if sample.name.startswith("megascope_rank_straggler")
    }
    assert {rank: samples[("megascope_rank_straggler", str(rank))] for rank in range(4)} == {0: 0, 1: 1, 2: 0, 3: 0}
    assert samples[("megascope_rank_straggler_cost_seconds", "1")] == flag.cost_seconds > 0
    assert samples[("megascope_rank_straggler_cost_seconds", "0")] == 0


def test_a_flag_raised_and_cleared_makes_one_alert_each_from_the_node_that_runs_the_rank() -> None:
    state, _ = node(4)
    feed(state, reports(slow_rank_one(), range(1, SLOW_FROM + SLOW_STEPS + 30)))
    alerts = [alert_for(event, [0, 1, 2, 3]) for event in state.events]
    made = [(a.kind, a.rank, a.severity) for a in alerts if a is not None]
    assert made == [("straggler", 1, "warning"), ("straggler_cleared", 1, "info")]
    raised = next(a for a in alerts if a is not None and a.kind == "straggler")
    assert raised.payload()["detail"]["cost_seconds"] > 0 and raised.payload()["text"].startswith("[megascope] node0")


def test_a_dashboard_fed_the_agents_telemetry_shows_each_straggler_once_its_own_job_wide_flag() -> None:
    state, _ = node(4)
    steps = reports(slow_rank_one(), range(1, SLOW_FROM + SLOW_STEPS + 30))
    feed(state, steps)
    model = ClusterModel(["agent0"], clock=lambda: 2000.0)
    model.set_connected("agent0")
    model.ingest("agent0", pb.Telemetry(node_info=state.node_info))
    for step in steps:
        model.ingest("agent0", pb.Telemetry(step_reports=step))
    model.ingest("agent0", pb.Telemetry(events=state.events))  # the agent's own straggler events among them
    assert [e.kind for e in state.events if e.kind.startswith("straggler")] == ["straggler", "straggler_cleared"]
    shown = [(row.kind, row.rank, row.text) for row in model.events() if row.kind.startswith("straggler")]
    assert [(kind, rank) for kind, rank, _ in shown] == [("straggler", 1), ("straggler_cleared", 1)]
    assert not any("judged among" in text for _, _, text in shown)  # the dashboard's judgement, not the agent's
