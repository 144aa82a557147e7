"""An ordinary torchrun DDP script (gloo, a tiny model, random data) with megascope's two lines added.

    torchrun --nproc-per-node 4 api_script.py --steps 60 --slow-rank 3 --slow-seconds 0.05

The lines marked ``# megascope`` are all it takes; ``comm_hook`` is the optional third, which times DDP's
all-reduces (what tells a rank that computes slowly from the ranks waiting for it).
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import megascope.api as megascope  # megascope


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--slow-rank", type=int, default=-1, help="this rank sleeps --slow-seconds every step")
    parser.add_argument("--slow-seconds", type=float, default=0.0)
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    )
    megascope.comm_hook(model)  # megascope (optional)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        batch = torch.randn(16, 32, generator=generator)
        if rank == args.slow_rank:
            time.sleep(args.slow_seconds)  # a slow rank: the others wait for it in the all-reduce
        loss = torch.nn.functional.mse_loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        megascope.step(loss=loss, tokens=batch.numel())  # megascope
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
