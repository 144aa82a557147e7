"""README's checkpoint walkthrough works as written: its commands are read out of README.md (the fenced blocks
marked ``<!-- walkthrough ... -->``) and run in order in one empty directory, so README and test cannot drift.

The walkthrough runs once (a module fixture, about a minute of training); each test reads what one of its
commands did.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass

import pytest
from support import REPO, run_megascope

_MARKED_BLOCK = re.compile(r"^<!-- walkthrough\b[^\n]*-->\n```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def walkthrough_commands(readme: str) -> list[list[str]]:
    """Each command line of the marked blocks, as argv (a ``#`` comment ends a line, as in a shell)."""
    commands = [
        shlex.split(line, comments=True) for block in _MARKED_BLOCK.findall(readme) for line in block.splitlines()
    ]
    return [argv for argv in commands if argv]


@dataclass
class Ran:
    argv: list[str]
    result: subprocess.CompletedProcess[str]

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> list[Ran]:
    """Run the walkthrough's commands in order in a new directory, stopping at the first that fails."""
    cwd = tmp_path_factory.mktemp("walkthrough")
    ran: list[Ran] = []
    for argv in walkthrough_commands((REPO / "README.md").read_text()):
        assert argv[0] == "megascope", f"the walkthrough runs megascope commands only, not {shlex.join(argv)}"
        ran.append(Ran(argv, run_megascope(*argv[1:], cwd=cwd, timeout=600)))
        if ran[-1].result.returncode != 0:
            break
    return ran


def _command(ran: list[Ran], *words: str) -> Ran:
    """The walkthrough command whose argv holds all of ``words`` (the first such)."""
    for item in ran:
        if all(word in item.argv for word in words):
            return item
    raise AssertionError(f"no walkthrough command ran with {words} (did an earlier one fail?)")


def test_readme_marks_the_checkpoint_and_merge_commands_as_the_walkthrough() -> None:
    commands = [shlex.join(argv) for argv in walkthrough_commands((REPO / "README.md").read_text())]
    assert any(c.startswith("megascope train") and "--init-from" not in c for c in commands)
    assert any(c.startswith("megascope ckpt verify") for c in commands)
    assert any(c.startswith("megascope merge") and "--last" in c for c in commands)
    assert any(c.startswith("megascope train") and "--init-from" in c for c in commands)


def test_every_walkthrough_command_succeeds_as_written(walkthrough: list[Ran]) -> None:
    expected = len(walkthrough_commands((REPO / "README.md").read_text()))
    last = walkthrough[-1]
    assert last.result.returncode == 0, f"`{shlex.join(last.argv)}` failed:\n{last.output[-3000:]}"
    assert len(walkthrough) == expected


def test_training_says_each_save_on_the_console(walkthrough: list[Ran]) -> None:
    first = walkthrough[0]
    for step in (10, 20, 30, 40):
        assert f"[info] checkpoint: saved step {step}:" in first.result.stdout, first.output[-3000:]
    assert "[info] finished: trained 40 steps (1..40)" in first.result.stdout


def test_a_resumed_run_says_where_it_resumed_and_counts_only_the_steps_it_trained(walkthrough: list[Ran]) -> None:
    resumed = walkthrough[1]
    out = resumed.result.stdout
    assert "--steps" in resumed.argv and "80" in resumed.argv
    assert "[info] resumed: resumed from step 40" in out, resumed.output[-3000:]
    assert "[info] finished: trained 40 steps (41..80, resumed at step 40)" in out
    assert "megascope train: done: 40 steps (41..80)" in out
    assert "trained 80 steps" not in out


def test_ckpt_verify_takes_dir_slash_step(walkthrough: list[Ran]) -> None:
    verify = _command(walkthrough, "ckpt", "verify")
    assert verify.result.stdout.startswith("OK: step 10:"), verify.output


def test_ckpt_inspect_prints_labelled_lines_not_a_python_dict(walkthrough: list[Ran]) -> None:
    out = _command(walkthrough, "ckpt", "inspect").result.stdout
    assert re.search(r"^step\s+80$", out, re.MULTILINE), out
    assert re.search(r"^model\s+tiny: ", out, re.MULTILINE)
    assert "{'" not in out  # a repr of a dict


def test_a_pma_init_run_says_it_starts_from_the_merge(walkthrough: list[Ran]) -> None:
    init = _command(walkthrough, "--init-from")
    assert "[info] initialized: model weights from merged (sma merge of steps [40, 50, 60, 70, 80])" in (
        init.result.stdout
    ), init.output[-3000:]
    assert "[info] finished: trained 40 steps (1..40)" in init.result.stdout
