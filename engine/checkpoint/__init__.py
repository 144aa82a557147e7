"""Asynchronous sharded checkpoints with load-time resharding (ByteCheckpoint-style); see format.py."""

from megascope.engine.checkpoint.checkpointer import Checkpointer, SaveFigures, remove_unfinished
from megascope.engine.checkpoint.format import CheckpointError, Metadata, committed_steps, read_metadata, resolve
from megascope.engine.checkpoint.loader import LoadStats, load, load_state, open_checkpoint, verify

__all__ = [
    "CheckpointError",
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
