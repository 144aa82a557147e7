"""A PyTorch Lightning script with megascope's callback: a 1-layer GPT-2 built from a config (no download) trained
on random token ids.

    python tests/support/scripts/lightning_script.py OUT_DIR [--steps N] [--grad-accum N]

Also imported by the in-process tests (:func:`train`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from megascope.api.lightning import MegascopeCallback

VOCAB = 64
SEQ = 16


class TinyGpt(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2))
        self.losses: list[float] = []
        """Each batch's loss as training_step returned it."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def loader(batches: int, batch: int = 4) -> torch.utils.data.DataLoader[Any]:
    ids = torch.randint(0, VOCAB, (batches * batch, SEQ), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row} for row in ids]
    return torch.utils.data.DataLoader(rows, batch_size=batch)  # type: ignore[arg-type]  # a list is a map-style data set


def train(output_dir: Path, steps: int, grad_accum: int = 1, **callback: Any) -> TinyGpt:
    torch.manual_seed(0)
    module = TinyGpt()
    trainer = pl.Trainer(
        max_steps=steps, accumulate_grad_batches=grad_accum, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(output_dir), callbacks=[MegascopeCallback(**callback)],
    )  # fmt: skip
    trainer.fit(module, loader(steps * grad_accum))
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args()
    train(args.output_dir, args.steps, args.grad_accum, grad_norm=True)


if __name__ == "__main__":
    main()
