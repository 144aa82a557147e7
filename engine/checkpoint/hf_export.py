"""Export a checkpoint's model as a Hugging Face Llama model: ``config.json``, ``model.safetensors`` and a
byte-level tokenizer (``tokenizer.json``, ``tokenizer_config.json``), so ``AutoTokenizer`` and
``AutoModelForCausalLM`` load the directory offline.

Our default model is Llama's architecture, so the export is a renaming, with no tensor changed:

- RoPE: ours rotates the first half of each head against the second half (``x1, x2 = x.chunk(2)``), with
  frequencies ``theta ** (-2i / head_dim)``: the same convention as HF Llama's ``rotate_half``. So the q and k
  projections are copied as they are. (Checkpoints from Meta's original code rotate interleaved pairs, which
  is why HF's conversion script permutes q/k rows; ours need no permutation, and the logits test proves it.)
- Grouped-query attention: query head h uses key/value head ``h // (n_heads / n_kv_heads)`` in ours (SDPA's
  ``enable_gqa``) and in HF's ``repeat_kv``.
- RMSNorm ``x * rsqrt(mean(x^2) + eps) * weight`` with our ``norm_eps`` as ``rms_norm_eps``; SwiGLU
  ``w_down(silu(w_gate x) * w_up x)`` as ``down_proj(silu(gate_proj x) * up_proj x)``; no biases anywhere.
- Tied embeddings: only ``embed_tokens`` is written and ``tie_word_embeddings`` is set.

A model with LayerNorm or GELU (``--norm layernorm`` / ``--activation gelu``) is a GPT/BERT-style model,
not Llama, and a tile-sparse (pruned) one has no dense weights: both are refused, with the reason.

The export streams tensor by tensor (``SafetensorsWriter``), in bounded memory, into ``OUT.tmp``, then
renames it to ``OUT``: an export that fails leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megascope.engine.checkpoint.format import CheckpointError, Metadata, fsync_dir, open_checkpoint, write_atomically
from megascope.engine.checkpoint.loader import read_tensor
from megascope.engine.checkpoint.safetensors_io import SafetensorsWriter
from megascope.engine.checkpoint.streaming import publish, stream, tmp_path
from megascope.engine.model import ModelConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

_TOP = {
    "model/embedding.weight": "model.embed_tokens.weight",
    "model/norm.weight": "model.norm.weight",
    "model/output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"^model/layers\.(\d+)\.(.+)$")
_IN_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_HF_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


class HFExportError(CheckpointError):
    """A checkpoint that cannot be exported as a Hugging Face Llama model; the message says why."""


def hf_name(name: str) -> str | None:
    """The HF Llama name of one of our checkpoint names (``model/...``), or None if there is none."""
    if name in _TOP:
        return _TOP[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _IN_LAYER:
        return f"model.layers.{match.group(1)}.{_IN_LAYER[match.group(2)]}"
    return None


def model_config_of(metadata: Metadata, where: Path) -> ModelConfig:
    """The model config a checkpoint was trained with (``extra.config.model``, as ``megascope train`` saves)."""
    try:
        return ModelConfig.from_dict(metadata.extra["config"]["model"])
    except (KeyError, TypeError, ValueError) as error:
        raise HFExportError(
            f"{where}: no usable model config in its metadata (extra.config.model: {error}); "
            "checkpoints saved by `megascope train` have one"
        ) from None


def check_llama(model: ModelConfig, where: Path) -> None:
    if model.norm != "rmsnorm" or model.activation != "swiglu":
        raise HFExportError(
            f"{where}: the model uses {model.norm} and {model.activation}; a Llama model has rmsnorm and swiglu, "
            "so this one has no Hugging Face Llama equivalent (train with the default --norm and --activation)"
        )


def hf_config(model: ModelConfig, dtype: str) -> dict[str, Any]:
    """``config.json`` for ``LlamaForCausalLM`` with exactly our model's function."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        "intermediate_size": model.ffn_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        # Both spellings: transformers >= 5 reads rope_parameters, older readers (and mergekit) rope_theta.
        "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": model.init_std,
        "torch_dtype": _HF_DTYPES[dtype],
        # Byte-level tokens: no special tokens exist.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which the ``tokenizers`` ByteLevel pre-tokenizer and decoder use:
    printable bytes stand for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def byte_level_tokenizer() -> dict[str, Any]:
    """``tokenizer.json`` (the ``tokenizers`` format) mapping each UTF-8 byte to the token id of its value, as our
    data does (engine/data.py): a byte-level BPE with the 256 bytes and no merges, so ``AutoTokenizer`` encodes
    any text to exactly the ids the model was trained on and decodes them back. Written by hand so the export
    needs no tokenizer library."""
    vocab = {char: byte for byte, char in sorted(_bytes_to_unicode().items())}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        # No regex split and no prefix space: the text is one stream of bytes, as in training.
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def tokenizer_config(model: ModelConfig) -> dict[str, Any]:
    """``tokenizer_config.json``: the generic fast tokenizer over ``tokenizer.json``; no special tokens exist."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }


@dataclass
class HFPlan:
    """Which of our tensors go to the HF file under which name, and the file's header, known before any data."""

    model: ModelConfig
    names: dict[str, str]
    """Our name -> HF name, in file order; tensors not named here (optimizer state, a tied output) are skipped."""
    specs: dict[str, tuple[str, list[int]]]
    dtype: str

    @classmethod
    def from_checkpoint(cls, metadata: Metadata, where: Path, names: list[str]) -> HFPlan:
        model = model_config_of(metadata, where)
        check_llama(model, where)
        model_names = [n for n in names if n.startswith("model/")]
        if any(n.endswith((".values", ".rows", ".row_offsets", ".columns")) for n in model_names):
            raise HFExportError(f"{where}: a tile-sparse (pruned) model has no dense Llama weights to export")
        mapping: dict[str, str] = {}
        unknown = []
        for name in model_names:
            target = hf_name(name)
            if target is None:
                unknown.append(name)
            elif not (model.tie_embeddings and target == "lm_head.weight"):
                mapping[name] = target
        if unknown:
            raise HFExportError(f"{where}: no Llama equivalent for {unknown[:3]}; this is not a Llama-style model")
        dtypes = {metadata.tensors[n].dtype for n in mapping}
        if len(dtypes) != 1 or next(iter(dtypes)) not in _HF_DTYPES:
            raise HFExportError(f"{where}: the model's tensors have dtypes {sorted(dtypes)}; one float dtype is needed")
        specs = {target: (metadata.tensors[n].dtype, list(metadata.tensors[n].shape)) for n, target in mapping.items()}
        return cls(model, mapping, specs, next(iter(dtypes)))

    def writer(self, directory: Path) -> HFWriter:
        """Write ``config.json`` into ``directory`` (made if missing); the writer takes our tensors in plan order."""
        directory.mkdir(exist_ok=True)
        write_atomically(directory / CONFIG_FILE, json.dumps(hf_config(self.model, self.dtype), indent=2) + "\n")
        if self.model.vocab_size >= 256:  # token ids are bytes (engine/data.py): a smaller vocab has no tokenizer
            write_atomically(directory / TOKENIZER_FILE, json.dumps(byte_level_tokenizer()) + "\n")
            write_atomically(
                directory / TOKENIZER_CONFIG_FILE, json.dumps(tokenizer_config(self.model), indent=2) + "\n"
            )
        return HFWriter(self, SafetensorsWriter(directory / WEIGHTS_FILE, self.specs, {"format": "pt"}))


class HFWriter:
    def __init__(self, plan: HFPlan, writer: SafetensorsWriter) -> None:
        self.plan = plan
        self._writer = writer
        self.size = writer.size

    def write(self, name: str, tensor: torch.Tensor | np.ndarray) -> None:
        target = self.plan.names.get(name)
        if target is not None:
            self._writer.write(target, tensor)

    def close(self) -> None:
        self._writer.close()
        fsync_dir(self._writer.path.parent)

    def abort(self) -> None:
        self._writer.abort()


def export(path: str | Path, out: str | Path, stop: threading.Event | None = None) -> Path:
    """Write the model of the checkpoint at ``path`` (a step directory or a root) as an HF Llama directory ``out``.

    ``out`` must not exist; it appears complete or not at all.
    """
    step_dir, metadata = open_checkpoint(path)
    out = Path(out)
    if out.exists():
        raise HFExportError(f"--hf {out} already exists; an export never overwrites: choose a new directory")
    tmp = tmp_path(out)
    if tmp.exists():
        raise HFExportError(f"{tmp} exists: another export into {out} is running; if none is, remove it")
    plan = HFPlan.from_checkpoint(metadata, step_dir, sorted(metadata.tensors))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.mkdir()  # the lock: fails if another export took the name since the check above
    except FileExistsError:
        raise HFExportError(f"{tmp} exists: another export into {out} is running") from None
    try:
        writer = plan.writer(tmp)
        try:
            stream(list(plan.names), lambda name: read_tensor(step_dir, metadata, name), writer.write, stop)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
