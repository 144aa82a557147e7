"""Hostile inputs, tried against a real agent and real checkpoints (issue 17's probe), one module per area.

Each area module has ``run(workdir: Path) -> list[Case]``: it starts what it needs (on 127.0.0.1, port 0), tries
its cases, stops what it started, and says for each case whether megascope handled it (clear refusal or
error, nothing lost, still serving). ``python bench/probe.py`` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    area: str
    """"worker channel", "wire", "transport", "checkpoints", ..."""
    name: str
    handled: bool
    detail: str = ""
    """What happened: the status code and message, or why it was not handled."""
