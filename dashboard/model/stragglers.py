"""Straggler detection for the dashboard: the rules live in the agent (agent/straggler_rules.py, documented there).

The dashboard judges every rank of the job with them (dashboard/model/step_alignment.py feeds it one step at a
time, every node's ranks together); each agent judges its own node's ranks with the very same rules, for its
events, alerts and ``/metrics``. One module, so the two never disagree on the same input; this one keeps the
dashboard's names (``StragglerDetector``, ``StragglerFlag``, ...) where its code and tests import them.
"""

from __future__ import annotations

from megascope.agent.straggler_rules import (
    DEFAULT_CONFIG,
    HEAT_STEPS,
    HISTORY_FLAGS,
    MIN_NOISE_STEPS,
    NOISE_EVERY,
    NOISE_HISTORY,
    NOISE_STEPS,
    WARMUP_STEPS,
    Cause,
    FloatArray,
    HeatMap,
    RankTiming,
    StepResult,
    StragglerConfig,
    StragglerDetector,
    StragglerFlag,
)

__all__ = [
    "DEFAULT_CONFIG",
    "HEAT_STEPS",
    "HISTORY_FLAGS",
    "MIN_NOISE_STEPS",
    "NOISE_EVERY",
    "NOISE_HISTORY",
    "NOISE_STEPS",
    "WARMUP_STEPS",
    "Cause",
    "FloatArray",
    "HeatMap",
    "RankTiming",
    "StepResult",
    "StragglerConfig",
    "StragglerDetector",
    "StragglerFlag",
]
