"""Launch a node's training ranks through torch elastic, exactly as ``torchrun`` does (it *is* torchrun).

Both ``megascope train`` and the agent start ``python -m torch.distributed.run`` as a child process: one
launch path, and the elastic agent (rendezvous, restarts) lives in its own process, so the megascope agent
stays responsive and can stop the whole process group on shutdown.

Rendezvous is c10d: a single node uses an ephemeral store on 127.0.0.1; many nodes pass the same
``--rdzv-endpoint`` and ``--rdzv-id``. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` makes every restart attempt
build a fresh store for its process group: with the store shared, restarted workers can read the previous
attempt's gloo addresses and fail or hang (pytorch/pytorch#135712).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megascope.engine.config import ConfigError, TrainConfig
from megascope.engine.runtime import bound_stores, parent_death, rank_guard, recovery_env
from megascope.engine.runtime.run_dir import config_file, logs_dir

_STOP_GRACE_SECONDS = 15.0


@dataclass(frozen=True)
class LaunchOptions:
    nproc_per_node: int = 1
    nnodes: str = "1"
    """``N`` or ``MIN:MAX`` (elastic)."""
    rdzv_endpoint: str | None = None
    """``HOST:PORT`` of the c10d rendezvous; None for a single node on an ephemeral local port."""
    rdzv_id: str | None = None
    max_restarts: int = 0
    monitor_interval: float = 0.1
    """How often torch elastic polls its workers (seconds): how soon a dead rank starts a restart."""
    no_python: bool = False
    """The entry point is a command, run as given by each rank's guard (torchrun's ``--no-python``): ``bash
    wrapper.sh``, ``accelerate launch train.py``; not a Python script or ``-m module``."""
    recovery: str | None = None
    """``--recovery``: ``inplace`` (a failed rank is replaced, the others go on) or ``restart`` (every rank restarts
    from the newest checkpoint); None: in place where it is safe (:func:`recovery_mode`)."""

    def node_range(self) -> tuple[int, int]:
        try:
            low, _, high = self.nnodes.partition(":")
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise ConfigError(f"--nnodes must be N or MIN:MAX, got {self.nnodes!r}") from None
        if lo < 1 or hi < lo:
            raise ConfigError(f"--nnodes must satisfy 1 <= MIN <= MAX, got {self.nnodes!r}")
        return lo, hi

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LaunchOptions:
        """The launch flags (``megascope train``'s, which ``megascope agent`` shares), validated."""
        options = cls(
            nproc_per_node=args.nproc_per_node,
            nnodes=args.nnodes,
            rdzv_endpoint=args.rdzv_endpoint,
            rdzv_id=args.rdzv_id,
            max_restarts=args.max_restarts,
            no_python=getattr(args, "no_python", False),  # `megascope agent`'s flag; `megascope train` runs ours
            recovery=getattr(args, "recovery", None),
        )
        options.validate()
        return options

    def validate(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        _, max_nodes = self.node_range()
        if max_nodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if self.recovery is not None and self.recovery not in recovery_env.MODES:
            raise ConfigError(f"--recovery must be one of {', '.join(recovery_env.MODES)}, got {self.recovery!r}")
        if self.recovery == recovery_env.INPLACE and max_nodes > 1:
            raise ConfigError(
                f"--recovery inplace needs a job of one node for now, got --nnodes {self.nnodes}; "
                "use --recovery restart (every rank restarts from the newest checkpoint)"
            )
        if self.recovery == recovery_env.INPLACE and self.nproc_per_node < 2:
            raise ConfigError(
                "--recovery inplace needs at least 2 ranks (a replacement takes its state from a surviving rank), "
                f"got --nproc-per-node {self.nproc_per_node}; use --recovery restart"
            )


class LaunchFailed(RuntimeError):
    """The ranks failed after the allowed restarts."""


def write_config(config: TrainConfig) -> Path:
    path = config_file(config.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json())
    return path


def trainer_entry(config: TrainConfig) -> list[str]:
    """torchrun's entry point for our trainer: writes the config every rank will read."""
    return ["-m", rank_guard.TRAINER_MODULE, str(write_config(config).resolve())]


def recovery_mode(options: LaunchOptions, entry: Sequence[str]) -> str:
    """How a fault is recovered: ``--recovery`` as given, else in place for our trainer (``entry``) on one node of
    several ranks (a node lost cannot be recovered in place yet), and a restart of every rank for anything else (a
    user's script cannot rebuild its group; a job of one rank has no other rank to take the state from)."""
    if options.recovery is not None:
        return options.recovery
    ours = list(entry[:2]) == ["-m", rank_guard.TRAINER_MODULE] and not options.no_python
    # A job of one rank has no surviving rank to take the state from.
    alone = options.nproc_per_node < 2
    return recovery_env.INPLACE if ours and options.node_range() == (1, 1) and not alone else recovery_env.RESTART


def torchrun_command(options: LaunchOptions, entry: Sequence[str], log_dir: Path, run_id: str) -> list[str]:
    """The ``torchrun`` command line for ``entry`` (``-m module args`` or ``script.py args``).

    Every rank runs under :mod:`megascope.engine.runtime.rank_guard`, which reports how the rank ended to the agent;
    torchrun itself under :mod:`megascope.engine.runtime.elastic`, which hosts the recovery store when recovery is in
    place (:func:`launcher_environment` says).
    """
    options.validate()
    low, high = options.node_range()
    store_host = loopback_store_host(options)
    # On loopback, torchrun with its stores bound there (engine/runtime/bound_stores.py, by STORE_HOST_ENV), and this
    # node's address (MASTER_ADDR, where rank 0's store is) the same loopback address rather than the host's name.
    local_addr = [f"--local-addr={store_host}"] if store_host else []
    return [
        sys.executable, "-m", "megascope.engine.runtime.elastic", *local_addr,
        f"--nnodes={low}" if low == high else f"--nnodes={low}:{high}",
        f"--nproc-per-node={options.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={options.rdzv_endpoint or '127.0.0.1:0'}",
        f"--rdzv-id={run_id}",
        f"--max-restarts={options.max_restarts}",
        f"--monitor-interval={options.monitor_interval}",
        f"--log-dir={log_dir}",
        *_rendezvous_settings(low, high),
        "-m", "megascope.engine.runtime.rank_guard",
        *([rank_guard.NO_PYTHON_FLAG] if options.no_python else []),
        *entry,
    ]  # fmt: skip


def script_entry(command: Sequence[str], no_python: bool = False) -> list[str]:
    """torchrun's entry point for a user's command line (what follows ``--``).

    Without ``no_python`` the command is a Python script (or ``-m module``) that the ranks run with this interpreter;
    a leading interpreter (``python``, ``python3.11``, this interpreter's path) is dropped rather than run as the
    script (``python -u python train.py``). With ``no_python`` it is run as given."""
    entry = list(command)
    if not no_python and entry and _is_python(entry[0]):
        entry = entry[1:]
    return entry


_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)?)?")


def _is_python(program: str) -> bool:
    if _PYTHON_NAME.fullmatch(os.path.basename(program)):
        return True
    return os.path.sep in program and os.path.realpath(program) == os.path.realpath(sys.executable)


ELASTIC_LAST_CALL_SECONDS = 5
"""With ``--nnodes MIN:MAX``, how long a rendezvous that has MIN nodes waits for more (torch's default is 30 s):
a restart after a node is lost should not idle half a minute waiting for it."""


def _rendezvous_settings(low: int, high: int) -> list[str]:
    if low == high:
        return []
    return [f"--rdzv-conf=last_call_timeout={ELASTIC_LAST_CALL_SECONDS}"]


def loopback_store_host(options: LaunchOptions) -> str | None:
    """The loopback address of a job whose rendezvous is on loopback (one node, or nodes on one host): its stores
    listen there only. None for a rendezvous on a network address (torch's stores then listen on every interface)."""
    host = (options.rdzv_endpoint or "127.0.0.1:0").rpartition(":")[0].strip("[]")
    return host if bound_stores.is_loopback_address(host) and host != "localhost" else None


def launcher_environment(
    options: LaunchOptions, extra: dict[str, str] | None = None, entry: Sequence[str] = ()
) -> dict[str, str]:
    """torchrun's environment for ``entry``: this one, with the stores' address, the recovery mode
    (:func:`recovery_mode`), thread counts, and ``extra``."""
    env = dict(os.environ)
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # The launcher's process (engine/runtime/elastic.py) names the recovery store; an outer job's must not leak in.
    env[recovery_env.RECOVERY_ENV] = recovery_mode(options, entry)
    env.pop(recovery_env.RECOVERY_STORE_ENV, None)
    env.pop(recovery_env.REPLACEMENT_ENV, None)
    store_host = loopback_store_host(options)
    if store_host:
        env[bound_stores.STORE_HOST_ENV] = store_host  # rank 0 binds the process group's store there too
        interface = bound_stores.loopback_interface(store_host)
        if interface and "GLOO_SOCKET_IFNAME" not in env:
            env["GLOO_SOCKET_IFNAME"] = interface  # gloo's listeners too, not on the address of the host's name
    # As torchrun's own CLI would for several ranks, but a share of the cores rather than one thread each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nproc_per_node)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def start(
    options: LaunchOptions,
    entry: Sequence[str],
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start torchrun for this node; ``new_session`` puts it in its own process group (see :func:`stop`)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = torchrun_command(options, entry, log_dir, options.rdzv_id or uuid.uuid4().hex)
    # If whoever launched torchrun dies (the agent killed with its node), the ranks stop with it rather than
    # train on unobserved: the other nodes see the node lost and restart without it.
    return subprocess.Popen(
        parent_death.command(signal.SIGTERM, command),
        env=launcher_environment(options, extra_env, entry),
        start_new_session=new_session,
    )


def stop(process: subprocess.Popen[bytes], grace_seconds: float = _STOP_GRACE_SECONDS) -> int:
    """SIGTERM torchrun's process group (it stops its workers), SIGKILL whatever is left after the grace."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    return process.returncode


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    except ProcessLookupError:
        pass


def launch(config: TrainConfig, options: LaunchOptions) -> None:
    """Run this node's ranks until training ends (foreground); raises LaunchFailed if they fail for good."""
    process = start(options, trainer_entry(config), logs_dir(config.run_dir))
    try:
        code = process.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached torchrun too (same process group); give it the time to stop its workers.
        stop(process)
        raise
    if code != 0:
        logs = logs_dir(config.run_dir)
        raise LaunchFailed(f"torchrun exited with code {code}; its report is above, logs under {logs}")
