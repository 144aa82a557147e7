"""A Hugging Face ``Trainer`` script with megascope's callback: a 1-layer GPT-2 built from a config (no download)
trained on random token ids (no tokenizer, no data set to fetch).

    megascope agent --port 0 --nproc-per-node 1 -- tests/support/scripts/hf_script.py OUT_DIR [--steps N]
        [--logging-steps N] [--grad-accum N]

Also imported by the in-process tests (:func:`train`). Prints ``HF_LOG <json>`` for each of the Trainer's own
log lines, so a test can hold megascope's per-step loss against the Trainer's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from megascope.api.huggingface import MegascopeCallback

VOCAB = 64
SEQ = 16


class RandomTokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, size: int, seed: int = 0) -> None:
        self.ids = torch.randint(0, VOCAB, (size, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class KeepLogs(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            record = {"step": state.global_step, **logs}
            self.logs.append(record)
            print("HF_LOG " + json.dumps(record), flush=True)


def trainer(
    output_dir: Path,
    steps: int,
    logging_steps: int = 1,
    grad_accum: int = 1,
    batch: int = 4,
    eval_dataset: RandomTokens | None = None,
    **extra: Any,
) -> tuple[Trainer, KeepLogs]:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=1, n_head=2)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=grad_accum, logging_steps=logging_steps, learning_rate=1e-3,
        lr_scheduler_type="linear", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, **{"save_strategy": "no", **extra},
    )  # fmt: skip
    logs = KeepLogs()
    model = GPT2LMHeadModel(config)
    data = RandomTokens(steps * batch * grad_accum)
    callbacks = [MegascopeCallback(), logs]
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=eval_dataset, callbacks=callbacks), logs


def train(
    output_dir: Path, steps: int, logging_steps: int = 1, grad_accum: int = 1, **extra: Any
) -> list[dict[str, Any]]:
    """Train for ``steps`` optimizer steps; the Trainer's own log records."""
    hf, logs = trainer(output_dir, steps, logging_steps, grad_accum, **extra)
    hf.train()
    return logs.logs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    args = parser.parse_args()
    train(args.output_dir, args.steps, args.logging_steps, args.grad_accum)


if __name__ == "__main__":
    main()
