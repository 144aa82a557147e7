"""Streaming a checkpoint tensor by tensor: produce the next tensor while the previous one is written.

Used by the merge and the Hugging Face export, so that both hold a bounded number of tensors in memory
(about the largest tensor times a small constant), whatever the model's size, and overlap reading with
writing.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from megascope.engine.checkpoint.format import CheckpointError, fsync_dir

T = TypeVar("T")

_QUEUE_DEPTH = 1
"""Produced tensors waiting for the consumer: with one, the producer works on the next tensor while the consumer
writes the previous one, and at most three tensors are alive (being produced, waiting, being written)."""


class Stopped(Exception):  # noqa: N818  # not an error: the caller asked for the stop
    """The work was stopped (its ``stop`` event set); nothing was published."""


def tmp_path(out: Path) -> Path:
    """Where ``out`` is built before the rename that publishes it (and the lock against a second writer)."""
    return out.with_name(out.name + ".tmp")


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out``, durably; never over an ``out`` that appeared meanwhile
    (rename(2) would silently replace an empty directory)."""
    fsync_dir(tmp)
    if out.exists():
        raise CheckpointError(f"{out} appeared while it was being written; the result is not published")
    os.rename(tmp, out)
    fsync_dir(out.parent)


def stream(
    names: list[str],
    produce: Callable[[str], T],
    consume: Callable[[str, T], None],
    stop: threading.Event | None = None,
    on_done: Callable[[str], None] | None = None,
) -> None:
    """``consume(name, produce(name))`` for every name in order, producing the next on a thread meanwhile.

    At most ``_QUEUE_DEPTH`` produced tensors wait between the two, so memory stays bounded; an error on
    either side stops both and is raised here; ``stop`` set stops both and raises Stopped.
    """
    stop = stop or threading.Event()
    halt = threading.Event()  # set when the consumer is done or failed: the producer must not block on a full queue
    handoff: queue.Queue[tuple[str, T] | BaseException | None] = queue.Queue(maxsize=_QUEUE_DEPTH)

    def put(item: tuple[str, T] | BaseException | None) -> bool:
        while not (halt.is_set() or stop.is_set()):
            try:
                handoff.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def producer() -> None:
        try:
            for name in names:
                if stop.is_set() or halt.is_set():
                    return
                if not put((name, produce(name))):
                    return
            put(None)
        except BaseException as error:  # handed to the consumer, which raises it
            put(error)

    thread = threading.Thread(target=producer, name="megascope-stream-read", daemon=True)
    thread.start()
    try:
        while True:
            if stop.is_set():
                raise Stopped()
            try:
                item = handoff.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            consume(*item)
            if on_done is not None:
                on_done(item[0])
    finally:
        halt.set()
        thread.join()
