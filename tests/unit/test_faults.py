"""Fault injection: the ``--inject KIND:key=value,...`` grammar, its errors, and its place in the run config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from support import run_megascope

from megascope.engine.config import TrainConfig
from megascope.engine.runtime import faults as faults_module
from megascope.engine.runtime.faults import (
    CRASH_POINT_ENV,
    CrashFault,
    FaultError,
    FaultInjector,
    HangFault,
    SlowFault,
    check_ranks,
    claim_firing,
    fault_from_dict,
    fault_to_dict,
    faults_for_rank,
    inject_argument,
    is_spent,
    parse_fault,
)
from megascope.engine.runtime.run_dir import fault_marker


def test_slow_parses_into_its_dataclass() -> None:
    assert parse_fault("slow:rank=2,factor=1.3") == SlowFault(rank=2, factor=1.3)


def test_spaces_and_case_are_forgiven() -> None:
    assert parse_fault(" SLOW: rank = 0 , factor = 2 ") == SlowFault(rank=0, factor=2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crash:rank=1,step=0", "crash: step must be >= 1"),
        ("crash:rank=1,step=3,how=melt", "crash: how must be one of kill, segv, exception, exit, got 'melt'"),
        ("crash:rank=1,step=3,times=-1", "crash: times must be >= 0"),
        ("crash:rank=1", "crash: missing step; write crash:rank=...,step=..."),
        ("hang:rank=1,step=3,how=nap", "hang: how must be one of sleep, stop, got 'nap'"),
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
    with pytest.raises(argparse.ArgumentTypeError, match="unknown fault kind 'explode'"):
        inject_argument("explode:rank=0,step=1")


def test_crash_and_hang_parse_with_their_defaults() -> None:
    assert parse_fault("crash:rank=1,step=40") == CrashFault(rank=1, step=40, how="kill", times=1)
    assert parse_fault("crash:rank=0,step=2,how=EXCEPTION,times=0") == CrashFault(0, 2, "exception", 0)
    assert parse_fault("hang:rank=2,step=80") == HangFault(rank=2, step=80, how="sleep")
    assert parse_fault("hang:rank=2,step=80,how=stop") == HangFault(rank=2, step=80, how="stop")


def test_a_fault_fires_once_across_restarts(tmp_path: Path) -> None:
    fault = CrashFault(rank=1, step=5)
    assert claim_firing(fault, tmp_path)
    assert not claim_firing(fault, tmp_path)  # the restarted rank reaches step 5 again and runs on


def test_a_fault_with_times_n_fires_n_times_and_with_zero_every_time(tmp_path: Path) -> None:
    assert [claim_firing(CrashFault(rank=0, step=2, times=2), tmp_path) for _ in range(3)] == [True, True, False]
    assert all(claim_firing(CrashFault(rank=0, step=3, times=0), tmp_path) for _ in range(5))


def test_a_firing_is_recorded_where_the_run_directory_module_says(tmp_path: Path) -> None:
    fault = CrashFault(rank=1, step=5)
    claim_firing(fault, tmp_path)
    assert fault_marker(tmp_path, fault.describe(), 0) == tmp_path / "faults" / "crash_rank-1_step-5_how-kill_times-1.0"
    assert fault_marker(tmp_path, fault.describe(), 0).exists()


def test_the_injector_holds_its_ranks_faults_and_announces_those_still_to_fire(tmp_path: Path) -> None:
    slow, crash, other = SlowFault(rank=0, factor=2.0), CrashFault(rank=0, step=3, how="exception"), HangFault(1, 2)
    injector = FaultInjector([slow, crash, other], rank=0, run_dir=tmp_path)
    assert injector.slow == slow
    assert injector.to_announce() == [slow, crash]
    injector.at_step(2)  # not its step: nothing happens
    with pytest.raises(RuntimeError, match="injected fault crash:rank=0,step=3"):
        injector.at_step(3)
    assert injector.to_announce() == [slow]  # fired: a restarted rank does not announce it again
    injector.at_step(3)  # and does not fire it again


def test_the_injector_kills_at_the_checkpoint_point_the_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    kills: list[int] = []
    monkeypatch.setattr(faults_module.os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    injector = FaultInjector(rank=1)
    monkeypatch.setenv(CRASH_POINT_ENV, "commit:1:8")
    for point, step in (("write", 8), ("commit", 6), ("commit", 8)):
        injector.at_checkpoint(point, step)
    assert len(kills) == 1
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted job shows what it resumes from
    injector.at_checkpoint("commit", 8)
    assert len(kills) == 1


def test_a_fault_is_spent_once_it_fired_as_often_as_it_may(tmp_path: Path) -> None:
    twice, storm = CrashFault(rank=0, step=2, times=2), CrashFault(rank=0, step=3, times=0)
    assert not is_spent(twice, tmp_path)
    claim_firing(twice, tmp_path)
    assert not is_spent(twice, tmp_path)
    claim_firing(twice, tmp_path)
    assert is_spent(twice, tmp_path)
    claim_firing(storm, tmp_path)
    assert not is_spent(storm, tmp_path)  # a storm fires at every start


def test_a_rank_outside_the_job_or_a_repeat_is_refused() -> None:
    check_ranks([SlowFault(rank=3, factor=2)], world_size=4)
    with pytest.raises(FaultError, match="ranks 0..3, so rank 4 never runs"):
        check_ranks([SlowFault(rank=4, factor=2)], world_size=4)
    with pytest.raises(FaultError, match="two 'slow' faults for rank 1"):
        check_ranks([SlowFault(rank=1, factor=2), SlowFault(rank=1, factor=3)], world_size=4)


def test_one_rank_may_crash_or_hang_again_at_another_step_but_not_twice_at_one() -> None:
    check_ranks([CrashFault(rank=1, step=10), CrashFault(rank=1, step=30, how="exception"),
                 HangFault(rank=1, step=10), HangFault(rank=1, step=50)], world_size=4)  # fmt: skip
    with pytest.raises(FaultError, match="two 'crash' faults for rank 1 at step 10"):
        check_ranks([CrashFault(rank=1, step=10), CrashFault(rank=1, step=10, how="exit")], world_size=4)
    with pytest.raises(FaultError, match="two 'hang' faults for rank 2 at step 7"):
        check_ranks([HangFault(rank=2, step=7), HangFault(rank=2, step=7)], world_size=4)


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
        (["--inject", "crash:rank=1,step=3,how=melt"], "argument --inject: crash: how must be one of"),
        (["--inject", "slow:rank=5,factor=2", "--nproc-per-node", "2"], "--inject: slow:rank=5,factor=2: the job"),
    ],
)
def test_train_refuses_a_bad_inject_naming_the_flag(args: list[str], message: str) -> None:
    result = run_megascope("train", *args, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_demo_refuses_a_bad_inject_naming_the_flag(tmp_path: Path) -> None:
    result = run_megascope("demo", "--headless", "--steps", "2", "--inject", "hang:rank=0,step=0", "--run-dir",
                           str(tmp_path), timeout=120)  # fmt: skip
    assert result.returncode == 2
    expected = "megascope demo: error: --inject: hang: step must be >= 1 (steps count from 1), got 0"
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
