"""A rank for the tests of the warm parent and of in-place replacement (engine/runtime/warm_parent.py): any module
with ``main(argv)`` (and optionally ``preload(argv)``) runs there, this one without torch unless asked.

``python -m support.scripts.warm_rank DIRECTORY MODE [VALUE] [--torch]``: each start writes
``DIRECTORY/rank{RANK}-{pid}.json`` (its pid, replacement count, restart count, whether it was preloaded, its
recovery store's answer), then, by MODE: ``exit CODE`` exits with CODE, ``raise`` raises, ``wait`` waits until
``DIRECTORY/stop`` exists and exits 0. ``--torch``: import torch in ``preload`` and, when the recovery store is
named, add 1 to a key there as a client; ``--thread``: start a thread in ``preload``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from megascope.engine.runtime import recovery_env

preloaded_by: int | None = None
"""The pid of the process that ran ``preload``: the warm parent, when this rank was forked from it."""


def preload(argv: list[str]) -> None:
    global preloaded_by
    preloaded_by = os.getpid()
    if "--torch" in argv:
        import torch.distributed  # noqa: F401 (what a real rank preloads)
    if "--thread" in argv:  # what preload must not do: the warm parent then starts its ranks fresh
        threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()


def _store_count() -> int | None:
    address = recovery_env.store_address()
    if address is None:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(address[0], address[1], is_master=False, timeout=timedelta(seconds=30))
    return int(store.add("test/starts", 1))


def main(argv: list[str]) -> int:
    directory, mode = Path(argv[0]), argv[1]
    record = {
        "pid": os.getpid(),
        "rank": int(os.environ.get("RANK", 0)),
        "replacement": recovery_env.replacement_count(),
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        "preloaded_by": preloaded_by,
        "started": time.monotonic(),
        "store": os.environ.get(recovery_env.RECOVERY_STORE_ENV),
        "store_count": _store_count() if "--torch" in argv else None,
    }
    path = directory / f"rank{record['rank']}-{record['pid']}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").rename(path)  # whole or absent: the test polls for it
    print(f"rank {record['rank']} pid {record['pid']} replacement {record['replacement']} started", flush=True)
    if mode == "exit":
        print(f"exiting with {argv[2]}", file=sys.stderr, flush=True)
        return int(argv[2])
    if mode == "raise":
        raise RuntimeError("the rank failed on purpose")
    while not (directory / "stop").exists():
        time.sleep(0.05)
    return 0
