"""One training rank: DDP over torch.distributed, every phase of every step timed.

Run by the launcher as ``python -m megascope.engine.trainer CONFIG_JSON`` in each rank's process, with the
torch elastic environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, ...) already set.

A step is: wait for data, forward, backward, wait for gradient communication, optimizer. DDP all-reduces
gradient buckets while backward still runs; :class:`CollectiveTimer` marks when the last bucket launched,
which splits ``backward()`` into compute and the time blocked on communication. The phases are measured
back to back, so they add up to the step time; ``other_seconds`` holds what falls between them.

With in-place recovery on (the launcher names the recovery store, engine/runtime/recovery_env.py), a step whose
collectives fail because a peer died does not end the rank: the trainer forms the process group again with the
dead rank's replacement and takes the newest step's state from a rank that has it (engine/recovery.py), then
goes on; the replacement itself (``MEGASCOPE_REPLACEMENT`` set) starts by joining that group instead of the
env:// rendezvous, and loads no checkpoint. A rank that cannot recover exits with ``RECOVERY_FAILED_EXIT``.

Around the steps the trainer decides nothing itself: the :class:`CheckpointManager` owns resume, init-from and
every save, the :class:`FaultInjector` every ``--inject`` fault. Between steps the loop applies the agent's
commands (CHECKPOINT: a save at the step named; STOP: end after the step named, as if it were the last) and
answers each with a ``CommandAck``. Telemetry is the wire's own messages; a clean end sends ``RankFinished``, an
exception caught in :func:`main` an ``ExitReport`` (its traceback), the self-check a ``SelfCheckResult``.

All of it goes through the public API a user's own loop uses (:mod:`megascope.api`, one path): its run owns the
agent link, the telemetry file and console log, the stack dump on SIGUSR1 and the lifecycle signals; the trainer
builds richer step reports than ``megascope.step()`` can (collectives, MFU, validation) and hands them to
``Run.report``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from google.protobuf.message import Message
from torch.nn.parallel import DistributedDataParallel

import megascope.api as megascope_api
from megascope.engine.checkpoint.format import CheckpointError
from megascope.engine.checkpoint.manager import CheckpointManager
from megascope.engine.collectives import DeviceComputeTimer
from megascope.engine.config import TrainConfig
from megascope.engine.data import Batch, Corpus, PackedBatches, Prefetcher, load_corpus, split_train_val
from megascope.engine.mfu import PeakFlops, device_peak, job_peak
from megascope.engine.model import Transformer, cross_entropy
from megascope.engine.recovery import (
    STUCK_MIN_SECONDS,
    STUCK_STEPS,
    Agreement,
    Recovery,
    RecoveryFailed,
    Standing,
    StuckWatch,
    broadcast_objects,
    broadcast_tensors,
    exchange,
    fork_wall_time,
    is_peer_failure,
    shut_down,
)
from megascope.engine.recovery import enabled as recovery_enabled
from megascope.engine.runtime import bound_stores, recovery_env, selfcheck
from megascope.engine.runtime.faults import FaultInjector
from megascope.engine.runtime.telemetry import StepReport, Telemetry
from megascope.protos.events import INFO, WARNING, make_event
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2


def _pick_device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was given but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


_PRELOADED: dict[str | None, Corpus] = {}
"""Corpora read by :func:`preload` in the warm parent, by ``--data`` path: a forked rank finds them here."""


def preload(argv: list[str]) -> None:
    """Do before the fork what every rank would do at its start: read the corpus, and make the imports torch leaves
    for later (the modules of this one are imported already).

    Called by the warm parent (engine/runtime/warm_parent.py) once, before it forks ranks: no thread may start and
    no torch parallel op may run here (a fork copies one thread only). A bad argument is left for ``main`` to say.
    """
    # Building the first optimizer imports torch._dynamo and its dependencies (~900 modules, 0.7 s or more): a
    # replacement rank would pay for it while the other ranks wait. One parameter of one element: no parallel op.
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    if len(argv) != 1:
        return
    try:
        path = json.loads(Path(argv[0]).read_text())["data"].get("path")
        _PRELOADED[path] = load_corpus(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # main() reads the config again and says what is wrong with it


def _corpus(path: str | None) -> Corpus:
    corpus = _PRELOADED.get(path)
    return corpus if corpus is not None else load_corpus(path)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes in name order: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: no weight decay on the norms' gains (1-D), since decaying them towards 0 only fights
    the normalisation."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


_PRIME_TOKENS = 16
"""Tokens of the forward and backward that lay a re-formed DDP's buckets out (Trainer._prime_ddp)."""


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
        timeout = timedelta(seconds=config.dist_timeout_seconds)
        self.replacement = recovery_env.replacement_count() > 0
        """This rank replaces a dead one: it joins the others' next process group and takes their state."""
        self.recovery = Recovery(backend, self.rank, self.world_size, timeout) if recovery_enabled() else None
        if self.replacement and self.recovery is None:
            raise RecoveryFailed(
                f"{recovery_env.REPLACEMENT_ENV} is set but {recovery_env.RECOVERY_STORE_ENV} is not: "
                "a replacement rank joins through the recovery store"
            )
        self.ckpt_group: dist.ProcessGroup | None = None
        if not self.replacement:  # a replacement skips env://: rank 0's store may have died with rank 0
            bound_stores.bind_from_env()  # a one-node job: rank 0's store on loopback only, not on every interface
            dist.init_process_group(backend, timeout=timeout)
            self.ckpt_group = self._new_ckpt_group()

        # The public API's run, as a user's own loop gets it (one path): the telemetry file and console log, the
        # agent link, the stack dump on SIGUSR1, the failure report. This loop applies the agent's commands itself.
        self.run = megascope_api.init(
            run_dir=config.run_dir, console_every=config.log_every if self.rank == 0 else 0, handle_commands=True
        )
        if self.run.telemetry is None:  # a run directory always makes the run active; this is init() having failed
            raise RuntimeError(f"megascope.api could not start in {config.run_dir} (see the warning above)")
        self.telemetry: Telemetry = self.run.telemetry
        self._stop_after: int | None = None
        """The step a STOP command ends training after."""

        torch.manual_seed(config.data.seed)  # every rank builds identical initial weights
        self.model = Transformer(config.model, kernels=config.kernels).to(self.device)
        # CUDA events only on a GPU: a CPU run never touches CUDA.
        self.device_timer = DeviceComputeTimer() if self.device.type == "cuda" else None
        self.faults = FaultInjector(config.faults, self.rank, config.run_dir)
        self._compute_started = 0.0
        """perf_counter at which this step's compute would have begun had it run without a break (fault timing)."""
        self.ddp: DistributedDataParallel
        if not self.replacement:  # a replacement's DDP is built once it is in the group and holds the state
            self._build_ddp()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.optim.weight_decay),
            lr=config.optim.lr,
            betas=(config.optim.beta1, config.optim.beta2),
            fused=self.device.type == "cuda",
        )
        self.autocast = self.device.type == "cuda"

        corpus = _corpus(config.data.path)
        train_docs, val_docs = split_train_val(corpus, config.data.val_fraction)
        seq = config.model.max_seq_len
        batch = config.data.batch_tokens
        self.train_batches = PackedBatches(train_docs, batch, seq, config.data.seed, self.rank, self.world_size)
        self.val_batches = (
            PackedBatches(val_docs, batch, seq, config.data.seed, self.rank, self.world_size, shuffle=False)
            if len(val_docs) and val_docs.num_tokens >= batch
            else None
        )
        # One peak for the job (a collective): ranks doing the same work must show the same MFU. A replacement
        # takes the others' (it cannot make that collective alone).
        self.peak: PeakFlops | None = (
            None if self.replacement else job_peak(device_peak(self.device, self.autocast, config.peak_tflops))
        )
        self.checkpoints = CheckpointManager(
            config, self.model, self.optimizer, self.train_batches, rank=self.rank, world_size=self.world_size,
            group=self.ckpt_group, device=self.device, emit=self._emit, faults=self.faults,
        )  # fmt: skip
        self.step = 0
        """The step under way, then the last step done: where a resume goes on from, then each step as it ends."""
        self._completed = 0
        """The last step whose optimizer step finished (what this rank holds, for a recovery)."""
        self._position = self.train_batches.state_dict()
        """The data position right after the last completed step's batches (what a recovery goes on from)."""
        self._longest_step = 0.0
        """The longest a step took on this rank, saving and validating included (seconds)."""
        if self.replacement:
            assert self.recovery is not None  # checked above
            self.checkpoints.start_without_load()
            generation = self.recovery.announce()
            self._reform(generation, Standing(self.rank, -1, 0, None, fork_wall_time()))
        else:
            self.step = self._completed = self.checkpoints.load()
            self._position = self.train_batches.state_dict()

    def _new_ckpt_group(self) -> dist.ProcessGroup | None:
        # Checkpoint coordination gets its own gloo group, so a save's commit (on a background thread)
        # can never interleave with, or wait behind, the training group's gradient all-reduces.
        # Its timeout bounds how long a save waits for a rank that never writes its part (then it fails).
        if not self.config.checkpoint.dir:
            return None
        return dist.new_group(backend="gloo", timeout=timedelta(seconds=120))

    def _build_ddp(self, init_sync: bool = True) -> None:
        """Wrap the model in DDP on the current process group, with the run's timing hook (again after a recovery,
        without ``init_sync``: every rank holds the donor's weights already)."""
        # No buffer sync at each forward: the buffers (RoPE tables, sparse layouts) are built identically on every
        # rank, and a broadcast at each forward is one more collective per step, one a hang diagnosis cannot count.
        self.ddp = DistributedDataParallel(
            self.model,
            device_ids=[self.local_rank] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,
            init_sync=init_sync,
        )
        collectives = self.run.comm_hook(self.ddp)
        assert collectives is not None  # the run is active (checked at init)
        self.collectives = collectives
        if self.faults.slow is not None:
            # Sleep when backward compute is done, before the last bucket's all-reduce launches: the sleep
            # counts as this rank's compute and the other ranks wait for it inside the collective.
            self.collectives.before_last_launch = lambda: self.faults.slow_down(
                time.perf_counter() - self._compute_started
            )

    def _apply_commands(self) -> None:
        """Apply the commands that arrived during the step just done, answering each with a CommandAck.

        The run queues them on the link's thread; they are applied here, between steps (a save at the step the
        agent chose, so that every rank saves the same step)."""
        for command in self.run.pending_commands():
            if command.kind == worker_pb2.COMMAND_KIND_CHECKPOINT:
                ok, message = self.checkpoints.request_save(command.step, self.step)
            elif command.kind == worker_pb2.COMMAND_KIND_STOP:
                ok, message = self._request_stop(command.step)
            else:
                ok, message = False, f"unknown command kind {command.kind}"
            self.run.answer(command, ok, message)

    def _refuse_commands(self, reason: str) -> None:
        """Answer the commands that came too late for the loop, so that no sender waits on an ack for ever."""
        for command in self.run.pending_commands():
            self.run.answer(command, False, reason)

    def _request_stop(self, step: int) -> tuple[bool, str]:
        """STOP: end after ``step`` (0: the step just done), as if it were the run's last step.

        Every rank of a job must stop after the same step, or the others wait in a collective for ever: with
        several ranks the agent names a step a little ahead, as for a save; 0 suits a job of one rank.
        """
        at = step or self.step
        if at < self.step:
            return False, f"the request to stop after step {step} came too late"
        if at >= self.config.steps:
            return True, f"training ends at step {self.config.steps} anyway"
        self._stop_after = at if self._stop_after is None else min(self._stop_after, at)
        return True, f"will stop after step {self._stop_after}"

    def _sync(self) -> None:
        # Host timers only mean something once the GPU has caught up.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _emit(self, event: telemetry_pb2.Event) -> None:
        """Send an event built elsewhere (the checkpoint manager, on any thread), stamped with this node."""
        event.node = self.node
        self.telemetry.event(event)

    def _event(self, text: str, detail: Message, severity: int = INFO) -> None:
        self.telemetry.event(
            make_event(text, detail, severity=severity, node=self.node, rank=self.rank, step=self.step)
        )

    def train(self) -> None:
        config = self.config
        params = config.model.num_params()
        peak = f"{self.peak.flops_per_second / 1e12:.2f} TFLOPS ({self.peak.source})" if self.peak else "unknown"
        started = telemetry_pb2.RunDetail(
            phase=telemetry_pb2.RunDetail.PHASE_STARTED,
            device=str(self.device),
            parameters=params,
            param_digest=parameter_digest(self.model),
            steps=config.steps,
        )
        replacement = f" (a replacement, from step {self.step})" if self.replacement else ""
        self._event(
            f"rank {self.rank}/{self.world_size} on {self.device}{replacement}, {params / 1e6:.2f}M params, "
            f"preset {config.preset}, {config.steps} steps, peak {peak}",
            started,
        )
        if self.val_batches is None and config.val_batches:
            self._event(
                "no validation loss: the held-out documents are fewer than one "
                "micro-batch; raise --val-fraction or give more --data",
                telemetry_pb2.RunDetail(phase=telemetry_pb2.RunDetail.PHASE_NO_VALIDATION),
            )
        if config.self_check and not self.replacement:  # the check is a collective the others made at their start
            self._self_check()
        for fault in self.faults.to_announce():
            injected = telemetry_pb2.FaultInjectedDetail(fault=fault.describe())
            self._event(f"--inject {fault.describe()} on this rank", injected, WARNING)
        prefetch = Prefetcher(self.train_batches, self.device)
        watch = None if self.recovery is None else StuckWatch(self.recovery, self._stuck_patience)
        try:
            while self.step < config.steps and (self._stop_after is None or self.step < self._stop_after):
                self.step += 1
                self.faults.at_step(self.step)
                failure = self._step_or_peer_failure(prefetch)
                if failure is not None:  # outside the except clause: its traceback held the old DDP's autograd graph
                    assert watch is not None  # a peer failure is returned only with recovery on
                    with watch.recovering():
                        prefetch = self._recover(prefetch, *failure)
        finally:
            if watch is not None:
                watch.stop()
            prefetch.close()
            self.checkpoints.close()
        self._refuse_commands("training has ended")
        digest = parameter_digest(self.model)
        finished = telemetry_pb2.RunDetail(
            phase=telemetry_pb2.RunDetail.PHASE_FINISHED,
            param_digest=digest,
            steps=self.step,
            telemetry_dropped=self.telemetry.dropped,
        )
        self._event(f"trained {self.step} steps", finished)
        # The control signal of a clean end (the event above is for people); it also flushes and closes the run.
        self.run.finish(steps=self.step, param_digest=digest)

    def _step_or_peer_failure(self, prefetch: Prefetcher) -> tuple[float, int, str] | None:
        """Do the step under way; with recovery on, a peer's death inside it is returned (when it was seen, the step
        in flight or 0 between steps, what failed) instead of raised. Any other error is raised."""
        config = self.config
        began = time.monotonic()
        try:
            report = self._train_step(prefetch)
            self._completed = self.step
            self._position = dict(prefetch.position)
            self._apply_commands()
            last = self.step == config.steps or self.step == self._stop_after
            self.checkpoints.save(self.step, prefetch.position, last=last)
            if (config.val_every and self.step % config.val_every == 0) or last:
                val_loss = self.validate()
                if val_loss is not None:
                    report.val_loss = val_loss
            self.run.report(report)
        except RuntimeError as error:
            if self.recovery is None or not is_peer_failure(error):
                raise
            in_flight = self.step if self._completed < self.step else 0
            return time.time(), in_flight, " ".join(str(error).split())[:200]
        self._longest_step = max(self._longest_step, time.monotonic() - began)
        return None

    def _stuck_patience(self) -> float:
        """How long after a replacement's announcement this rank may take to begin recovering before its
        StuckWatch takes it for stuck: the time for the longest step it did to reach the failed collective."""
        return max(STUCK_MIN_SECONDS, STUCK_STEPS * self._longest_step)

    def _recover(self, prefetch: Prefetcher, failed_wall_time: float, in_flight: int, cause: str) -> Prefetcher:
        """A peer died inside a collective: form the group again with its replacement, take the newest state, and
        return the data prefetcher to go on with. Raises RecoveryFailed when that is not possible."""
        assert self.recovery is not None  # only called with recovery on
        print(
            f"megascope: rank {self.rank}: a collective failed at step {self.step} ({cause}); recovering in place",
            file=sys.stderr,
            flush=True,
        )
        prefetch.close()
        # Release every peer blocked on this rank in the failed collective (a peer waits on this rank's part, not on
        # the dead rank's); a save in flight fails at its commit then, unless it is past it, and ends either way.
        shut_down(self.recovery.address)
        self.checkpoints.settle()
        # The broken groups' last references go to the teardown's thread (their destructors may wait on a worker).
        del self.ddp  # its reducer holds the broken group
        self.ckpt_group = None
        self.checkpoints.release_group()
        self.recovery.tear_down()
        generation = self.recovery.wait_for_generation()
        self._reform(generation, Standing(self.rank, self._completed, in_flight, failed_wall_time))
        return Prefetcher(self.train_batches, self.device)

    def _reform(self, generation: int, standing: Standing) -> None:
        """Join ``generation``'s process group, agree on the step, take the donor's state, rebuild DDP, and (rank 0)
        say so in a ``recovered`` event. Any failure on the way is given up for every rank (RecoveryFailed)."""
        assert self.recovery is not None
        try:
            self.recovery.form_group(generation)
            self.ckpt_group = self._new_ckpt_group()
            if standing.fork_wall_time is not None:
                standing.joined_wall_time = time.time()
            agreement = exchange(standing)
            formed = time.time()
            started = time.perf_counter()
            state_bytes = self._take_state(agreement.donor)
            transfer_seconds = time.perf_counter() - started
            self.checkpoints.rebind(self.ckpt_group)
            self._build_ddp(init_sync=False)
            self._prime_ddp()
        except RecoveryFailed:
            raise  # said to the other ranks already
        except (RuntimeError, ValueError) as error:  # a collective of the recovery failed: a second fault
            self.recovery.fail(f"the recovery into generation {generation} failed: {' '.join(str(error).split())}")
        self.step = self._completed = agreement.step
        self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        if self.rank == 0:
            self._recovered_event(agreement, generation, formed, transfer_seconds, state_bytes)

    def _prime_ddp(self) -> None:
        """One forward and backward whose gradients are thrown away, so that the new DDP's gradient buckets are laid
        out as the old one's were: DDP reduces its first iteration in one bucket, then lays the buckets out in the
        order gradients became ready. A different layout sums each gradient's parts in another order (gloo's ring
        reduces each chunk starting at another rank), and the weights would differ in their last bits from a run
        that never failed. The weights, the optimizer and the data position are untouched.

        A few tokens are enough (_PRIME_TOKENS): the order in which gradients become ready is the autograd graph's,
        the same for any batch size; a full batch would cost a step's compute on the path every rank waits on."""
        full = self.train_batches.batch_at(0)
        n = min(_PRIME_TOKENS, len(full.tokens), self.config.model.max_seq_len)
        batch = Batch(
            tokens=full.tokens[:n],
            targets=full.targets[:n].clamp(min=0),  # no -100: a loss over no target is NaN
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            max_seqlen=n,
            segment_lengths=[n],
            index=full.index,
        ).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.ddp(batch.tokens, batch.cu_seqlens, batch.max_seqlen)
            loss = cross_entropy(logits, batch.targets)
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        self.collectives.begin_step()

    def _take_state(self, donor: int) -> int:
        """Everything a rank holds between steps, from ``donor`` to every rank: the bytes sent."""
        mine = None
        if self.rank == donor:
            mine = {
                "optimizer": any(self.optimizer.state.values()),
                "position": self._position,
                "peak": None if self.peak is None else (self.peak.flops_per_second, self.peak.source),
                "stop_after": self._stop_after,
                "requested": self.checkpoints.requested_steps(),
            }
        theirs: dict[str, Any] = broadcast_objects(mine, donor)
        if not theirs["optimizer"]:
            self.optimizer.state.clear()  # the donor is before its first step: so is every rank
        state = self.checkpoints.transfer_state(with_optimizer=theirs["optimizer"])
        # Every rank seeds alike and draws alike, so the donor's random state is the one each rank would hold.
        rng = [torch.get_rng_state()]
        if self.device.type == "cuda":
            rng.append(torch.cuda.get_rng_state(self.device))
        sent = broadcast_tensors([state[name] for name in sorted(state)] + rng, donor)
        torch.set_rng_state(rng[0])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(rng[1], self.device)
        self.train_batches.load_state_dict(theirs["position"])
        self._position = dict(theirs["position"])
        self.peak = None if theirs["peak"] is None else PeakFlops(*theirs["peak"])
        self._stop_after = theirs["stop_after"]
        self.checkpoints.set_requested_steps(theirs["requested"])
        return sent

    def _recovered_event(
        self, agreement: Agreement, generation: int, formed: float, transfer_seconds: float, state_bytes: int
    ) -> None:
        failed = agreement.failed_wall_time
        total = time.time() - failed
        detail = telemetry_pb2.RecoveryDetail(
            replaced_ranks=agreement.replaced_ranks,
            generation=generation,
            step=agreement.step,
            donor_rank=agreement.donor,
            steps_redone=agreement.steps_redone,
            failed_wall_time=failed,
            reform_seconds=formed - failed,
            transfer_seconds=transfer_seconds,
            state_bytes=state_bytes,
            replacement_ready_seconds=agreement.replacement_ready_seconds,
            total_seconds=total,
        )
        replaced = ", ".join(map(str, agreement.replaced_ranks)) or "none"
        self._event(
            f"recovered in place: rank {replaced} replaced, generation {generation}; step {agreement.step} "
            f"from rank {agreement.donor} ({state_bytes / 1e6:.1f} MB in {transfer_seconds * 1e3:.0f} ms), "
            f"{agreement.steps_redone} step(s) redone; training again {total:.2f}s after the failure",
            detail,
        )

    def _self_check(self) -> None:
        disk = Path(self.config.checkpoint.dir or self.config.run_dir)
        verdict = selfcheck.run(self.node, self.device, disk, self.faults.slow)
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
        detail = selfcheck.to_detail(verdict)
        self._event(text, detail, WARNING if verdict.below else INFO)
        # What the agent acts on (eviction of a slow node); the event above is for people.
        self.run.signal(worker_pb2.SelfCheckResult(detail=detail))

    def _train_step(self, prefetch: Prefetcher) -> StepReport:
        config = self.config
        lr = config.optim.lr_at(self.step, config.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        gc_before = self.run.gc_pause_seconds
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
        self.checkpoints.before_optimizer_step()  # a save's staging must finish before weights change
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss_sum.item()  # also waits for the device
        grad_norm_value = grad_norm.item()
        t5 = time.perf_counter()

        step_seconds = t5 - step_start
        optimizer = t5 - t4
        named = data_wait + forward + backward + comm_wait + optimizer
        report = StepReport(
            node=self.node,
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
            gc_pause_seconds=self.run.gc_pause_seconds - gc_before,
            cpu_seconds=time.process_time() - cpu_start,
            collectives=self.collectives.timings(step_start, compute_end),
            collectives_issued=self.collectives.issued,
            restart_count=self.restart_count,
            wall_time=time.time(),
        )
        if self.peak:
            report.mfu = flops / step_seconds / self.peak.flops_per_second
        if self.device_timer is not None:
            # Read after loss.item() above, which waited for the device: the events are complete, no extra sync.
            report.device_compute_seconds = self.device_timer.seconds()
        return report

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
        self.run.fail(error)

    def close(self) -> None:
        self.run.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megascope.engine.trainer CONFIG_JSON", file=sys.stderr)
        return 2
    config = TrainConfig.load(args[0])
    try:
        trainer = Trainer(config)
    except CheckpointError as error:  # no checkpoint to resume from or init from: one line, not a traceback
        run = megascope_api.current()
        if run is not None:
            run.close()  # neither finished nor a crash to report: the rank guard reports the exit code
        print(f"megascope: rank {os.environ.get('RANK', 0)}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except RecoveryFailed as error:  # a replacement that could not join
        _exit_recovery_failed(error)
    try:
        trainer.train()
    except RecoveryFailed as error:
        _exit_recovery_failed(error)
    except Exception as error:
        trainer.report_failure(error)
        raise
    finally:
        trainer.close()
    return 0


def _exit_recovery_failed(error: RecoveryFailed) -> NoReturn:
    """End a rank that could not recover in place: one line, RECOVERY_FAILED_EXIT (its guard then lets torch elastic
    restart the job). The process exits at once: its broken process group's teardown could hang or abort."""
    code = recovery_env.RECOVERY_FAILED_EXIT
    print(
        f"megascope: rank {os.environ.get('RANK', 0)}: in-place recovery failed, exiting with {code} "
        f"for a full restart: {error}",
        file=sys.stderr,
        flush=True,
    )
    run = megascope_api.current()
    if run is not None:
        run.close()  # not a crash to report: the rank guard reports the exit code
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
