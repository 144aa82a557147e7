"""The resharding matrix with real process groups: saved by 1-4 ranks, loaded by 1-4 ranks, DDP <-> FSDP2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from support import checkpoint_workers

from megascope.dashboard.local_cluster import free_port

WORLDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("saved")
    for world in WORLDS:
        mp.spawn(checkpoint_workers.save_worker, args=(world, free_port(), str(root)), nprocs=world, join=True)
    return root


def test_every_layout_saved_by_1_to_4_ranks_exists(saved: Path) -> None:
    names = {p.name for p in saved.iterdir()}
    assert names == {f"{layout}_by_{w}" for layout in ("ddp", "dtensor", "model_ddp", "model_fsdp2") for w in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
def test_loads_into_world_of_every_size_and_layout_identically(saved: Path, tmp_path: Path, world: int) -> None:
    mp.spawn(
        checkpoint_workers.load_worker, args=(world, free_port(), str(saved), str(tmp_path)), nprocs=world, join=True
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert [p for r in results for p in r["problems"]] == []
