"""megascope.api, the two lines a training loop adds: what each call reports, and that none can hurt the loop.

A run with a run directory writes the same records the agent gets to ``telemetry/rank0.jsonl``, so most tests read
that file; the agent's side is a real in-process AgentServer on its worker socket. What touches the interpreter
(the module's one run, ``sys.excepthook``, ``atexit``, SIGUSR1) is tested in a subprocess of its own.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from support.agents import STAND_IN_RANKS, wait_until

from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.api import MAX_SCALARS, Run
from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV, AGENT_SECRET_ENV
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2

AGENT_ENV = (AGENT_ADDRESS_ENV, AGENT_SECRET_ENV, "RANK", "WORLD_SIZE", "LOCAL_RANK", "MEGASCOPE_RUN_DIR")


def records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "telemetry" / "rank0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def steps(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in records(run_dir) if r["type"] == "step"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AGENT_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_run(clean_env: None) -> Iterator[Any]:
    """Runs made in this process, closed after the test with the interpreter hooks they installed undone."""
    made: list[Run] = []
    hook = sys.excepthook

    def make(**options: Any) -> Run:
        run = Run(**options)
        made.append(run)
        return run

    yield make
    for run in made:
        run.close()
    sys.excepthook = hook
    faulthandler.unregister(signal.SIGUSR1)


@pytest.fixture
async def agent(monkeypatch: pytest.MonkeyPatch, clean_env: None) -> AsyncIterator[AgentServer]:
    """A real agent serving its worker channel; this process's runs attach to it as rank 0 of 1."""
    socket = Path(tempfile.mkdtemp(prefix="api-")) / "agent.sock"  # short: a socket's path has a length limit
    server = AgentServer(
        NodeState(telemetry_pb2.NodeInfo(node="node0")), "127.0.0.1", 0,
        worker_socket=socket, worker_secret="the job's secret", launched=STAND_IN_RANKS,
    )  # fmt: skip
    await server.start()
    monkeypatch.setenv(AGENT_ADDRESS_ENV, server.worker_address)
    monkeypatch.setenv(AGENT_SECRET_ENV, server.worker_secret)
    yield server
    await server.stop(grace_seconds=0.1)


def script(code: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a training script of its own, without torchrun (rank 0 of 1)."""
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(code))
    clean = {k: v for k, v in os.environ.items() if k not in AGENT_ENV}
    return subprocess.run(
        [sys.executable, str(path)], env={**clean, **env}, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


# -- no agent ------------------------------------------------------------------------------------------------------


def test_without_an_agent_every_call_does_nothing_and_starts_no_thread(tmp_path: Path) -> None:
    result = script(
        """
        import atexit, sys, threading
        import megascope.api as megascope
        hook, threads = sys.excepthook, threading.active_count()
        megascope.init()
        with megascope.phase("data"):
            pass
        for batch in megascope.batches([1, 2]):
            megascope.step(loss=0.5, tokens=batch, lr="fast", whatever=object())
        megascope.event("hello", severity="loud")
        megascope.comm_hook(object())
        megascope.finish()
        run = megascope.current()
        print(run.active, run.telemetry, run.errors, threading.active_count() - threads, sys.excepthook is hook)
        """,
        {},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "None", "0", "0", "True"]
    assert result.stderr == ""
    assert list(tmp_path.iterdir()) == [tmp_path / "train.py"]  # no file written anywhere near


# -- the step report -----------------------------------------------------------------------------------------------


def test_a_step_reports_its_number_loss_tokens_and_time_since_the_previous_step(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    time.sleep(0.02)
    run.step(2.5, 1024, 3e-4, 1.5, 8, None, {"accuracy": 0.75})
    run.close()
    (report,) = steps(tmp_path)
    assert (report["rank"], report["world_size"], report["step"]) == (0, 1, 1)
    assert (report["loss"], report["tokens"], report["lr"], report["grad_norm"]) == (2.5, 1024, 3e-4, 1.5)
    assert report["step_seconds"] >= 0.02
    assert report["tokens_per_second"] == pytest.approx(1024 / report["step_seconds"])
    assert report["scalars"]["accuracy"] == 0.75
    assert report["scalars"]["samples"] == 8
    assert report["scalars"]["samples_per_second"] == pytest.approx(8 / report["step_seconds"])


def test_steps_are_numbered_from_one_unless_the_loop_gives_its_own_number(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    for given in (None, None, 100, None):
        run.step(1.0, None, None, None, None, given, {})
    run.close()
    assert [r["step"] for r in steps(tmp_path)] == [1, 2, 100, 101]


def test_tensors_are_read_as_numbers_without_the_loop_calling_item(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    weight = torch.ones(3, requires_grad=True)
    loss = (weight * 2).sum()  # a loss still attached to its graph
    run.step(loss, torch.tensor(512), None, torch.tensor([0.5]), None, None, {"ppl": torch.tensor(7.0)})
    run.close()
    (report,) = steps(tmp_path)
    assert (report["loss"], report["tokens"], report["grad_norm"], report["scalars"]["ppl"]) == (6.0, 512, 0.5, 7.0)


def test_garbage_arguments_are_left_out_counted_and_warned_about_once(
    make_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(run_dir=tmp_path)
    run.step("low", [1, 2], object(), torch.ones(2), None, "seven", {"note": "text", "ok": 1.0, "inf": math.inf})
    run.close()
    (report,) = steps(tmp_path)
    assert report["step"] == 1  # a step number that is not one: the next in line
    assert [report[field] for field in ("loss", "tokens", "lr", "grad_norm")] == [0, 0, 0, 0]  # proto3: unset
    assert report["scalars"] == {"ok": 1.0}  # the readable, finite scalar only
    assert run.errors == 6  # step, loss, tokens, lr, grad_norm, note (a non-finite scalar is not an error)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("megascope: rank 0: step(")


def test_a_nan_loss_is_reported_as_nan(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    run.step(float("nan"), None, None, None, None, None, {})
    run.close()
    assert math.isnan(steps(tmp_path)[0]["loss"])


def test_scalars_beyond_the_limit_or_with_overlong_names_are_left_out(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    many: dict[str, object] = {"x" * 129: 1.0, **{f"s{i}": float(i) for i in range(MAX_SCALARS + 10)}}
    run.step(1.0, None, None, None, None, None, many)
    run.close()
    scalars = steps(tmp_path)[0]["scalars"]
    assert sorted(scalars) == sorted(f"s{i}" for i in range(MAX_SCALARS))


def test_phases_fill_the_breakdown_and_add_up_to_the_step(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    for name in ("data", "forward", "backward", "optimizer", "eval", "data"):
        with run.phase(name):
            time.sleep(0.01)
    run.step(1.0, None, None, None, None, None, {})
    run.close()
    (report,) = steps(tmp_path)
    named = [report[f"{p}_seconds"] for p in ("data_wait", "forward", "backward", "optimizer")]
    assert report["data_wait_seconds"] >= 0.02 and all(seconds >= 0.01 for seconds in named)
    assert report["scalars"]["eval_seconds"] >= 0.01  # a phase of another name: a scalar
    total = sum(named) + report["other_seconds"]  # "eval" falls in "other"
    assert total == pytest.approx(report["step_seconds"])


def test_batches_times_the_wait_for_each_batch_as_the_data_phase(make_run: Any, tmp_path: Path) -> None:
    def slow_loader() -> Iterator[int]:
        for batch in range(2):
            time.sleep(0.03)
            yield batch

    run = make_run(run_dir=tmp_path)
    for _ in run.batches(slow_loader()):
        run.step(1.0, None, None, None, None, None, {})
    run.close()
    assert [r["data_wait_seconds"] >= 0.03 for r in steps(tmp_path)] == [True, True]


def test_comm_hook_reports_the_collectives_of_each_step_and_the_wait_for_them(make_run: Any, tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        run = make_run(run_dir=tmp_path)
        model = DistributedDataParallel(torch.nn.Linear(8, 8))
        run.comm_hook(model)
        for _ in range(2):
            model(torch.randn(4, 8)).sum().backward()
            run.step(1.0, None, None, None, None, None, {})
        run.close()
    finally:
        dist.destroy_process_group()
    reports = steps(tmp_path)
    assert [r["collectives_issued"] for r in reports] == [1, 2]  # one bucket a step
    assert [len(r["collectives"]) for r in reports] == [1, 1]
    assert all(r["comm_wait_seconds"] >= 0 for r in reports)


# -- lifecycle -----------------------------------------------------------------------------------------------------


def test_finish_says_finished_with_the_steps_done(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    for _ in range(3):
        run.step(1.0, None, None, None, None, None, {})
    run.finish()
    run.finish()  # idempotent
    assert [(r["type"], r.get("steps")) for r in records(tmp_path)][-1:] == [("finished", 3)]
    assert [r["type"] for r in records(tmp_path)].count("finished") == 1


def test_no_finished_follows_a_failure(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    try:
        raise ValueError("the loss went away")
    except ValueError as error:
        run.fail(error)
    run.finish()
    kinds = [r["type"] for r in records(tmp_path)]
    assert kinds == ["failure"]
    failure = records(tmp_path)[0]
    assert failure["log_tail"][-1] == "ValueError: the loss went away" and failure["exit_code"] == 1


async def test_the_agent_gets_the_steps_and_a_clean_finish_leaves_the_rank_exited_not_failed(
    agent: AgentServer, make_run: Any
) -> None:
    run = make_run()
    await wait_until(lambda: run.agent is not None and run.agent.connected, timeout=15)
    for _ in range(3):
        run.step(2.0, 256, None, None, None, None, {})
    await wait_until(lambda: len(agent.state.step_reports) == 3)
    await asyncio.to_thread(run.finish)
    await wait_until(lambda: agent.state.ranks[0].state != telemetry_pb2.RANK_STATE_RUNNING)
    assert agent.state.ranks[0].state == telemetry_pb2.RANK_STATE_EXITED
    assert [r.loss for r in agent.state.step_reports] == [2.0, 2.0, 2.0]


async def test_a_save_on_command_is_refused_with_the_reason(agent: AgentServer, make_run: Any) -> None:
    run = make_run()
    await wait_until(lambda: run.agent is not None and run.agent.connected, timeout=15)
    run.step(2.0, 256, None, None, None, None, {})
    await wait_until(lambda: len(agent.state.step_reports) == 1)
    async with grpc.aio.insecure_channel(agent.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent_pb2_grpc.AgentServiceStub(channel).SaveCheckpoint(agent_pb2.SaveCheckpointRequest(step=5))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot save a checkpoint on command" in (refused.value.details() or "")
    await asyncio.to_thread(run.finish)


def test_a_clean_exit_says_finished_by_itself(tmp_path: Path) -> None:
    result = script(
        """
        import megascope.api as megascope
        for _ in range(3):
            megascope.step(loss=1.0)
        """,
        {"MEGASCOPE_RUN_DIR": str(tmp_path / "run")},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [r["type"] for r in records(tmp_path / "run")] == ["step", "step", "step", "finished"]


def test_an_unhandled_exception_is_reported_and_the_usual_traceback_still_printed(tmp_path: Path) -> None:
    result = script(
        """
        import megascope.api as megascope
        megascope.step(loss=1.0)
        raise RuntimeError("out of batches")
        """,
        {"MEGASCOPE_RUN_DIR": str(tmp_path / "run")},
        tmp_path,
    )
    assert result.returncode == 1
    assert "RuntimeError: out of batches" in result.stderr.splitlines()[-1]
    kinds = [r["type"] for r in records(tmp_path / "run")]
    assert kinds == ["step", "failure"]  # and never "finished" after it
    assert records(tmp_path / "run")[-1]["log_tail"][-1] == "RuntimeError: out of batches"


def test_sigusr1_dumps_every_threads_stack_and_still_calls_the_scripts_own_handler(tmp_path: Path) -> None:
    result = script(
        """
        import os, signal, time
        import megascope.api as megascope
        signal.signal(signal.SIGUSR1, lambda number, frame: print("the script's handler ran", flush=True))
        megascope.init()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)  # the Python-level handler runs between bytecodes
        print(megascope.current().stack_file)
        """,
        # An agent address with nobody there: the run is under an agent, its link never connects.
        {AGENT_ADDRESS_ENV: f"unix:{tmp_path}/nobody.sock", "MEGASCOPE_RUN_DIR": str(tmp_path / "run")},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    handler, stack_file = result.stdout.splitlines()
    assert handler == "the script's handler ran"
    assert Path(stack_file) == (tmp_path / "run" / "stacks" / "rank0.txt").resolve()
    assert "most recent call first" in Path(stack_file).read_text()


def test_init_is_idempotent_and_a_step_before_it_has_no_time(tmp_path: Path) -> None:
    result = script(
        """
        import time
        import megascope.api as megascope
        megascope.step(loss=1.0)
        time.sleep(0.01)
        megascope.step(loss=1.0)
        print(megascope.init() is megascope.init() is megascope.current())
        """,
        {"MEGASCOPE_RUN_DIR": str(tmp_path / "run")},
        tmp_path,
    )
    assert result.stdout.strip() == "True", result.stderr
    first, second = steps(tmp_path / "run")
    assert first["step_seconds"] == 0 and first["tokens_per_second"] == 0
    assert second["step_seconds"] >= 0.01


def test_the_training_threads_share_is_queueing_not_building(make_run: Any, tmp_path: Path) -> None:
    """Behaviour, not time: the report is built on the telemetry thread (bench/telemetry_overhead.py times it)."""
    run = make_run(run_dir=tmp_path)
    built_on: list[str] = []
    build = run._build_step

    def spy(*args: Any) -> Any:
        built_on.append(threading.current_thread().name)
        return build(*args)

    run._build_step = spy  # type: ignore[method-assign]
    run.step(1.0, None, None, None, None, None, {})
    run.close()
    assert built_on == ["megascope-telemetry"]


@pytest.mark.skipif(torch.cuda.is_initialized(), reason="with CUDA in use the loop notes the stream of CUDA values")
def test_without_cuda_the_training_thread_never_looks_at_a_value(make_run: Any, tmp_path: Path) -> None:
    """Behaviour, not time: a tensor's attribute read on the loop's thread is its most costly part (cold, after the
    step's own work); the values are only looked at where they are read, on the telemetry thread."""
    looked_on: list[str] = []

    class Value:
        def __getattribute__(self, name: str) -> Any:
            looked_on.append(threading.current_thread().name)
            return object.__getattribute__(self, name)

        def __float__(self) -> float:
            return 2.5

    run = make_run(run_dir=tmp_path)
    run.step(Value(), None, Value(), Value(), None, None, {"ppl": Value()})
    run.close()
    (report,) = steps(tmp_path)
    assert (report["loss"], report["lr"], report["grad_norm"], report["scalars"]["ppl"]) == (2.5, 2.5, 2.5, 2.5)
    assert looked_on and set(looked_on) == {"megascope-telemetry"}


def test_an_event_goes_to_the_log_with_its_severity_and_the_current_step(make_run: Any, tmp_path: Path) -> None:
    run = make_run(run_dir=tmp_path)
    run.step(1.0, None, None, None, None, None, {})
    run.event("switched to the long-context data", "warning")
    run.close()
    event = records(tmp_path)[-1]
    assert (event["type"], event["kind"], event["severity"]) == ("event", "user", "SEVERITY_WARNING")
    assert (event["text"], event["step"]) == ("switched to the long-context data", 1)
