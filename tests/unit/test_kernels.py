"""Kernels: bad input refused before any launch, which path runs, tile-wise pruning, the pruned model, and
the Triton kernels themselves under Triton's CPU interpreter (``test_kernels_triton.py``, in a subprocess).

The subprocess is what keeps ``TRITON_INTERPRET=1`` away from the rest of the suite: set in this process,
every CPU test after it would take the (5,000x slower) interpreted Triton path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import megascope.kernels
from megascope.engine.config import ConfigError, TrainConfig
from megascope.engine.model import ModelConfig, TileSparseLinear, Transformer, cross_entropy
from megascope.kernels import (
    add_layer_norm,
    add_rms_norm,
    bias_gelu,
    swiglu,
    tile_prune,
    tile_sparse_matmul,
    varlen_attention,
)
from megascope.kernels.backend import interpreting, use_triton

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]


def _cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# --- the Triton kernels, under the interpreter -----------------------------------------------------------


@pytest.mark.skipif(interpreting(), reason="this process already interprets: test_kernels_triton.py runs here")
def test_triton_kernels_match_their_references_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_kernels_triton.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    report = result.stdout[-12000:] + result.stderr[-4000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report


# --- which path runs -------------------------------------------------------------------------------------


def test_cpu_tensors_take_the_reference_path_unless_interpreting(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton("auto", "op", x)
    assert not use_triton("torch", "op", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("auto", "op", x)
    assert use_triton("triton", "op", x)
    assert not use_triton("torch", "op", x)


def test_triton_on_cpu_without_the_interpreter_is_refused_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="--kernels torch"):
        swiglu(torch.zeros(3), torch.zeros(3), kernels="triton")


def test_unknown_kernels_choice_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--kernels"):
        swiglu(torch.zeros(3), torch.zeros(3), kernels="cuda")
    with pytest.raises(ValueError, match="--kernels"):
        Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=32), kernels="fast")  # type: ignore[arg-type]


def test_kernels_setting_is_validated_naming_the_flag() -> None:
    assert TrainConfig().kernels == "auto"
    with pytest.raises(ConfigError, match="--kernels"):
        TrainConfig(kernels="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--kernels triton"):
        TrainConfig(kernels="triton", device="cpu")
    from megascope.engine.train_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).kernels == "auto"
    assert parser.parse_args(["--kernels", "torch"]).kernels == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kernels", "fast"])


# --- bad input: a clear error before any kernel launches --------------------------------------------------

LAUNCHERS = ("attention_triton", "norms_triton", "activations_triton", "tile_sparse_triton")


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Kernels on the Triton path (as if interpreting) whose launchers fail the test if anything calls them."""

    def launched(*args: object, **kwargs: object) -> None:
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in LAUNCHERS:
        stub = types.ModuleType(f"megascope.kernels.{name}")
        stub.__getattr__ = lambda attr: launched  # type: ignore[method-assign]
        monkeypatch.setitem(sys.modules, f"megascope.kernels.{name}", stub)
        monkeypatch.setattr(megascope.kernels, name, stub, raising=False)
    yield


def _qkv(
    tokens: int = 10, heads: int = 4, kv_heads: int = 2, head_dim: int = 64, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.randn(tokens, heads, head_dim, dtype=dtype),
        torch.randn(tokens, kv_heads, head_dim, dtype=dtype),
        torch.randn(tokens, kv_heads, head_dim, dtype=dtype),
    )


@pytest.mark.usefixtures("no_launch")
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: (*_qkv(), _cu(3, 7), 7), ValueError, None),  # the control: valid input reaches the launcher
        (lambda: (_qkv()[0], *_qkv(tokens=9)[1:], _cu(3, 7), 7), ValueError, "tokens"),
        (lambda: (*_qkv(kv_heads=3), _cu(3, 7), 7), ValueError, "multiple"),
        (lambda: (*_qkv(), torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6), ValueError, "non-decreasing"),
        (lambda: (*_qkv(), _cu(3, 5), 5), ValueError, "end at total_tokens=10"),
        (lambda: (*_qkv(), torch.tensor([1, 4, 10], dtype=torch.int32), 6), ValueError, "start at 0"),
        (lambda: (*_qkv(), _cu(3, 7).float(), 7), TypeError, "int32"),
        (lambda: (*_qkv(), _cu(3, 7), 5), ValueError, "max_seqlen"),
        (lambda: (*_qkv(head_dim=48), _cu(3, 7), 7), ValueError, "head_dim 48"),
        (lambda: (*_qkv(head_dim=256), _cu(3, 7), 7), ValueError, "head_dim 256"),
        (lambda: (*_qkv(dtype=torch.float64), _cu(3, 7), 7), TypeError, "float64"),
        (lambda: (*_qkv(dtype=torch.bfloat16), _cu(3, 7), 7), TypeError, "bfloat16"),
        (lambda: (_qkv()[0].half(), *_qkv()[1:], _cu(3, 7), 7), TypeError, "one dtype"),
    ],
    ids=[
        "valid",
        "tokens",
        "heads",
        "decreasing",
        "short",
        "start",
        "float-cu",
        "max-seqlen",
        "head-dim-48",
        "head-dim-256",
        "float64",
        "bf16-interpreter",
        "mixed-dtypes",
    ],
)
def test_varlen_attention_refuses_bad_input_before_launch(
    make: object, error: type[Exception], match: str | None
) -> None:
    args = make()  # type: ignore[operator]
    if match is None:
        with pytest.raises(AssertionError, match="launched"):
            varlen_attention(*args, kernels="triton")
        return
    with pytest.raises(error, match=match):
        varlen_attention(*args, kernels="triton")


@pytest.mark.usefixtures("no_launch")
def test_norms_refuse_bad_input_before_launch() -> None:
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(AssertionError, match="launched"):  # the control
        add_rms_norm(x, x, w, kernels="triton")
    with pytest.raises(ValueError, match="one shape"):
        add_rms_norm(x, torch.randn(4, 9), w, kernels="triton")
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, x, torch.randn(7), kernels="triton")
    with pytest.raises(ValueError, match="bias"):
        add_layer_norm(x, x, w, torch.randn(9), kernels="triton")
    with pytest.raises(TypeError, match="float64"):
        add_layer_norm(x.double(), x.double(), w.double(), w.double(), kernels="triton")
    with pytest.raises(TypeError, match="floating-point"):
        add_rms_norm(x.long(), x.long(), w, kernels="triton")


@pytest.mark.usefixtures("no_launch")
def test_activations_refuse_bad_input_before_launch() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(AssertionError, match="launched"):  # the control
        swiglu(x, x, kernels="triton")
    with pytest.raises(ValueError, match="one shape"):
        swiglu(x, torch.randn(4, 9), kernels="triton")
    with pytest.raises(TypeError, match="dtype"):
        swiglu(x, x.half(), kernels="triton")
    with pytest.raises(TypeError, match="float64"):
        swiglu(x.double(), x.double(), kernels="triton")
    with pytest.raises(ValueError, match="bias"):
        bias_gelu(x, torch.randn(9), kernels="triton")
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu(x, torch.randn(8), approximate="erf", kernels="triton")


@pytest.mark.usefixtures("no_launch")
def test_tile_sparse_matmul_refuses_bad_input_before_launch() -> None:
    weight = tile_prune(torch.randn(32, 20), 0.5, tile_n=16)
    with pytest.raises(AssertionError, match="launched"):  # the control
        tile_sparse_matmul(torch.randn(3, 20), weight, kernels="triton")
    with pytest.raises(ValueError, match=r"\(\.\.\., 20\)"):
        tile_sparse_matmul(torch.randn(3, 21), weight, kernels="triton")
    with pytest.raises(TypeError, match="share"):
        tile_sparse_matmul(torch.randn(3, 20).half(), weight, kernels="triton")
    with pytest.raises(ValueError, match="tile_n 24"):
        tile_sparse_matmul(torch.randn(3, 20), tile_prune(torch.randn(32, 20), 0.5, tile_n=24), kernels="triton")


def test_tile_prune_refuses_bad_arguments() -> None:
    w = torch.randn(16, 8)
    with pytest.raises(ValueError, match="sparsity"):
        tile_prune(w, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        tile_prune(w, -0.1)
    with pytest.raises(ValueError, match="column_sparsity"):
        tile_prune(w, 0.3, column_sparsity=0.5)
    with pytest.raises(ValueError, match="2-D"):
        tile_prune(torch.randn(8), 0.5)
    with pytest.raises(ValueError, match="importance"):
        tile_prune(w, 0.5, importance=torch.rand(8, 16))


# --- tile-wise pruning ---------------------------------------------------------------------------------

PRUNE_CASES = [
    # (out_features, in_features, sparsity, column_sparsity, tile_n)
    (64, 48, 0.5, 0.0, 16),
    (100, 33, 0.75, 0.0, 16),  # a narrower last tile
    (100, 33, 0.75, 0.25, 32),
    (40, 7, 0.9, 0.1, 16),
    (16, 16, 0.0, 0.0, 16),
]


@pytest.mark.parametrize(("out_features", "in_features", "sparsity", "column_sparsity", "tile_n"), PRUNE_CASES)
def test_tile_prune_meets_the_requested_sparsity_within_one_tile_row(
    out_features: int, in_features: int, sparsity: float, column_sparsity: float, tile_n: int
) -> None:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    pruned = tile_prune(weight, sparsity, tile_n=tile_n, column_sparsity=column_sparsity)
    zeros = int((pruned.to_dense() == 0).sum())
    assert abs(zeros - round(sparsity * weight.numel())) <= tile_n
    assert pruned.sparsity == pytest.approx(zeros / weight.numel())
    # Whole output features were pruned as asked.
    assert pruned.columns.numel() == out_features - round(column_sparsity * out_features)


@pytest.mark.parametrize(("out_features", "in_features", "sparsity", "column_sparsity", "tile_n"), PRUNE_CASES)
def test_tile_prune_pattern_is_tile_regular_and_keeps_the_original_weights(
    out_features: int, in_features: int, sparsity: float, column_sparsity: float, tile_n: int
) -> None:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    pruned = tile_prune(weight, sparsity, tile_n=tile_n, column_sparsity=column_sparsity)
    dense = pruned.to_dense()
    kept = dense != 0
    columns = pruned.columns.long()
    # Pruned output features are entirely zero.
    dropped = torch.ones(out_features, dtype=torch.bool)
    dropped[columns] = False
    assert not kept[dropped].any()
    # Within a tile, every output feature keeps the same input features: the tile's stored rows.
    for t in range(pruned.n_tiles):
        tile_columns = columns[t * tile_n : (t + 1) * tile_n]
        rows = pruned.rows[pruned.row_offsets[t] : pruned.row_offsets[t + 1]].long()
        expected = torch.zeros(in_features, dtype=torch.bool)
        expected[rows] = True
        assert torch.equal(kept[tile_columns], expected.expand(len(tile_columns), -1))
    # Survivors are the original weights, untouched.
    torch.testing.assert_close(dense[kept], weight[kept], rtol=0, atol=0)


def test_tile_prune_removes_the_least_important_units_first() -> None:
    weight = torch.ones(32, 10)
    importance = torch.ones(32, 10)
    importance[5] = 0.0  # output feature 5: the least important column goes first
    # Without feature 5 the tiles are features 0-4, 6-16 and 17-31.
    importance[17:32, 3] = 0.01  # input feature 3 of the second tile
    importance[0:17, 7] = 0.02  # input feature 7 of the first tile
    pruned = tile_prune(weight, (10 + 15 + 16) / 320, tile_n=16, column_sparsity=1 / 32, importance=importance)
    dense = pruned.to_dense()
    assert not dense[5].any()
    assert pruned.columns.tolist() == [c for c in range(32) if c != 5]
    first_tile, second_tile = pruned.columns[:16].long(), pruned.columns[16:].long()
    assert not dense[first_tile, 7].any() and dense[first_tile][:, [3]].all()
    assert not dense[second_tile, 3].any() and dense[second_tile][:, [7]].all()


def test_tile_prune_uses_magnitude_by_default() -> None:
    torch.manual_seed(0)
    weight = torch.randn(16, 12)
    weight[:, 4] *= 1e-3  # one input feature carries almost nothing
    pruned = tile_prune(weight, 1 / 12, tile_n=16)
    assert pruned.rows.tolist() == [r for r in range(12) if r != 4]


def test_reference_tile_sparse_matmul_equals_dense_matmul_with_the_pruned_weight() -> None:
    torch.manual_seed(0)
    weight = torch.randn(40, 33)
    pruned = tile_prune(weight, 0.6, tile_n=16, column_sparsity=0.1)
    mask = pruned.to_dense() != 0
    x = torch.randn(2, 7, 33)
    torch.testing.assert_close(tile_sparse_matmul(x, pruned, kernels="torch"), x @ (weight * mask).T)


# --- the model's pruning switch ------------------------------------------------------------------------

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(10))
    targets = torch.cat([tokens[1:20], torch.tensor([-100]), tokens[21:], torch.tensor([-100])])
    return tokens, _cu(20, 28), targets


def _train(model: Transformer, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens, cu, targets = _batch()
    losses = []
    for _ in range(steps):
        loss = cross_entropy(model(tokens, cu, 28), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_prune_mlp_then_fine_tune_keeps_the_pattern_and_lowers_the_loss(activation: str) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY.to_dict(), "activation": activation}), kernels="torch")
    _train(model, 20)
    tokens, cu, targets = _batch()
    model.prune_mlp(0.75, tile_n=16, column_sparsity=0.1)
    projections = [m for m in model.modules() if isinstance(m, TileSparseLinear)]
    assert len(projections) == TINY.n_layers * (3 if activation == "swiglu" else 2)
    patterns = [(p.sparse_weight().to_dense() != 0) for p in projections]
    for projection in projections:
        size = projection.in_features * projection.out_features
        assert abs(projection.sparse_weight().sparsity - 0.75) * size <= 16
    with torch.no_grad():
        pruned_loss = cross_entropy(model(tokens, cu, 28), targets).item()
    losses = _train(model, 15)  # a fresh optimizer over the new parameters: the fine-tuning
    assert losses[-1] < 0.7 * pruned_loss
    for projection, pattern in zip(projections, patterns, strict=True):
        dense = projection.sparse_weight().to_dense()
        assert not dense[~pattern].any(), "a pruned weight came back during fine-tuning"


def test_pruned_model_equals_the_dense_model_with_pruned_weights() -> None:
    torch.manual_seed(0)
    model = Transformer(TINY, kernels="torch")
    dense_model = Transformer(TINY, kernels="torch")
    model.prune_mlp(0.5, tile_n=16)
    state = {k: v for k, v in model.state_dict().items() if "mlp." not in k}
    for i, layer in enumerate(model.layers):
        for name in ("w_gate", "w_up", "w_down"):
            state[f"layers.{i}.mlp.{name}.weight"] = getattr(layer.mlp, name).sparse_weight().to_dense()
    dense_model.load_state_dict(state)
    tokens, cu, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, cu, 28), dense_model(tokens, cu, 28))


def test_prune_mlp_again_prunes_further() -> None:
    torch.manual_seed(0)
    model = Transformer(TINY, kernels="torch")
    model.prune_mlp(0.5, tile_n=16)
    first = model.layers[0].mlp.w_up.sparse_weight().to_dense() != 0
    model.prune_mlp(0.75, tile_n=16)
    second = model.layers[0].mlp.w_up.sparse_weight().to_dense() != 0
    assert second.sum() < first.sum()
    assert not (second & ~first).any()
