"""The Grafana dashboard in bench/ queries only metrics the agent serves (a rename breaks this, not a 3 a.m. panel)."""

from __future__ import annotations

import json
import re

from support import REPO
from support.ops import node_at_step_7

from megascope.agent.metrics import NodeMetrics
from megascope.agent.stragglers import NodeStragglers
from megascope.protos.megascope.v1 import agent_pb2

DASHBOARD = REPO / "bench" / "grafana-megascope.json"


def test_every_metric_the_grafana_dashboard_queries_is_served() -> None:
    merge = agent_pb2.MergeProgress(state=agent_pb2.MERGE_STATE_RUNNING, bytes_total=1)
    state = node_at_step_7()
    metrics = NodeMetrics(state, lambda: merge, stragglers=NodeStragglers(state))
    served = {sample.name for family in metrics.collect() for sample in family.samples}
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queried = {
        name
        for panel in panels
        for target in panel.get("targets", [])
        for name in re.findall(r"\b(megascope_[a-z0-9_]+)", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    assert queried <= served, f"queried but not served: {sorted(queried - served)}"
