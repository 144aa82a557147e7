"""torch's stores on loopback for a one-node job (engine/runtime/bound_stores.py), checked in this process."""

from __future__ import annotations

import subprocess
import sys

from megascope.engine.runtime import bound_stores
from megascope.engine.runtime.launch import LaunchOptions, launcher_environment, loopback_store_host, torchrun_command

_PROBE = """
import psutil, sys
from datetime import timedelta
from megascope.engine.runtime import bound_stores
assert bound_stores.bind_stores("127.0.0.1")
import torch.distributed as dist
import importlib
rendezvous = importlib.import_module("torch.distributed.rendezvous")
server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, multi_tenant=True)
client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
client.set("k", "v")
assert server.get("k") == b"v"
again = rendezvous.TCPStore("127.0.0.1", server.port, None, True, multi_tenant=True, wait_for_workers=False)
assert again.get("k") == b"v"  # a second tenant of the same port: torch's own sharing, not a second bind
connections = psutil.Process().net_connections("tcp")
print(sorted({c.laddr.ip for c in connections if c.status == "LISTEN" and c.laddr.port == server.port}))
# what init_process_group builds for rank 0 (env://): the module's own TCPStore, bound too
pg_store = rendezvous._create_c10d_store("127.0.0.1", 0, 0, 1, timedelta(seconds=30))
connections = psutil.Process().net_connections("tcp")
print(sorted({c.laddr.ip for c in connections if c.status == "LISTEN" and c.laddr.port == pg_store.port}))
"""


def test_a_store_server_listens_on_loopback_only() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['127.0.0.1']"] * 2


def test_only_loopback_is_bound() -> None:
    assert not bound_stores.bind_stores("10.0.0.1")
    assert not bound_stores.bind_from_env({})
    assert bound_stores.is_loopback_address("::1") and not bound_stores.is_loopback_address("node0")


def test_a_loopback_job_runs_torchrun_with_bound_stores_and_a_network_one_plain_torchrun(tmp_path) -> None:  # type: ignore[no-untyped-def]
    local = LaunchOptions(nproc_per_node=2)
    command = torchrun_command(local, ["-m", "x"], tmp_path, "id")
    # torchrun under engine/runtime/elastic.py, which binds the stores as STORE_HOST_ENV says
    assert command[1:4] == ["-m", "megascope.engine.runtime.elastic", "--local-addr=127.0.0.1"]
    assert launcher_environment(local)[bound_stores.STORE_HOST_ENV] == "127.0.0.1"
    remote = LaunchOptions(nnodes="2", rdzv_endpoint="node0:29400")
    assert loopback_store_host(remote) is None
    remote_command = torchrun_command(remote, ["-m", "x"], tmp_path, "id")
    assert remote_command[1:3] == ["-m", "megascope.engine.runtime.elastic"] and "--local-addr" not in remote_command[3]
    assert bound_stores.STORE_HOST_ENV not in launcher_environment(remote)
