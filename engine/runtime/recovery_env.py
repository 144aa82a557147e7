"""The contract of in-place recovery between the launcher, the rank guard, the warm parent and the trainer.

In-place recovery (``--recovery inplace``) replaces a failed rank and keeps the others (engine/recovery.py):

- the launcher's process (torchrun's, engine/runtime/elastic.py) hosts the **recovery store**, a TCPStore on
  loopback that outlives every rank (rank 0's own store dies with rank 0), and names it in
  :data:`RECOVERY_STORE_ENV`, which every rank inherits. The variable being set is what turns recovery on;
- each rank's guard (engine/runtime/rank_guard.py) runs our trainer through a **warm parent**
  (engine/runtime/warm_parent.py): a process that imported torch and the trainer once and forks the rank; when the
  rank dies, the guard reports it and asks the warm parent for a replacement (same RANK, :data:`REPLACEMENT_ENV`
  set) instead of exiting, so torch elastic never sees the death and never restarts the others;
- the trainer's surviving ranks see their collective fail, the replacement announces itself by bumping the
  generation in the store, and all of them form the process group again under that generation's prefix, then take
  the state of the newest committed step from a rank that has it;
- a rank that cannot recover in place exits with :data:`RECOVERY_FAILED_EXIT`; its guard then exits too, and torch
  elastic restarts the whole job from the newest checkpoint (today's path, the fallback).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

RECOVERY_ENV = "MEGASCOPE_RECOVERY"
"""``inplace`` or ``restart``: what the launcher was asked for (``--recovery``); read by the launcher's process."""
RECOVERY_STORE_ENV = "MEGASCOPE_RECOVERY_STORE"
"""``HOST:PORT`` of the recovery store; set (by the launcher's process) only when recovery is in place."""
REPLACEMENT_ENV = "MEGASCOPE_REPLACEMENT"
"""Set in a replacement rank by its warm parent: how many times this rank has been replaced (1, 2, ...)."""
RECOVERY_FAILED_EXIT = 75
"""The exit code of a rank that could not recover in place: its guard exits with it, and the job restarts."""
STUCK_SURVIVOR_EXIT = 76
"""The exit code of a survivor that never saw its collective fail after a replacement announced itself (gloo, now and
then, leaves one blocked on a dead peer it stopped reading from): it leaves, and its guard replaces it like a dead
rank; the replacement joins the generation being formed instead of opening a new one (engine/recovery.py)."""

_EXIT_CAUSES = {
    RECOVERY_FAILED_EXIT: "could not recover in place; the job restarts",
    STUCK_SURVIVOR_EXIT: "left: never saw its collective fail after a peer was replaced; replaced in place",
}


def exit_cause(code: int) -> str:
    """What exit ``code`` of a rank recovering in place means (for its exit report), or "" for any other code."""
    return _EXIT_CAUSES.get(code, "")


INPLACE, RESTART = "inplace", "restart"
MODES = (INPLACE, RESTART)


def store_address(environ: Mapping[str, str] | None = None) -> tuple[str, int] | None:
    """The recovery store's host and port; None when recovery is not in place."""
    value = (os.environ if environ is None else environ).get(RECOVERY_STORE_ENV, "")
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def replacement_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times this rank was replaced; 0 in a rank of the job's start (or of a full restart)."""
    value = (os.environ if environ is None else environ).get(REPLACEMENT_ENV, "0")
    return int(value) if value.isdigit() else 0


def store_prefix(environ: Mapping[str, str] | None = None) -> str:
    """The keys of one torch elastic attempt: a full restart starts again from generation 0 under a new prefix."""
    attempt = (os.environ if environ is None else environ).get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"megascope/recovery/attempt{attempt}/"
