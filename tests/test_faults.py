"""Fault injection: the ``--inject KIND:key=value,...`` grammar, its errors, and its place in the run config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from megascope.engine.config import TrainConfig
from megascope.engine.faults import (
    FaultError,
    SlowFault,
    check_ranks,
    fault_from_dict,
    fault_to_dict,
    faults_for_rank,
    inject_argument,
    parse_fault,
)
from tests.conftest import run_megascope


def test_slow_parses_into_its_dataclass() -> None:
    assert parse_fault("slow:rank=2,factor=1.3") == SlowFault(rank=2, factor=1.3)


def test_spaces_and_case_are_forgiven() -> None:
    assert parse_fault(" SLOW: rank = 0 , factor = 2 ") == SlowFault(rank=0, factor=2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crash:rank=1,step=3", "'crash' faults are not supported yet"),
        ("hang:rank=1,step=3", "'hang' faults are not supported yet"),
        ("bogus:rank=1", "unknown fault kind 'bogus'"),
        ("slow", "gives no settings; write slow:rank=...,factor=..."),
        ("slow:rank=1", "missing factor"),
        ("slow:rank=1,factor=2,speed=3", "unknown setting 'speed'"),
        ("slow:rank=one,factor=2", "rank must be an integer, got 'one'"),
        ("slow:rank=1,factor=fast", "factor must be a number, got 'fast'"),
        ("slow:rank=1,factor=1", "factor must be more than 1"),
        ("slow:rank=-1,factor=2", "rank must be >= 0"),
        ("slow:rank=1,rank=2,factor=2", "rank is given twice"),
        ("slow:rank,factor=2", "'rank' in 'slow:rank,factor=2' is not key=value"),
    ],
)
def test_bad_values_are_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(FaultError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_fault(text)


def test_the_argparse_type_turns_errors_into_usage_errors() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not supported yet"):
        inject_argument("crash:rank=0,step=1")


def test_a_rank_outside_the_job_or_a_repeat_is_refused() -> None:
    check_ranks([SlowFault(rank=3, factor=2)], world_size=4)
    with pytest.raises(FaultError, match="ranks 0..3, so rank 4 never runs"):
        check_ranks([SlowFault(rank=4, factor=2)], world_size=4)
    with pytest.raises(FaultError, match="two 'slow' faults for rank 1"):
        check_ranks([SlowFault(rank=1, factor=2), SlowFault(rank=1, factor=3)], world_size=4)


def test_faults_round_trip_through_the_run_config_json() -> None:
    config = TrainConfig(faults=(SlowFault(rank=2, factor=1.3),))
    values = json.loads(config.to_json())
    assert values["faults"] == [{"rank": 2, "factor": 1.3, "kind": "slow"}]
    assert TrainConfig.from_dict(values) == config
    assert fault_from_dict(fault_to_dict(SlowFault(rank=1, factor=4))) == SlowFault(rank=1, factor=4)


def test_a_config_written_before_faults_existed_still_loads() -> None:
    values = json.loads(TrainConfig().to_json())
    del values["faults"]
    assert TrainConfig.from_dict(values).faults == ()


def test_slow_sleeps_factor_minus_one_times_the_compute() -> None:
    fault = SlowFault(rank=0, factor=1.3)
    assert fault.extra_seconds(0.5) == pytest.approx(0.15)
    assert fault.extra_seconds(-1.0) == 0.0  # a clock oddity never becomes a negative sleep


def test_each_rank_gets_only_its_own_faults() -> None:
    faults = (SlowFault(rank=0, factor=2), SlowFault(rank=2, factor=3))
    assert faults_for_rank(faults, 2) == [SlowFault(rank=2, factor=3)]
    assert faults_for_rank(faults, 1) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--inject", "crash:rank=1,step=3"], "argument --inject: 'crash' faults are not supported yet"),
        (["--inject", "slow:rank=5,factor=2", "--nproc-per-node", "2"], "--inject: slow:rank=5,factor=2: the job"),
    ],
)
def test_train_refuses_a_bad_inject_naming_the_flag(args: list[str], message: str) -> None:
    result = run_megascope("train", *args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_demo_relays_the_agents_refusal_of_a_bad_inject(tmp_path: Path) -> None:
    result = run_megascope("demo", "--headless", "--steps", "2", "--inject", "hang:rank=0,step=1", "--run-dir",
                           str(tmp_path), timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "megascope demo: error: argument --inject: 'hang' faults are not supported yet" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
