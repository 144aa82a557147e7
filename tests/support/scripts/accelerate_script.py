"""An Accelerate training loop with megascope's StepReporter: a 1-layer GPT-2 built from a config (no download)
trained on random token ids.

    accelerate launch tests/support/scripts/accelerate_script.py [--steps N] [--grad-accum N]

Also imported by the in-process tests (:func:`train`).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

import megascope.api as megascope
from megascope.api.accelerate import StepReporter

VOCAB = 64
SEQ = 16


def train(steps: int, grad_accum: int = 1, batch: int = 4) -> dict[str, list[float]]:
    """Train for ``steps`` optimizer steps; each micro-batch's loss and each optimizer step's learning rate."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    ids = torch.randint(0, VOCAB, (steps * grad_accum * batch, SEQ), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row} for row in ids]
    loader: torch.utils.data.DataLoader[dict[str, torch.Tensor]] = torch.utils.data.DataLoader(
        rows,  # type: ignore[arg-type]  # a list is a map-style data set
        batch_size=batch,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    seen: dict[str, list[float]] = {"losses": [], "lrs": []}

    report = StepReporter(accelerator, optimizer)
    for item in megascope.batches(loader):
        with accelerator.accumulate(model):
            loss = model(input_ids=item["input_ids"], labels=item["input_ids"]).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                seen["lrs"].append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        report(loss, item)
        seen["losses"].append(float(loss.detach()))
    accelerator.end_training()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args()
    train(args.steps, args.grad_accum)


if __name__ == "__main__":
    main()
