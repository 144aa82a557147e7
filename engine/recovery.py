"""In-place recovery of one rank: form the process group again without the dead rank's process, go on.

The contract with the launcher, the rank guard and the warm parent is in
:mod:`megascope.engine.runtime.recovery_env`; this module is the trainer's side of it, used by
:class:`~megascope.engine.trainer.Trainer`:

1. **detect** (:func:`is_peer_failure`): a collective of the step fails because a peer died (gloo raises a
   ``RuntimeError`` naming its transport: "Connection closed by peer", "Connection reset by peer"). Only errors
   raised inside the step count, and only while recovery is on (the recovery store is named in the environment);
   anything else is a crash, as without recovery. The rank then shuts its groups' connections down
   (:func:`shut_down`): a peer blocked on this rank's part of the failed collective, not on the dead rank's, fails
   at once too instead of at the group's timeout.
2. **wait** (:meth:`Recovery.wait_for_generation`): the replacement announces itself by bumping the
   ``generation`` key of the recovery store (``store.add``); a survivor waits for the generation to pass its own.
   The store is the launcher's (it outlives every rank, rank 0's own store dies with rank 0).
3. **re-form** (:meth:`Recovery.form_group`): every rank of the generation meets on the store, the old groups are
   destroyed, and ``init_process_group`` runs again on a ``PrefixStore`` of that generation.
4. **agree and transfer** (:func:`exchange`, :func:`broadcast_tensors`, :func:`broadcast_objects`): every rank
   says which step it completed; the lowest rank holding the highest step is the donor, and sends the model,
   optimizer, RNG and data position to the others (from memory, not from disk).

A survivor that never sees its collective fail (gloo, now and then, stops reading a connection whose peer died and
waits on it for the group's whole timeout; seen about once in thirty faults in a soak) is released by
:class:`StuckWatch`: once a replacement announced a new generation and this rank has not begun recovering within
its patience, it leaves (:data:`~megascope.engine.runtime.recovery_env.STUCK_SURVIVOR_EXIT`), and its own
replacement joins that same generation (:meth:`Recovery.announce`) with the state of a rank that has it. The stuck
rank's process cannot be released otherwise: its main thread waits in C++ on a gloo collective no API of torch 2.13
aborts.

Whatever goes wrong on the way (a deadline passed, a newer generation appeared: a second fault during the
recovery, a collective of the recovery failed) raises :class:`RecoveryFailed`; the rank marks the attempt as failed
in the store, so that the other ranks give up at once instead of waiting for their deadline, and exits with
:data:`~megascope.engine.runtime.recovery_env.RECOVERY_FAILED_EXIT`: the job falls back to a full restart.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from megascope.engine.runtime import recovery_env

DEADLINE_SECONDS = 60.0
"""How long a rank waits for the others (the replacement needs a fork and the trainer's start) before giving up."""
_POLL_SECONDS = 0.005
"""How often a waiting rank reads the store: a few reads of a loopback store per 5 ms cost nothing."""
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "gloo/transport",
    "NCCL communicator was aborted",
)
"""What a collective's error says when a peer is gone (gloo names its transport's source file and the cause)."""


class RecoveryFailed(RuntimeError):
    """This rank cannot recover in place; the job must restart (the rank exits with RECOVERY_FAILED_EXIT)."""


def enabled() -> bool:
    """Whether recovery is in place: the launcher named the recovery store."""
    return recovery_env.store_address() is not None


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error``, raised by a step's collectives, is a peer's death (not a bug of this rank's code)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in _PEER_LOST)


def fork_wall_time() -> float:
    """Unix time at which this process started (its fork, for a replacement a warm parent forked).

    From its age on the boot clock (``/proc/self/stat`` counts from boot in clock ticks): the boot time the kernel
    gives in whole seconds (psutil's start time) would be up to a second off, the size of what is measured."""
    with open("/proc/self/stat") as stat_file:
        fields = stat_file.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)


class Recovery:
    """One rank's handle on the recovery store: its generation, the waits, the re-formed process group."""

    def __init__(self, backend: str, rank: int, world_size: int, timeout: timedelta) -> None:
        """``timeout``: the new process group's collective timeout (the training group's)."""
        address = recovery_env.store_address()
        if address is None:
            raise RecoveryFailed(f"in-place recovery needs {recovery_env.RECOVERY_STORE_ENV}=HOST:PORT (it is not set)")
        self.address = address
        self.backend = backend
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.prefix = recovery_env.store_prefix()
        self.generation = 0
        """The generation of the process group this rank is in (the first group is generation 0)."""
        self._client: dist.TCPStore | None = None

    @property
    def _generation_key(self) -> str:
        return self.prefix + "generation"

    @property
    def _failed_key(self) -> str:
        return self.prefix + "failed"

    @property
    def _rejoin_key(self) -> str:
        return f"{self.prefix}rejoin/rank{self.rank}"

    def connect(self) -> dist.TCPStore:
        """A new client of the recovery store."""
        host, port = self.address
        try:
            return dist.TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=DEADLINE_SECONDS), wait_for_workers=False
            )
        except (RuntimeError, ValueError) as error:
            raise RecoveryFailed(f"cannot reach the recovery store at {host}:{port}: {error}") from error

    def store(self) -> dist.TCPStore:
        """The client of the recovery store, connected at first use (a survivor connects only after a fault)."""
        if self._client is None:
            self._client = self.connect()
        return self._client

    def announce(self) -> int:
        """A replacement's first act: bump the generation; the survivors wait for it. The generation to join.

        The replacement of a stuck survivor (:meth:`leave_for`) joins the generation its predecessor left for
        instead: that generation waits for this rank, and a new one would read as a second fault."""
        store = self.store()
        if store.check([self._rejoin_key]):
            self.generation = int(store.get(self._rejoin_key))
            store.delete_key(self._rejoin_key)
            return self.generation
        self.generation = int(store.add(self._generation_key, 1))
        return self.generation

    def current_generation(self, store: dist.Store) -> int:
        """The newest generation announced (0 before any)."""
        return int(store.add(self._generation_key, 0))

    def leave_for(self, store: dist.Store, generation: int) -> None:
        """A stuck survivor's last act before it exits: its replacement is to join ``generation``."""
        store.set(self._rejoin_key, str(generation))

    def wait_for_generation(self, deadline_seconds: float = DEADLINE_SECONDS) -> int:
        """A survivor's wait for a replacement's announcement: the first generation above this rank's."""
        store = self.store()
        deadline = time.monotonic() + deadline_seconds
        while True:
            self._check_not_failed(store)
            generation = self.current_generation(store)
            if generation > self.generation:
                return generation
            if time.monotonic() > deadline:
                self.fail(f"no replacement rank announced itself within {deadline_seconds:.0f}s")
            time.sleep(_POLL_SECONDS)

    def form_group(self, generation: int, deadline_seconds: float = DEADLINE_SECONDS) -> None:
        """Meet every rank of ``generation`` on the store, then form the process group again under its prefix.

        The meeting comes first, on the store alone, so that a newer generation (a second fault during this
        recovery) or an attempt another rank gave up is seen while waiting; ``init_process_group`` would only
        wait for the missing rank until its timeout.
        """
        store = self.store()
        here = f"{self.prefix}gen{generation}/"
        store.add(here + "arrived", 1)
        deadline = time.monotonic() + deadline_seconds
        while int(store.add(here + "arrived", 0)) < self.world_size:
            self._check_generation(store, generation)
            if time.monotonic() > deadline:
                self.fail(f"not every rank joined generation {generation} within {deadline_seconds:.0f}s")
            time.sleep(_POLL_SECONDS)
        self.tear_down()
        try:
            dist.init_process_group(
                self.backend,
                store=dist.PrefixStore(here + "pg/", store),
                rank=self.rank,
                world_size=self.world_size,
                timeout=self.timeout,
            )
        except (RuntimeError, ValueError) as error:
            self.fail(f"could not form the process group of generation {generation}: {error}")
        self._check_generation(store, generation)
        self.generation = generation

    def tear_down(self) -> None:
        """:func:`destroy_groups`, giving the recovery up for every rank if it cannot be done."""
        try:
            destroy_groups()
        except RecoveryFailed as error:
            self.fail(str(error))

    def _check_generation(self, store: dist.Store, generation: int) -> None:
        self._check_not_failed(store)
        now = self.current_generation(store)
        if now != generation:
            self.fail(f"generation {now} appeared while generation {generation} formed (a second fault)")

    def _check_not_failed(self, store: dist.Store) -> None:
        if store.check([self._failed_key]):
            reason = store.get(self._failed_key).decode(errors="replace")
            raise RecoveryFailed(f"another rank gave up the recovery: {reason}")

    def fail(self, reason: str) -> NoReturn:
        """Give the recovery up: tell the other ranks through the store (they stop waiting), then raise."""
        with contextlib.suppress(Exception):  # the store may be the thing that failed
            store = self.store()
            if not store.check([self._failed_key]):  # the first rank's reason is the one worth reading
                store.set(self._failed_key, f"rank {self.rank}: {reason}")
        raise RecoveryFailed(reason)


STUCK_MIN_SECONDS = 5.0
"""The least patience of :class:`StuckWatch`: a healthy survivor begins recovering milliseconds after a peer's death
(its collective fails), a loaded machine's scheduler may delay it by a second or two."""
STUCK_STEPS = 3.0
"""... or this many of the rank's longest step, if longer: a survivor busy in a long step (a big model's forward)
reaches the failed collective only at the end of it."""
WATCH_THREAD_NAME = "megascope-watch"
"""The watch thread's name, in Python and for the kernel (at most 15 characters)."""
_PR_SET_NAME = 15
_WATCH_POLL_SECONDS = 0.25
"""How often :class:`StuckWatch` reads the generation: one loopback store read per quarter second."""


class StuckWatch:
    """Releases a survivor that never saw its collective fail (see the module's docstring): a thread that reads the
    store's generation; once one newer than the rank's was announced and the rank has not begun recovering (or
    finished) within its patience, it tells the replacement to join that generation and ends the process with
    :data:`~megascope.engine.runtime.recovery_env.STUCK_SURVIVOR_EXIT`: its guard replaces it. A healthy rank
    mistaken for a stuck one costs a replacement's start, not a step: its replacement takes the donor's state.

    Its own store client: the trainer's is used by the main thread, and a TCPStore client is not for two threads."""

    def __init__(self, recovery: Recovery, patience: Callable[[], float]) -> None:
        """``patience``: seconds a healthy rank may take to begin recovering (read at each announcement)."""
        self._recovery = recovery
        self._patience = patience
        self._store = recovery.connect()
        self._lock = threading.Lock()
        self._recovering = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=WATCH_THREAD_NAME, daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def recovering(self) -> Iterator[None]:
        """The main thread's recovery (the generation is this rank's to change meanwhile): never left from."""
        with self._lock:
            self._recovering = True
        try:
            yield
        finally:
            with self._lock:
                self._recovering = False

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2 * _WATCH_POLL_SECONDS)

    def _run(self) -> None:
        # Named for the kernel too (top -H, /proc/PID/task/TID/comm): bench/recovery_overhead.py reads its CPU time.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, WATCH_THREAD_NAME.encode())
        announced: tuple[int, float] | None = None  # the newer generation seen, and when
        while not self._stopped.wait(_WATCH_POLL_SECONDS):
            try:
                generation = self._recovery.current_generation(self._store)
            except (RuntimeError, ValueError):
                continue  # the store is the launcher's and outlives the ranks: a hiccup, read again
            with self._lock:
                if self._recovering or generation <= self._recovery.generation:
                    announced = None
                    continue
                if announced is None or announced[0] != generation:
                    announced = (generation, time.monotonic())
                waited = time.monotonic() - announced[1]
                if waited >= self._patience():
                    self._leave(generation, waited)  # under the lock: the main thread cannot begin recovering

    def _leave(self, generation: int, waited: float) -> NoReturn:
        code = recovery_env.STUCK_SURVIVOR_EXIT
        with contextlib.suppress(Exception):  # leaving all the same: its replacement would then open a generation
            self._recovery.leave_for(self._store, generation)
        print(
            f"megascope: rank {self._recovery.rank}: generation {generation} was announced {waited:.1f}s ago and this "
            f"rank never saw its collective fail (stuck in it); exiting with {code} for a replacement to join "
            f"generation {generation} in its place",
            file=sys.stderr,
            flush=True,
        )
        os._exit(code)


def shut_down(keep: tuple[str, int]) -> None:
    """Shut this rank's TCP connections down, so that every peer blocked on this rank in the failed collective sees
    them closed at once and fails too (gloo in torch 2.13 has no abort that does this: pytorch#190731).

    Every connected TCP socket but the one to ``keep`` (the recovery store, needed next): gloo's pairs, including
    those it connected lazily after the group formed (a snapshot taken at the group's start missed them, and a peer
    blocked on one waited for the group's timeout, seen in a 100-fault soak), and the first store's. The agent's
    channel is a Unix socket, untouched; a listening socket is left alone (gloo's listener dies on a shut-down one).
    The descriptors stay open: their owners close them when their groups go."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            connection = socket.socket(fileno=fd)
            try:
                if connection.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if connection.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    continue
                host, port = connection.getpeername()[:2]  # OSError when not connected
                if (host.removeprefix("::ffff:"), port) != keep:  # torch's stores use IPv4 mapped into IPv6
                    connection.shutdown(socket.SHUT_RDWR)
            finally:
                connection.detach()  # the descriptor stays its owner's


DESTROY_SECONDS = 10.0
"""How long tearing the broken groups down may take before the recovery is given up (a full restart instead)."""


def destroy_groups(deadline_seconds: float = DESTROY_SECONDS) -> None:
    """Destroy every process group of this rank (the broken ones of the last generation), before forming new ones.

    Their connections were shut down already (:func:`shut_down`). The teardown runs on a thread of its own, which
    also holds the groups' last references: a broken gloo group's destructor waits for its worker threads, and one
    may sit in the failed collective until the group's timeout (seen now and then in a 100-fault soak); the
    recovery waits only for torch's bookkeeping, and gives up (RecoveryFailed) past ``deadline_seconds``. No
    ``gc.collect()`` here: with torch's modules loaded one takes ~0.4 s, on the path every rank waits on."""
    if not dist.is_initialized():
        return
    doomed: list[object] = list(dist.distributed_c10d._world.pg_map)
    done = threading.Event()

    def tear_down() -> None:
        with contextlib.suppress(Exception):  # a group whose peer died may fail its own teardown; it is gone anyway
            dist.destroy_process_group()
        done.set()
        doomed.clear()  # the last references: the destructors run here, however long they wait

    threading.Thread(target=tear_down, name="megascope-old-groups", daemon=True).start()
    if not done.wait(deadline_seconds):
        raise RecoveryFailed(f"the broken process group was not torn down within {deadline_seconds:.0f}s")


@dataclass
class Standing:
    """What one rank brings to the recovery, exchanged by every rank once the new group formed."""

    rank: int
    completed: int
    """The last step whose optimizer step this rank finished; -1 for a replacement (no state)."""
    in_flight: int
    """The step this rank was inside when its collective failed; 0 when it was between steps."""
    failed_wall_time: float | None
    """When this rank saw its collective fail (survivors); None for a replacement."""
    fork_wall_time: float | None = None
    joined_wall_time: float | None = None
    """A replacement's start and the moment it was in the new group."""


@dataclass
class Agreement:
    """What every rank concludes from the exchange (the same on every rank)."""

    step: int
    donor: int
    steps_redone: int
    replaced_ranks: list[int]
    failed_wall_time: float
    replacement_ready_seconds: float


def exchange(mine: Standing) -> Agreement:
    """Every rank's standing (an all-gather on the new group), and the step and donor every rank agrees on."""
    standings: list[Standing | None] = [None] * dist.get_world_size()
    dist.all_gather_object(standings, mine)
    known = [s for s in standings if s is not None]
    step = max(s.completed for s in known)
    if step < 0:
        raise RecoveryFailed("no rank holds any state (every rank is a replacement): the job must restart")
    donor = min(s.rank for s in known if s.completed == step)
    failed = [s.failed_wall_time for s in known if s.failed_wall_time is not None]
    replaced = sorted(s.rank for s in known if s.completed < 0)
    ready = [
        s.joined_wall_time - s.fork_wall_time
        for s in known
        if s.fork_wall_time is not None and s.joined_wall_time is not None
    ]
    return Agreement(
        step=step,
        donor=donor,
        steps_redone=max(0, max(s.in_flight for s in known) - step),
        replaced_ranks=replaced,
        failed_wall_time=min(failed) if failed else time.time(),
        replacement_ready_seconds=max(ready, default=0.0),
    )


def broadcast_tensors(tensors: Sequence[torch.Tensor], donor: int) -> int:
    """Overwrite ``tensors`` on every rank with the donor's (same names, shapes and order on every rank); the
    bytes sent. One flat buffer per dtype: a few large broadcasts, not one per tensor."""
    sent = 0
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=donor)
        offset = 0
        with torch.no_grad():
            for tensor in group:
                n = tensor.numel()
                tensor.copy_(flat[offset : offset + n].view_as(tensor))
                offset += n
        sent += flat.numel() * flat.element_size()
    return sent


def broadcast_objects(value: Any, donor: int) -> Any:
    """The donor's ``value`` (picklable) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=donor)
    return box[0]
