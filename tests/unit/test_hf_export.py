"""Hugging Face export: `megascope ckpt export` and `megascope merge --export-hf` write a Llama model that
`transformers` loads and that computes our model's logits, with a byte-level tokenizer that `AutoTokenizer` loads
offline and that gives the token ids our data pipeline trains on."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megascope.agent.cli import main as megascope
from megascope.engine.checkpoint import Checkpointer, load_state
from megascope.engine.config import TrainConfig
from megascope.engine.model import ModelConfig, Transformer

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is a test dependency: pip install -e .[dev]"
)

# Grouped-query attention, a non-default RoPE theta and eps, so that each has to be carried over to match.
GQA = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64, norm_eps=1e-6,
                  rope_theta=50_000.0)  # fmt: skip


def save(directory: Path, model: ModelConfig, steps: tuple[int, ...] = (1,)) -> Path:
    """Checkpoints of ``model`` with every weight (norm gains included) moved off its initial value."""
    checkpointer = Checkpointer(directory, keep_last=0)
    config = json.loads(TrainConfig(model=model).to_json())
    for step in steps:
        torch.manual_seed(step)
        net = Transformer(model)
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        state = {f"model/{k}": v for k, v in net.state_dict().items()}
        checkpointer.save(step, state, {"step": step, "world_size": 1, "config": config})
        checkpointer.wait()
    checkpointer.close()
    return directory


def our_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Our model's logits for a batch ``(docs, length)``, packed as documents the way the trainer feeds it."""
    state, metadata = load_state(checkpoint)
    model = Transformer(ModelConfig.from_dict(metadata.extra["config"]["model"]), kernels="torch").eval()
    model.load_state_dict({k.removeprefix("model/"): v for k, v in state.items()})
    docs, length = tokens.shape
    cu_seqlens = torch.arange(0, (docs + 1) * length, length, dtype=torch.int32)
    with torch.no_grad():
        return model(tokens.reshape(-1), cu_seqlens, length).view(docs, length, -1)


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(0))


@needs_transformers
@pytest.mark.parametrize("model", [GQA, replace(GQA, tie_embeddings=True)], ids=["gqa", "tied"])
def test_exported_checkpoint_loads_in_transformers_as_llama_with_our_logits(tmp_path: Path, model: ModelConfig) -> None:
    ckpt = save(tmp_path / "ckpt", model)
    assert megascope(["ckpt", "export", str(ckpt), "--hf", str(tmp_path / "hf")]) == 0
    ours, theirs = our_logits(ckpt, TOKENS), hf_logits(tmp_path / "hf", TOKENS)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) != model.tie_embeddings  # noqa: SIM118  # tied: embed_tokens only


@needs_transformers
def test_merge_export_hf_holds_the_merged_weights_and_loads_in_transformers(tmp_path: Path) -> None:
    ckpt = save(tmp_path / "ckpt", GQA, steps=(1, 2, 3))
    out = tmp_path / "merged"
    assert megascope(["merge", "--ckpt-dir", str(ckpt), "--method", "wma", "--last", "3", "--out", str(out),
                      "--export-hf", "--progress", "none"]) == 0  # fmt: skip
    merged, _ = load_state(out)
    with safe_open(out / "hf" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.1.self_attn.k_proj.weight"),
                           merged["model/layers.1.attention.wk.weight"])  # fmt: skip
        assert torch.equal(f.get_tensor("model.norm.weight"), merged["model/norm.weight"])
        assert len(f.keys()) == len(merged)
    assert torch.allclose(hf_logits(out / "hf", TOKENS), our_logits(out, TOKENS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change", [{"norm": "layernorm"}, {"activation": "gelu"}], ids=["layernorm", "gelu"])
def test_a_model_that_is_not_llama_is_refused_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str]
) -> None:
    ckpt = save(tmp_path / "ckpt", replace(GQA, **change))  # type: ignore[arg-type]
    assert megascope(["ckpt", "export", str(ckpt), "--hf", str(tmp_path / "hf")]) == 1
    assert "no Hugging Face Llama equivalent" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_export_never_overwrites_an_existing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = save(tmp_path / "ckpt", GQA)
    (tmp_path / "hf").mkdir()
    assert megascope(["ckpt", "export", str(ckpt), "--hf", str(tmp_path / "hf")]) == 1
    assert "already exists" in capsys.readouterr().err and not list((tmp_path / "hf").iterdir())


# Text the model reads as raw UTF-8 bytes: code, whitespace runs, tabs, newlines, accents, a 4-byte emoji.
TEXT = "def f(x):\n\treturn x  # héllo, wörld ✓ 😀\n\n  end"


@needs_transformers
def test_export_has_a_byte_level_tokenizer_that_autotokenizer_loads_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert megascope(["ckpt", "export", str(save(tmp_path / "ckpt", GQA)), "--hf", str(tmp_path / "hf")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))  # the ids our data pipeline (engine/data.py) trained on
    assert tokenizer.decode(ids) == TEXT
    assert len(tokenizer) == 256


@needs_transformers
def test_tokenizer_ids_feed_the_exported_model_as_our_trainer_feeds_ours(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ckpt = save(tmp_path / "ckpt", GQA)
    assert megascope(["ckpt", "export", str(ckpt), "--hf", str(tmp_path / "hf")]) == 0
    tokens = AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXT, return_tensors="pt")["input_ids"]
    assert torch.equal(tokens[0], torch.tensor(list(TEXT.encode("utf-8"))))
    assert torch.allclose(hf_logits(tmp_path / "hf", tokens), our_logits(ckpt, tokens), atol=1e-5, rtol=0)
