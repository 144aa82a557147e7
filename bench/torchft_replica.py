"""One torchft replica group of one rank, training the job bench/faults.py runs on its other sides (its ``torchft``
side starts four of these, a lighthouse and a supervisor).

    TORCHFT_LIGHTHOUSE=http://HOST:PORT python bench/torchft_replica.py CONFIG_JSON --replica R [--replicas 4]

The same job as ``megascope train`` with the same flags (CONFIG_JSON is the run config bench/faults.py writes for
its torchrun side): our Transformer, built from the same seed; replica R reads the micro-batches rank R would
(engine/data.py ``PackedBatches`` with rank R of ``--replicas``); AdamW with the trainer's parameter groups
(engine/trainer.py ``param_groups``), learning rate schedule (``OptimConfig.lr_at``) and gradient clipping; the same
``--inject`` faults, fired by engine/runtime/faults.py's ``FaultInjector`` with the replica id as the rank (so they
leave the marker files the benchmark times faults by). What torchft changes: each step starts with a quorum
(torchft's ``Manager``, gloo ``ProcessGroupGloo``, the lighthouse at ``TORCHFT_LIGHTHOUSE``), the gradients are
averaged over the replicas in it (torchft's ``DistributedDataParallel``), and the optimizer steps only if the step
commits (``OptimizerWrapper``: ``Manager.should_commit``); a replica that starts late or again takes the model and
optimizer from a peer (``state_dict`` / ``load_state_dict``, torchft's healing) and goes on from the peer's step.
Step S reads the batches of step S, so a step retried after a failed commit reads them again, and the batches of the
steps a replica missed are never trained on (torchft skips a failed replica's samples).

Not the trainer's: no checkpoints (torchft recovers from peers), no validation, no agent or telemetry stream. Each
step attempt appends one JSON line to ``run_dir/telemetry/replica{R}.jsonl``: ``step`` (the step attempted),
``wall_time`` (its end), ``step_seconds`` (quorum included), ``committed``, ``participants`` (replicas in the
quorum), ``tokens`` (the tokens this replica committed in it: its batch when committed, else 0), ``loss``, and
``start`` (how many times the supervisor had started this replica before: ``TORCHFT_BENCH_START``).

A fault whose step this replica skipped while healing (it jumps to the peers' step) fires at its next step start.
The replica exits 0 once the job has committed ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchft import DistributedDataParallel, Manager, ProcessGroupGloo
from torchft.optim import OptimizerWrapper

from megascope.engine.config import TrainConfig
from megascope.engine.data import PackedBatches, load_corpus, split_train_val
from megascope.engine.model import Transformer, cross_entropy
from megascope.engine.runtime.faults import FaultInjector
from megascope.engine.runtime.run_dir import telemetry_dir
from megascope.engine.trainer import param_groups

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
START_ENV = "TORCHFT_BENCH_START"
"""How many times the supervisor started this replica before (0: the first start), for the telemetry."""


def replica_telemetry_file(run_dir: str | Path, replica: int) -> Path:
    return telemetry_dir(run_dir) / f"replica{replica}.jsonl"


def train(config: TrainConfig, replica: int, replicas: int, lighthouse: str, start: int) -> None:
    torch.manual_seed(config.data.seed)  # every replica builds identical initial weights, as every rank does
    model = Transformer(config.model, kernels=config.kernels)
    inner = torch.optim.AdamW(
        param_groups(model, config.optim.weight_decay),
        lr=config.optim.lr,
        betas=(config.optim.beta1, config.optim.beta2),
    )
    train_docs, _ = split_train_val(load_corpus(config.data.path), config.data.val_fraction)
    batches = PackedBatches(
        train_docs, config.data.batch_tokens, config.model.max_seq_len, config.data.seed, replica, replicas
    )

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    def load_state_dict(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["optim"])

    # A replica group of one rank still needs its own store: the Manager publishes its address there.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    # The collectives' and quorum's timeout is the job's process group timeout (bench/faults.py --pg-timeout), as
    # on the torchrun side.
    timeout = timedelta(seconds=config.dist_timeout_seconds)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=1,
        # The quorum (and a heal) before the forward pass, so that the step, and with it the batch, is the healed
        # one; the async default overlaps the quorum with the forward pass instead.
        use_async_quorum=False,
        timeout=timeout,
        quorum_timeout=timeout,
        rank=0,
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=lighthouse,
        replica_id=f"replica{replica}",
    )
    ddp = DistributedDataParallel(manager, model)
    optimizer = OptimizerWrapper(manager, inner)
    faults = FaultInjector(config.faults, replica, config.run_dir)
    clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    out = replica_telemetry_file(config.run_dir, replica)
    out.parent.mkdir(parents=True, exist_ok=True)
    checked = 0
    """The last step whose faults were checked: a heal can jump over steps, whose faults then fire late."""
    try:
        with open(out, "a", buffering=1) as telemetry:
            while manager.current_step() < config.steps:
                began = time.perf_counter()
                upcoming = manager.current_step() + 1
                for step in range(checked + 1, upcoming + 1):  # before the step's first collective (the quorum)
                    faults.at_step(step)
                checked = max(checked, upcoming)
                optimizer.zero_grad()  # the quorum; a replica behind the others heals here
                step = manager.current_step() + 1
                lr = config.optim.lr_at(step, config.steps)
                for group in inner.param_groups:
                    group["lr"] = lr
                batch = batches.batch_at((step - 1) * replicas + replica)  # what rank `replica` reads at `step`
                loss = cross_entropy(ddp(batch.tokens, batch.cu_seqlens, batch.max_seqlen), batch.targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()  # steps the inner optimizer only if should_commit(), which then counts the step
                committed = manager.current_step() >= step
                record = {
                    "type": "step",
                    "replica": replica,
                    "start": start,
                    "step": step,
                    "wall_time": time.time(),
                    "step_seconds": time.perf_counter() - began,
                    "committed": committed,
                    "participants": manager.num_participants(),
                    "tokens": batch.tokens.numel() if committed else 0,
                    "loss": loss.item(),
                }
                telemetry.write(json.dumps(record) + "\n")
    finally:
        manager.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the run config (config.json) bench/faults.py wrote")
    parser.add_argument("--replica", type=int, required=True, help="this replica group's id, 0..replicas-1")
    parser.add_argument("--replicas", type=int, default=4, help="replica groups in the job (default: 4)")
    args = parser.parse_args(argv)
    if not 0 <= args.replica < args.replicas:
        parser.error(f"--replica must be in 0..{args.replicas - 1}, got {args.replica}")
    lighthouse = os.environ.get(LIGHTHOUSE_ENV)
    if not lighthouse:
        parser.error(f"{LIGHTHOUSE_ENV} is not set: give the lighthouse's address (http://HOST:PORT)")
    train(TrainConfig.load(args.config), args.replica, args.replicas, lighthouse, int(os.environ.get(START_ENV, "0")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
