"""``megascope train``: flags, their validation, and the launch. Importing this module stays cheap."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from megascope.engine.runtime.faults import inject_argument  # pure Python, no torch: the parser stays cheap

if TYPE_CHECKING:
    from megascope.engine.config import TrainConfig
    from megascope.engine.runtime.launch import LaunchOptions

HELP = "train a model with data parallelism (torch elastic: the same flags as torchrun scale to many nodes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--preset", default="tiny", help="model size: tiny, small, 125m, 350m, 1b (default: tiny)")
    model.add_argument("--norm", choices=["rmsnorm", "layernorm"], help="override the preset's normalisation")
    model.add_argument("--activation", choices=["swiglu", "gelu"], help="override the preset's MLP activation")
    model.add_argument("--max-seq-len", type=int, help="override the preset's longest document segment")

    data = parser.add_argument_group("data")
    data.add_argument("--data", help="a directory or text file (default: the Python standard library's source)")
    data.add_argument("--batch-tokens", type=int, default=2048, help="tokens per micro-batch per rank (default: 2048)")
    data.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (default: 0.02)")
    data.add_argument("--seed", type=int, default=0, help="seeds weights and data order (default: 0)")

    train = parser.add_argument_group("training")
    train.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step per rank (default: 1)")
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    train.add_argument("--warmup-steps", type=int, default=20, help="linear warmup steps (default: 20)")
    train.add_argument("--decay-steps", type=int, default=0, help="linear decay over the last N steps (default: 0)")
    train.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="the decay ends at this fraction of --lr (default: 0.1)"
    )
    train.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    train.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm; 0 disables (default: 1)")
    train.add_argument("--val-every", type=int, default=50, help="validation every N steps (default: 50)")
    train.add_argument("--val-batches", type=int, default=4, help="validation micro-batches per rank (default: 4)")
    train.add_argument("--log-every", type=int, default=1, help="console line every N steps (default: 1)")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    train.add_argument(
        "--collective-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="a collective stuck this long fails instead of hanging (default: 300; the agent's hang detection acts "
        "well before it)",
    )
    train.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table, or measured on CPU)")
    train.add_argument(
        "--kernels",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="fused Triton kernels or the PyTorch references (default: auto, Triton on CUDA and PyTorch on CPU)",
    )
    train.add_argument("--run-dir", help="config, telemetry and logs go here (default: runs/train-TIMESTAMP)")
    train.add_argument(
        "--inject",
        type=inject_argument,
        action="append",
        default=[],
        metavar="KIND:KEY=VALUE,...",
        help="inject a fault to test the diagnosis, e.g. slow:rank=2,factor=1.3 (rank 2 computes 1.3x longer); "
        "repeatable",
    )

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--ckpt-dir", help="save checkpoints here, and resume from the newest one found there")
    ckpt.add_argument("--ckpt-every", type=int, default=0, help="save every N steps (default: 0, only at the end)")
    ckpt.add_argument("--ckpt-keep", type=int, default=3, help="keep the newest N; 0 keeps all (default: 3)")
    ckpt.add_argument("--ckpt-keep-every", type=int, default=0, help="also keep every step divisible by N (default: 0)")
    ckpt.add_argument("--no-resume", action="store_true", help="start from scratch even if --ckpt-dir has checkpoints")
    ckpt.add_argument(
        "--allow-failed-saves",
        action="store_true",
        help="exit 0 even when every checkpoint save of the run failed (by default such a run exits 1)",
    )
    train.add_argument(
        "--no-self-check",
        action="store_true",
        help="skip the node self-check (matmul, memory, local all-reduce, disk; ~1 s) at each start of the ranks",
    )
    ckpt.add_argument(
        "--init-from",
        metavar="CKPT",
        help="PMA-init: model weights from this checkpoint (e.g. a `megascope merge` output) when --ckpt-dir has "
        "nothing to resume; step 0, this run's own schedule",
    )
    ckpt.add_argument(
        "--init-optimizer",
        choices=["fresh", "keep"],
        default="fresh",
        help="with --init-from: a fresh optimizer, or the one saved there (merge --keep-optimizer)",
    )

    launch = parser.add_argument_group("launch (as torchrun)")
    launch.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this node (default: 1)")
    launch.add_argument("--nnodes", default="1", help="N or MIN:MAX nodes (default: 1)")
    launch.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (needed for more than one node)")
    launch.add_argument("--rdzv-id", help="job id shared by all nodes (default: random)")
    launch.add_argument("--max-restarts", type=int, default=0, help="restarts after a rank fails (default: 0)")
    launch.add_argument(
        "--recovery",
        choices=["inplace", "restart"],
        help="after a rank fails: inplace replaces that rank and the others go on (state from a healthy rank, at most "
        "the step in flight redone), restart restarts every rank from the newest checkpoint; what cannot be recovered "
        "in place falls back to a restart (default: inplace for megascope's trainer on one node, else restart)",
    )


def build(args: argparse.Namespace) -> tuple[TrainConfig, LaunchOptions]:
    """The run's config and launch options from the flags; raises ConfigError/DataError naming a flag."""
    from megascope.engine.config import CheckpointConfig, ConfigError, OptimConfig, TrainConfig
    from megascope.engine.data import DataConfig, DataError, load_corpus, split_train_val
    from megascope.engine.model import PRESETS, preset
    from megascope.engine.runtime.faults import FaultError, check_ranks
    from megascope.engine.runtime.launch import LaunchOptions

    if args.preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise ConfigError(f"--max-seq-len must be at least 1, got {args.max_seq_len}")
    overrides = {
        name: value
        for name, value in (("norm", args.norm), ("activation", args.activation), ("max_seq_len", args.max_seq_len))
        if value is not None
    }
    config = TrainConfig(
        model=preset(args.preset, **overrides),
        data=DataConfig(path=args.data, batch_tokens=args.batch_tokens, val_fraction=args.val_fraction, seed=args.seed),
        optim=OptimConfig(
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            decay_steps=args.decay_steps,
            min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
        ),
        checkpoint=CheckpointConfig(
            dir=args.ckpt_dir,
            every=args.ckpt_every,
            keep_last=args.ckpt_keep,
            keep_every=args.ckpt_keep_every,
            resume=not args.no_resume,
            init_from=args.init_from,
            init_optimizer=args.init_optimizer,
        ),
        preset=args.preset,
        steps=args.steps,
        grad_accum=args.grad_accum,
        val_every=args.val_every,
        val_batches=args.val_batches,
        log_every=args.log_every,
        device=args.device,
        dist_timeout_seconds=args.collective_timeout,
        peak_tflops=args.peak_tflops,
        kernels=args.kernels,
        run_dir=args.run_dir or time.strftime("runs/train-%Y%m%d-%H%M%S"),
        faults=tuple(args.inject),
        self_check=not args.no_self_check,
    )
    options = LaunchOptions.from_args(args)
    if config.checkpoint.init_from:
        _check_init_from(config)
    if config.checkpoint.dir and config.checkpoint.resume:
        _check_resume(Path(config.checkpoint.dir))
    try:  # with --nnodes MIN:MAX the job may grow to MAX nodes
        check_ranks(config.faults, options.nproc_per_node * options.node_range()[1])
    except FaultError as error:
        raise ConfigError(f"--inject: {error}") from None
    # Read the data once here so a bad --data fails now, with a clear message, not in every rank.
    train_docs, _ = split_train_val(load_corpus(config.data.path), config.data.val_fraction)
    if train_docs.num_tokens < config.data.batch_tokens:
        raise DataError(
            f"--batch-tokens {config.data.batch_tokens} exceeds the training text ({train_docs.num_tokens} "
            "tokens); lower --batch-tokens or give more --data"
        )
    return config, options


def _check_resume(directory: Path) -> None:
    """Some committed checkpoint in ``directory`` opens (metadata, every file with its size and header), or there is
    none at all: otherwise the run would stop in every rank, so it stops here, in one line naming each. The ranks
    themselves skip any that does not verify (and check every block they read)."""
    from megascope.engine.checkpoint import CheckpointError, committed_steps, open_checkpoint
    from megascope.engine.checkpoint.format import step_dir_name
    from megascope.engine.config import ConfigError

    reasons = []
    for step in reversed(committed_steps(directory)):
        try:
            open_checkpoint(directory / step_dir_name(step))
            return
        except (CheckpointError, OSError) as error:
            reasons.append(f"{step_dir_name(step)}: {' '.join(str(error).split())}")
    if reasons:
        raise ConfigError(
            f"--ckpt-dir: no checkpoint in {directory} can be resumed from ({'; '.join(reasons)}); "
            "start over with --no-resume, or repair them"
        )


def _check_init_from(config: TrainConfig) -> None:
    """--init-from names a committed checkpoint of this run's model (and holds optimizer state if kept)."""
    from megascope.engine.checkpoint import CheckpointError, open_checkpoint
    from megascope.engine.config import ConfigError

    ckpt = config.checkpoint
    try:
        step_dir, metadata = open_checkpoint(ckpt.init_from or "")
    except CheckpointError as error:
        raise ConfigError(f"--init-from: {error}") from None
    saved = metadata.extra.get("config", {}).get("model")
    if isinstance(saved, dict):
        ours = config.model.to_dict()
        # The fields that decide which tensors exist and their shapes; others (max_seq_len, rope_theta) may change.
        shaped = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "norm", "activation",
                  "tie_embeddings")  # fmt: skip
        differ = [f"{k}={saved[k]!r} (this run: {ours[k]!r})" for k in shaped if k in saved and saved[k] != ours[k]]
        if differ:
            preset = metadata.extra["config"].get("preset", "?")
            raise ConfigError(
                f"--init-from {step_dir} holds a different model: {', '.join(differ)}; "
                f"train with that model's flags (it was trained with --preset {preset})"
            )
    if ckpt.init_optimizer == "keep" and not any(name.startswith("optim/") for name in metadata.tensors):
        raise ConfigError(
            f"--init-optimizer keep: {step_dir} holds no optimizer state (a merge keeps it only with "
            "--keep-optimizer); use --init-optimizer fresh"
        )


def run(args: argparse.Namespace) -> int:
    from megascope.engine.config import ConfigError
    from megascope.engine.data import DataError
    from megascope.engine.runtime.launch import LaunchFailed, launch

    try:
        config, options = build(args)
    except (ConfigError, DataError) as error:
        print(f"megascope train: error: {error}", file=sys.stderr)
        return 2
    print(f"megascope train: {config.preset} on {options.nproc_per_node} rank(s) per node, run dir {config.run_dir}")
    try:
        launch(config, options)
    except LaunchFailed as error:
        print(f"megascope train: failed: {error}", file=sys.stderr)
        return 1
    _print_summary(Path(config.run_dir))
    if config.checkpoint.dir and not _report_saves(Path(config.run_dir)) and not args.allow_failed_saves:
        return 1
    return 0


def _report_saves(run_dir: Path) -> bool:
    """Say which checkpoint saves failed (from the ranks' telemetry); False when saves were made and all failed."""
    import json

    from megascope.engine.runtime.run_dir import telemetry_files

    saved: set[int] = set()
    failed: dict[int, str] = {}
    for path in telemetry_files(run_dir):
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(record, dict) or record.get("type") != "event":
                continue
            step = int((record.get("checkpoint") or {}).get("step") or record.get("step") or 0)
            if record.get("kind") == "checkpoint":
                saved.add(step)
            elif record.get("kind") == "checkpoint_failed":
                failed.setdefault(step, str((record.get("checkpoint") or {}).get("error") or record.get("text")))
    failed = {step: error for step, error in failed.items() if step not in saved}  # a later attempt saved it
    if not failed:
        return True
    steps = ", ".join(map(str, sorted(failed)[:10])) + (", ..." if len(failed) > 10 else "")
    last = failed[max(failed)]
    if saved:
        print(f"megascope train: warning: {len(failed)} checkpoint save(s) failed (step {steps}): {last}",
              file=sys.stderr)  # fmt: skip
        return True
    print(f"megascope train: error: every checkpoint save failed (step {steps}); nothing of this run is saved: "
          f"{last} (--allow-failed-saves exits 0 anyway)", file=sys.stderr)  # fmt: skip
    return False


def _print_summary(run_dir: Path) -> None:
    from megascope.engine.runtime.run_dir import telemetry_dir
    from megascope.engine.summary import summarize

    s = summarize(run_dir)
    if not s["steps"]:
        return
    val = f", validation loss {s['last_val_loss']:.4f}" if s["last_val_loss"] is not None else ""
    first, last = s["first_step"], s["steps"]
    trained = f"{last - first + 1} step{'s' if last != first else ''} ({first}..{last})"
    print(
        f"megascope train: done: {trained} on {s['ranks']} rank(s), loss {s['first_loss']:.4f} -> "
        f"{s['last_loss']:.4f}{val}, {s['tokens_per_s']:,.0f} tokens/s (median); telemetry in {telemetry_dir(run_dir)}"
    )
