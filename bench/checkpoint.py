"""What a checkpoint costs training, side by side in one run: megascope vs torch.save, DCP, DCP async, ByteCheckpoint.

    python bench/checkpoint.py [--repeats 5] [--params-millions 43] [--quick] [--json]

Two ranks (gloo on 127.0.0.1, spawned here) train one DDP transformer with AdamW; every method saves the
same model + optimizer state (>= 500 MB at the default size), from the same processes, interleaved:

- megascope: our Checkpointer (stage in the background, wait only before the optimizer step, write, commit);
- dcp_async: torch.distributed.checkpoint.async_save, default thread mode (copies the state in the call);
- dcp: torch.distributed.checkpoint.save (synchronous);
- torch_save: torch.save of the full state dict by rank 0 (then fsync and a barrier, so the save is durable
  and the other rank waits for it, as a training script does);
- bytecheckpoint: the `bytecheckpoint` package's DDP checkpointer with fast_saving=True, as shipped
  (optional; see bench/_ckpt_peers.py for how to install it and how it is kept on 127.0.0.1).

megascope, dcp and dcp_async save one flat dict of tensors named as the trainer names them; ByteCheckpoint
takes the model and optimizer objects (its API); torch_save the same flat dict. All fsync their files.

Figures (seconds; "max" is over ranks, as DDP ranks wait for the slowest):
- block_s: training thread blocked by the save: the call plus any wait before the next optimizer step
  (max over ranks, median over repeats).
- extra_loop_s: wall time of K training steps that start with a save (plus any wait for it to commit at
  the end) minus the same K steps without a save, in adjacent pairs, median of --repeats pairs. This counts
  contention from background work. K is the same for every method, long enough for the async saves to end.
- save_s: call to committed checkpoint, idle (no training), median; save_in_loop_s: the same during the loop.
- load_s: 2 -> 2 ranks, each filling its whole (replicated, DDP) state; reshard_load_s: 2 -> 1 process
  (whole state) and 2 -> 3 ranks (each its dim-0 shard as a DTensor, FSDP2's layout). Page cache dropped
  for the checkpoint's files before every load (fsync + POSIX_FADV_DONTNEED), so loads read the disk.
- bytes_read_ratio: bytes read / bytes needed in the 2 -> 3 load (summed over ranks): megascope's from its
  LoadStats; the others' from /proc/self/io rchar (bytes the process passed through read(); a few KB of
  unrelated reads included). Per-load ratios and disk-level ratios (read_bytes) are in the JSON.
- Floors in the same run: memcpy_s copies one rank's share of the state (both ranks at once, max);
  disk_write_s writes the same bytes sequentially to one file per rank and fsyncs (both ranks at once, max).

Progress goes to stderr; with --json the last stdout line is one JSON object. On a shared machine other jobs
widen the spread of the loop figures: the JSON keeps every repeat and the load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from _ckpt_peers import bytecheckpoint_missing, patch_loopback  # bench/ is sys.path[0] when run as a script
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

from megascope.engine.checkpoint import Checkpointer, load
from megascope.engine.model import ModelConfig, Transformer, cross_entropy

METHODS = ("megascope", "dcp_async", "dcp", "torch_save", "bytecheckpoint")
WORLD_SIZE = 2
RESHARD_WORLDS = (1, 3)
DIM, FFN_DIM, HEADS = 768, 2048, 12  # the full-size model's layer shape; --params-millions sets the depth
QUICK_DIM, QUICK_FFN_DIM, QUICK_HEADS = 256, 768, 4
TIMEOUT = timedelta(seconds=900)

T = TypeVar("T")
_T0_ENV = "MEGASCOPE_CKPT_BENCH_T0"  # the run's start, so every process's progress lines share one clock


def _log(text: str) -> None:
    elapsed = time.time() - float(os.environ.get(_T0_ENV, "0") or 0)
    print(f"[{elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)


# --- configuration ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    params_millions: float
    repeats: int
    load_repeats: int
    tokens: int
    steps_per_window: int
    """0: chosen from the measured step and save times."""
    root: str
    methods: tuple[str, ...]
    quick: bool

    def model_config(self) -> ModelConfig:
        dim, ffn, heads = (QUICK_DIM, QUICK_FFN_DIM, QUICK_HEADS) if self.quick else (DIM, FFN_DIM, HEADS)
        one_layer = ModelConfig(dim=dim, n_layers=1, n_heads=heads, n_kv_heads=heads, ffn_dim=ffn)
        per_layer = ModelConfig(dim=dim, n_layers=2, n_heads=heads, n_kv_heads=heads, ffn_dim=ffn).num_params()
        per_layer -= one_layer.num_params()
        layers = max(1, round((self.params_millions * 1e6 - (one_layer.num_params() - per_layer)) / per_layer))
        return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads, ffn_dim=ffn)


# --- process plumbing ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, world_size: int, port: int) -> dist.ProcessGroup:
    """Join the job's gloo group; returns the separate gloo group for checkpoint coordination."""
    os.dup2(2, 1)  # libraries print to stdout; keep the parent's stdout for the table and JSON
    torch.set_num_threads(1)  # one core per rank, as torchrun sets OMP_NUM_THREADS=1
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=TIMEOUT
    )
    return dist.new_group(backend="gloo")


def _reduce(values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.MAX) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op)
    return [float(v) for v in tensor.tolist()]


def _io_counters() -> tuple[int, int]:
    """(rchar, read_bytes) of this process: bytes through read() calls, bytes fetched from the disk."""
    fields = dict(line.split(":") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["read_bytes"])


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file()]


def _drop_cache(path: Path) -> None:
    """Evict a checkpoint's pages so the next load reads the disk (fsync first: only clean pages drop)."""
    for file in _files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in _files(path))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --- the training job ------------------------------------------------------------------------------------


class Training:
    """One DDP rank: model, AdamW, a fixed batch; real forward, backward and optimizer steps."""

    def __init__(self, config: ModelConfig, tokens: int, rank: int) -> None:
        torch.manual_seed(0)  # identical initial weights on every rank
        self.model = Transformer(config)
        self.ddp = DistributedDataParallel(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
        self.tokens = torch.randint(0, config.vocab_size, (tokens,), generator=generator)
        self.targets = torch.roll(self.tokens, -1)
        half = tokens // 2
        self.cu_seqlens = torch.tensor([0, half, tokens], dtype=torch.int32)
        self.max_seqlen = tokens - half

    def step(self, before_optimizer_step: Callable[[], None] | None = None) -> None:
        loss = cross_entropy(self.ddp(self.tokens, self.cu_seqlens, self.max_seqlen), self.targets)
        loss.backward()
        if before_optimizer_step is not None:
            before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> dict[str, torch.Tensor]:
        return flat_state(self.model, self.optimizer)


def flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors by stable names, as megascope's trainer names them."""
    state = {f"model/{name}": tensor for name, tensor in model.state_dict().items()}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            state[f"optim/{name}/{key}"] = value
    return state


def fresh_model(config: ModelConfig) -> tuple[Transformer, torch.optim.Optimizer]:
    """A model and an AdamW whose state exists (zeros), ready to be loaded into, as a resume does."""
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():
        optimizer.state[param] = {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
        }
    return model, optimizer


# --- the methods, as the training thread sees them ---------------------------------------------------------


class Method:
    """A way of saving: ``save`` is the call, ``before_optimizer_step`` any wait the method needs before the
    weights change, ``wait`` blocks until the save is committed and returns seconds from call to commit."""

    name = ""

    def __init__(self, root: Path, training: Training, group: dist.ProcessGroup, rank: int) -> None:
        self.root = root / self.name
        self.training = training
        self.group = group
        self.rank = rank
        self.root.mkdir(parents=True, exist_ok=True)
        self._called = 0.0

    def path(self, save_id: int) -> Path:
        return self.root / f"save_{save_id:04d}"

    def save(self, save_id: int) -> None:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        pass

    def wait(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Megascope(Method):
    name = "megascope"

    def __init__(self, root: Path, training: Training, group: dist.ProcessGroup, rank: int) -> None:
        super().__init__(root, training, group, rank)
        # keep_last=0 keeps everything: the harness removes old saves outside the timed regions, as it does
        # for the other methods, so retention's deletions are not counted against this one only.
        self.checkpointer = Checkpointer(self.root, rank, WORLD_SIZE, group, layout="ddp", keep_last=0)

    def path(self, save_id: int) -> Path:
        return self.root / f"step_{save_id:08d}"

    def save(self, save_id: int) -> None:
        self.checkpointer.save(save_id, self.training.state(), extra={"step": save_id})

    def before_optimizer_step(self) -> None:
        self.checkpointer.before_optimizer_step()

    def wait(self) -> float:
        figures = self.checkpointer.wait()
        assert figures is not None
        if figures.error:
            raise RuntimeError(figures.error)
        return figures.total_seconds  # rank 0: call to commit; others: call to their file written

    def close(self) -> None:
        self.checkpointer.close()


class DcpAsync(Method):
    name = "dcp_async"

    def save(self, save_id: int) -> None:
        self._called = time.perf_counter()
        self._done_at: float | None = None
        # The checkpoint group, not the training group: the background thread's collectives must not
        # interleave with DDP's gradient all-reduces.
        self._future: Future[Any] = dcp.async_save(  # type: ignore[assignment]
            self.training.state(), checkpoint_id=self.path(save_id), process_group=self.group
        )
        self._future.add_done_callback(lambda _: setattr(self, "_done_at", time.perf_counter()))

    def wait(self) -> float:
        self._future.result()
        done = self._done_at if self._done_at is not None else time.perf_counter()  # callback may lag result()
        return done - self._called


class DcpSync(Method):
    name = "dcp"

    def save(self, save_id: int) -> None:
        self._called = time.perf_counter()
        dcp.save(self.training.state(), checkpoint_id=self.path(save_id), process_group=self.group)
        self._seconds = time.perf_counter() - self._called

    def wait(self) -> float:
        return self._seconds


class TorchSave(Method):
    name = "torch_save"

    def path(self, save_id: int) -> Path:
        return self.root / f"save_{save_id:04d}.pt"

    def save(self, save_id: int) -> None:
        self._called = time.perf_counter()
        if self.rank == 0:
            with open(self.path(save_id), "wb") as f:
                torch.save(self.training.state(), f)
                f.flush()
                os.fsync(f.fileno())
        dist.barrier(group=self.group)
        self._seconds = time.perf_counter() - self._called

    def wait(self) -> float:
        return self._seconds


class ByteCheckpoint(Method):
    name = "bytecheckpoint"

    def __init__(self, root: Path, training: Training, group: dist.ProcessGroup, rank: int) -> None:
        super().__init__(root, training, group, rank)
        patch_loopback()
        import bytecheckpoint

        self.bcp = bytecheckpoint

    def path(self, save_id: int) -> Path:
        return self.root / f"global_step_{save_id}"

    def save(self, save_id: int) -> None:
        self._called = time.perf_counter()
        self._committed: float | None = None
        # Its callback runs on rank 0 once every rank's files are written and its tracker file is updated.
        self.bcp.save(
            str(self.root),
            {"model": self.training.model, "optimizer": self.training.optimizer},
            framework="ddp",
            fast_saving=True,
            global_steps=save_id,
            callback=lambda: setattr(self, "_committed", time.perf_counter()),
        )
        self._returned = time.perf_counter()

    def wait(self) -> float:
        if self.rank != 0:
            return self._returned - self._called
        deadline = time.perf_counter() + 600
        while self._committed is None:
            if time.perf_counter() > deadline:
                raise RuntimeError("ByteCheckpoint never reported its save committed")
            time.sleep(0.002)
        return self._committed - self._called


METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (Megascope, DcpAsync, DcpSync, TorchSave, ByteCheckpoint)
}


# --- loading, for every method, into plain tensors (DDP, one process) or dim-0 DTensor shards (FSDP2) ------


@dataclass
class LoadResult:
    seconds: float
    read: int
    """Bytes the method says it read (megascope's LoadStats) or, for the others, rchar."""
    read_source: str
    disk_read: int
    needed: int


def _local(target: torch.Tensor) -> torch.Tensor:
    return target.to_local() if isinstance(target, DTensor) else target


def _my_rows(full: torch.Tensor, target: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows of the whole tensor ``full`` that ``target`` holds (all of them unless it is a dim-0 shard)."""
    if not isinstance(target, DTensor) or full.dim() == 0:
        return full
    chunk = -(-full.shape[0] // world)  # torch.chunk's split, which Shard(0) uses
    start = min(rank * chunk, full.shape[0])
    return full[start : start + _local(target).shape[0]]


def make_targets(
    manifest: dict[str, tuple[list[int], str]], rank: int, world: int, sharded: bool
) -> dict[str, torch.Tensor]:
    """Empty tensors to load into: whole tensors, or each rank's dim-0 shard (as torch.chunk splits it)."""
    mesh = init_device_mesh("cpu", (world,)) if sharded else None
    targets: dict[str, torch.Tensor] = {}
    for name, (shape, dtype_name) in manifest.items():
        dtype = getattr(torch, dtype_name)
        if mesh is None or not shape:
            targets[name] = torch.zeros(shape, dtype=dtype)
            continue
        chunk = -(-shape[0] // world)
        start = min(rank * chunk, shape[0])
        rows = max(0, min(shape[0], start + chunk) - start)
        local = torch.zeros([rows, *shape[1:]], dtype=dtype)
        stride = torch.empty(shape, dtype=dtype, device="meta").stride()
        targets[name] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
        )
    return targets


class Loader:
    """Loads one method's checkpoint into this rank's targets; keeps what it needs between repeats."""

    def __init__(self, method: str, path: Path, config: ModelConfig, targets: dict[str, torch.Tensor]) -> None:
        self.method = method
        self.path = path
        self.targets = targets
        self.bcp_model: tuple[Transformer, torch.optim.Optimizer] | None = None
        if method == "bytecheckpoint":
            patch_loopback()
            # Its API loads model and optimizer objects of the DDP layout: whole tensors on every rank.
            self.bcp_model = fresh_model(config)

    def loaded(self) -> dict[str, torch.Tensor]:
        """What the last load filled, by flat name."""
        if self.bcp_model is not None:
            return flat_state(*self.bcp_model)
        return self.targets

    def needed(self) -> int:
        return sum(_local(t).numel() * _local(t).element_size() for t in self.loaded().values())

    def run(self) -> int | None:
        """Load once; megascope's own count of bytes read (None for the others)."""
        if self.method == "megascope":
            _, stats = load(self.path, self.targets)
            return stats.bytes_read
        if self.method in ("dcp", "dcp_async"):
            dcp.load(self.targets, checkpoint_id=self.path)
        elif self.method == "torch_save":
            full = torch.load(self.path, map_location="cpu", weights_only=True)
            rank, world = dist.get_rank(), dist.get_world_size()
            with torch.no_grad():
                for name, target in self.targets.items():
                    _local(target).copy_(_my_rows(full[name], target, rank, world))
        elif self.method == "bytecheckpoint":
            import bytecheckpoint

            assert self.bcp_model is not None
            model, optimizer = self.bcp_model
            bytecheckpoint.load(str(self.path), {"model": model, "optimizer": optimizer}, framework="ddp")
        return None


def timed_load(loader: Loader, group: dist.ProcessGroup) -> LoadResult:
    """One cold load on every rank at once; time is the slowest rank's, bytes are summed over ranks."""
    if dist.get_rank() == 0:
        _drop_cache(loader.path)
    for target in loader.loaded().values():
        _local(target).zero_()  # touched before the clock starts: no first-touch page faults inside
    dist.barrier(group=group)
    rchar, disk = _io_counters()
    start = time.perf_counter()
    own = loader.run()
    seconds = time.perf_counter() - start
    rchar_after, disk_after = _io_counters()
    read = own if own is not None else rchar_after - rchar
    seconds = _reduce([seconds])[0]
    read_sum, disk_sum, needed = _reduce(
        [float(read), float(disk_after - disk), float(loader.needed())], dist.ReduceOp.SUM
    )
    return LoadResult(seconds, int(read_sum), "LoadStats" if own is not None else "rchar", int(disk_sum), int(needed))


def check_equal(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    """Every loaded tensor (or this rank's rows of it) equals the reference bit for bit."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, expected in reference.items():
        got = loaded[name]
        if not torch.equal(_local(got), _my_rows(expected, got, rank, world)):
            raise AssertionError(f"{what}: {name} differs from what was saved")


# --- phase 1: two ranks train and save ----------------------------------------------------------------------


@dataclass
class MethodFigures:
    block_s: list[float] = field(default_factory=list)
    extra_loop_s: list[float] = field(default_factory=list)
    save_in_loop_s: list[float] = field(default_factory=list)
    tail_wait_s: list[float] = field(default_factory=list)
    baseline_loop_s: list[float] = field(default_factory=list)
    """Wait at the end of a window for a save that had not committed yet (counted in extra_loop_s)."""
    save_s: list[float] = field(default_factory=list)
    bytes_written: int = 0
    error: str | None = None


def _agree(action: Callable[[], T]) -> tuple[T | None, str | None]:
    """Run ``action`` on every rank: (its value, None), or (None, the error) if it failed on any rank."""
    value, error = None, None
    try:
        value = action()
    except Exception as exc:  # a peer package failing must not take the whole benchmark down
        error = f"{type(exc).__name__}: {exc}"
    failed = _reduce([0.0 if error is None else 1.0])[0]
    if failed:
        return None, error or "failed on another rank"
    return value, None


def _floors(training: Training, rank: int, root: Path, repeats: int) -> tuple[float, float]:
    """memcpy_s and disk_write_s of this rank's share (balanced largest first, as a balanced plan would)."""
    state = training.state()
    load_by_rank = [0] * WORLD_SIZE
    mine = []
    for name in sorted(state, key=lambda n: (-state[n].numel() * state[n].element_size(), n)):
        owner = min(range(WORLD_SIZE), key=lambda r: (load_by_rank[r], r))
        load_by_rank[owner] += state[name].numel() * state[name].element_size()
        if owner == rank:
            mine.append(state[name])
    buffers = [torch.empty_like(t) for t in mine]
    for buffer, tensor in zip(buffers, mine, strict=True):
        buffer.copy_(tensor)  # first touch outside the clock
    memcpy = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for buffer, tensor in zip(buffers, mine, strict=True):
            buffer.copy_(tensor)
        memcpy.append(_reduce([time.perf_counter() - start])[0])
    disk = []
    file = root / f"floor_rank{rank}.bin"
    for _ in range(min(3, repeats)):
        dist.barrier()
        start = time.perf_counter()
        with open(file, "wb") as f:
            for buffer in buffers:
                f.write(buffer.reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        disk.append(_reduce([time.perf_counter() - start])[0])
        file.unlink()
    return statistics.median(memcpy), statistics.median(disk)


class SaveBench:
    """Phase 1 on one rank: windows of training steps with and without each method's save, then idle saves."""

    def __init__(self, rank: int, options: Options, group: dist.ProcessGroup) -> None:
        self.rank = rank
        self.options = options
        self.group = group
        self.root = Path(options.root)
        self.log = _log if rank == 0 else (lambda text: None)
        self.training = Training(options.model_config(), options.tokens, rank)
        for _ in range(2):  # AdamW creates its state at the first step
            self.training.step()
        self.figures = {name: MethodFigures() for name in options.methods}
        self.methods: dict[str, Method] = {}
        self.save_id = 0
        self.steps = 0

    def set_up_methods(self) -> None:
        for name in self.options.methods:
            cls = METHOD_CLASSES[name]
            method, error = _agree(functools.partial(cls, self.root, self.training, self.group, self.rank))
            if method is not None:
                self.methods[name] = method
            else:
                self._drop(name, f"setup failed: {error}")

    def _drop(self, name: str, error: str) -> None:
        self.figures[name].error = error
        self.methods.pop(name, None)
        self.log(f"{name}: {error}; left out")

    def _clean_up(self, method: Method, keep: bool = False) -> None:
        """After a committed save: remove it (outside every clock) unless it is kept for the loads."""
        dist.barrier()
        if self.rank == 0 and not keep:
            _remove(method.path(self.save_id))
        dist.barrier()

    def warm_up(self) -> tuple[float, dict[str, float]]:
        """Step time, and one idle save each: pays one-time costs (buffers, plans, ByteCheckpoint's
        coordinator) and tells how long saves take, to size the windows."""
        times = []
        for _ in range(3):
            dist.barrier()
            start = time.perf_counter()
            self.training.step()
            times.append(time.perf_counter() - start)
        step_s = _reduce([statistics.median(times)])[0]
        seconds: dict[str, float] = {}
        for name, method in list(self.methods.items()):
            self.save_id += 1

            def save_and_wait(method: Method = method) -> float:
                start = time.perf_counter()
                method.save(self.save_id)
                method.wait()
                return time.perf_counter() - start

            took, error = _agree(save_and_wait)
            self._clean_up(method)
            if took is None:
                self._drop(name, f"save failed: {error}")
                continue
            seconds[name] = _reduce([took])[0]
            self.log(f"warm-up save {name}: {seconds[name]:.2f}s")
        return step_s, seconds

    def window(self, method: Method | None) -> tuple[float, float, float, float]:
        """``self.steps`` training steps, the first preceded by a save: (loop seconds, blocked seconds,
        seconds from call to commit, wait at the end for the commit), each the max over ranks."""
        dist.barrier()
        start = time.perf_counter()
        blocked = 0.0
        hook = None
        if method is not None:
            method.save(self.save_id)
            blocked = time.perf_counter() - start

            def hook() -> None:
                nonlocal blocked
                t = time.perf_counter()
                method.before_optimizer_step()
                blocked += time.perf_counter() - t

        for _ in range(self.steps):
            self.training.step(hook)
        tail = time.perf_counter()
        commit = method.wait() if method is not None else 0.0
        end = time.perf_counter()
        loop, blocked, commit, tail_wait = _reduce([end - start, blocked, commit, end - tail])
        if method is not None:
            self._clean_up(method)
        return loop, blocked, commit, tail_wait

    def windows(self) -> None:
        names = list(self.methods)
        repeats = self.options.repeats
        for repeat in range(repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:  # rotate: no method always runs first
                self.save_id += 1
                if repeat % 2 == 0:  # alternate which half of the pair runs first, against drift
                    base = self.window(None)[0]
                    loop, blocked, commit, tail = self.window(self.methods[name])
                else:
                    loop, blocked, commit, tail = self.window(self.methods[name])
                    base = self.window(None)[0]
                f = self.figures[name]
                f.extra_loop_s.append(loop - base)
                f.block_s.append(blocked)
                f.save_in_loop_s.append(commit)
                f.tail_wait_s.append(tail)
                f.baseline_loop_s.append(base)
                self.log(
                    f"repeat {repeat + 1}/{repeats} {name:<15} block {blocked:6.3f}s  loop {loop:6.2f}s vs "
                    f"{base:6.2f}s (extra {loop - base:+.2f}s)  commit {commit:.2f}s"
                )

    def idle_saves(self) -> dict[str, str]:
        """Saves with no training in between: every method saves the same final state; the last round is
        kept for the loads. Returns each method's kept checkpoint path."""
        kept: dict[str, str] = {}
        for repeat in range(self.options.repeats):
            last = repeat == self.options.repeats - 1
            for name, method in self.methods.items():
                self.save_id += 1
                dist.barrier()
                method.save(self.save_id)
                self.figures[name].save_s.append(_reduce([method.wait()])[0])
                if last:
                    path = method.path(self.save_id)
                    kept[name] = str(path)
                    self.figures[name].bytes_written = _size(path) if self.rank == 0 else 0
                self._clean_up(method, keep=last)
            self.log(
                f"idle saves {repeat + 1}/{self.options.repeats}: "
                + ", ".join(f"{n} {self.figures[n].save_s[-1]:.2f}s" for n in self.methods)
            )
        for method in self.methods.values():
            method.close()
        return kept


def save_phase(rank: int, options: Options, port: int) -> None:
    group = _init(rank, WORLD_SIZE, port)
    bench = SaveBench(rank, options, group)
    config = options.model_config()
    model_bytes = sum(t.numel() * t.element_size() for t in bench.training.state().values())
    bench.log(f"model {config.num_params() / 1e6:.1f}M params, {config.n_layers} layers: {model_bytes / 1e6:.0f} MB")
    memcpy_s, disk_write_s = _floors(bench.training, rank, bench.root, options.repeats)
    bench.log(f"floors: memcpy {memcpy_s:.3f}s, write + fsync {disk_write_s:.3f}s (one rank's share, both at once)")

    bench.set_up_methods()
    step_s, warm = bench.warm_up()
    async_save = max([warm[n] for n in ("megascope", "dcp_async") if n in warm] or [step_s])
    bench.steps = options.steps_per_window or min(12, max(3, math.ceil(1.3 * async_save / step_s) + 1))
    bench.log(f"training step {step_s:.3f}s; windows of {bench.steps} steps")
    bench.windows()
    paths = bench.idle_saves()

    # Loads 2 -> 2: each rank fills its whole state (DDP), compared bit for bit with what was saved.
    reference = {name: t.detach().clone() for name, t in bench.training.state().items()}
    manifest = {name: (list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in reference.items()}
    targets = make_targets(manifest, rank, WORLD_SIZE, sharded=False)
    loads = {
        name: _load_figures(name, Path(path), config, targets, reference, options, group, bench.log, "2->2")
        for name, path in paths.items()
    }
    if rank == 0:
        result = {
            "model_bytes": model_bytes,
            "params": config.num_params(),
            "model": config.to_dict(),
            "memcpy_s": memcpy_s,
            "disk_write_s": disk_write_s,
            "step_s": step_s,
            "steps_per_window": bench.steps,
            "figures": {name: asdict(f) for name, f in bench.figures.items()},
            "loads": loads,
            "paths": paths,
            "manifest": manifest,
        }
        (bench.root / "phase_save.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _load_figures(
    name: str,
    path: Path,
    config: ModelConfig,
    targets: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    options: Options,
    group: dist.ProcessGroup,
    log: Callable[[str], None],
    label: str,
) -> dict[str, Any]:
    """Median time and byte counts of ``options.load_repeats`` cold loads; checks the first one's values."""
    loader, error = _agree(lambda: Loader(name, path, config, targets))
    results: list[LoadResult] = []
    for repeat in range(options.load_repeats):
        if loader is None or error is not None:
            break
        result, error = _agree(functools.partial(timed_load, loader, group))
        if result is not None and repeat == 0:
            _, error = _agree(functools.partial(check_equal, loader.loaded(), reference, f"{name} {label}"))
        if result is not None:
            results.append(result)
    if loader is None or error is not None:
        log(f"load {label} {name}: failed: {error}")
        return {"error": error}
    seconds = statistics.median(r.seconds for r in results)
    first = results[0]
    log(
        f"load {label} {name:<15} {seconds:6.2f}s  read/needed {first.read / first.needed:.3f} ({first.read_source}), "
        f"disk {first.disk_read / first.needed:.3f}"
    )
    return {
        "seconds": seconds,
        "read_ratio": first.read / first.needed,
        "read_source": first.read_source,
        "disk_read_ratio": first.disk_read / first.needed,
    }


# --- phase 2: the same checkpoints loaded by 1 and by 3 processes ------------------------------------------


def load_phase(rank: int, world: int, options: Options, port: int) -> None:
    group = _init(rank, world, port)
    root = Path(options.root)
    log = _log if rank == 0 else (lambda text: None)
    saved = json.loads((root / "phase_save.json").read_text())
    manifest = {name: (shape, dtype) for name, (shape, dtype) in saved["manifest"].items()}
    config = ModelConfig.from_dict(saved["model"])
    label = f"2->{world}"
    # torch_save's file holds the whole state: it is the reference every other load is compared with.
    reference = torch.load(saved["paths"]["torch_save"], map_location="cpu", weights_only=True)
    targets = make_targets(manifest, rank, world, sharded=world > 1)
    loads = {
        name: _load_figures(name, Path(path), config, targets, reference, options, group, log, label)
        for name, path in saved["paths"].items()
    }
    if rank == 0:
        (root / f"phase_load_{world}.json").write_text(json.dumps(loads))
    dist.barrier()
    dist.destroy_process_group()


# --- report ----------------------------------------------------------------------------------------------------


BYTECHECKPOINT_NO_RESHARD = (
    "cannot load its DDP checkpoint into FSDP2 shards (its DDP files key optimizer state by parameter index, "
    "its FSDP2 loader wants names: KeyError 'state.<name>.step'); ddp_load_3_ranks_s is 3 ranks each loading "
    "the whole state (DDP), and its bytes_read_ratio_by_load['2->3'] is against that whole state"
)
NOTES = {
    "megascope": "bytes_read_ratio from LoadStats (reads widened to whole 256 KiB checksum blocks)",
    "dcp_async": "thread mode: copies the whole state dict in the call, writes in a background thread",
    "dcp": "synchronous; reads every saved item whole even when a rank needs a slice of it",
    "torch_save": "cannot reshard: every rank reads the whole file and keeps its rows",
    "bytecheckpoint": (
        "fast_saving=True, effectively synchronous as shipped (files written inside the call); no 2->3 "
        "reshard into FSDP2 shards (see why_null in --json); 2->3 column shows 3 DDP ranks each loading everything"
    ),
}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def assemble(
    saved: dict[str, Any], resharded: dict[int, dict[str, Any]], options: Options, load_average: list[float]
) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for name in METHODS:
        if name not in options.methods:
            why = (bytecheckpoint_missing() if name == "bytecheckpoint" else None) or "not selected"
            methods[name] = {"skipped": why}
            continue
        f = saved["figures"][name]
        load_2 = saved["loads"].get(name, {"error": f.get("error") or "not run"})
        by_world = {world: resharded[world].get(name, {"error": "not run"}) for world in RESHARD_WORLDS}
        entry: dict[str, Any] = {
            "block_s": _median(f["block_s"]),
            "extra_loop_s": _median(f["extra_loop_s"]),
            "save_s": _median(f["save_s"]),
            "load_s": load_2.get("seconds"),
            "reshard_load_s": {f"2->{w}": by_world[w].get("seconds") for w in RESHARD_WORLDS},
            "bytes_read_ratio": by_world[3].get("read_ratio"),
            "save_in_loop_s": _median(f["save_in_loop_s"]),
            "tail_wait_s": _median(f["tail_wait_s"]),
            "bytes_written": f["bytes_written"],
            "bytes_read_ratio_by_load": {"2->2": load_2.get("read_ratio")}
            | {f"2->{w}": by_world[w].get("read_ratio") for w in RESHARD_WORLDS},
            "disk_read_ratio_by_load": {"2->2": load_2.get("disk_read_ratio")}
            | {f"2->{w}": by_world[w].get("disk_read_ratio") for w in RESHARD_WORLDS},
            "bytes_read_source": by_world[3].get("read_source"),
            "repeats": {
                "block_s": f["block_s"],
                "extra_loop_s": f["extra_loop_s"],
                "baseline_loop_s": f["baseline_loop_s"],
                "save_s": f["save_s"],
            },
            "note": NOTES[name],
        }
        if name == "bytecheckpoint" and entry["reshard_load_s"]["2->3"] is not None:
            # Its 2->3 load filled whole tensors on 3 ranks (DDP), not the FSDP2 shards the others filled.
            entry["ddp_load_3_ranks_s"] = entry["reshard_load_s"]["2->3"]
            entry["reshard_load_s"]["2->3"] = None
            entry["bytes_read_ratio"] = None
            entry["why_null"] = BYTECHECKPOINT_NO_RESHARD
        errors = [f.get("error")] + [v.get("error") for v in (load_2, *by_world.values())]
        if any(errors):
            entry["errors"] = [e for e in errors if e]
        methods[name] = entry
    return {
        "model_bytes": saved["model_bytes"],
        "world_size": WORLD_SIZE,
        "memcpy_s": saved["memcpy_s"],
        "disk_write_s": saved["disk_write_s"],
        "params": saved["params"],
        "step_s": saved["step_s"],
        "steps_per_window": saved["steps_per_window"],
        "repeats": options.repeats,
        "load_average": load_average,
        "load_repeats": options.load_repeats,
        "methods": methods,
    }


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nmodel + optimizer state {result['model_bytes'] / 1e6:.0f} MB ({result['params'] / 1e6:.1f}M params), "
        f"{result['world_size']} ranks; training step {result['step_s']:.2f}s, windows of "
        f"{result['steps_per_window']} steps; medians of {result['repeats']} repeats (loads: {result['load_repeats']})"
    )
    print(
        f"floors: memcpy_s {result['memcpy_s']:.3f}   disk_write_s {result['disk_write_s']:.3f}   "
        f"(1-min load average before/after: {result['load_average'][0]:.1f}/{result['load_average'][1]:.1f})\n"
    )
    header = (
        f"{'method':<15}{'block_s':>9}{'extra_loop_s':>13}{'save_s':>8}{'in_loop':>8}{'load_s':>8}"
        f"{'2->1_s':>8}{'2->3_s':>8}{'read_ratio':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, m in result["methods"].items():
        if "skipped" in m:
            print(f"{name:<15}skipped: {m['skipped']}")
            continue
        reshard = dict(m["reshard_load_s"])
        three = _cell(reshard["2->3"], 2)
        if "ddp_load_3_ranks_s" in m:
            three = _cell(m["ddp_load_3_ranks_s"], 2) + "*"
        print(
            f"{name:<15}{_cell(m['block_s']):>9}{_cell(m['extra_loop_s']):>13}{_cell(m['save_s'], 2):>8}"
            f"{_cell(m['save_in_loop_s'], 2):>8}{_cell(m['load_s'], 2):>8}{_cell(reshard['2->1'], 2):>8}"
            f"{three:>8}{_cell(m['bytes_read_ratio'], 3):>11}"
        )
    print("\nnotes:")
    for name, m in result["methods"].items():
        if "skipped" not in m:
            print(f"  {name}: {m['note']}")
            for error in m.get("errors", []):
                print(f"    error: {error}")
    print(
        "  in_loop: save_s measured during the training loop; read_ratio: bytes read / needed in the 2->3 load "
        "(see --json for every load); *: not a reshard (DDP layout on 3 ranks)"
    )


# --- main ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="megascope-ckpt-bench-", dir="/tmp") as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="save/no-save window pairs per method (default 5)")
    parser.add_argument(
        "--params-millions", type=float, default=43.0, help="model size; AdamW state makes ~12 bytes/param (43)"
    )
    parser.add_argument("--load-repeats", type=int, default=3, help="cold loads per method and world size (3)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank per training step (128)")
    parser.add_argument("--steps-per-window", type=int, default=0, help="0: long enough for the async saves")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="small model, 2 repeats, 1 load: a smoke run")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()
    if args.quick:
        args.params_millions, args.repeats, args.load_repeats = 4.0, 2, 1
    wanted = tuple(m for m in METHODS if m in args.methods.split(","))
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown or "torch_save" not in wanted:
        parser.error(f"--methods: unknown {sorted(unknown)}" if unknown else "--methods must include torch_save")
    skipped = bytecheckpoint_missing()
    if "bytecheckpoint" in wanted and skipped:
        _log(f"bytecheckpoint skipped: {skipped}")
        wanted = tuple(m for m in wanted if m != "bytecheckpoint")

    os.environ[_T0_ENV] = str(time.time())
    # Inherited by the rank processes and by ByteCheckpoint's coordinator process they spawn.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("BYTECHECKPOINT_LOGGING_LEVEL", "ERROR")  # it logs every call at INFO to stdout
    # A SIGTERM (a timeout, Ctrl-C's cousin) still removes the temporary directory on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    load_before = os.getloadavg()[0]
    with _workdir() as root:
        options = Options(
            params_millions=args.params_millions,
            repeats=args.repeats,
            load_repeats=args.load_repeats,
            tokens=args.tokens,
            steps_per_window=args.steps_per_window,
            root=str(root),
            methods=wanted,
            quick=args.quick,
        )
        _log(f"2 ranks train and save; methods: {', '.join(wanted)}; files under {root}")
        mp.start_processes(save_phase, args=(options, _free_port()), nprocs=WORLD_SIZE, start_method="spawn")
        resharded = {}
        for world in RESHARD_WORLDS:
            _log(f"loading the 2-rank checkpoints into {world} process(es)")
            mp.start_processes(load_phase, args=(world, options, _free_port()), nprocs=world, start_method="spawn")
            resharded[world] = json.loads((root / f"phase_load_{world}.json").read_text())
        saved = json.loads((root / "phase_save.json").read_text())
    # Other work on the machine shows here: windows are compared in adjacent pairs, but a busy machine still
    # widens the spread (see "repeats" in --json).
    result = assemble(saved, resharded, options, [load_before, os.getloadavg()[0]])
    print_table(result)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
