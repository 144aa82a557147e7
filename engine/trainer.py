"""One training rank: DDP over torch.distributed, every phase of every step timed.

Run by the launcher as ``python -m megascope.engine.trainer CONFIG_JSON`` in each rank's process, with the
torch elastic environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...) already set.

A step is: wait for data, forward, backward, wait for gradient communication, optimizer. DDP all-reduces
gradient buckets while backward still runs; :class:`CollectiveTimer` marks when the last bucket launched,
which splits ``backward()`` into compute and the time blocked on communication. The phases are measured
back to back, so they add up to the step time; ``other_seconds`` holds what falls between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import gc
import hashlib
import json
import os
import signal
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from megascope.engine.checkpoint import Checkpointer, CheckpointError, committed_steps, load, remove_unfinished
from megascope.engine.checkpoint.format import step_dir_name
from megascope.engine.collectives import CollectiveTimer, DeviceComputeTimer
from megascope.engine.config import TrainConfig
from megascope.engine.data import PackedBatches, Prefetcher, load_corpus, split_train_val
from megascope.engine.mfu import PeakFlops, device_peak
from megascope.engine.model import Transformer, cross_entropy
from megascope.engine.runtime import selfcheck
from megascope.engine.runtime.agent_link import connect_from_environment
from megascope.engine.runtime.faults import CrashFault, HangFault, SlowFault, claim_firing, faults_for_rank, is_spent
from megascope.engine.runtime.launch import RESTART_FROM
from megascope.engine.runtime.telemetry import ConsoleSink, Event, JsonlSink, Sink, StepReport, Telemetry
from megascope.protos.megascope.v1 import worker_pb2

_FAILURE_TRACEBACK_LINES = 20


class _GcPauses:
    """Total time spent in garbage collection, from ``gc.callbacks`` (a host stall the step pays for)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._started

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def _pick_device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes in name order: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        self.node = os.environ.get("MEGASCOPE_NODE", socket.gethostname())
        self.device = _pick_device(config, self.local_rank)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=config.dist_timeout_seconds))
        # Checkpoint coordination gets its own gloo group, so a save's commit (on a background thread)
        # can never interleave with, or wait behind, the training group's gradient all-reduces.
        # Its timeout bounds how long a save waits for a rank that never writes its part (then it fails).
        self.ckpt_group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=120)) if config.checkpoint.dir else None
        )

        run_dir = Path(config.run_dir)
        self._stack_file = _install_stack_dumps(run_dir, self.rank)
        sinks: list[Sink] = [JsonlSink(run_dir / "telemetry" / f"rank{self.rank}.jsonl")]
        if self.rank == 0:
            sinks.append(ConsoleSink(every=config.log_every))
        self._requested_save_step: int | None = None
        self.collectives = CollectiveTimer()
        agent = connect_from_environment(
            self.rank, self.local_rank, self.world_size, self.node, self.restart_count, self._on_command,
            stack_file=str(self._stack_file), collectives_issued=lambda: self.collectives.issued,
        )  # fmt: skip
        if agent is not None:
            sinks.append(agent)
        self.telemetry = Telemetry(sinks)

        torch.manual_seed(config.data.seed)  # every rank builds identical initial weights
        self.model = Transformer(config.model, kernels=config.kernels).to(self.device)
        # No buffer sync at each forward: the buffers (RoPE tables, sparse layouts) are built identically on every
        # rank, and a broadcast at each forward is one more collective per step, one a hang diagnosis cannot count.
        self.ddp = DistributedDataParallel(
            self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None, forward_sync_buffers=False
        )
        self.ddp.register_comm_hook(None, self.collectives.hook)
        # CUDA events only on a GPU: a CPU run never touches CUDA.
        self.device_timer = DeviceComputeTimer() if self.device.type == "cuda" else None
        self.faults = faults_for_rank(config.faults, self.rank)
        self._compute_started = 0.0
        """perf_counter at which this step's compute would have begun had it run without a break (fault timing)."""
        for fault in self.faults:
            if isinstance(fault, SlowFault):
                # Sleep when backward compute is done, before the last bucket's all-reduce launches: the sleep
                # counts as this rank's compute and the other ranks wait for it inside the collective.
                self.collectives.before_last_launch = lambda f=fault: time.sleep(
                    f.extra_seconds(time.perf_counter() - self._compute_started)
                )
        self.optimizer = torch.optim.AdamW(
            self._param_groups(),
            lr=config.optim.lr,
            betas=(config.optim.beta1, config.optim.beta2),
            fused=self.device.type == "cuda",
        )
        self.autocast = self.device.type == "cuda"

        corpus = load_corpus(config.data.path)
        train_docs, val_docs = split_train_val(corpus, config.data.val_fraction)
        seq = config.model.max_seq_len
        batch = config.data.batch_tokens
        self.train_batches = PackedBatches(train_docs, batch, seq, config.data.seed, self.rank, self.world_size)
        self.val_batches = (
            PackedBatches(val_docs, batch, seq, config.data.seed, self.rank, self.world_size, shuffle=False)
            if len(val_docs) and val_docs.num_tokens >= batch
            else None
        )
        self.peak: PeakFlops | None = device_peak(self.device, self.autocast, config.peak_tflops)
        self.step = 0
        self.checkpointer: Checkpointer | None = None
        self.resumed_from: int | None = None
        if config.checkpoint.dir:
            self._set_up_checkpoints(Path(config.checkpoint.dir))
        elif config.checkpoint.init_from:
            self._init_from(Path(config.checkpoint.init_from))

    def _on_command(self, command: worker_pb2.Command) -> None:
        # Runs on the agent sink's thread: only record the request; the training loop acts on it between
        # steps, at the step the agent chose, so that every rank saves the same step.
        if command.kind == worker_pb2.COMMAND_KIND_CHECKPOINT:
            self._requested_save_step = int(command.arguments.get("step", "0"))

    def _set_up_checkpoints(self, directory: Path) -> None:
        ckpt = self.config.checkpoint
        if ckpt.resume and committed_steps(directory):
            self._resume(self._resume_source(directory))
        elif ckpt.init_from:  # a restart of this run resumes its own checkpoints instead (the branch above)
            self._init_from(Path(ckpt.init_from))
        if self.rank == 0:
            for path in remove_unfinished(directory):
                self._event("checkpoint_cleanup", f"removed the unfinished save {path.name}")
        self.checkpointer = Checkpointer(
            directory, self.rank, self.world_size, self.ckpt_group, layout="ddp", keep_last=ckpt.keep_last,
            keep_every=ckpt.keep_every, on_event=lambda kind, text, attributes: self._event(kind, text, **attributes),
        )  # fmt: skip

    def _resume_source(self, directory: Path) -> Path:
        """The newest checkpoint, unless a restart asked for an earlier one (``RESTART_FROM`` in the run dir).

        Every rank reads its own node's request and the ranks agree on one step (a collective every rank makes,
        so a node whose agent got no request follows the others); then the request is removed, for one restart.
        """
        request = Path(self.config.run_dir) / RESTART_FROM
        asked = int(json.loads(request.read_text())["step"]) if request.is_file() else 0
        agreed = torch.tensor([asked], dtype=torch.int64, device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        step = int(agreed.item())
        request.unlink(missing_ok=True)  # every rank has read it: the all-reduce waited for all
        if not step:
            return directory
        if step not in committed_steps(directory):
            self._event("restart_from_missing", f"no committed checkpoint at step {step}; resuming the newest")
            return directory
        return directory / step_dir_name(step)

    def _checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Model and optimizer tensors by stable names (parameter names, not optimizer indices)."""
        state = {f"model/{name}": tensor for name, tensor in self.model.state_dict().items()}
        for name, param in self.model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                state[f"optim/{name}/{key}"] = value
        return state

    def _ensure_optimizer_state(self) -> None:
        # AdamW creates its state lazily at the first step; a resume fills it in before that step.
        fused = self.device.type == "cuda"
        for param in self.model.parameters():
            if not self.optimizer.state.get(param):
                self.optimizer.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu"),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }

    def _resume(self, directory: Path) -> None:
        self._ensure_optimizer_state()
        targets = self._checkpoint_state()
        rng = torch.get_rng_state()
        targets_local = {f"rng/rank{self.rank}/cpu": rng}
        started = time.perf_counter()
        metadata, stats = load(directory, targets)
        # A rank that did not exist in the saving job keeps its own seed-derived RNG state.
        load(directory, targets_local, strict=False)
        torch.set_rng_state(rng)
        self.train_batches.load_state_dict(metadata.extra["data"])
        self.step = self.resumed_from = int(metadata.extra["step"])
        seconds = time.perf_counter() - started
        self._event(
            "resumed",
            f"resumed from step {self.step} ({directory}): read {stats.bytes_read / 1e6:.1f} MB in {seconds:.2f}s",
            path=str(directory),
            load_seconds=f"{seconds:.6f}",
            bytes_read=str(stats.bytes_read),
        )

    def _init_from(self, path: Path) -> None:
        """PMA-init: this run's model weights from the checkpoint at ``path`` (a merge's output, say).

        Only the weights (and, with --init-optimizer keep, the optimizer state saved there); the step count,
        learning-rate schedule, data order and RNG stay this run's own, starting at step 0. Every rank reads
        the same file, so the replicas start identical.
        """
        started = time.perf_counter()
        metadata, stats = load(path, {f"model/{name}": t for name, t in self.model.state_dict().items()})
        optimizer = "fresh optimizer"
        if self.config.checkpoint.init_optimizer == "keep":
            if not any(name.startswith("optim/") for name in metadata.tensors):
                raise CheckpointError(f"--init-optimizer keep: {path} holds no optimizer state; use fresh")
            self._ensure_optimizer_state()
            optim = {k: v for k, v in self._checkpoint_state().items() if k.startswith("optim/")}
            _, more = load(path, optim)
            stats.bytes_read += more.bytes_read
            optimizer = "optimizer state from the checkpoint"
        merge = metadata.extra.get("merge")
        what = f"step {metadata.step}"
        if isinstance(merge, dict):
            what = f"{merge['method']} merge of steps {merge['steps']}"
        self._event(
            "initialized",
            f"model weights from {path} ({what}), {optimizer}: read {stats.bytes_read / 1e6:.1f} MB "
            f"in {time.perf_counter() - started:.2f}s",
            path=str(path),
        )

    def _save_checkpoint(self, prefetch: Prefetcher) -> None:
        assert self.checkpointer is not None
        self.checkpointer.save(
            self.step,
            self._checkpoint_state(),
            extra={"step": self.step, "data": prefetch.position, "world_size": self.world_size,
                   "config": json.loads(self.config.to_json())},
            local={f"rng/rank{self.rank}/cpu": torch.get_rng_state()},
        )  # fmt: skip

    def _param_groups(self) -> list[dict[str, object]]:
        # No weight decay on norms' gains (1-D): decaying them towards 0 only fights the normalisation.
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": self.config.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def _sync(self) -> None:
        # Host timers only mean something once the GPU has caught up.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _event(self, kind: str, text: str, **attributes: str) -> None:
        self.telemetry.event(
            Event(kind=kind, text=text, rank=self.rank, step=self.step, attributes=attributes, node=self.node)
        )

    def train(self) -> None:
        config = self.config
        params = config.model.num_params()
        peak = f"{self.peak.flops_per_second / 1e12:.2f} TFLOPS ({self.peak.source})" if self.peak else "unknown"
        self._event(
            "started",
            f"rank {self.rank}/{self.world_size} on {self.device}, {params / 1e6:.2f}M params, "
            f"preset {config.preset}, {config.steps} steps, peak {peak}",
            device=str(self.device),
            params=str(params),
            param_digest=parameter_digest(self.model),
        )
        if self.val_batches is None and config.val_batches:
            self._event(
                "no_validation",
                "no validation loss: the held-out documents are fewer than one "
                "micro-batch; raise --val-fraction or give more --data",
            )
        if config.self_check:
            self._self_check()
        for fault in self.faults:
            if isinstance(fault, CrashFault | HangFault) and is_spent(fault, self.config.run_dir):
                continue  # fired before a restart: it will not fire again, so it is not announced again
            self.telemetry.event(
                Event(kind="fault_injected", text=f"--inject {fault.describe()} on this rank", severity="warning",
                      rank=self.rank, step=self.step, node=self.node, attributes={"fault": fault.describe()})
            )  # fmt: skip
        gc_pauses = _GcPauses()
        prefetch = Prefetcher(self.train_batches, self.device)
        try:
            while self.step < config.steps:
                self.step += 1
                self._fire_faults()
                report = self._train_step(prefetch, gc_pauses)
                every = config.checkpoint.every
                scheduled = self.step == config.steps or bool(every and self.step % every == 0)
                requested = self._requested_save_step
                if requested is not None and self.step >= requested:
                    self._requested_save_step = None
                    if self.checkpointer is None:
                        self._event("checkpoint_refused", "a checkpoint was requested, but this run has no --ckpt-dir")
                    elif self.step > requested:
                        self._event("checkpoint_refused", f"the request to save step {requested} came too late")
                    else:
                        scheduled = True
                if self.checkpointer and scheduled:
                    self._save_checkpoint(prefetch)
                if (config.val_every and self.step % config.val_every == 0) or self.step == config.steps:
                    report.val_loss = self.validate()
                self.telemetry.step(report)
        finally:
            prefetch.close()
            gc_pauses.close()
            if self.checkpointer is not None:
                self.checkpointer.close()
        self._event(
            "finished",
            f"trained {self.step} steps",
            param_digest=parameter_digest(self.model),
            telemetry_dropped=str(self.telemetry.dropped),
        )

    def _self_check(self) -> None:
        slow = next((f for f in self.faults if isinstance(f, SlowFault)), None)
        disk = Path(self.config.checkpoint.dir or self.config.run_dir)
        verdict = selfcheck.run(self.node, self.device, disk, slow)
        if self.local_rank != 0:
            return
        node = verdict.node
        text = (
            f"node {self.node}: matmul {node.matmul_gflops:.1f} GFLOPS, memory {node.memory_gbps:.1f} GB/s, "
            f"local all-reduce {node.allreduce_gbps:.2f} GB/s, disk {node.disk_mbps:.0f} MB/s "
            f"({verdict.seconds:.1f}s)"
        )
        if verdict.below:
            text += f"; SLOW: {', '.join(verdict.below)} below {selfcheck.SLOW_RATIO:.0%} of the other nodes' median"
            text += "" if verdict.slow else " (another node is further below; one node leaves per start)"
        self.telemetry.event(
            Event(kind="self_check", text=text, severity="warning" if verdict.below else "info", rank=self.rank,
                  step=self.step, node=self.node, attributes=selfcheck.describe(verdict))
        )  # fmt: skip

    def _fire_faults(self) -> None:
        """Injected crashes and hangs, at the start of the step they name (before its first collective)."""
        for fault in self.faults:
            if not isinstance(fault, CrashFault | HangFault) or fault.step != self.step:
                continue
            if not claim_firing(fault, self.config.run_dir):
                continue
            # The event may not get out before the process dies: the agent learns of a crash on its own.
            print(f"megascope: rank {self.rank}: injecting {fault.describe()} at step {self.step}", flush=True)
            if isinstance(fault, HangFault):
                if fault.how == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                while True:  # an endless loop: the process lives, answers signals, and never issues a collective
                    time.sleep(0.05)
            elif fault.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif fault.how == "segv":
                ctypes.string_at(0)  # a read of address 0: a real SIGSEGV, as a bad native extension would cause
            elif fault.how == "exit":
                sys.stdout.flush()
                os._exit(1)
            else:
                raise RuntimeError(f"injected fault {fault.describe()} at step {self.step}")

    def _train_step(self, prefetch: Prefetcher, gc_pauses: _GcPauses) -> StepReport:
        config = self.config
        lr = config.optim.lr_at(self.step, config.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        gc_before = gc_pauses.total
        self.collectives.begin_step()

        cpu_start = time.process_time()
        step_start = time.perf_counter()
        data_wait = forward = backward = comm_wait = 0.0
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        flops = 0.0
        compute_end = step_start
        for micro in range(config.grad_accum):
            t0 = time.perf_counter()
            batch = prefetch.next()
            t1 = time.perf_counter()
            self._compute_started = t1 - (forward + backward)
            if self.device_timer is not None:
                self.device_timer.start()
            last = micro == config.grad_accum - 1
            # Gradients are all-reduced only on the last micro-batch; the others accumulate locally.
            sync = contextlib.nullcontext() if last else self.ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = self.ddp(batch.tokens, batch.cu_seqlens, batch.max_seqlen)
                    loss = cross_entropy(logits, batch.targets) / config.grad_accum
                self._sync()
                t2 = time.perf_counter()
                loss.backward()
                self._sync()
                t3 = time.perf_counter()
            if self.device_timer is not None:
                self.device_timer.stop(self.collectives.last_ready_event() if last else None)
            launched = self.collectives.last_launch() if last else None
            compute_end = launched if launched is not None and t2 <= launched <= t3 else t3
            data_wait += t1 - t0
            forward += t2 - t1
            backward += compute_end - t2
            comm_wait += t3 - compute_end
            loss_sum += loss.detach()
            tokens += batch.tokens.numel()
            flops += config.model.flops_per_step(batch.segment_lengths)

        t4 = time.perf_counter()
        clip = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.checkpointer is not None:
            self.checkpointer.before_optimizer_step()  # a save's staging must finish before weights change
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss_sum.item()  # also waits for the device
        grad_norm_value = grad_norm.item()
        t5 = time.perf_counter()

        step_seconds = t5 - step_start
        optimizer = t5 - t4
        named = data_wait + forward + backward + comm_wait + optimizer
        return StepReport(
            rank=self.rank,
            local_rank=self.local_rank,
            world_size=self.world_size,
            step=self.step,
            loss=loss_value,
            lr=lr,
            grad_norm=grad_norm_value,
            tokens=tokens,
            step_seconds=step_seconds,
            data_wait_seconds=data_wait,
            forward_seconds=forward,
            backward_seconds=backward,
            comm_wait_seconds=comm_wait,
            optimizer_seconds=optimizer,
            other_seconds=max(0.0, step_seconds - named),
            tokens_per_second=tokens / step_seconds,
            model_flops=flops,
            mfu=flops / step_seconds / self.peak.flops_per_second if self.peak else None,
            gc_pause_seconds=gc_pauses.total - gc_before,
            cpu_seconds=time.process_time() - cpu_start,
            # Read after loss.item() above, which waited for the device: the events are complete, no extra sync.
            device_compute_seconds=self.device_timer.seconds() if self.device_timer is not None else None,
            collectives=self.collectives.timings(step_start, compute_end),
            collectives_issued=self.collectives.issued,
            restart_count=self.restart_count,
            node=self.node,
        )

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean validation loss over every rank's validation batches (the same batches each time)."""
        if self.val_batches is None or self.config.val_batches == 0:
            return None
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        for i in range(self.config.val_batches):
            batch = self.val_batches.batch_at(i * self.world_size + self.rank).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(batch.tokens, batch.cu_seqlens, batch.max_seqlen)
            total[0] += cross_entropy(logits, batch.targets)
            total[1] += 1
        self.model.train()
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def report_failure(self, error: Exception) -> None:
        """The rank's last words, sent before it exits: the agent names the crash without waiting for the exit."""
        lines = traceback.format_exc().rstrip().splitlines()[-_FAILURE_TRACEBACK_LINES:]
        self.telemetry.event(
            Event(kind="rank_failed", text=f"{type(error).__name__}: {error}"[:500], severity="error", rank=self.rank,
                  step=self.step, node=self.node, attributes={"traceback": "\n".join(lines)})
        )  # fmt: skip

    def close(self) -> None:
        self.telemetry.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _install_stack_dumps(run_dir: Path, rank: int) -> Path:
    """SIGUSR1 appends every thread's Python stack to ``run_dir/stacks/rankR.txt``; fatal signals to stderr.

    faulthandler writes from the signal handler itself, in C: it answers even when the main thread is blocked
    inside a collective and never returns to the interpreter, which a Python-level handler would not.
    """
    directory = run_dir / "stacks"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank{rank}.txt"
    stacks = path.open("a")  # kept open for the life of the process: the handler writes to its descriptor
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True, chain=False)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    return path.resolve()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megascope.engine.trainer CONFIG_JSON", file=sys.stderr)
        return 2
    trainer = Trainer(TrainConfig.load(args[0]))
    try:
        trainer.train()
    except Exception as error:
        trainer.report_failure(error)
        raise
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
