"""The transformer over packed documents: isolation, causality, attention kernel, config and presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megascope.engine.model import (
    PRESETS,
    ModelConfig,
    Transformer,
    cross_entropy,
    positions_in_documents,
    preset,
)
from megascope.kernels import varlen_attention

TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


def _model(config: ModelConfig = TINY, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).eval()


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed))


def _cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@torch.no_grad()
def _logits_of_packed(model: Transformer, *docs: torch.Tensor) -> list[torch.Tensor]:
    """Logits of each document when ``docs`` are packed back to back into one sequence."""
    lengths = [len(d) for d in docs]
    logits = model(torch.cat(docs), _cu(*lengths), max(lengths))
    return list(logits.split(lengths))


# --- the model over packed documents ------------------------------------------------------------------


@pytest.mark.parametrize("a_first", [True, False], ids=["A_before_B", "B_before_A"])
def test_changing_document_a_does_not_change_logits_of_document_b(a_first: bool) -> None:
    model = _model()
    doc_a, doc_b = _tokens(13, seed=1), _tokens(20, seed=2)
    changed_a = _tokens(13, seed=3)
    assert not torch.equal(doc_a, changed_a)

    def logits_of_b(a: torch.Tensor) -> torch.Tensor:
        if a_first:
            return _logits_of_packed(model, a, doc_b)[1]
        return _logits_of_packed(model, doc_b, a)[0]

    torch.testing.assert_close(logits_of_b(changed_a), logits_of_b(doc_a))


def test_changing_document_a_does_not_change_logits_of_equally_long_document_b() -> None:
    # Documents of equal length share one batched attention call in the reference path.
    model = _model()
    doc_a, doc_b, changed_a = _tokens(16, seed=1), _tokens(16, seed=2), _tokens(16, seed=3)
    before = _logits_of_packed(model, doc_a, doc_b)[1]
    after = _logits_of_packed(model, changed_a, doc_b)[1]
    torch.testing.assert_close(after, before)


def test_changing_later_tokens_leaves_logits_at_earlier_positions_unchanged() -> None:
    model = _model()
    doc = _tokens(24, seed=4)
    changed = doc.clone()
    changed[10:] = _tokens(14, seed=5)
    assert not torch.equal(changed[10:], doc[10:])
    (before,) = _logits_of_packed(model, doc)
    (after,) = _logits_of_packed(model, changed)
    torch.testing.assert_close(after[:10], before[:10])


def test_changing_an_earlier_token_changes_logits_at_later_positions() -> None:
    model = _model()
    doc = _tokens(24, seed=4)
    changed = doc.clone()
    changed[3] = (doc[3] + 1) % 256
    (before,) = _logits_of_packed(model, doc)
    (after,) = _logits_of_packed(model, changed)
    torch.testing.assert_close(after[:3], before[:3])
    for position in range(3, 24):
        assert not torch.allclose(after[position], before[position]), f"position {position} did not change"


def test_document_logits_are_the_same_whether_packed_first_or_after_another_document() -> None:
    model = _model()
    # Together longer than max_seq_len: only restarting positions keep every position in the rotary table.
    doc, other = _tokens(30, seed=6), _tokens(50, seed=7)
    assert len(doc) + len(other) > TINY.max_seq_len
    alone = _logits_of_packed(model, doc)[0]
    first = _logits_of_packed(model, doc, other)[0]
    after = _logits_of_packed(model, other, doc)[1]
    torch.testing.assert_close(first, alone)
    torch.testing.assert_close(after, alone)


def test_positions_restart_at_zero_in_every_document() -> None:
    positions = positions_in_documents(_cu(3, 1, 4), 8)
    assert positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_forward_raises_when_max_seqlen_exceeds_config_max_seq_len() -> None:
    model = _model()
    tokens = _tokens(TINY.max_seq_len + 1, seed=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens, _cu(len(tokens)), TINY.max_seq_len + 1)


def test_forward_returns_logits_per_token_over_the_vocabulary() -> None:
    model = _model()
    logits = model(_tokens(30, seed=9), _cu(10, 20), 20)
    assert logits.shape == (30, TINY.vocab_size)
    assert torch.isfinite(logits).all()


# --- varlen_attention against a naive reference -------------------------------------------------------


def _naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], causal: bool = True
) -> torch.Tensor:
    """Explicit softmax over all tokens with a block-diagonal (causal) mask; kv head ``h // group``."""
    total, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = doc[:, None] == doc[None, :]
    if causal:
        allowed &= torch.ones(total, total, dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q, k) * head_dim**-0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


@pytest.mark.parametrize(
    ("lengths", "n_heads", "n_kv_heads"),
    [
        ([1, 7, 1, 12, 7, 3], 4, 4),
        ([1, 7, 1, 12, 7, 3], 4, 2),
        ([5, 1, 9, 9, 1], 6, 1),
        ([1], 2, 1),
    ],
    ids=["mha", "gqa", "mqa", "single_token"],
)
def test_varlen_attention_matches_naive_block_diagonal_causal_attention_and_its_gradient(
    lengths: list[int], n_heads: int, n_kv_heads: int
) -> None:
    torch.manual_seed(0)
    total, head_dim = sum(lengths), 8
    q = torch.randn(total, n_heads, head_dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(total, n_kv_heads, head_dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, n_kv_heads, head_dim, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(total, n_heads, head_dim, dtype=torch.float64)

    out = varlen_attention(q, k, v, _cu(*lengths), max(lengths), causal=True)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    expected = _naive_attention(q, k, v, lengths)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)

    assert out.shape == q.shape
    torch.testing.assert_close(out, expected)
    for name, got, want in zip("qkv", grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_varlen_attention_without_causal_mask_attends_to_the_whole_document_only() -> None:
    torch.manual_seed(0)
    lengths = [4, 1, 6]
    q, k, v = (torch.randn(11, 2, 8, dtype=torch.float64) for _ in range(3))
    out = varlen_attention(q, k, v, _cu(*lengths), 6, causal=False)
    torch.testing.assert_close(out, _naive_attention(q, k, v, lengths, causal=False))


def test_varlen_attention_rejects_cu_seqlens_not_ending_at_total_tokens() -> None:
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, _cu(3, 5), 5)


def test_varlen_attention_rejects_heads_not_a_multiple_of_kv_heads() -> None:
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 3, 8), torch.randn(10, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, k, v, _cu(10), 10)


# --- config switches ----------------------------------------------------------------------------------


def _loss_after_training(config: ModelConfig, steps: int = 30) -> tuple[float, float]:
    """(first, last) loss of ``steps`` AdamW steps on one fixed batch of two packed documents."""
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = _tokens(48, seed=10)
    cu = _cu(20, 28)
    targets = torch.cat([tokens[1:20], torch.tensor([-100]), tokens[21:], torch.tensor([-100])])
    losses = []
    for _ in range(steps):
        loss = cross_entropy(model(tokens, cu, 28), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_layernorm_switch_builds_layernorm_modules_and_still_trains() -> None:
    config = ModelConfig(**{**TINY.to_dict(), "norm": "layernorm"})
    model = Transformer(config)
    layernorms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(layernorms) == 2 * config.n_layers + 1
    assert all(type(m).__name__ != "RMSNorm" for m in model.modules())
    first, last = _loss_after_training(config)
    assert last < 0.5 * first


def test_gelu_switch_has_no_gate_projection_and_still_trains() -> None:
    config = ModelConfig(**{**TINY.to_dict(), "activation": "gelu"})
    model = Transformer(config)
    names = [name for name, _ in model.named_parameters()]
    assert not any("w_gate" in name for name in names)
    assert any("w_up" in name for name in names)
    first, last = _loss_after_training(config)
    assert last < 0.5 * first


def test_default_rmsnorm_swiglu_model_trains() -> None:
    first, last = _loss_after_training(TINY)
    assert last < 0.5 * first


# --- parameter counts and config validation -----------------------------------------------------------


def _built_params(config: ModelConfig) -> int:
    return sum(p.numel() for p in Transformer(config).parameters())


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_num_params_equals_built_parameter_count_for_preset(name: str) -> None:
    config = preset(name)
    assert config.num_params() == _built_params(config)


@pytest.mark.parametrize(
    "overrides",
    [{"tie_embeddings": True}, {"norm": "layernorm"}, {"activation": "gelu"}, {}],
    ids=["tied", "layernorm", "gelu", "gqa"],
)
def test_num_params_equals_built_parameter_count_for_config_variant(overrides: dict) -> None:
    config = ModelConfig(**{**TINY.to_dict(), **overrides})
    assert config.num_params() == _built_params(config)


def test_tied_embeddings_count_the_embedding_once() -> None:
    tied = ModelConfig(**{**TINY.to_dict(), "tie_embeddings": True})
    assert TINY.num_params() - tied.num_params() == TINY.vocab_size * TINY.dim


def test_num_params_without_embedding_leaves_out_exactly_the_embedding_table() -> None:
    assert TINY.num_params() - TINY.num_params(include_embedding=False) == TINY.vocab_size * TINY.dim


def test_1b_preset_has_about_a_billion_parameters() -> None:
    assert 0.9e9 < preset("1b").num_params() < 1.2e9


def test_config_rejects_dim_not_divisible_by_n_heads_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"model\.dim"):
        ModelConfig(dim=30, n_heads=4, n_kv_heads=4)


def test_config_rejects_n_heads_not_divisible_by_n_kv_heads() -> None:
    with pytest.raises(ValueError, match=r"model\.n_kv_heads"):
        ModelConfig(dim=32, n_heads=4, n_kv_heads=3)


def test_unknown_preset_raises_listing_the_presets() -> None:
    with pytest.raises(ValueError, match="nope") as error:
        preset("nope")
    for name in PRESETS:
        assert name in str(error.value)


def test_preset_overrides_replace_only_the_named_fields() -> None:
    config = preset("tiny", max_seq_len=32)
    assert config.max_seq_len == 32
    assert config.dim == PRESETS["tiny"].dim


def test_config_round_trips_through_dict_and_rejects_unknown_keys() -> None:
    assert ModelConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**TINY.to_dict(), "bogus": 1})
