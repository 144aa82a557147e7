"""An ordinary torchrun DDP training script that knows nothing of megascope (no import of it): what a user brings.

    torchrun --nproc-per-node 2 plain_ddp.py --steps 20 [--crash-rank R --crash-step S --crash-attempts 0,1]
                                                       [--hang-rank R --hang-step S [--hang-how spin]]

It trains a tiny linear model with gloo on the CPU and prints one line per step. The fault flags make it fail the way
real scripts do: rank R raises at step S in the restart attempts listed (TORCHELASTIC_RESTART_COUNT), or rank R stops
at step S of the first attempt forever (sleeping, or spinning on the CPU in one place as a busy wait does) while
the others wait for it in the step's all-reduce.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--crash-rank", type=int, default=-1)
    parser.add_argument("--crash-step", type=int, default=-1)
    parser.add_argument("--crash-attempts", default="0")
    parser.add_argument("--hang-rank", type=int, default=-1)
    parser.add_argument("--hang-step", type=int, default=-1)
    parser.add_argument("--hang-how", choices=["sleep", "spin"], default="sleep")
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, attempt = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    crash_attempts = {int(a) for a in args.crash_attempts.split(",") if a}
    for step in range(1, args.steps + 1):
        if rank == args.crash_rank and step == args.crash_step and attempt in crash_attempts:
            raise RuntimeError(f"rank {rank} failed at step {step} (attempt {attempt})")
        if rank == args.hang_rank and step == args.hang_step and attempt == 0:
            print(f"rank {rank} stops at step {step}", flush=True)
            while True:
                if args.hang_how == "sleep":
                    time.sleep(1.0)
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dist.all_reduce(loss.detach())
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)
        time.sleep(args.step_seconds)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
