"""Every `megascope` command spells its flags out in full, and a mistyped flag is reported by the subcommand it
was given to, with that subcommand's usage and the nearest flag it has."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from megascope.agent.cli import build_parser, check_fault_specs
from megascope.agent.cli import main as megascope


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def _usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        megascope(list(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_no_parser_matches_a_flag_by_its_prefix() -> None:
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 10  # megascope, its commands, and ckpt's actions
    assert all(not parser.allow_abbrev for parser in parsers)


def test_a_prefix_of_a_flag_is_refused_not_taken_for_it(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "train", "--ckpt", "ckpt")
    assert "unrecognized arguments: --ckpt ckpt" in err


def test_a_mistyped_flag_gets_the_subcommands_usage_and_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "train", "--ckpt-kep", "5")
    assert err.startswith("usage: megascope train ")
    assert "megascope train: error: unrecognized arguments: --ckpt-kep 5 (did you mean --ckpt-keep?)" in err


def test_a_mistyped_flag_with_its_value_after_an_equals_sign_gets_a_suggestion(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "(did you mean --batch-tokens?)" in _usage_error(capsys, "demo", "--batch-token=512")


def test_a_mistyped_flag_of_a_nested_action_gets_that_actions_usage(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "ckpt", "inspect", "ckpt", "--jsn")
    assert err.startswith("usage: megascope ckpt inspect ")
    assert "(did you mean --json?)" in err


def test_an_unknown_word_gets_the_usage_without_a_guess(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "status", "--agents", "127.0.0.1:1", "extra")
    assert err.startswith("usage: megascope status ")
    assert err.rstrip().endswith("unrecognized arguments: extra")


def test_fault_specs_are_checked_against_the_demos_ranks() -> None:
    assert check_fault_specs(["slow:rank=3,factor=1.3"], world_size=4) is None
    assert "rank 4 never runs" in str(check_fault_specs(["crash:rank=4,step=3"], world_size=4))
    assert "unknown fault kind 'bogus'" in str(check_fault_specs(["bogus"], world_size=4))


def test_a_mistyped_command_gets_the_nearest_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'trian'" in (err := _usage_error(capsys, "trian"))
    assert err.rstrip().endswith("(did you mean train?)")


def test_a_mistyped_action_of_ckpt_gets_the_nearest_action(capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(capsys, "ckpt", "verfy", "ckpt")
    assert err.startswith("usage: megascope ckpt ") and "(did you mean verify?)" in err


def test_the_collective_timeout_is_a_train_flag_and_a_bad_one_names_it() -> None:
    from megascope.engine.config import ConfigError, TrainConfig

    train = build_parser().parse_args(["train", "--collective-timeout", "20"])
    assert train.collective_timeout == 20.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--collective-timeout"):
            TrainConfig(dist_timeout_seconds=bad)
