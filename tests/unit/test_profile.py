"""Profiles (megascope.agent.profile and `megascope config`): where the file is, what it may hold, how its values
meet the flags (the flag wins), and that errors name the file, the key and what is expected."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from megascope.agent import cli, profile

PROFILE = """
[client]
agents = ["node0:50051", "node1:50051"]
token_file = "token"

[dashboard]
theme = "textual-light"
straggler_threshold = 1.2

[agent]
port = 6000
hang_timeout = 90
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(PROFILE)
    return path


def parse(*argv: str) -> argparse.Namespace:
    """The namespace `megascope ARGV` runs with, profile applied (as cli.main does)."""
    args = cli.build_parser().parse_args(list(argv))
    return cli.with_profile(args, list(argv))


# -- where the file is -------------------------------------------------------------------------------------------


def test_the_file_is_under_xdg_config_home_else_dot_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert profile.default_path({"XDG_CONFIG_HOME": "/etc/xdg-here"}) == Path("/etc/xdg-here/megascope/config.toml")
    assert profile.default_path({}) == tmp_path / "home/.config/megascope/config.toml"
    # The XDG spec: a relative $XDG_CONFIG_HOME is ignored.
    assert profile.default_path({"XDG_CONFIG_HOME": "rel"}) == tmp_path / "home/.config/megascope/config.toml"


def test_no_file_means_every_default(tmp_path: Path) -> None:
    loaded = profile.load(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert loaded.path is None
    assert loaded.get("agent", "port") == 50051 and loaded.defaults_for("agent") == {}
    assert {origin for keys in loaded.origins.values() for origin in keys.values()} == {profile.DEFAULT}


def test_the_default_file_is_read_when_it_exists(tmp_path: Path) -> None:
    (tmp_path / "megascope").mkdir()
    (tmp_path / "megascope/config.toml").write_text(PROFILE)
    loaded = profile.load(environ={"XDG_CONFIG_HOME": str(tmp_path)})
    assert loaded.get("client", "agents") == ["node0:50051", "node1:50051"]


def test_no_config_reads_no_file_even_where_the_default_one_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "megascope").mkdir()
    (tmp_path / "megascope/config.toml").write_text(PROFILE)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert parse("agent", "--no-launch").port == 6000
    assert parse("agent", "--no-launch", "--no-config").port == 50051


def test_a_config_flag_naming_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(profile.ProfileError, match="--config: .*missing.toml does not exist"):
        profile.load(tmp_path / "missing.toml")


# -- what it holds -------------------------------------------------------------------------------------------------


def test_values_keep_their_origin_and_paths_resolve_against_the_files_folder(config: Path) -> None:
    loaded = profile.load(config)
    assert loaded.get("client", "token_file") == str(config.parent / "token")
    assert loaded.origins["client"]["token_file"] == str(config)
    assert loaded.origins["client"]["tls"] == profile.DEFAULT
    assert loaded.get("agent", "hang_timeout") == 90.0  # an integer is a number of seconds too


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[agnet]\nport = 1\n", r"unknown section \[agnet\] \(did you mean agent\?\)"),
        ("[agent]\nhang_timout = 3\n", r"\[agent\] hang_timout: unknown key \(did you mean hang_timeout\?\)"),
        ('[agent]\nport = "x"\n', r"\[agent\] port: expected a port number from 0 to 65535, got 'x' \(string\)"),
        ("[agent]\nport = 70000\n", r"\[agent\] port: expected a port number"),
        ("[agent]\ntoken_reads = 1\n", r"\[agent\] token_reads: expected true or false, got 1 \(integer\)"),
        ('[client]\nagents = "node0:50051"\n', r"\[client\] agents: expected a list of \"HOST:PORT\" strings"),
        ('[client]\nagents = ["node0"]\n', r"\[client\] agents: expected a list"),
        ("[dashboard]\nstraggler_threshold = 0.9\n", r"straggler_threshold: expected a number more than 1"),
        ('[client]\ntoken = "s3cret"\n', r"\[client\] token: a token is never kept in the config file"),
        ("agent = 3\n", r"agent must be a table"),
        ("[agent\n", r"not valid TOML"),
    ],
    ids=["section", "key", "type", "range", "bool", "list", "address", "threshold", "token", "table", "syntax"],
)
def test_a_bad_file_is_an_error_naming_the_file_the_key_and_what_is_expected(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(profile.ProfileError, match=message) as raised:
        profile.load(path)
    assert str(raised.value).startswith(f"{path}: ")


# -- precedence: the file gives defaults, flags win -------------------------------------------------------------------


def test_the_files_values_become_the_commands_defaults(config: Path) -> None:
    status = parse("status", "--config", str(config))
    assert status.agents == ["node0:50051", "node1:50051"]
    assert status.straggler_threshold == 1.2 and status.profile_token_file == str(config.parent / "token")
    agent = parse("agent", "--no-launch", "--config", str(config))
    assert agent.port == 6000 and agent.hang_timeout == 90.0 and agent.host == "127.0.0.1"


def test_a_flag_on_the_command_line_wins_over_the_file(config: Path) -> None:
    status = parse("status", "--config", str(config), "--straggler-threshold", "1.5", "--agents", "other:1")
    assert status.straggler_threshold == 1.5
    assert status.agents == ["other:1"]  # replaces the profile's list, not added to it
    assert parse("agent", "--no-launch", "--config", str(config), "--port", "0").port == 0


def test_repeated_agents_flags_add_up(config: Path) -> None:
    args = parse("status", "--config", str(config), "--agents", "a:1", "--agents", "b:2,a:1")
    assert args.agents == ["a:1", "b:2"]


def test_sections_feed_only_their_commands(config: Path) -> None:
    loaded = profile.load(config)
    assert "port" not in loaded.defaults_for("status") and "agents" not in loaded.defaults_for("agent")
    assert loaded.defaults_for("train") == {}


def test_the_environments_token_wins_over_the_profiles_token_file(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megascope.dashboard import transport

    (config.parent / "token").write_text("from-file\n")
    (config.parent / "token").chmod(0o600)
    monkeypatch.delenv("MEGASCOPE_TOKEN", raising=False)
    assert transport.from_args(parse("status", "--config", str(config)))[0].token == "from-file"
    monkeypatch.setenv("MEGASCOPE_TOKEN", "from-env")
    assert transport.from_args(parse("status", "--config", str(config)))[0].token == "from-env"


# -- megascope config show -----------------------------------------------------------------------------------------


def test_config_show_prints_every_value_with_its_origin(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "show", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"# config file: {config}" in out
    lines = {line.split("#")[0].strip(): line.rsplit("# ", 1)[1] for line in out.splitlines() if " = " in line}
    assert lines['agents = ["node0:50051", "node1:50051"]'] == str(config)
    assert lines["port = 6000"] == str(config)
    assert lines['host = "127.0.0.1"'] == profile.DEFAULT


def test_config_show_never_prints_a_token(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGASCOPE_TOKEN", "very-secret-value")
    (config.parent / "token").write_text("file-secret-value\n")
    for form in (["--json"], []):
        assert cli.main(["config", "show", "--config", str(config), *form]) == 0
        out = capsys.readouterr().out
        assert "secret-value" not in out
        assert "MEGASCOPE_TOKEN" in out


def test_a_bad_profile_stops_a_command_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dashboard]\nstraggler_window = 0\n")
    assert cli.main(["status", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megascope status: error: {bad}: [dashboard] straggler_window: expected a whole number of at "
                   "least 1, got 0 (integer)"]  # fmt: skip


def test_status_without_agents_anywhere_says_where_to_put_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert "--agents" in err and f"{tmp_path}/megascope/config.toml" in err
