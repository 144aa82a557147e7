"""Hang diagnosis rules: which rank is the culprit, from progress and faulthandler stacks (pure, no processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from megascope.agent.hang_rules import (
    RankProgress,
    diagnose,
    main_thread,
    parse_faulthandler,
    parse_stacks,
    signature,
)


def stack(*frames: tuple[str, str], other_thread: bool = True) -> str:
    """faulthandler's text for a main thread with ``frames`` (innermost first, as (file, function))."""
    lines = []
    if other_thread:
        lines += [
            "Thread 0x00007f0000000001 (most recent call first):",
            '  File "/usr/lib/python3.11/threading.py", line 327 in wait',
            '  File "/usr/lib/python3.11/threading.py", line 1002 in _bootstrap',
            "",
        ]
    lines.append("Current thread 0x00007f0000000002 (most recent call first):")
    for line, (file, function) in enumerate(frames, start=10):
        lines.append(f'  File "{file}", line {line} in {function}')
    lines.append('  File "/work/engine/trainer.py", line 500 in <module>')
    return "\n".join(lines) + "\n"


WAITING = stack(
    ("/venv/torch/autograd/graph.py", "_engine_run_backward"),
    ("/venv/torch/_tensor.py", "backward"),
    ("/work/engine/trainer.py", "_train_step"),
)
SLEEPING = stack(("/work/engine/trainer.py", "_fire_faults"), ("/work/engine/trainer.py", "train"))


def test_a_real_faulthandler_dump_parses_into_threads_with_the_main_thread_found(tmp_path: Path) -> None:
    script = tmp_path / "dump.py"
    script.write_text(
        "import faulthandler, sys, threading, time\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "def innermost():\n"
        "    faulthandler.dump_traceback(file=sys.stdout, all_threads=True)\n"
        "time.sleep(0.1)\n"
        "innermost()\n"
    )
    text = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30).stdout
    threads = parse_faulthandler(text)
    assert len(threads) == 2
    main = main_thread(threads)
    assert main is not None and [f.function for f in main.frames] == ["innermost", "<module>"]
    assert signature(main) == "dump.py:innermost < dump.py:<module>"


def test_the_rank_whose_progress_lags_every_other_is_the_culprit() -> None:
    ranks = [RankProgress(r, last_step=14, collectives_issued=29, stacks=WAITING) for r in (0, 1, 3)]
    ranks.append(RankProgress(2, last_step=14, collectives_issued=27, stacks=SLEEPING))
    diagnosis = diagnose(ranks)
    assert diagnosis.culprit == 2 and "lags" in diagnosis.reason


def test_with_equal_progress_the_odd_stack_out_of_a_majority_is_the_culprit() -> None:
    ranks = [RankProgress(r, 14, 29, stacks=WAITING) for r in (0, 1, 2)] + [RankProgress(3, 14, 29, stacks=SLEEPING)]
    diagnosis = diagnose(ranks)
    assert diagnosis.culprit == 3 and "differs" in diagnosis.reason
    assert diagnosis.groups == [[0, 1, 2], [3]]


def test_of_two_ranks_with_equal_progress_the_one_not_waiting_in_torch_is_the_culprit() -> None:
    diagnosis = diagnose([RankProgress(0, 5, 10, stacks=SLEEPING), RankProgress(1, 5, 10, stacks=WAITING)])
    assert diagnosis.culprit == 0 and "not waiting" in diagnosis.reason


def test_the_one_rank_that_does_not_answer_is_the_culprit_when_nothing_else_stands_out() -> None:
    ranks = [RankProgress(r, 5, 10, stacks=WAITING) for r in (0, 1)]
    ranks.append(RankProgress(2, 5, 10, note="stopped (SIGSTOP)"))
    diagnosis = diagnose(ranks)
    assert diagnosis.culprit == 2 and "stopped (SIGSTOP)" in diagnosis.reason


def test_ranks_that_all_wait_alike_name_no_culprit() -> None:
    diagnosis = diagnose([RankProgress(r, 5, 10, stacks=WAITING) for r in (0, 1)])
    assert diagnosis.culprit is None and diagnosis.groups == [[0, 1]]


def test_two_ranks_tied_for_last_name_no_culprit_by_progress() -> None:
    ranks = [RankProgress(0, 5, 9, stacks=WAITING), RankProgress(1, 5, 9, stacks=WAITING)]
    ranks += [RankProgress(2, 5, 10, stacks=WAITING), RankProgress(3, 5, 10, stacks=WAITING)]
    assert diagnose(ranks).culprit is None


def test_a_py_spy_dump_parses_like_a_faulthandler_one() -> None:
    text = (
        "Process 6013: python -c ...\nPython v3.11.7 (/usr/bin/python3.11)\n\n"
        'Thread 6014 (idle): "Thread-1"\n    wait (threading.py:327)\n    run (threading.py:982)\n\n'
        'Thread 6013 (idle): "MainThread"\n    _fire_faults (megascope/engine/trainer.py:340)\n'
        "    train (megascope/engine/trainer.py:293)\n    <module> (megascope/engine/trainer.py:488)\n"
    )
    main = main_thread(parse_stacks(text))
    assert main is not None and signature(main) == "trainer.py:_fire_faults < trainer.py:train < trainer.py:<module>"
