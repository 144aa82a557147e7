"""`megascope merge` (PMA): weights, streaming, bad input, evaluation and training from a merge, on real files.

The inputs are real checkpoints written by our Checkpointer from 1, 2 and 3 ranks (whole tensors and dim-0
shards), and every expected value is computed here from the raw safetensors files with the `safetensors`
library, never with the code under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from support import merge_workers, read_telemetry, run_megascope

from megascope.agent.cli import main as megascope
from megascope.dashboard.local_cluster import free_port
from megascope.engine.checkpoint import Checkpointer, load_state, verify
from megascope.engine.checkpoint.merge import merge_weights
from megascope.engine.evaluate import Evaluator
from megascope.engine.model import ModelConfig, Transformer

STEPS = [step for step, _, _ in merge_workers.SAVES]


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 10..40 of one run, saved by 1, 2, 3 (sharded) and 3 (DDP) ranks into one checkpoint directory."""
    directory = tmp_path_factory.mktemp("series") / "ckpt"
    mp.spawn(merge_workers.save_series, args=(3, free_port(), str(directory)), nprocs=3, join=True)
    return directory


@pytest.fixture
def run_dir(series: Path, tmp_path: Path) -> Path:
    """A private copy of the series, for tests that damage or add checkpoints."""
    copy = tmp_path / "ckpt"
    shutil.copytree(series, copy)
    return copy


def raw_tensor(step_dir: Path, name: str) -> torch.Tensor:
    """One whole tensor from the raw files: metadata.json says where its shards are; safetensors reads them."""
    meta = json.loads((step_dir / "metadata.json").read_text())["tensors"][name]
    parts = []
    for shard in sorted(meta["shards"], key=lambda s: s["offset"]):
        with safe_open(step_dir / shard["file"], "pt") as f:
            parts.append(f.get_tensor(shard["key"]))
    return torch.cat(parts) if parts[0].dim() else parts[0]


def raw_names(step_dir: Path) -> list[str]:
    return sorted(json.loads((step_dir / "metadata.json").read_text())["tensors"])


def reference(step_dirs: list[Path], name: str, method: str, alpha: float = 0.0, weights: list[float] | None = None):  # type: ignore[no-untyped-def]
    """(expected value in float64, bound on fp32 rounding) of the merge of ``name``, computed independently."""
    models = [raw_tensor(d, name).double() for d in step_dirs]
    n = len(models)
    if method == "ema":  # the recursion itself, on the tensors
        value = models[0]
        for m in models[1:]:
            value = alpha * m + (1 - alpha) * value
        w = [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]
    else:
        w = {"sma": [1 / n] * n, "wma": [i / (n * (n + 1) / 2) for i in range(1, n + 1)]}.get(method, weights)
        assert w is not None
        value = sum(wi * m for wi, m in zip(w, models, strict=True))
    # fp32 accumulation: each of the n products and n additions rounds with relative error 2^-24.
    bound = 4 * n * 2.0**-24 * sum(abs(wi) * m.abs() for wi, m in zip(w, models, strict=True)) + 1e-30
    return value, bound


def merged_file(out: Path) -> Path:
    return out / (out / "latest").read_text().strip() / "rank0.safetensors"


def nothing_written(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".tmp").exists()


# --- the weights ----------------------------------------------------------------------------------------------


def test_sma_gives_every_checkpoint_one_nth() -> None:
    assert merge_weights("sma", 4) == [0.25] * 4


def test_wma_weights_grow_linearly_towards_the_newest() -> None:
    assert merge_weights("wma", 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_ema_weights_are_those_of_the_recursion_and_sum_to_one() -> None:
    weights = merge_weights("ema", 4, alpha=0.2)
    assert weights == pytest.approx([0.8**3, 0.2 * 0.8**2, 0.2 * 0.8, 0.2])
    assert math.fsum(weights) == pytest.approx(1.0, abs=1e-15)


# --- merges against the independent reference ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "flags", "alpha", "weights"),
    [
        ("sma", ["--method", "sma"], 0.0, None),
        ("wma", ["--method", "wma"], 0.0, None),
        ("ema", ["--method", "ema", "--alpha", "0.3"], 0.3, None),
        ("weights", ["--weights", "0.1", "0.2,0.3", "0.4"], 0.0, [0.1, 0.2, 0.3, 0.4]),
    ],
)
def test_merge_of_checkpoints_saved_by_1_2_3_ranks_equals_the_reference_within_fp32_rounding(
    series: Path, tmp_path: Path, method: str, flags: list[str], alpha: float, weights: list[float] | None
) -> None:
    out = tmp_path / "merged"
    assert megascope(["merge", "--ckpt-dir", str(series), *flags, "--last", "4", "--out", str(out),
                      "--progress", "none"]) == 0  # fmt: skip
    inputs = [series / f"step_{s:08d}" for s in STEPS]
    model_names = [n for n in raw_names(inputs[-1]) if n.startswith("model/")]
    with safe_open(merged_file(out), "pt") as f:
        assert sorted(f.keys()) == model_names  # model tensors only: no optimizer state, no RNG state
        for name in model_names:
            got = f.get_tensor(name)
            expected, bound = reference(inputs, name, method, alpha, weights)
            assert got.dtype == torch.float32
            assert bool(((got.double() - expected).abs() <= bound).all()), name


def test_ema_with_alpha_one_is_the_newest_checkpoint(series: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert megascope(["merge", "--ckpt-dir", str(series), "--method", "ema", "--alpha", "1", "--steps", "30", "40",
                      "--out", str(out), "--progress", "none"]) == 0  # fmt: skip
    with safe_open(merged_file(out), "pt") as f:
        for name in f.keys():  # noqa: SIM118  # safe_open is not a mapping
            assert torch.equal(f.get_tensor(name), raw_tensor(series / "step_00000040", name))


def test_last_every_picks_steps_spaced_back_from_the_newest(series: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert megascope(["merge", "--ckpt-dir", str(series), "--method", "sma", "--last", "2", "--every", "20",
                      "--out", str(out), "--progress", "none"]) == 0  # fmt: skip
    meta = json.loads((out / "step_00000040" / "metadata.json").read_text())
    assert meta["extra"]["merge"]["steps"] == [20, 40]


def test_output_is_a_committed_checkpoint_with_the_merge_in_its_metadata(series: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert megascope(["merge", "--ckpt-dir", str(series), "--method", "wma", "--steps", "20,30,40",
                      "--out", str(out), "--progress", "none"]) == 0  # fmt: skip
    metadata = verify(out)  # every byte checked against its CRC, through `latest`
    assert (out / "latest").read_text().strip() == "step_00000040" and metadata.step == 40
    extra = metadata.extra
    assert extra["merge"]["method"] == "wma" and extra["merge"]["steps"] == [20, 30, 40]
    assert extra["merge"]["weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert extra["merge"]["sources"] == [str((series / f"step_{s:08d}").resolve()) for s in (20, 30, 40)]
    assert extra["optimizer_averaged"] is False and extra["step"] == 40
    assert extra["config"] == merge_workers.run_config()
    state, _ = load_state(out)  # our loader, one process
    assert set(state) == {n for n in raw_names(series / "step_00000040") if n.startswith("model/")}
    assert not list(tmp_path.glob("*.tmp"))


def test_keep_optimizer_copies_the_newest_optimizer_state_without_averaging(series: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert megascope(["merge", "--ckpt-dir", str(series), "--method", "sma", "--last", "3", "--keep-optimizer",
                      "--out", str(out), "--progress", "none"]) == 0  # fmt: skip
    newest = series / "step_00000040"
    optim = [n for n in raw_names(newest) if n.startswith("optim/")]
    with safe_open(merged_file(out), "pt") as f:
        for name in optim:
            assert torch.equal(f.get_tensor(name), raw_tensor(newest, name)), name
    assert verify(out).extra["optimizer"] == "copied from step 40"


def test_bf16_checkpoints_are_accumulated_in_fp32_and_written_in_bf16(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    checkpointer = Checkpointer(directory, keep_last=0)
    for step in (1, 2, 3):
        checkpointer.save(step, {k: v for k, v in merge_workers.state_at(step, dtype=torch.bfloat16).items()
                                 if k.startswith("model/")}, merge_workers.extra_at(step, 1))  # fmt: skip
        checkpointer.wait()
    checkpointer.close()
    out = tmp_path / "merged"
    assert megascope(["merge", "--ckpt-dir", str(directory), "--method", "sma", "--last", "3", "--out", str(out),
                      "--progress", "none"]) == 0  # fmt: skip
    inputs = [directory / f"step_{s:08d}" for s in (1, 2, 3)]
    with safe_open(merged_file(out), "pt") as f:
        for name in f.keys():  # noqa: SIM118
            got = f.get_tensor(name)
            assert got.dtype == torch.bfloat16
            expected, bound = reference(inputs, name, "sma")
            # fp32 rounding, then one rounding to bf16: half a bf16 step, 2^-8 of the value.
            assert bool(((got.double() - expected).abs() <= bound + expected.abs() * 2**-8).all()), name


# --- progress contract -------------------------------------------------------------------------------------------


def test_progress_json_prints_progress_lines_then_one_done_line(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert megascope(["merge", "--ckpt-dir", str(series), "--method", "ema", "--alpha", "0.2", "--last", "3",
                      "--out", str(out), "--progress", "json"]) == 0  # fmt: skip
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    progress, done = events[:-1], events[-1]
    assert progress and all(set(e) == {"event", "tensors_done", "tensors_total", "bytes_done", "bytes_total"}
                            and e["event"] == "progress" for e in progress)  # fmt: skip
    assert progress[0]["tensors_done"] == 0
    assert [e["tensors_done"] for e in progress] == sorted(e["tensors_done"] for e in progress)
    assert progress[-1]["tensors_done"] == progress[-1]["tensors_total"]
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"] > 0
    assert done == {"event": "done", "out": str(out.resolve()), "steps": [20, 30, 40], "method": "ema",
                    "weights": pytest.approx([0.64, 0.16, 0.2]), "val_loss": None, "input_val_losses": {}}  # fmt: skip


# --- bad input: a clear error, exit 2, nothing written ------------------------------------------------------


def merge_fails(capsys: pytest.CaptureFixture[str], ckpt: Path, out: Path, *flags: str) -> str:
    """Run a merge that must fail; return its error message after checking the exit code and that nothing exists."""
    code = megascope(["merge", "--ckpt-dir", str(ckpt), "--out", str(out), "--progress", "none", *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "megascope merge: error: " in err
    assert nothing_written(out)
    return err


def test_fewer_than_two_checkpoints_is_refused(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "at least two checkpoints" in merge_fails(capsys, series, tmp_path / "o", "--method", "sma", "--steps", "40")


def test_a_step_without_a_committed_checkpoint_is_named(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = merge_fails(capsys, series, tmp_path / "o", "--method", "sma", "--steps", "30", "35")
    assert "no committed checkpoint for step 35" in err and "10, 20, 30, 40" in err


def test_an_unfinished_save_is_refused_as_such(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(run_dir / "step_00000040", run_dir / "step_00000050.tmp")
    err = merge_fails(capsys, run_dir, tmp_path / "o", "--method", "sma", "--steps", "40", "50")
    assert "step 50: an unfinished save" in err


def test_a_truncated_checkpoint_file_is_refused_before_writing(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = run_dir / "step_00000030" / "rank1.safetensors"
    os.truncate(victim, victim.stat().st_size - 100)
    err = merge_fails(capsys, run_dir, tmp_path / "o", "--method", "sma", "--last", "3")
    assert "rank1.safetensors" in err and "truncated" in err


def test_a_damaged_byte_in_an_input_aborts_the_merge_and_publishes_nothing(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    step_dir = run_dir / "step_00000040"
    meta = json.loads((step_dir / "metadata.json").read_text())
    last_name = sorted(n for n in meta["tensors"] if n.startswith("model/"))[-1]  # merged last: output already begun
    shard = meta["tensors"][last_name]["shards"][0]
    with open(step_dir / shard["file"], "r+b") as f:
        f.seek(shard["byte_start"] + 5)
        byte = f.read(1)
        f.seek(shard["byte_start"] + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    err = merge_fails(capsys, run_dir, tmp_path / "o", "--method", "sma", "--last", "3")
    assert "checksum mismatch" in err and last_name in err and shard["file"] in err


def test_damaged_metadata_is_refused(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "step_00000020" / "metadata.json").write_text('{"format": "megascope-checkpoint", "version": 1, "tens')
    assert "damaged metadata" in merge_fails(capsys, run_dir, tmp_path / "o", "--method", "sma", "--last", "3")


def test_checkpoints_of_different_shapes_are_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = replace(merge_workers.MODEL, dim=64)
    checkpointer = Checkpointer(run_dir, keep_last=0)
    checkpointer.save(50, merge_workers.state_at(50, other), merge_workers.extra_at(50, 1, other))
    checkpointer.close()
    err = merge_fails(capsys, run_dir, tmp_path / "o", "--method", "sma", "--steps", "40", "50")
    assert "model/embedding.weight" in err and "[256, 128]" in err and "[256, 64]" in err


def test_checkpoints_with_different_tensor_sets_are_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = merge_workers.state_at(50)
    del state["model/norm.weight"]
    checkpointer = Checkpointer(run_dir, keep_last=0)
    checkpointer.save(50, state, merge_workers.extra_at(50, 1))
    checkpointer.close()
    err = merge_fails(capsys, run_dir, tmp_path / "o", "--method", "sma", "--steps", "40", "50")
    assert "different model tensors" in err and "model/norm.weight" in err


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (["0.5", "0.4"], "must sum to 1"),
        (["0.5", "nan"], "must all be finite"),
        (["0.2", "0.3", "0.5"], "3 weights for 2 checkpoints"),
    ],
)
def test_bad_explicit_weights_are_refused(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], weights: list[str], message: str
) -> None:
    assert message in merge_fails(capsys, series, tmp_path / "o", "--weights", *weights, "--last", "2")


@pytest.mark.parametrize("alpha", ["0", "-0.1", "1.5", "nan"])
def test_alpha_outside_zero_to_one_is_refused(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], alpha: str
) -> None:
    err = merge_fails(capsys, series, tmp_path / "o", "--method", "ema", "--alpha", alpha, "--last", "2")
    assert "--alpha must be in (0, 1]" in err


def test_an_existing_output_directory_is_never_overwritten(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code = megascope(["merge", "--ckpt-dir", str(series), "--out", str(out), "--method", "sma", "--last", "2"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_a_merge_into_an_output_another_merge_is_writing_is_refused(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "o.tmp").mkdir()
    code = megascope(["merge", "--ckpt-dir", str(series), "--out", str(tmp_path / "o"), "--method", "sma",
                      "--last", "2", "--progress", "none"])  # fmt: skip
    assert code == 2 and "another merge" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list((tmp_path / "o.tmp").iterdir())


# --- streaming: bounded memory, a clean stop -------------------------------------------------------------------

TENSOR_ROWS, TENSOR_COLS, TENSORS = 1024, 1024, 48
"""48 tensors of 4 MB: 192 MB a checkpoint, 576 MB for three; the merge may hold a few tensors, not a model."""


@pytest.fixture(scope="module")
def big_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("big") / "ckpt"
    checkpointer = Checkpointer(directory, keep_last=0)
    for step in (1, 2, 3):
        state = {f"model/t{i:02d}": torch.full((TENSOR_ROWS, TENSOR_COLS), float(step + i)) for i in range(TENSORS)}
        checkpointer.save(step, state, {"step": step})
        checkpointer.wait()
        del state
    checkpointer.close()
    return directory


def test_peak_memory_of_a_merge_stays_a_few_tensors_whatever_the_model_size(big_series: Path, tmp_path: Path) -> None:
    # `megascope merge` runs in a fresh process; its peak is VmHWM, that process's own high-water mark (getrusage's
    # ru_maxrss would also count the RSS pytest had when it forked the child: Linux carries it across exec).
    script = textwrap.dedent(f"""
        import json, re, sys
        from pathlib import Path
        from megascope.agent.cli import main

        def kb(field):
            return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

        import megascope.engine.checkpoint.merge, megascope.engine.checkpoint.merge_cli  # all imported: the baseline
        before = kb("VmRSS")
        code = main(["merge", "--ckpt-dir", {str(big_series)!r}, "--method", "sma", "--last", "3",
                     "--out", {str(tmp_path / "out")!r}, "--progress", "none"])
        print(json.dumps({{"code": code, "before": before * 1024, "peak": kb("VmHWM") * 1024}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["code"] == 0
    tensor_bytes = TENSOR_ROWS * TENSOR_COLS * 4
    growth = figures["peak"] - figures["before"]
    # Alive at once: two read buffers, the fp32 sum being made, one queued, one being written: five tensors, and
    # measured 6; a merge that held a model (48 tensors) or its inputs would grow by 192-576 MB.
    assert growth < 10 * tensor_bytes, f"grew {growth / 1e6:.0f} MB while merging {3 * TENSORS} tensors of 4 MB"
    with safe_open(merged_file(tmp_path / "out"), "pt") as f:
        assert torch.equal(f.get_tensor("model/t05"), torch.full((TENSOR_ROWS, TENSOR_COLS), 7.0))


def test_sigterm_during_a_merge_publishes_nothing_and_exits_130(big_series: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "merge", "--ckpt-dir", str(big_series), "--method", "sma",
         "--last", "3", "--out", str(out), "--progress", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    json.loads(process.stdout.readline())  # the first progress line: the output is being written
    assert (tmp_path / "out.tmp" / "step_00000003").is_dir()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted; nothing was published" in err
    assert nothing_written(out)


# --- PMA-init and evaluation, with one real training run ---------------------------------------------------

TRAIN = ("train", "--preset", "tiny", "--batch-tokens", "256", "--val-batches", "2", "--log-every", "100")


@pytest.fixture(scope="module")
def pma_run(series: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`megascope train --init-from` an EMA merge of the series: 4 steps, checkpoint and validation every 2."""
    root = tmp_path_factory.mktemp("pma")
    assert megascope(["merge", "--ckpt-dir", str(series), "--method", "ema", "--last", "3",
                      "--out", str(root / "merged"), "--progress", "none"]) == 0  # fmt: skip
    result = run_megascope(*TRAIN, "--steps", "4", "--warmup-steps", "2", "--init-from", str(root / "merged"),
                           "--ckpt-dir", str(root / "ckpt"), "--ckpt-every", "2", "--ckpt-keep", "0",
                           "--val-every", "2", "--run-dir", str(root / "run"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def parameter_digest_of(checkpoint: Path) -> str:
    """The trainer's parameter digest (sha256 of every parameter in name order) of a checkpoint's model."""
    state, metadata = load_state(checkpoint)
    model = Transformer(ModelConfig.from_dict(metadata.extra["config"]["model"]))
    model.load_state_dict({k.removeprefix("model/"): v for k, v in state.items() if k.startswith("model/")})
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_training_with_init_from_starts_from_the_merged_weights_and_runs(pma_run: Path) -> None:
    records = read_telemetry(pma_run / "run")[0]
    started = next(r for r in records if r["type"] == "event" and r["kind"] == "started")
    assert started["run"]["param_digest"] == parameter_digest_of(pma_run / "merged")
    initialized = next(r for r in records if r["type"] == "event" and r["kind"] == "initialized")
    assert "ema merge of steps [20, 30, 40]" in initialized["text"] and "fresh optimizer" in initialized["text"]
    losses = [r["loss"] for r in records if r["type"] == "step"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert verify(pma_run / "ckpt").step == 4  # and it saves checkpoints of its own


def logged_val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_telemetry(run_dir)[0] if r["type"] == "step" and r.get("val_loss")}


def test_eval_gives_the_validation_loss_the_trainer_logged_at_that_step(pma_run: Path) -> None:
    logged = logged_val_losses(pma_run / "run")
    assert set(logged) == {2, 4}
    evaluator = Evaluator.for_checkpoint(pma_run / "ckpt")
    for step in (2, 4):
        assert evaluator.loss(pma_run / "ckpt" / f"step_{step:08d}") == pytest.approx(logged[step], rel=1e-5)


def test_merge_eval_reports_the_merged_and_each_input_validation_loss(
    pma_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(pma_run / "ckpt")
    assert megascope(["merge", "--ckpt-dir", ckpt, "--method", "sma", "--steps", "2", "4", "--out",
                      str(tmp_path / "m"), "--eval", "--progress", "json"]) == 0  # fmt: skip
    done = json.loads(capsys.readouterr().out.splitlines()[-1])
    logged = logged_val_losses(pma_run / "run")
    assert done["input_val_losses"] == {str(s): pytest.approx(logged[s], rel=1e-5) for s in (2, 4)}
    assert done["val_loss"] == pytest.approx(Evaluator.for_checkpoint(tmp_path / "m").loss(tmp_path / "m"))
    assert megascope(["merge", "--ckpt-dir", ckpt, "--method", "sma", "--steps", "2", "4", "--out",
                      str(tmp_path / "m2"), "--eval"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines()]
    assert ["4", "0.5000", f"{logged[4]:.4f}"] in rows
    assert ["merged", f"{done['val_loss']:.4f}"] in [r[:2] for r in rows]


def test_init_optimizer_keep_is_refused_when_the_merge_kept_no_optimizer_state(
    pma_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = megascope([*TRAIN, "--steps", "2", "--init-from", str(pma_run / "merged"), "--init-optimizer", "keep",
                      "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--init-optimizer keep" in err and "--keep-optimizer" in err


def test_init_from_a_checkpoint_of_another_model_is_refused_naming_the_difference(
    pma_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = megascope(["train", "--preset", "small", "--steps", "2", "--init-from", str(pma_run / "merged"),
                      "--run-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "holds a different model" in err and "dim=128 (this run: 384)" in err
