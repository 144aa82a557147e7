"""The straggler rules (dashboard/model/stragglers.py) on synthetic timings of a simulated synchronous job.

tests/support/straggler_sim.py makes the timings: per-rank noise close to a GPU cluster's (2% step-to-step, spikes, GC
pauses), and slowdowns injected into chosen ranks, steps and parts of the step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from support.straggler_sim import Part, SimCluster, Slowdown, feed

from megascope.dashboard.model.stragglers import (
    DEFAULT_CONFIG,
    WARMUP_STEPS,
    Cause,
    RankTiming,
    StragglerConfig,
    StragglerDetector,
    StragglerFlag,
)

ONSET = 30
"""Slowdowns start here, after the detector has measured the noise."""


def raised(changes: list) -> list[tuple[int, StragglerFlag]]:  # type: ignore[type-arg]
    return [(step, flag) for step, result in changes for flag in result.raised]


def cleared(changes: list) -> list[tuple[int, StragglerFlag]]:  # type: ignore[type-arg]
    return [(step, flag) for step, result in changes for flag in result.cleared]


# -- noise alone ---------------------------------------------------------------------------------------------


def test_no_flag_over_10000_steps_of_realistic_noise() -> None:
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=1, jitter=0.02, spike_rate=0.005)
    detector = StragglerDetector()
    assert feed(detector, cluster, range(1, 10_001)) == []
    assert detector.threshold == pytest.approx(DEFAULT_CONFIG.threshold, abs=0.01)  # quiet: the bar stays low


def test_no_flag_over_10000_steps_of_cpu_noise_on_four_ranks() -> None:
    # Four ranks sharing two CPU cores vary 8% from step to step: the bar rises above the noise.
    cluster = SimCluster(nodes=2, ranks_per_node=2, seed=2, jitter=0.08, spike_rate=0.005)
    detector = StragglerDetector()
    assert feed(detector, cluster, range(1, 10_001)) == []
    assert detector.threshold > 1.1


# -- one straggler -------------------------------------------------------------------------------------------


def test_a_steady_10_percent_straggler_is_flagged_within_10_steps() -> None:
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=3, slowdowns=[Slowdown((13,), 1.10, ONSET, 1000)])
    changes = feed(StragglerDetector(), cluster, range(1, ONSET + 40))
    flags = raised(changes)
    assert [flag.rank for _, flag in flags] == [13]
    step, flag = flags[0]
    assert step - ONSET < 10
    assert flag.node == "node1" and flag.cause is Cause.DEVICE
    assert ONSET - DEFAULT_CONFIG.lookback <= flag.since_step <= step
    assert cleared(changes) == []


def test_the_cost_is_the_ranks_busy_time_above_the_median() -> None:
    # 40% more compute on 0.25 s: the job's step is about 0.1 s longer than with a median rank there.
    cluster = SimCluster(nodes=2, ranks_per_node=4, seed=4, slowdowns=[Slowdown((5,), 1.4, ONSET, 1000)])
    detector = StragglerDetector()
    feed(detector, cluster, range(1, ONSET + 20))
    [flag] = detector.active()
    assert flag.cost_seconds == pytest.approx(0.1, rel=0.15)
    assert flag.cost_fraction == pytest.approx(0.1 / 0.36, rel=0.15)  # of the slowed job's median step
    assert flag.ratio == pytest.approx(1.37, abs=0.05)


def test_a_transient_burst_shorter_than_the_window_is_not_flagged() -> None:
    burst = DEFAULT_CONFIG.window - 1
    bursts = [Slowdown((7,), 2.0, start, burst) for start in range(ONSET, 400, 40)]
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=5, slowdowns=bursts)
    assert feed(StragglerDetector(), cluster, range(1, 420)) == []


def test_a_burst_as_long_as_the_window_is_flagged() -> None:
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=5, slowdowns=[Slowdown((7,), 2.0, ONSET, 6)])
    assert [flag.rank for _, flag in raised(feed(StragglerDetector(), cluster, range(1, 60)))] == [7]


# -- several -------------------------------------------------------------------------------------------------


def test_two_stragglers_are_both_flagged_and_nothing_else() -> None:
    slowdowns = [Slowdown((3,), 1.25, ONSET, 1000), Slowdown((20,), 1.15, ONSET, 1000)]
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=6, slowdowns=slowdowns)
    detector = StragglerDetector()
    changes = feed(detector, cluster, range(1, ONSET + 30))
    assert sorted(flag.rank for _, flag in raised(changes)) == [3, 20]
    costs = {flag.rank: flag.cost_seconds for flag in detector.active()}
    assert costs[3] > costs[20]  # each one's own excess


def test_a_whole_slow_node_flags_each_of_its_ranks_as_node_wide() -> None:
    node2 = tuple(range(16, 24))
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=7, slowdowns=[Slowdown(node2, 1.2, ONSET, 1000)])
    detector = StragglerDetector()
    feed(detector, cluster, range(1, ONSET + 30))
    flags = detector.active()
    assert [flag.rank for flag in flags] == list(node2)
    assert all(flag.node_wide and flag.node == "node2" and flag.cause is Cause.DEVICE for flag in flags)
    assert "whole node" in flags[0].describe()


def test_a_straggler_that_comes_and_goes_is_flagged_and_cleared_each_time() -> None:
    episodes = [Slowdown((9,), 1.3, start, 30) for start in (ONSET, 100, 170)]
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=8, slowdowns=episodes)
    detector = StragglerDetector()
    changes = feed(detector, cluster, range(1, 240))
    up = [step for step, flag in raised(changes) if flag.rank == 9]
    down = [step for step, flag in cleared(changes) if flag.rank == 9]
    assert len(up) == 3 and len(down) == 3
    for episode, flagged, recovered in zip(episodes, up, down, strict=True):
        assert episode.start <= flagged < episode.start + 10
        assert episode.start + episode.steps <= recovered < episode.start + episode.steps + 10
    assert {flag.rank for _, flag in raised(changes)} == {9}
    assert detector.active() == []
    assert [flag.cleared_reason for flag in detector.history()] == ["recovered"] * 3


# -- ranks that come and go ----------------------------------------------------------------------------------


def test_ranks_joining_late_and_vanishing_raise_no_exception() -> None:
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=9, slowdowns=[Slowdown((30,), 1.3, ONSET, 1000)])
    detector = StragglerDetector()
    present = np.zeros(32, dtype=bool)
    present[:16] = True  # nodes 2 and 3 join late
    feed(detector, cluster, range(1, ONSET), present)
    present[:] = True
    changes = feed(detector, cluster, range(ONSET, ONSET + 20), present)
    assert [flag.rank for _, flag in raised(changes)] == [30]
    present[30] = False  # the straggler vanishes ...
    present[:8] = False  # ... and so does node 0
    changes = feed(detector, cluster, range(ONSET + 20, ONSET + 40), present)
    assert [(flag.rank, flag.cleared_reason) for _, flag in cleared(changes)] == [(30, "stopped reporting")]
    present[:] = False
    present[:2] = True  # fewer ranks than a majority needs: skipped, not an error
    assert feed(detector, cluster, range(ONSET + 40, ONSET + 50), present) == []


def test_an_old_or_repeated_step_is_ignored_until_a_restart_rewinds() -> None:
    detector = StragglerDetector()
    timings = [RankTiming(rank=r, node="n", step_seconds=1.0, compute_seconds=0.8, data_wait_seconds=0.0,
                          comm_wait_seconds=0.1) for r in range(4)]  # fmt: skip
    for step in range(1, WARMUP_STEPS + 1):
        detector.observe(step, timings)
    assert detector.heat(10).steps == []  # start-up steps are not judged
    detector.observe(5, timings)
    detector.observe(5, timings)
    detector.observe(3, timings)
    assert detector.last_step == 5
    assert detector.heat(10).steps == [5]
    detector.restart_from(3)
    detector.observe(3, timings)
    assert detector.heat(10).steps == [5, 3]


# -- causes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "gpu", "cause"),
    [
        ("compute", False, Cause.DEVICE),
        ("data", False, Cause.DATA),
        ("gc", False, Cause.GC),
        ("host", False, Cause.HOST),
        ("launch", True, Cause.HOST),  # the host-measured compute grew, the device's did not
        ("compute", True, Cause.DEVICE),
    ],
)
def test_the_cause_is_the_part_of_the_step_that_grew(part: Part, gpu: bool, cause: Cause) -> None:
    slowdowns = [Slowdown((6,), 1.3, ONSET, 1000, part)]
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=10, gpu=gpu, slowdowns=slowdowns)
    detector = StragglerDetector()
    feed(detector, cluster, range(1, ONSET + 15))
    assert [(flag.rank, flag.cause) for flag in detector.active()] == [(6, cause)]


def test_a_slow_link_flags_every_rank_of_its_node() -> None:
    node1 = tuple(range(8, 16))
    cluster = SimCluster(nodes=4, ranks_per_node=8, seed=11, slowdowns=[Slowdown(node1, 1.3, ONSET, 1000, "link")])
    detector = StragglerDetector()
    changes = feed(detector, cluster, range(1, ONSET + 15))
    flags = detector.active()
    assert [flag.rank for flag in flags] == list(node1)
    assert all(flag.cause is Cause.LINK and flag.node_wide for flag in flags)
    assert flags[0].cost_seconds == pytest.approx(0.075, rel=0.2)
    assert {flag.rank for _, flag in raised(changes)} == set(node1)


def test_a_slow_node_of_two_does_not_look_like_a_slow_link_elsewhere() -> None:
    # The fast node waits for the slow one: that waiting must not be blamed on the fast node's link.
    slow = tuple(range(8, 16))
    cluster = SimCluster(nodes=3, ranks_per_node=8, seed=12, slowdowns=[Slowdown(slow, 1.3, ONSET, 1000)])
    detector = StragglerDetector()
    feed(detector, cluster, range(1, ONSET + 20))
    assert {(flag.rank, flag.cause) for flag in detector.active()} == {(r, Cause.DEVICE) for r in slow}


# -- the noisy cluster, the heat map, the tunables --------------------------------------------------------------


def test_on_a_noisy_cluster_a_30_percent_straggler_is_still_flagged() -> None:
    cluster = SimCluster(nodes=2, ranks_per_node=2, seed=13, jitter=0.08, compute_seconds=0.5,
                         slowdowns=[Slowdown((2,), 1.3, 1, 1000)])  # fmt: skip
    changes = feed(StragglerDetector(), cluster, range(1, 41))
    assert [flag.rank for _, flag in raised(changes)] == [2]
    assert raised(changes)[0][0] <= 20


def test_the_heat_map_holds_each_ranks_compute_over_the_median() -> None:
    cluster = SimCluster(nodes=2, ranks_per_node=4, seed=14, jitter=0.0, spike_rate=0.0, gc_rate=0.0,
                         slowdowns=[Slowdown((1,), 1.5, 6, 1000)])  # fmt: skip
    detector = StragglerDetector()
    present = np.ones(8, dtype=bool)
    present[7] = False
    feed(detector, cluster, range(1, 9), present)  # steps 1-3 are the warm-up
    heat = detector.heat(4)
    assert heat.steps == [5, 6, 7, 8]
    assert heat.ranks == list(range(7)) and heat.nodes[:5] == ["node0"] * 4 + ["node1"]
    assert heat.ratios.shape == (7, 4)
    assert heat.ratios[1, 0] == pytest.approx(1.0, abs=0.02)  # before the slowdown
    assert heat.ratios[1, -1] == pytest.approx(1.5, abs=0.05)
    assert heat.ratios[0, -1] == pytest.approx(1.0, abs=0.02)
    assert detector.heat(1000).ratios.shape == (7, 8 - WARMUP_STEPS)


def test_a_higher_threshold_ignores_a_smaller_slowdown() -> None:
    slowdowns = [Slowdown((4,), 1.10, ONSET, 1000)]
    detector = StragglerDetector(StragglerConfig(threshold=1.2))
    assert feed(detector, SimCluster(nodes=2, ranks_per_node=4, seed=15, slowdowns=slowdowns), range(1, 60)) == []


@pytest.mark.parametrize(
    "values", [{"threshold": 1.0}, {"window": 0}, {"grace": -1}, {"noise_z": -1.0}, {"min_ranks": 2}]
)
def test_bad_tunables_are_refused(values: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StragglerConfig(**values)  # type: ignore[arg-type]


def test_the_tunables_describe_themselves_for_the_help_screen() -> None:
    names = [name for name, _ in StragglerConfig(threshold=1.07, window=5).describe()]
    text = " ".join(meaning for _, meaning in StragglerConfig(threshold=1.07, window=5).describe())
    assert names == ["threshold", "window", "noise"]
    assert "1.07x" in text and "5 of the last 7" in text


def test_a_step_without_usable_timings_is_skipped() -> None:
    detector = StragglerDetector()
    zeros = [RankTiming(rank=r, node="n", step_seconds=0.0, compute_seconds=0.0, data_wait_seconds=0.0,
                        comm_wait_seconds=0.0) for r in range(4)]  # fmt: skip
    assert detector.observe(1, zeros).raised == []
    assert detector.last_step is None and math.isinf(detector.threshold)
