"""`megascope ckpt inspect|verify DIR/STEP`: a checkpoint is named as the help says (a step directory, DIR/N, or a
checkpoint directory for its latest); a name with no checkpoint lists the steps there are; inspect reads as text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from megascope.agent.cli import main as megascope
from megascope.engine.checkpoint import Checkpointer
from megascope.engine.config import TrainConfig
from megascope.engine.model import ModelConfig, Transformer

MODEL = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """Steps 10, 20 and 30 of a small model, as `megascope train` saves them (config and data position)."""
    directory = tmp_path / "ckpt"
    checkpointer = Checkpointer(directory, keep_last=0)
    config = json.loads(TrainConfig(model=MODEL, steps=30).to_json())
    model = Transformer(MODEL)
    for step in (10, 20, 30):
        state = {f"model/{name}": tensor for name, tensor in model.state_dict().items()}
        extra = {"step": step, "world_size": 1, "config": config, "data": {"consumed": step, "seed": 0}}
        checkpointer.save(step, state, extra, local={"rng/rank0/cpu": torch.get_rng_state()})
        checkpointer.wait()
    checkpointer.close()
    return directory


def test_verify_takes_dir_slash_step_number(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert megascope(["ckpt", "verify", str(ckpt / "20")]) == 0
    assert capsys.readouterr().out.startswith("OK: step 20:")


def test_verify_takes_the_step_directory_and_the_checkpoint_directory(
    ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert megascope(["ckpt", "verify", str(ckpt / "step_00000010")]) == 0
    assert megascope(["ckpt", "verify", str(ckpt)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("OK: step 10:") and out[1].startswith("OK: step 30:")  # the root: its latest


@pytest.mark.parametrize("name", ["5", "step_00000005"])
def test_a_step_with_no_checkpoint_lists_the_steps_there_are(
    ckpt: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert megascope(["ckpt", "inspect", str(ckpt / name)]) == 1
    err = capsys.readouterr().err
    assert f"{ckpt / name}: no checkpoint here; {ckpt} holds steps 10, 20, 30" in err
    assert "Traceback" not in err


def test_a_directory_with_no_checkpoints_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert megascope(["ckpt", "verify", str(tmp_path)]) == 1
    assert f"{tmp_path} holds no committed checkpoint" in capsys.readouterr().err


def test_inspect_prints_labelled_lines_then_the_tensors(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert megascope(["ckpt", "inspect", str(ckpt / "20")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^step\s+20$", out, re.MULTILINE)
    assert re.search(r"^model\s+tiny: .*dim 32, 1 layers, 2 heads \(2 kv\), ffn 64, vocab 256, rmsnorm, swiglu$", out,
                     re.MULTILINE)  # fmt: skip
    assert re.search(r"^run\s+step 20 of 30, lr ", out, re.MULTILINE)
    assert re.search(r"^optimizer\s+none", out, re.MULTILINE)
    assert re.search(r"^model/embedding\.weight\s+\(256, 32\)\s+F32\s+1\s+rank0$", out, re.MULTILINE)
    assert "{" not in out  # no repr of a dict


def test_inspect_json_is_one_object_for_scripts(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert megascope(["ckpt", "inspect", str(ckpt / "30"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["step"] == 30 and described["world_size"] == 1
    assert described["tensors"]["model/embedding.weight"] == {"shape": [256, 32], "dtype": "F32", "shards": 1}
    assert described["extra"]["data"] == {"consumed": 30, "seed": 0}
