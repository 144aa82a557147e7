"""torch's key-value stores on loopback for a one-node job, rather than on every interface.

A ``TCPStore`` server listens on every interface (``*:PORT``), whatever host it is given: the c10d rendezvous
store (in torchrun's process) and the process group's store (in rank 0) of a job that never leaves 127.0.0.1 are
reachable from the network, and they authenticate nobody. torch offers no host to bind to, but it does take a
socket its caller bound (``TCPStore(master_listen_fd=...)``). So, for a store whose host is a loopback address
(a one-node job: rendezvous on ``127.0.0.1``, ``MASTER_ADDR=127.0.0.1``), :func:`bind_stores` makes every
``TCPStore`` server this process starts listen on that address only.

- torchrun: engine/runtime/elastic.py, the module engine/runtime/launch.py runs torchrun as, binds them before
  torchrun starts when :data:`STORE_HOST_ENV` is set (the launcher sets it when the rendezvous is on loopback).
- ranks: :func:`bind_from_env` before ``init_process_group`` (our trainer calls it); a user's own script that does
  not keeps torch's behaviour (its rank-0 store on every interface).
- gloo's own listeners: ``GLOO_SOCKET_IFNAME`` names the loopback interface (:func:`loopback_interface`), which
  torch does allow; the launcher sets it unless it is set already.

Whatever cannot be bound (the address is not loopback, the port is taken: a second tenant of the same store)
falls back to torch's own behaviour, so this can only narrow where a store listens, never break a launch.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from typing import Any

STORE_HOST_ENV = "MEGASCOPE_STORE_HOST"
"""Set by the launcher to the loopback address the job's stores should listen on."""
_bound_to: str | None = None


def is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def bind_stores(host: str) -> bool:
    """From now on, a TCPStore server this process starts for ``host`` listens on ``host`` only. Only for a
    loopback ``host``; whether it is in effect."""
    global _bound_to
    if not is_loopback_address(host):
        return False
    if _bound_to is not None:
        return _bound_to == host
    import importlib

    import torch.distributed as dist

    # By module, not ``import torch.distributed.rendezvous as ...``: torch.distributed's attribute of that name is
    # the rendezvous *function*.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    c10d_rendezvous_backend = importlib.import_module("torch.distributed.elastic.rendezvous.c10d_rendezvous_backend")

    address = "127.0.0.1" if host == "localhost" else host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    class BoundTCPStore(dist.TCPStore):  # type: ignore[misc]
        """A TCPStore whose server (``is_master``) listens on the loopback address only."""

        def __init__(
            self,
            host_name: str,
            port: int,
            world_size: int | None = None,
            is_master: bool = False,
            timeout: timedelta = timedelta(seconds=300),
            wait_for_workers: bool = True,
            multi_tenant: bool = False,
            master_listen_fd: int | None = None,
            use_libuv: bool = True,
        ) -> None:
            if is_master and master_listen_fd is None and is_loopback_address(host_name):
                listener = _listen(family, address, port)
                if listener is not None:
                    port, master_listen_fd = listener
            super().__init__(
                host_name, port, world_size, is_master, timeout, wait_for_workers, multi_tenant, master_listen_fd,
                use_libuv,
            )  # fmt: skip

    for module in (dist, rendezvous, c10d_rendezvous_backend):
        module.TCPStore = BoundTCPStore  # type: ignore[attr-defined]
    _bound_to = host
    return True


def _listen(family: socket.AddressFamily, address: str, port: int) -> tuple[int, int] | None:
    """A socket listening on ``address:port`` (0: any free port), handed over as ``(port, fd)``; None when it
    cannot be bound (torch then binds as it always does, or finds the store already served in this process)."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, port))
        listener.listen(socket.SOMAXCONN)
        bound_port = int(listener.getsockname()[1])
    except OSError:
        listener.close()
        return None
    return bound_port, listener.detach()  # the store owns the descriptor from now on


def loopback_interface(host: str) -> str | None:
    """The name of the network interface that holds ``host`` (``lo`` on Linux for 127.0.0.1), for
    ``GLOO_SOCKET_IFNAME``: gloo then listens there, rather than on the address the host's name resolves to."""
    import psutil

    address = "127.0.0.1" if host == "localhost" else host.strip("[]")
    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address.split("%")[0] == address for entry in addresses):
            return name
    return None


def bind_from_env(environ: Any = None) -> bool:
    """:func:`bind_stores` for the host the launcher named in :data:`STORE_HOST_ENV`, if any."""
    host = (os.environ if environ is None else environ).get(STORE_HOST_ENV)
    return bind_stores(str(host)) if host else False
