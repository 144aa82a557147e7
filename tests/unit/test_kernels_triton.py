"""The Triton kernels against their PyTorch references: outputs and every gradient, at small odd shapes.

Runs where the Triton path can: on a GPU (CUDA tensors), or on CPU under Triton's interpreter when
``TRITON_INTERPRET=1`` was set before the kernels were first used. ``test_kernels.py`` runs this file in a
subprocess with that variable set, so a plain ``pytest tests`` covers it without leaking the variable into
the rest of the suite; on its own here, without either, the file skips.

Ground truth is the reference path in float64 on the same (rounded) inputs; tolerances are per dtype. bf16
runs on a GPU only: the interpreter computes bf16 wrongly (triton-lang/triton#11584).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from megascope.engine.model import ModelConfig, Transformer, cross_entropy
from megascope.kernels import (
    add_layer_norm,
    add_rms_norm,
    bias_gelu,
    swiglu,
    tile_prune,
    tile_sparse_matmul,
    varlen_attention,
)
from megascope.kernels.backend import interpreting

if interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = "none"
    pytestmark = pytest.mark.skip(
        reason="the Triton path needs CUDA or TRITON_INTERPRET=1 (test_kernels.py runs this file so)"
    )

cuda_only = pytest.mark.skipif(
    DEVICE != "cuda", reason="bf16 is tested on a GPU only (the interpreter's bf16 is broken)"
)
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=cuda_only),
]
# (atol, rtol) against float64, for outputs and gradients. Half precisions round every input and output
# once and their dot products accumulate in fp32.
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 5e-2)}

Fn = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def _rand(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=DEVICE, dtype=dtype)


def _outputs_and_grads(
    fn: Fn, inputs: Sequence[torch.Tensor], upstream: Sequence[torch.Tensor] | None, kernels: str, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    result = fn(*leaves, kernels=kernels)
    outs = list(result) if isinstance(result, tuple) else [result]
    if upstream is None:
        upstream = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(upstream, outs, strict=True)])
    return outs, list(grads), list(upstream)


def assert_matches_reference(fn: Fn, inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
    """``fn`` on the Triton path equals ``fn`` on the reference path in float64, outputs and all gradients."""
    outs, grads, upstream = _outputs_and_grads(fn, inputs, None, "triton", dtype)
    ref_outs, ref_grads, _ = _outputs_and_grads(fn, inputs, upstream, "torch", torch.float64)
    atol, rtol = TOLERANCE[dtype]
    for i, (got, want) in enumerate(zip(outs, ref_outs, strict=True)):
        assert got.dtype == dtype or got.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m, i=i: f"output {i}: {m}")
    for i, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=lambda m, i=i: f"grad {i}: {m}")


def _cu(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


# --- variable-length attention -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("lengths", "n_heads", "n_kv_heads", "head_dim", "causal"),
    [
        ([1, 7, 33, 1, 5], 4, 2, 64, True),  # several documents, two of one token, grouped-query
        ([33], 2, 1, 128, True),  # one document spanning three 16-row blocks, multi-query, head_dim 128
        ([7, 0, 1, 33], 2, 2, 64, False),  # an empty document, no causal mask
        ([1], 1, 1, 64, True),  # a single token
    ],
    ids=["gqa-d64", "mqa-d128", "noncausal-empty-doc", "one-token"],
)
def test_varlen_attention_matches_reference(
    lengths: list[int], n_heads: int, n_kv_heads: int, head_dim: int, causal: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    total = sum(lengths)
    cu = _cu(lengths)
    q = _rand(total, n_heads, head_dim, dtype=dtype)
    k = _rand(total, n_kv_heads, head_dim, dtype=dtype)
    v = _rand(total, n_kv_heads, head_dim, dtype=dtype)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernels: str) -> torch.Tensor:
        return varlen_attention(q, k, v, cu, max(lengths), causal=causal, kernels=kernels)

    assert_matches_reference(attention, [q, k, v], dtype)


def test_varlen_attention_accepts_an_upper_bound_for_max_seqlen_and_a_custom_scale() -> None:
    torch.manual_seed(1)
    lengths = [5, 9]
    q, k, v = (_rand(14, 2, 32, dtype=torch.float32) for _ in range(3))

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernels: str) -> torch.Tensor:
        return varlen_attention(q, k, v, _cu(lengths), 40, softmax_scale=0.3, kernels=kernels)

    assert_matches_reference(attention, [q, k, v], torch.float32)


# --- residual add + norms ------------------------------------------------------------------------------

NORM_SHAPES = [(1, 64), (7, 33), (3, 11, 48)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_add_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, residual, weight = _rand(*shape, dtype=dtype), _rand(*shape, dtype=dtype), _rand(shape[-1], dtype=dtype)

    def norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, r, w, 1e-6, kernels=kernels)

    assert_matches_reference(norm, [x, residual, weight], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_add_layer_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    dim = shape[-1]
    inputs = [_rand(*shape, dtype=dtype), _rand(*shape, dtype=dtype), _rand(dim, dtype=dtype), _rand(dim, dtype=dtype)]

    def norm(
        x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor, kernels: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_layer_norm(x, r, w, b, 1e-5, kernels=kernels)

    assert_matches_reference(norm, inputs, dtype)


@pytest.mark.parametrize("which", ["rms", "layer"])
def test_add_norm_with_half_sublayer_output_and_fp32_residual_stream(which: str) -> None:
    # The model under autocast: a bf16/fp16 sublayer output added to an fp32 stream with fp32 norm weights.
    torch.manual_seed(0)
    x = _rand(7, 33, dtype=torch.float16)
    residual, weight, bias = (
        _rand(7, 33, dtype=torch.float32),
        _rand(33, dtype=torch.float32),
        _rand(33, dtype=torch.float32),
    )
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    ref_leaves = [t.double().requires_grad_() for t in (x, residual, weight, bias)]

    def run(xs: list[torch.Tensor], kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which == "rms":
            return add_rms_norm(xs[0], xs[1], xs[2], kernels=kernels)
        return add_layer_norm(xs[0], xs[1], xs[2], xs[3], kernels=kernels)

    y, new_residual = run(leaves, "triton")
    assert y.dtype == new_residual.dtype == torch.float32
    ref_y, ref_residual = run(ref_leaves, "torch")
    dy, dres = torch.randn_like(y), torch.randn_like(y)
    used = leaves if which == "layer" else leaves[:3]
    grads = torch.autograd.grad((y, new_residual), used, (dy, dres))
    ref_grads = torch.autograd.grad((ref_y, ref_residual), ref_leaves[: len(used)], (dy.double(), dres.double()))
    torch.testing.assert_close(y.double(), ref_y, atol=1e-5, rtol=1e-4)
    assert grads[0].dtype == torch.float16 and grads[1].dtype == torch.float32
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-2)


def test_add_rms_norm_when_only_the_normalised_output_is_used() -> None:
    # The final norm: its updated residual is dropped, so that gradient arrives as None.
    torch.manual_seed(0)
    x, residual, weight = (
        _rand(7, 33, dtype=torch.float32),
        _rand(7, 33, dtype=torch.float32),
        _rand(33, dtype=torch.float32),
    )

    def norm_y(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, kernels: str) -> torch.Tensor:
        return add_rms_norm(x, r, w, kernels=kernels)[0]

    assert_matches_reference(norm_y, [x, residual, weight], torch.float32)


# --- activations ---------------------------------------------------------------------------------------

ACTIVATION_SHAPES = [(1, 7), (7, 33), (3, 5, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACTIVATION_SHAPES, ids=str)
def test_swiglu_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    assert_matches_reference(swiglu, [_rand(*shape, dtype=dtype, scale=3.0), _rand(*shape, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", ACTIVATION_SHAPES, ids=str)
def test_bias_gelu_matches_reference(shape: tuple[int, ...], approximate: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)

    def gelu(x: torch.Tensor, b: torch.Tensor, kernels: str) -> torch.Tensor:
        return bias_gelu(x, b, approximate, kernels=kernels)

    assert_matches_reference(gelu, [_rand(*shape, dtype=dtype, scale=3.0), _rand(shape[-1], dtype=dtype)], dtype)


# --- tile-wise sparse matmul ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "out_features", "in_features", "sparsity", "column_sparsity", "tile_n"),
    [
        (7, 40, 33, 0.5, 0.1, 16),  # pruned columns, a narrower last tile
        (33, 48, 7, 0.75, 0.0, 16),  # more rows of x than one block
        (1, 33, 48, 0.9, 0.2, 32),  # one token, tiles left with few rows
    ],
)
def test_tile_sparse_matmul_matches_dense_matmul_with_the_pruned_weight(
    tokens: int,
    out_features: int,
    in_features: int,
    sparsity: float,
    column_sparsity: float,
    tile_n: int,
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    weight = tile_prune(
        _rand(out_features, in_features, dtype=dtype), sparsity, tile_n=tile_n, column_sparsity=column_sparsity
    )
    x = _rand(tokens, in_features, dtype=dtype)

    def matmul(x: torch.Tensor, values: torch.Tensor, kernels: str) -> torch.Tensor:
        return tile_sparse_matmul(x, weight.with_values(values), kernels=kernels)

    # Gradients for x and for the surviving weights (fine-tuning); the reference multiplies densely.
    assert_matches_reference(matmul, [x, weight.values], dtype)


def test_tile_sparse_matmul_takes_leading_batch_dimensions() -> None:
    torch.manual_seed(0)
    weight = tile_prune(_rand(24, 20, dtype=torch.float32), 0.5, tile_n=16)
    x = _rand(2, 3, 20, dtype=torch.float32)
    out = tile_sparse_matmul(x, weight, kernels="triton")
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, x @ weight.to_dense().T, atol=1e-5, rtol=1e-4)


# --- the model -----------------------------------------------------------------------------------------

# head_dim 64, one of the two head dims the attention kernel is built for.
MODEL = ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=96, max_seq_len=64)


@pytest.mark.parametrize(
    ("overrides", "prune"),
    [({}, False), ({"norm": "layernorm", "activation": "gelu"}, False), ({}, True)],
    ids=["rmsnorm-swiglu", "layernorm-gelu", "tile-sparse-mlp"],
)
def test_model_gives_the_same_logits_and_gradients_with_triton_kernels(overrides: dict, prune: bool) -> None:
    config = ModelConfig(**{**MODEL.to_dict(), **overrides})
    torch.manual_seed(0)
    lengths = [1, 7, 9]
    tokens = torch.randint(0, 256, (sum(lengths),), device=DEVICE)
    cu = _cu(lengths)
    targets = torch.roll(tokens, -1)
    models = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        model = Transformer(config, kernels=kernels).to(DEVICE)
        with torch.no_grad():  # non-zero biases, so their gradients are tested too
            for name, param in model.named_parameters():
                if name.endswith(("b_up", "norm.bias")):
                    param.normal_(std=0.1)
        if prune:
            model.prune_mlp(0.5, tile_n=16, column_sparsity=0.1)
        models[kernels] = model
    results = {}
    for kernels, model in models.items():
        logits = model(tokens, cu, max(lengths))
        cross_entropy(logits, targets).backward()
        results[kernels] = (logits, {n: p.grad for n, p in model.named_parameters()})
    logits, grads = results["triton"]
    ref_logits, ref_grads = results["torch"]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
