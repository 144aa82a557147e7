"""Asynchronous sharded checkpoints with load-time resharding (ByteCheckpoint-style); see format.py.

The names below are imported on first use: `megascope` builds every subcommand's parser at start, and the
checkpointer pulls in torch.distributed and DTensor (over a second on a small machine), which a command that
only reads checkpoints (`ckpt ls`, `merge`) never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megascope.engine.checkpoint.checkpointer import Checkpointer, SaveFigures, remove_unfinished
    from megascope.engine.checkpoint.format import (
        CheckpointError,
        Metadata,
        committed_steps,
        open_checkpoint,
        read_metadata,
        resolve,
    )
    from megascope.engine.checkpoint.loader import LoadStats, load, load_state, verify
    from megascope.engine.checkpoint.manager import CheckpointManager

_WHERE = {
    "Checkpointer": "checkpointer",
    "CheckpointManager": "manager",
    "SaveFigures": "checkpointer",
    "remove_unfinished": "checkpointer",
    "CheckpointError": "format",
    "Metadata": "format",
    "committed_steps": "format",
    "read_metadata": "format",
    "resolve": "format",
    "LoadStats": "loader",
    "load": "loader",
    "load_state": "loader",
    "open_checkpoint": "format",
    "verify": "loader",
}

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Checkpointer",
    "LoadStats",
    "Metadata",
    "SaveFigures",
    "committed_steps",
    "load",
    "load_state",
    "open_checkpoint",
    "read_metadata",
    "remove_unfinished",
    "resolve",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value
