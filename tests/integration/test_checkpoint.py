"""Checkpoints in one process: round trip, plain safetensors, damage, crash consistency, failed writes, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support import REPO, run_megascope

from megascope.engine.checkpoint import Checkpointer, CheckpointError, committed_steps, load, load_state, verify
from megascope.engine.checkpoint.checkpointer import CRASH_POINT_ENV, remove_unfinished
from megascope.engine.checkpoint.format import BLOCK_BYTES, LATEST, read_metadata
from megascope.engine.model import ModelConfig, Transformer


def model_and_optimizer_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (64,))
    model(tokens, torch.tensor([0, 30, 32, 64], dtype=torch.int32), 32).sum().backward()
    optimizer.step()
    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for param, values in optimizer.state.items():
        for key, value in values.items():
            state[f"optim/{names[param]}/{key}"] = value
    state["extra/half"] = torch.randn(5, 3).half()
    state["extra/bf16"] = torch.randn(7).bfloat16()
    return state


def save(directory: Path, step: int, state: dict[str, torch.Tensor], **kwargs: object) -> Checkpointer:
    checkpointer = Checkpointer(directory, **kwargs)  # type: ignore[arg-type]
    checkpointer.save(step, state, extra={"step": step})
    checkpointer.close()
    return checkpointer


def test_round_trip_is_bit_exact_for_model_and_optimizer(tmp_path: Path) -> None:
    state = model_and_optimizer_state()
    save(tmp_path, 3, state)
    loaded, metadata = load_state(tmp_path)
    assert metadata.step == 3 and metadata.extra == {"step": 3}
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_files_are_plain_safetensors(tmp_path: Path) -> None:
    state = model_and_optimizer_state()
    save(tmp_path, 1, state)
    with safe_open(str(tmp_path / "step_00000001" / "rank0.safetensors"), "pt") as f:
        assert set(f.keys()) == set(state)
        assert torch.equal(f.get_tensor("model/embedding.weight"), state["model/embedding.weight"])


def test_latest_moves_and_retention_keeps_last_k_and_every_mth(tmp_path: Path) -> None:
    state = {"w": torch.ones(4)}
    checkpointer = Checkpointer(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 9):
        checkpointer.save(step, state)
        checkpointer.wait()
    checkpointer.close()
    assert committed_steps(tmp_path) == [4, 7, 8]
    assert (tmp_path / LATEST).read_text().strip() == "step_00000008"


def test_loading_into_a_model_with_other_shapes_names_the_first_mismatching_tensor(tmp_path: Path) -> None:
    save(tmp_path, 1, {"a": torch.zeros(4, 4), "b": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"^b: the checkpoint has shape \(3,\), the target wants \(5,\)"):
        load(tmp_path, {"a": torch.empty(4, 4), "b": torch.empty(5)})


def damage(step_dir: Path, how: str) -> None:
    data = step_dir / "rank0.safetensors"
    if how == "truncated":
        data.write_bytes(data.read_bytes()[:-100])
    elif how == "flipped byte":
        raw = bytearray(data.read_bytes())
        raw[-(BLOCK_BYTES + 10)] ^= 0x01
        data.write_bytes(bytes(raw))
    elif how == "missing shard file":
        data.unlink()
    elif how == "metadata disagrees with the files":
        meta = (step_dir / "metadata.json").read_text()
        (step_dir / "metadata.json").write_text(meta.replace('"shape": [\n    700,', '"shape": [\n    701,'))


@pytest.mark.parametrize(
    "how", ["truncated", "flipped byte", "missing shard file", "metadata disagrees with the files"]
)
def test_damage_is_an_error_naming_the_file_or_tensor_for_verify_and_load(tmp_path: Path, how: str) -> None:
    save(tmp_path, 1, {"big": torch.randn(700, 200), "small": torch.randn(3)})
    step_dir = tmp_path / "step_00000001"
    damage(step_dir, how)
    for attempt in (lambda: verify(step_dir), lambda: load_state(step_dir)):
        with pytest.raises(CheckpointError) as raised:
            attempt()
        assert "rank0.safetensors" in str(raised.value) or "big" in str(raised.value)


def test_verify_cli_exits_nonzero_on_damage_and_zero_when_whole(tmp_path: Path) -> None:
    save(tmp_path, 1, {"big": torch.randn(700, 200)})
    assert run_megascope("ckpt", "verify", str(tmp_path), timeout=60).returncode == 0
    damage(tmp_path / "step_00000001", "flipped byte")
    result = run_megascope("ckpt", "verify", str(tmp_path), timeout=60)
    assert result.returncode == 1
    assert "checksum mismatch in big" in result.stderr and "Traceback" not in result.stderr


def test_unwritable_step_directory_fails_the_save_with_an_event_and_keeps_latest(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    checkpointer = Checkpointer(tmp_path, on_event=lambda event: events.append((event.kind, event.text)))
    checkpointer.save(1, {"w": torch.ones(4)})
    checkpointer.wait()
    (tmp_path / "step_00000002.tmp").write_text("a file where the save wants its directory")
    checkpointer.save(2, {"w": torch.zeros(4)})
    figures = checkpointer.wait()
    checkpointer.close()
    assert figures is not None and figures.error is not None and "could not write" in figures.error
    assert events[-1][0] == "checkpoint_failed"
    assert (tmp_path / LATEST).read_text().strip() == "step_00000001"
    assert torch.equal(load_state(tmp_path)[0]["w"], torch.ones(4))


def test_disk_full_fails_the_save_with_an_event_and_keeps_latest(tmp_path: Path) -> None:
    events: list[str] = []
    checkpointer = Checkpointer(tmp_path, on_event=lambda event: events.append(event.kind))
    checkpointer.save(1, {"w": torch.ones(4)})
    checkpointer.wait()
    (tmp_path / "step_00000002.tmp").mkdir()
    os.symlink("/dev/full", tmp_path / "step_00000002.tmp" / "rank0.safetensors")  # every write: ENOSPC
    checkpointer.save(2, {"w": torch.zeros(4)})
    figures = checkpointer.wait()
    checkpointer.close()
    assert figures is not None and figures.error is not None and "No space left" in figures.error
    assert events == ["checkpoint_started", "checkpoint", "checkpoint_started", "checkpoint_failed"]
    assert (tmp_path / LATEST).read_text().strip() == "step_00000001"


CRASHING_SAVE = textwrap.dedent(
    """
    import sys, torch
    from megascope.engine.checkpoint import Checkpointer
    checkpointer = Checkpointer(sys.argv[1])
    checkpointer.save(int(sys.argv[2]), {"w": torch.full((300, 300), float(sys.argv[2]))})
    checkpointer.close()
    """
)


@pytest.mark.parametrize("point", ["stage", "write", "before_commit", "commit", "publish"])
def test_a_save_killed_at_any_point_leaves_the_previous_checkpoint_intact_and_latest(
    tmp_path: Path, point: str
) -> None:
    def run_save(step: int, crash_at: str | None) -> int:
        env = dict(os.environ)
        env.pop(CRASH_POINT_ENV, None)
        if crash_at:
            env[CRASH_POINT_ENV] = crash_at
        return subprocess.run([sys.executable, "-c", CRASHING_SAVE, str(tmp_path), str(step)], env=env,
                              cwd=REPO, timeout=120).returncode  # fmt: skip

    assert run_save(1, None) == 0
    assert run_save(2, point) == -9  # SIGKILL
    assert (tmp_path / LATEST).read_text().strip() == "step_00000001"
    assert load_state(tmp_path)[1].step == 1
    assert torch.equal(load_state(tmp_path)[0]["w"], torch.full((300, 300), 1.0))
    listing = run_megascope("ckpt", "ls", str(tmp_path), timeout=60).stdout
    if point == "stage":  # killed before anything was written
        assert not any(line.startswith("2 ") for line in listing.splitlines())
    elif point != "publish":
        assert "INCOMPLETE" in listing  # the unfinished save is reported, and never loaded
        with pytest.raises(CheckpointError, match="unfinished save"):
            load_state(tmp_path / "step_00000002.tmp")
        assert [p.name for p in remove_unfinished(tmp_path)] == ["step_00000002.tmp"]
    else:
        # Renamed but `latest` not moved: a complete checkpoint, listed, but latest still says step 1.
        assert read_metadata(tmp_path / "step_00000002").step == 2


def test_ckpt_ls_and_inspect_describe_checkpoints(tmp_path: Path) -> None:
    save(tmp_path, 5, {"layer/w": torch.zeros(6, 2)})
    listing = run_megascope("ckpt", "ls", str(tmp_path), timeout=60)
    assert listing.returncode == 0 and "complete, latest" in listing.stdout
    inspect = run_megascope("ckpt", "inspect", str(tmp_path), timeout=60)
    assert inspect.returncode == 0 and "layer/w" in inspect.stdout and "(6, 2)" in inspect.stdout
    missing = run_megascope("ckpt", "inspect", str(tmp_path / "nope"), timeout=60)
    assert missing.returncode == 1 and "no checkpoint here" in missing.stderr


def test_a_partial_read_reads_only_the_blocks_holding_the_needed_rows(tmp_path: Path) -> None:
    from megascope.engine.checkpoint.safetensors_io import read_rows

    tensor = torch.randn(3000, 1000)  # 12 MB: many checksum blocks
    save(tmp_path, 1, {"w": tensor})
    meta = read_metadata(tmp_path / "step_00000001")
    counter = [0]
    rows = read_rows(tmp_path / "step_00000001", "w", meta.tensors["w"].shards[0], "F32", [1000], 1000, 1000, counter)
    assert torch.equal(rows, tensor[1000:2000])
    needed = 1000 * 1000 * 4
    assert needed <= counter[0] <= needed + 2 * BLOCK_BYTES


def test_an_unexpected_error_in_a_save_is_reported_and_the_next_save_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megascope.engine.checkpoint import checkpointer as module

    events: list[str] = []
    checkpointer = Checkpointer(tmp_path, on_event=lambda event: events.append(event.kind))
    checkpointer.save(1, {"w": torch.ones(4)})
    checkpointer.wait()
    real_write = module.write_file

    def broken_write(*args: object, **kwargs: object) -> object:
        raise RuntimeError("not an OSError: a bug, or an allocation failure")

    monkeypatch.setattr(module, "write_file", broken_write)
    checkpointer.save(2, {"w": torch.zeros(4)})
    figures = checkpointer.wait()
    assert figures is not None and figures.error is not None and "RuntimeError" in figures.error
    monkeypatch.setattr(module, "write_file", real_write)
    checkpointer.save(3, {"w": torch.full((4,), 3.0)})
    checkpointer.before_optimizer_step()  # would block forever if the thread had died
    checkpointer.close()
    assert events == ["checkpoint_started", "checkpoint", "checkpoint_started", "checkpoint_failed",
                      "checkpoint_started", "checkpoint"]  # fmt: skip
    assert committed_steps(tmp_path) == [1, 3]


def test_save_refuses_extra_that_is_not_json_before_anything_starts(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="extra: must be JSON"):
        checkpointer.save(1, {"w": torch.ones(4)}, extra={"when": {1, 2}})
    checkpointer.close()
