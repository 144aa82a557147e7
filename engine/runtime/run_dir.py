"""Every path of a run directory, named once.

The run directory (``--run-dir``) is shared by the processes of one node's job: the launcher writes the config
there, each rank writes its telemetry and its stacks there, the agent reads them, writes restart requests and
torch elastic's logs there, and fault injection keeps its firing markers there. Every reader and writer takes
the path from here, so a file cannot be renamed on one side only.

::

    <run_dir>/
      config.json             the TrainConfig every rank reads (written by the launcher)
      restart_from.json       {"step": N}: the next start resumes from checkpoint step N (written by the agent,
                              read and removed by the ranks' checkpoint manager)
      telemetry/rank<R>.jsonl one JSON object per line: step reports and events (written by rank R)
      stacks/rank<R>.txt      every thread's Python stack, appended on SIGUSR1 (faulthandler in rank R)
      faults/<fault>.<n>      one empty file per firing of an injected crash or hang (survives restarts)
      logs/[<node>/]          torch elastic's per-attempt logs of the ranks (``megascope train``: logs/; the
                              agent: logs/<node>/)
      checkpoints/            the conventional --ckpt-dir of the demo and benches (any directory works)
      agent-<node>.log|.out   the demo's agents' stderr and stdout (dashboard/local_cluster.py)
      agent-<node>.sock       the agent's worker channel: a Unix socket (mode 0600) serving only WorkerService
      agent-<node>.worker     {"address", "secret"} (mode 0600): how ranks the agent did not launch reach it
      record/<node>.sqlite    the agent's persistent record of its node (megascope.protos.recording): telemetry,
                              events, rank statuses, stacks; read by ``megascope replay|export|report``

Pure standard library: the agent and the dashboard import it without torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG = "config.json"
RESTART_FROM = "restart_from.json"
TELEMETRY = "telemetry"
STACKS = "stacks"
FAULTS = "faults"
LOGS = "logs"
CHECKPOINTS = "checkpoints"
RECORD = "record"
RECORD_SUFFIX = ".sqlite"


def config_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG


def restart_request_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESTART_FROM


def telemetry_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TELEMETRY


def telemetry_file(run_dir: str | Path, rank: int) -> Path:
    return telemetry_dir(run_dir) / f"rank{rank}.jsonl"


def telemetry_files(run_dir: str | Path) -> list[Path]:
    """Every rank's telemetry file, in name order."""
    return sorted(telemetry_dir(run_dir).glob("rank*.jsonl"))


def stacks_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / STACKS / f"rank{rank}.txt"


def faults_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / FAULTS


def fault_marker(run_dir: str | Path, fault_description: str, firing: int) -> Path:
    """The file recording firing number ``firing`` (from 0) of the fault ``describe()`` calls ``fault_description``."""
    name = fault_description.replace(":", "_").replace(",", "_").replace("=", "-")
    return faults_dir(run_dir) / f"{name}.{firing}"


def logs_dir(run_dir: str | Path, node: str | None = None) -> Path:
    """torch elastic's log directory: ``logs/`` for ``megascope train``, ``logs/<node>/`` under an agent."""
    return Path(run_dir) / LOGS / node if node else Path(run_dir) / LOGS


def record_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / RECORD


def record_file(run_dir: str | Path, node: str) -> Path:
    """Node ``node``'s record (one file per node: each agent writes only its own)."""
    return record_dir(run_dir) / f"{node}{RECORD_SUFFIX}"


def record_files(run_dir: str | Path) -> list[Path]:
    """Every node's record in the run directory, in name order."""
    return sorted(record_dir(run_dir).glob(f"*{RECORD_SUFFIX}"))


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def agent_log(run_dir: str | Path, node: str) -> Path:
    """The demo's agent stderr (its flag errors are read back from it)."""
    return Path(run_dir) / f"agent-{node}.log"


def agent_output(run_dir: str | Path, node: str) -> Path:
    """The demo's agent stdout, after the line that gives its address."""
    return Path(run_dir) / f"agent-{node}.out"


SOCKET_PATH_MAX = 100
"""A Unix socket's path must fit ``sun_path`` (108 bytes on Linux, 104 on macOS): longer ones go elsewhere."""


def worker_socket(run_dir: str | Path, node: str) -> Path:
    """The agent's worker channel (a Unix socket); absolute, because the ranks may start in another directory."""
    return Path(run_dir).resolve() / f"agent-{node}.sock"


def worker_info(run_dir: str | Path, node: str) -> Path:
    """The worker channel's address and the job's secret, for ranks that the agent did not launch."""
    return Path(run_dir) / f"agent-{node}.worker"


def write_restart_request(run_dir: str | Path, step: int) -> None:
    """Ask the next start of the ranks to resume from ``step`` (atomically: a rank never reads half a file)."""
    path = restart_request_file(run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, path)


def read_restart_request(run_dir: str | Path) -> int:
    """The step a restart asked to resume from; 0 when none was asked (resume the newest)."""
    path = restart_request_file(run_dir)
    return int(json.loads(path.read_text())["step"]) if path.is_file() else 0


def clear_restart_request(run_dir: str | Path) -> None:
    """Forget the request once every rank has read it: it is for one restart."""
    restart_request_file(run_dir).unlink(missing_ok=True)
