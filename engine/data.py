"""Real text that is always on the machine, as byte-level tokens packed without padding.

By default the corpus is the Python standard library's own source tree (found through ``sysconfig``): one
document per ``.py`` file. ``--data PATH`` takes a directory (every text file under it, one document each)
or a single text file (cut at line ends into documents of about ``_FILE_DOCUMENT_BYTES``).

Documents are split into a training and a held-out validation set by a hash of their name, so the split is
stable and never overlaps. Each epoch the training documents are shuffled (seeded) and laid end to end in
one stream; micro-batch ``b`` of the epoch is the ``batch_tokens`` tokens starting at ``b * batch_tokens``.
Inside a micro-batch, segments end at document ends, every ``max_seq_len`` tokens of a document, and at the
micro-batch's edges; ``cu_seqlens`` describes them. No token is padding.

Data parallelism: the micro-batches are dealt round-robin, rank ``r`` of ``W`` taking global micro-batch
``consumed + r``. The position (``consumed``, a count of global micro-batches) is all the state there is, so
a run restored at any position, even with another world size, sees exactly the batches that follow it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sysconfig
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_FILE_DOCUMENT_BYTES = 16 * 1024
_BINARY_SNIFF_BYTES = 8192
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """Bad data input; the message names the flag to change."""


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None
    """A directory or text file; None uses the Python standard library's source tree."""
    batch_tokens: int = 2048
    """Tokens per micro-batch on each rank (a fixed budget; documents are packed into it)."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (chosen by a hash of the document's name)."""
    seed: int = 0
    """Seeds the per-epoch shuffle of training documents."""

    def __post_init__(self) -> None:
        if self.batch_tokens < 2:
            raise DataError(f"--batch-tokens must be at least 2, got {self.batch_tokens}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class Corpus:
    """Documents as one byte array plus offsets: ``data[offsets[i]:offsets[i + 1]]`` is document ``i``."""

    names: list[str]
    data: np.ndarray
    offsets: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: list[int]) -> Corpus:
        pieces = [self.data[self.offsets[i] : self.offsets[i + 1]] for i in indices]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        data = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
        return Corpus([self.names[i] for i in indices], data, offsets)


def default_data_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def describe_source(path: str | None) -> str:
    return f"Python standard library at {default_data_root()}" if path is None else path


def load_corpus(path: str | None) -> Corpus:
    """Read the documents; raises DataError naming ``--data`` when there is nothing to read."""
    texts: list[tuple[str, bytes]]
    if path is None:
        root = default_data_root()
        texts = [(str(p.relative_to(root)), p.read_bytes()) for p in _stdlib_sources(root)]
    else:
        target = Path(path).expanduser()
        if not target.exists():
            raise DataError(f"--data: no such file or directory: {path}")
        if target.is_dir():
            texts = [(str(p.relative_to(target)), p.read_bytes()) for p in _text_files(target)]
        else:
            texts = list(_split_file(target))
    texts = [(name, body) for name, body in texts if len(body) >= 2]
    if not texts:
        raise DataError(f"--data: no text found in {describe_source(path)} (need at least one non-empty text file)")
    lengths = np.array([len(body) for _, body in texts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = np.frombuffer(b"".join(body for _, body in texts), dtype=np.uint8)
    return Corpus([name for name, _ in texts], data, offsets)


def _stdlib_sources(root: Path) -> list[Path]:
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS)
        found.extend(Path(directory) / f for f in sorted(files) if f.endswith(".py"))
    return found


def _text_files(root: Path) -> list[Path]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            candidate = Path(directory) / name
            if name.startswith(".") or not candidate.is_file():
                continue
            with open(candidate, "rb") as f:
                if b"\0" in f.read(_BINARY_SNIFF_BYTES):
                    continue  # binary
            found.append(candidate)
    return found


def _split_file(path: Path) -> Iterator[tuple[str, bytes]]:
    # A single file is cut into documents at line ends so that a validation split is possible.
    body = path.read_bytes()
    if b"\0" in body[:_BINARY_SNIFF_BYTES]:
        raise DataError(f"--data: {path} looks binary (it contains NUL bytes); give a text file or a directory")
    start, index = 0, 0
    while start < len(body):
        end = body.find(b"\n", start + _FILE_DOCUMENT_BYTES)
        end = len(body) if end < 0 else end + 1
        yield f"{path.name}#{index}", body[start:end]
        start, index = end, index + 1


def split_train_val(corpus: Corpus, val_fraction: float) -> tuple[Corpus, Corpus]:
    """Disjoint training and validation documents, chosen by a stable hash of each document's name."""
    threshold = int(val_fraction * 10_000)
    # Only the name's hash decides, never the position or the other documents: a corpus that grows keeps
    # every existing document on its side. A tiny corpus may so have no validation documents at all.
    val = [i for i, name in enumerate(corpus.names) if zlib.crc32(name.encode()) % 10_000 < threshold]
    held_out = set(val)
    train = [i for i in range(len(corpus)) if i not in held_out]
    if not train:
        raise DataError("--data: every document fell into the validation split; add documents or lower --val-fraction")
    return corpus.subset(train), corpus.subset(val)


@dataclass
class Batch:
    tokens: torch.Tensor
    """int64 ``(batch_tokens,)``."""
    targets: torch.Tensor
    """int64 ``(batch_tokens,)``: the next token of the same document, or -100 after its last token."""
    cu_seqlens: torch.Tensor
    """int32 ``(segments + 1,)``."""
    max_seqlen: int
    segment_lengths: list[int]
    index: int
    """Global micro-batch index this batch came from."""

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return Batch(
            self.tokens.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.cu_seqlens.to(device, non_blocking=non_blocking),
            self.max_seqlen,
            self.segment_lengths,
            self.index,
        )


class PackedBatches:
    """Deterministic packed micro-batches of one corpus for one rank; see the module docstring."""

    def __init__(
        self,
        corpus: Corpus,
        batch_tokens: int,
        max_seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if corpus.num_tokens < batch_tokens:
            raise DataError(
                f"--batch-tokens {batch_tokens} is larger than the whole corpus ({corpus.num_tokens} tokens); "
                "lower --batch-tokens or give more --data"
            )
        self.corpus = corpus
        self.batch_tokens = batch_tokens
        self.max_seq_len = max_seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.batches_per_epoch = corpus.num_tokens // batch_tokens
        self.consumed = 0
        """Global micro-batches taken so far by all ranks together."""
        self._epoch = -1
        self._order = np.zeros(0, dtype=np.int64)
        self._stream_starts = np.zeros(0, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "batch_tokens": self.batch_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["batch_tokens"] != self.batch_tokens:
            raise DataError(
                f"data position was saved with seed={state['seed']} batch_tokens={state['batch_tokens']}; "
                f"this run has --seed {self.seed} --batch-tokens {self.batch_tokens}: use the saved values to resume"
            )
        self.consumed = int(state["consumed"])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.consumed + self.rank)
        self.consumed += self.world_size
        return batch

    def batch_at(self, global_index: int) -> Batch:
        epoch, within = divmod(global_index, self.batches_per_epoch)
        self._lay_out_epoch(epoch)
        start = within * self.batch_tokens
        end = start + self.batch_tokens
        tokens = np.empty(self.batch_tokens, dtype=np.int64)
        targets = np.empty(self.batch_tokens, dtype=np.int64)
        segments: list[int] = []
        data, offsets = self.corpus.data, self.corpus.offsets
        slot = int(np.searchsorted(self._stream_starts, start, side="right")) - 1
        pos = start
        while pos < end:
            doc = int(self._order[slot])
            doc_len = int(offsets[doc + 1] - offsets[doc])
            in_doc = pos - int(self._stream_starts[slot])
            take = min(end - pos, doc_len - in_doc)
            base = int(offsets[doc]) + in_doc
            out = pos - start
            tokens[out : out + take] = data[base : base + take]
            # The target is the next byte of the same document; a document's last byte has none.
            has_next = take if in_doc + take < doc_len else take - 1
            targets[out : out + has_next] = data[base + 1 : base + 1 + has_next]
            targets[out + has_next : out + take] = -100
            # Segment boundaries on the document's own grid of max_seq_len, then the piece's edges.
            cut = in_doc
            while cut < in_doc + take:
                next_cut = min((cut // self.max_seq_len + 1) * self.max_seq_len, in_doc + take)
                segments.append(next_cut - cut)
                cut = next_cut
            pos += take
            slot += 1
        cu = np.concatenate([[0], np.cumsum(segments)]).astype(np.int32)
        return Batch(
            tokens=torch.from_numpy(tokens),
            targets=torch.from_numpy(targets),
            cu_seqlens=torch.from_numpy(cu),
            max_seqlen=max(segments),
            segment_lengths=segments,
            index=global_index,
        )

    def _lay_out_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        n = len(self.corpus)
        if self.shuffle:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            self._order = np.arange(n)
        lengths = np.diff(self.corpus.offsets)[self._order]
        self._stream_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._epoch = epoch


class Prefetcher:
    """Builds the next batches on a background thread so the training loop rarely waits for data.

    ``position`` is the loader state right after the last batch handed out (not the last one built), so
    saving it and restoring resumes exactly after what training has seen.
    """

    def __init__(self, batches: PackedBatches, device: torch.device, depth: int = 2) -> None:
        self._batches = batches
        self._device = device
        self._queue: queue.Queue[tuple[Batch, dict[str, Any]] | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.position = batches.state_dict()
        self._thread = threading.Thread(target=self._run, name="megascope-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._batches)
                if self._device.type == "cuda":
                    batch.tokens, batch.targets = batch.tokens.pin_memory(), batch.targets.pin_memory()
                item = (batch, self._batches.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the training thread, which re-raises it
            self._queue.put(error)

    def next(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self.position = item
        return batch.to(self._device)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):  # room in the queue: a put waiting for it returns now, not in 0.1 s
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)
