"""Corpus loading, the train/validation split, packed micro-batches, their position, and the prefetcher."""

from __future__ import annotations

import random
import string
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megascope.engine.data import (
    Batch,
    Corpus,
    DataError,
    PackedBatches,
    Prefetcher,
    load_corpus,
    split_train_val,
)

BATCH_TOKENS = 256
MAX_SEQ_LEN = 32
N_DOCS = 60

CorpusDir = tuple[Path, dict[str, bytes]]
"""The corpus directory and the documents written into it, by file name."""


_MARKERS = string.ascii_uppercase + string.digits + "".join(c for c in string.punctuation if c not in ".,")
_BODY_ALPHABET = string.ascii_lowercase + " \n.,"


def _document(index: int) -> bytes:
    """A marker byte unique to this document (found nowhere else), then 1..300 bytes of text."""
    rng = random.Random(index)
    body = "".join(rng.choice(_BODY_ALPHABET) for _ in range(rng.randrange(1, 300)))
    return f"{_MARKERS[index]}{body}".encode()


def _write_corpus(root: Path, n_docs: int = N_DOCS) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    docs = {f"doc_{i:03d}.txt": _document(i) for i in range(n_docs)}
    for name, body in docs.items():
        (root / name).write_bytes(body)
    return docs


@pytest.fixture
def corpus_dir(tmp_path: Path) -> CorpusDir:
    root = tmp_path / "corpus"
    return root, _write_corpus(root)


@pytest.fixture
def corpus(corpus_dir: CorpusDir) -> Corpus:
    return load_corpus(str(corpus_dir[0]))


def _loader(corpus: Corpus, seed: int = 0, rank: int = 0, world_size: int = 1) -> PackedBatches:
    return PackedBatches(corpus, BATCH_TOKENS, MAX_SEQ_LEN, seed=seed, rank=rank, world_size=world_size)


def _take(loader: PackedBatches, n: int) -> list[Batch]:
    return [next(loader) for _ in range(n)]


def _assert_same_batches(got: list[Batch], want: list[Batch]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.index == w.index
        assert torch.equal(g.tokens, w.tokens)
        assert torch.equal(g.targets, w.targets)
        assert torch.equal(g.cu_seqlens, w.cu_seqlens)
        assert g.max_seqlen == w.max_seqlen


def _stream(batches: list[Batch]) -> bytes:
    return bytes(torch.cat([b.tokens for b in batches]).tolist())


def _parse_documents(stream: bytes, docs: dict[str, bytes]) -> list[tuple[str, int]]:
    """(name, start) of each document laid end to end in ``stream``; the last one may be cut short."""
    by_marker = {body[0]: name for name, body in docs.items()}
    placed, pos = [], 0
    while pos < len(stream):
        name = by_marker[stream[pos]]
        body = docs[name]
        assert body.startswith(stream[pos : pos + len(body)]), f"document {name} at {pos} does not match"
        placed.append((name, pos))
        pos += len(body)
    return placed


# --- loading ------------------------------------------------------------------------------------------


def test_directory_corpus_has_one_document_per_text_file_with_its_bytes(corpus_dir: CorpusDir, corpus: Corpus) -> None:
    _, docs = corpus_dir
    assert sorted(corpus.names) == sorted(docs)
    for i, name in enumerate(corpus.names):
        assert corpus.data[corpus.offsets[i] : corpus.offsets[i + 1]].tobytes() == docs[name]
    assert corpus.num_tokens == sum(len(b) for b in docs.values())


def test_binary_file_in_data_directory_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"first text document\n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "b.txt").write_bytes(b"second text document\n")
    corpus = load_corpus(str(tmp_path))
    assert corpus.names == ["a.txt", "b.txt"]
    assert corpus.data.tobytes() == b"first text document\nsecond text document\n"


def test_single_file_is_cut_at_line_ends_into_documents_that_rebuild_the_file(tmp_path: Path) -> None:
    lines = [f"line {i}: {'x' * (i % 70)}\n" for i in range(2000)]
    body = "".join(lines).encode()
    assert len(body) > 3 * 16 * 1024
    path = tmp_path / "book.txt"
    path.write_bytes(body)
    corpus = load_corpus(str(path))
    assert len(corpus) >= 3
    assert corpus.data.tobytes() == body
    for i in range(len(corpus)):
        assert corpus.data[corpus.offsets[i + 1] - 1] == ord("\n")
    assert len(set(corpus.names)) == len(corpus)


def test_default_corpus_is_the_stdlib_source_without_site_packages() -> None:
    corpus = load_corpus(None)
    assert len(corpus) > 500
    assert corpus.num_tokens > 10_000_000
    assert all(name.endswith(".py") for name in corpus.names)
    assert not [name for name in corpus.names if "site-packages" in name or "dist-packages" in name]


def test_missing_data_path_raises_data_error_naming_flag_and_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such" / "corpus")
    with pytest.raises(DataError) as error:
        load_corpus(missing)
    assert "--data" in str(error.value)
    assert missing in str(error.value)


def test_directory_with_only_binary_and_empty_files_raises_data_error_naming_flag(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "one_byte.txt").write_bytes(b"x")
    with pytest.raises(DataError, match="--data"):
        load_corpus(str(tmp_path))


def test_single_binary_file_raises_data_error_naming_flag(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="--data"):
        load_corpus(str(path))


def test_batch_tokens_larger_than_corpus_raises_data_error_naming_flag(corpus: Corpus) -> None:
    with pytest.raises(DataError, match="--batch-tokens"):
        PackedBatches(corpus, corpus.num_tokens + 1, MAX_SEQ_LEN, seed=0)


# --- train / validation split -------------------------------------------------------------------------


def test_validation_split_never_overlaps_training(corpus: Corpus) -> None:
    train, val = split_train_val(corpus, val_fraction=0.2)
    assert len(val) > 0
    assert not set(train.names) & set(val.names)
    assert sorted(train.names + val.names) == sorted(corpus.names)
    assert train.num_tokens + val.num_tokens == corpus.num_tokens


def test_validation_split_is_stable_when_an_unrelated_document_is_added(corpus_dir: CorpusDir, corpus: Corpus) -> None:
    root, _ = corpus_dir
    train_before, val_before = split_train_val(corpus, val_fraction=0.2)
    (root / "unrelated.txt").write_bytes(b"a document added later\n")
    train_after, val_after = split_train_val(load_corpus(str(root)), val_fraction=0.2)
    assert set(val_after.names) - {"unrelated.txt"} == set(val_before.names)
    assert set(train_after.names) - {"unrelated.txt"} == set(train_before.names)


def test_validation_split_of_tiny_corpus_is_stable_when_a_document_is_added(tmp_path: Path) -> None:
    # None of these names hashes into a 2% validation split, so the fallback picks the held-out document.
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_bytes(f"document {name}\n".encode())
    _, val_before = split_train_val(load_corpus(str(tmp_path)), val_fraction=0.02)
    (tmp_path / "zz_new.txt").write_bytes(b"a document added later\n")
    train_after, _ = split_train_val(load_corpus(str(tmp_path)), val_fraction=0.02)
    assert not set(val_before.names) & set(train_after.names)


# --- packed batches -----------------------------------------------------------------------------------


def test_same_seed_gives_identical_batches(corpus: Corpus) -> None:
    _assert_same_batches(_take(_loader(corpus, seed=7), 30), _take(_loader(corpus, seed=7), 30))


def test_different_seed_gives_different_batches(corpus: Corpus) -> None:
    a, b = _take(_loader(corpus, seed=7), 5), _take(_loader(corpus, seed=8), 5)
    assert not all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))


def test_each_epoch_is_shuffled_differently(corpus: Corpus) -> None:
    loader = _loader(corpus)
    n = loader.batches_per_epoch
    first, second = _stream(_take(loader, n)), _stream(_take(loader, n))
    assert first != second


def test_every_batch_has_batch_tokens_and_well_formed_segments(corpus: Corpus) -> None:
    loader = _loader(corpus)
    for batch in _take(loader, 2 * loader.batches_per_epoch + 3):
        assert batch.tokens.shape == (BATCH_TOKENS,)
        assert batch.targets.shape == (BATCH_TOKENS,)
        cu = batch.cu_seqlens.tolist()
        assert batch.cu_seqlens.dtype == torch.int32
        assert cu[0] == 0
        assert cu[-1] == BATCH_TOKENS
        lengths = np.diff(cu)
        assert (lengths > 0).all()
        assert lengths.max() <= MAX_SEQ_LEN
        assert batch.max_seqlen == lengths.max()
        assert batch.segment_lengths == lengths.tolist()


def test_segments_never_cross_a_document_boundary(corpus_dir: CorpusDir, corpus: Corpus) -> None:
    _, docs = corpus_dir
    loader = _loader(corpus)
    batches = _take(loader, loader.batches_per_epoch)
    stream = _stream(batches)
    doc_starts = {start for _, start in _parse_documents(stream, docs)}
    segment_starts = set()
    for batch in batches:
        segment_starts |= {batch.index * BATCH_TOKENS + s for s in batch.cu_seqlens[:-1].tolist()}
    # A segment starts wherever a document starts (plus at max_seq_len cuts and batch edges).
    assert doc_starts <= segment_starts


def test_targets_are_the_next_byte_of_the_same_document_and_ignored_at_its_last_byte(
    corpus_dir: CorpusDir, corpus: Corpus
) -> None:
    _, docs = corpus_dir
    loader = _loader(corpus)
    batches = _take(loader, loader.batches_per_epoch)
    stream = _stream(batches)
    expected, complete = [], 0
    for name, start in _parse_documents(stream, docs):
        body = docs[name]
        doc_targets = [*body[1:], -100]
        expected.extend(doc_targets[: len(stream) - start])
        complete += start + len(body) <= len(stream)
    got = torch.cat([b.targets for b in batches]).tolist()
    assert got == expected
    assert got.count(-100) == complete > N_DOCS // 2


def test_an_epoch_of_batches_is_the_training_documents_end_to_end_without_padding(
    corpus_dir: CorpusDir, corpus: Corpus
) -> None:
    _, docs = corpus_dir
    train, _ = split_train_val(corpus, val_fraction=0.2)
    train_docs = {name: docs[name] for name in train.names}
    loader = _loader(train)
    stream = _stream(_take(loader, loader.batches_per_epoch))
    assert len(stream) == loader.batches_per_epoch * BATCH_TOKENS
    placed = _parse_documents(stream, train_docs)
    order = [name for name, _ in placed]
    assert len(order) == len(set(order)), "a document appears twice in one epoch"
    # Rebuild the epoch from the raw documents in the order found: equal up to the dropped tail.
    rebuilt = b"".join(train_docs[name] for name in order)
    assert rebuilt[: len(stream)] == stream
    unseen = [name for name in train_docs if name not in order]
    dropped = len(rebuilt) - len(stream) + sum(len(train_docs[name]) for name in unseen)
    assert dropped == train.num_tokens - len(stream)
    assert 0 <= dropped < BATCH_TOKENS


# --- position: save, restore, world sizes -------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 30], ids=["within_epoch", "after_an_epoch"])
def test_restored_loader_continues_exactly_where_the_saved_one_stopped(corpus: Corpus, k: int) -> None:
    uninterrupted = _loader(corpus, seed=3)
    _take(uninterrupted, k)
    state = uninterrupted.state_dict()
    restored = _loader(corpus, seed=3)
    restored.load_state_dict(state)
    _assert_same_batches(_take(restored, 5), _take(uninterrupted, 5))


def test_restoring_with_another_seed_raises_data_error(corpus: Corpus) -> None:
    saved = _loader(corpus, seed=3)
    _take(saved, 2)
    with pytest.raises(DataError, match="--seed"):
        _loader(corpus, seed=4).load_state_dict(saved.state_dict())


def test_two_ranks_together_consume_the_single_rank_batches_interleaved(corpus: Corpus) -> None:
    rank0, rank1 = _loader(corpus, rank=0, world_size=2), _loader(corpus, rank=1, world_size=2)
    interleaved = [b for pair in zip(_take(rank0, 20), _take(rank1, 20), strict=True) for b in pair]
    _assert_same_batches(interleaved, _take(_loader(corpus), 40))
    assert rank0.state_dict() == rank1.state_dict() == {**rank0.state_dict(), "consumed": 40}


def test_position_saved_with_two_ranks_resumes_on_one_rank(corpus: Corpus) -> None:
    rank0 = _loader(corpus, rank=0, world_size=2)
    _take(rank0, 7)
    single = _loader(corpus)
    single.load_state_dict(rank0.state_dict())
    reference = _loader(corpus)
    _take(reference, 14)
    _assert_same_batches(_take(single, 4), _take(reference, 4))


def test_position_saved_with_one_rank_resumes_on_two_ranks(corpus: Corpus) -> None:
    single = _loader(corpus)
    _take(single, 5)
    ranks = [_loader(corpus, rank=r, world_size=2) for r in (0, 1)]
    for loader in ranks:
        loader.load_state_dict(single.state_dict())
    got = [b for pair in zip(_take(ranks[0], 3), _take(ranks[1], 3), strict=True) for b in pair]
    _assert_same_batches(got, _take(single, 6))


# --- prefetcher ---------------------------------------------------------------------------------------


def _wait_until_built_ahead(loader: PackedBatches, handed_out: int, depth: int) -> None:
    """Wait until the prefetch thread has filled its queue past what was handed out."""
    deadline = time.monotonic() + 5
    while loader.consumed < handed_out + depth and time.monotonic() < deadline:
        time.sleep(0.005)
    assert loader.consumed >= handed_out + depth, "the prefetcher should have built batches ahead"


def test_prefetcher_hands_out_loader_batches_in_order_and_reports_position_of_handed_out_ones(
    corpus: Corpus,
) -> None:
    depth, n = 2, 5
    behind = _loader(corpus, seed=5)
    prefetcher = Prefetcher(behind, torch.device("cpu"), depth=depth)
    try:
        got = []
        for _ in range(n):
            _wait_until_built_ahead(behind, len(got), depth)
            got.append(prefetcher.next())
        reference = _loader(corpus, seed=5)
        _assert_same_batches(got, _take(reference, n))
        assert prefetcher.position == reference.state_dict()
    finally:
        prefetcher.close()


def test_prefetcher_position_restores_to_the_next_unseen_batch(corpus: Corpus) -> None:
    depth = 3
    behind = _loader(corpus, seed=5)
    prefetcher = Prefetcher(behind, torch.device("cpu"), depth=depth)
    try:
        seen = [prefetcher.next() for _ in range(4)]
        _wait_until_built_ahead(behind, len(seen), depth)
        position = prefetcher.position
    finally:
        prefetcher.close()
    resumed = _loader(corpus, seed=5)
    resumed.load_state_dict(position)
    assert next(resumed).index == seen[-1].index + 1
