"""MFU is measured against one peak for the whole job: ranks doing identical work show identical MFU."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp
from support.checkpoint_workers import finish

from megascope.dashboard.local_cluster import free_port
from megascope.engine.mfu import PeakFlops, job_peak

MEASURED = {0: PeakFlops(2.0e11, "measured: fp32 matmul"), 1: PeakFlops(0.9e11, "measured: fp32 matmul"), 2: None}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    peak = job_peak(MEASURED[rank])
    Path(out, f"rank{rank}.json").write_text(json.dumps(None if peak is None else [peak.flops_per_second, peak.source]))
    finish()


def test_every_rank_divides_by_the_best_peak_any_rank_found(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    peaks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert peaks == [[2.0e11, "measured: fp32 matmul, best of 2 ranks"]] * 3


def test_a_job_of_one_rank_keeps_its_own_peak() -> None:
    assert job_peak(MEASURED[1]) == MEASURED[1]
