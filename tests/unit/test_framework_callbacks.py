"""The framework callbacks (Hugging Face Trainer, PyTorch Lightning, Accelerate) report every optimizer step with
the live loss, tokens and learning rate, whatever the framework logs.

Each test trains a 1-layer GPT-2 built from a config (no download) on random ids, in this process, with megascope's
API writing to a run directory: the API's real JSONL sink, read back once the run is closed. A framework that is
not installed is skipped (the dev extra installs all three)."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from support import read_telemetry

import megascope.api as megascope
from megascope.api import _run
from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh megascope run for this test (the API keeps one per process), writing under the returned directory."""
    monkeypatch.setattr(_run, "_RUN", None)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # each run chains the hook; put the original back
    monkeypatch.delenv(AGENT_ADDRESS_ENV, raising=False)
    monkeypatch.setenv(_run.RUN_DIR_ENV, str(tmp_path / "run"))
    yield tmp_path / "run"
    run = megascope.current()
    if run is not None:
        run.close()


def script(name: str, *frameworks: str) -> ModuleType:
    """tests/support/scripts/<name>.py, or a skip when one of its frameworks is not installed."""
    for framework in frameworks:
        pytest.importorskip(framework)
    return importlib.import_module(f"support.scripts.{name}")


def reported_steps(run_dir: Path) -> list[dict[str, Any]]:
    """The step records the run wrote, once it is closed (closing delivers what is queued)."""
    run = megascope.current()
    assert run is not None and run.active, "the callback never started megascope's run"
    run.close()
    assert run.errors == 0
    return [record for record in read_telemetry(run_dir)[0] if record["type"] == "step"]


# -- Hugging Face Trainer -------------------------------------------------------------------------------------------


def test_hf_callback_reports_each_step_with_the_loss_lr_and_grad_norm_the_trainer_logs(
    run_dir: Path, tmp_path: Path
) -> None:
    hf = script("hf_script", "transformers")
    logs = hf.train(tmp_path / "out", steps=4, logging_steps=1, grad_accum=2)
    steps = reported_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for step, log in zip(steps, logs, strict=True):
        assert step["loss"] == pytest.approx(log["loss"], rel=1e-6)
        assert step["lr"] == pytest.approx(log["learning_rate"])
        assert step["grad_norm"] == pytest.approx(log["grad_norm"], rel=1e-6)
        assert step["tokens"] == 2 * 4 * hf.SEQ  # two micro-batches of 4 sequences
        assert step["step_seconds"] > 0 and step["tokens_per_second"] > 0


def test_hf_callback_reports_the_loss_of_steps_the_trainer_does_not_log(run_dir: Path, tmp_path: Path) -> None:
    hf = script("hf_script", "transformers")
    logs = hf.train(tmp_path / "out", steps=6, logging_steps=3)
    losses = [s["loss"] for s in reported_steps(run_dir)]
    assert len(losses) == 6 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    # The Trainer logs the mean over its logging window: the per-step losses average to it.
    assert [log["step"] for log in logs] == [3, 6]
    assert sum(losses[:3]) / 3 == pytest.approx(logs[0]["loss"], rel=1e-6)
    assert sum(losses[3:]) / 3 == pytest.approx(logs[1]["loss"], rel=1e-6)


def test_hf_evaluation_inside_training_adds_nothing_to_the_steps(run_dir: Path, tmp_path: Path) -> None:
    hf = script("hf_script", "transformers")
    trainer, _ = hf.trainer(
        tmp_path / "out", steps=4, eval_dataset=hf.RandomTokens(8, seed=1), eval_strategy="steps", eval_steps=2
    )
    trainer.train()
    steps = reported_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert {s["tokens"] for s in steps} == {4 * hf.SEQ}  # evaluation's forward passes are not training tokens


def test_hf_step_numbers_continue_across_a_resume_from_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    hf = script("hf_script", "transformers")
    first, _ = hf.trainer(tmp_path / "out", steps=2, save_strategy="steps", save_steps=2)
    first.train()
    resumed, _ = hf.trainer(tmp_path / "out", steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert [s["step"] for s in reported_steps(run_dir)] == [1, 2, 3, 4]


def test_hf_callback_without_an_agent_or_run_dir_reports_nothing_and_trains(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hf = script("hf_script", "transformers")
    monkeypatch.setattr(_run, "_RUN", None)
    monkeypatch.delenv(AGENT_ADDRESS_ENV, raising=False)
    monkeypatch.delenv(_run.RUN_DIR_ENV, raising=False)
    logs = hf.train(tmp_path / "out", steps=2)
    run = megascope.current()
    assert run is not None and not run.active
    assert len(logs) == 2 and run.errors == 0


# -- PyTorch Lightning ----------------------------------------------------------------------------------------------


def test_lightning_callback_reports_each_optimizer_step_with_the_mean_loss_of_its_batches(
    run_dir: Path, tmp_path: Path
) -> None:
    pl = script("lightning_script", "pytorch_lightning", "transformers")
    module = pl.train(tmp_path / "out", steps=3, grad_accum=2, grad_norm=True)
    steps = reported_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3]
    for number, step in enumerate(steps):
        pair = module.losses[2 * number : 2 * number + 2]
        assert step["loss"] == pytest.approx(sum(pair) / 2, rel=1e-6)
        assert step["lr"] == pytest.approx(1e-3 / (1 + number))  # the rate the step used, before the scheduler's
        assert step["tokens"] == 2 * 4 * pl.SEQ
        assert step["grad_norm"] > 0


def test_lightning_grad_norm_is_left_out_unless_asked_for(run_dir: Path, tmp_path: Path) -> None:
    pl = script("lightning_script", "pytorch_lightning", "transformers")
    pl.train(tmp_path / "out", steps=2)
    assert [s.get("grad_norm", 0.0) for s in reported_steps(run_dir)] == [0.0, 0.0]


def test_lightning_callback_subclasses_the_lightning_package_asked_for() -> None:
    pytorch_lightning = pytest.importorskip("pytorch_lightning")
    from megascope.api.lightning import callback_class

    assert issubclass(callback_class("pytorch_lightning"), pytorch_lightning.Callback)
    with pytest.raises(ValueError, match="lightning.pytorch"):
        callback_class("lightning.fabric")


# -- Accelerate ------------------------------------------------------------------------------------------------------


def test_accelerate_reporter_sends_one_step_per_optimizer_step_with_its_mean_loss_and_lr(run_dir: Path) -> None:
    accelerate = script("accelerate_script", "accelerate", "transformers")
    seen = accelerate.train(steps=3, grad_accum=2)
    steps = reported_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3]
    for number, step in enumerate(steps):
        pair = seen["losses"][2 * number : 2 * number + 2]
        assert step["loss"] == pytest.approx(sum(pair) / 2, rel=1e-6)
        assert step["lr"] == pytest.approx(seen["lrs"][number])
        assert step["tokens"] == 2 * 4 * accelerate.SEQ
        assert step["data_wait_seconds"] > 0  # megascope.batches(loader) timed each batch's wait


def test_importing_megascope_api_imports_no_framework() -> None:
    frameworks = "{'transformers', 'accelerate', 'pytorch_lightning', 'lightning'}"
    code = f"import sys, megascope.api; print(sorted({frameworks} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.stdout.strip() == "[]", result.stderr
