"""ByteCheckpoint (the `bytecheckpoint` package) made to run offline for bench/checkpoint.py.

Not a project dependency: install it with ``BYTECHECKPOINT_INSTALL``. Its pins (torch <= 2.5) would replace
our CPU torch with a multi-GB CUDA build, hence ``--no-deps``; 0.0.2 works on torch 2.13 on CPU with gloo.

Its coordinator (a gRPC server that rank 0 starts in a spawned process) learns the host address by
"connecting" a UDP socket to 8.8.8.8. We never let it reach for a public address: ``patch_loopback`` makes
both lookups answer 127.0.0.1, in this process and, through ``_serve_on_loopback``, inside the spawned
server process too (a spawned process imports the package afresh, so patching here alone would not reach
it). This module is imported by name in that process, so it must stay importable without side effects.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from multiprocessing.connection import Connection

BYTECHECKPOINT_INSTALL = "pip install --no-deps bytecheckpoint==0.0.2"
LOOPBACK = "127.0.0.1"


def bytecheckpoint_missing() -> str | None:
    """Why ByteCheckpoint cannot run here (with the install command), or None when it can."""
    if importlib.util.find_spec("bytecheckpoint") is None:
        return f"bytecheckpoint is not installed; install it with: {BYTECHECKPOINT_INSTALL}"
    return None


def _loopback() -> str:
    return LOOPBACK


def _patch_lookups() -> None:
    from bytecheckpoint.utilities.server import server_lib

    server_lib.get_host_ip = _loopback
    server_lib._get_local_ip = _loopback


def _serve_on_loopback(world_size: int, conn: Connection) -> None:
    """The coordinator process's entry point: patch the lookups there, then run the package's own loop."""
    _patch_lookups()
    from bytecheckpoint.utilities.server import server_lib

    server_lib._serve_in_loop(world_size, conn)


def _start_server_on_loopback(world_size: int) -> str:
    # Same as server_lib.start_server_in_new_process, with our entry point in place of _serve_in_loop.
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_serve_on_loopback, args=(world_size, child), daemon=True
    )
    process.start()
    address: str = parent.recv()
    if not address.startswith(LOOPBACK + ":"):
        raise RuntimeError(f"ByteCheckpoint's coordinator answered {address!r}, not a loopback address")
    return address


def patch_loopback() -> None:
    """Point every ByteCheckpoint host-address lookup at 127.0.0.1; call before its first save or load."""
    _patch_lookups()
    from bytecheckpoint.utilities.server import server_lib

    server_lib.start_server_in_new_process = _start_server_on_loopback
