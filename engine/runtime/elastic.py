"""torchrun as megascope runs it: ``python -m megascope.engine.runtime.elastic TORCHRUN-ARGS`` (engine/runtime/launch.py
always starts torchrun so).

Before torch.distributed.run's own main, in the same process:

- with :data:`~bound_stores.STORE_HOST_ENV` set (a job whose rendezvous is on loopback), torch's stores listen on that
  address only, as :mod:`~megascope.engine.runtime.bound_stores` describes;
- with ``MEGASCOPE_RECOVERY=inplace`` (``--recovery inplace``), it hosts the **recovery store**: a TCPStore server on
  loopback (the stores' address, else 127.0.0.1), on a free port, named in ``MEGASCOPE_RECOVERY_STORE`` for every
  rank to inherit. It lives as long as torchrun's process, which outlives every rank (rank 0's own store dies with
  rank 0), so the ranks left after a fault meet their replacement there (engine/runtime/recovery_env.py).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import MutableMapping
from typing import Any

from megascope.engine.runtime import bound_stores, recovery_env

_store: Any = None
"""The recovery store's server, held for the life of this process."""


def host_recovery_store(host: str) -> tuple[Any, str]:
    """A TCPStore server listening on the loopback address ``host`` only, on a free port: ``(store, "HOST:PORT")``."""
    if not bound_stores.is_loopback_address(host):
        raise ValueError(f"the recovery store must listen on a loopback address, not {host!r}")
    address = "127.0.0.1" if host == "localhost" else host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = bound_stores._listen(family, address, 0)
    if listener is None:
        raise OSError(f"cannot listen on {address} for the recovery store")
    port, fd = listener
    import torch.distributed as dist

    # Its own socket, bound to loopback (a TCPStore given only a host would listen on every interface); no worker
    # count to wait for: ranks come and go.
    store = dist.TCPStore(address, port, is_master=True, wait_for_workers=False, master_listen_fd=fd)
    return store, f"[{address}]:{port}" if family == socket.AF_INET6 else f"{address}:{port}"


def prepare(environ: MutableMapping[str, str] | None = None) -> Any:
    """Bind the stores and host the recovery store as ``environ`` (this process's environment) asks; the store's
    server (None when recovery is not in place), its address set in ``environ`` for the ranks."""
    environ = os.environ if environ is None else environ
    bound_stores.bind_from_env(environ)
    environ.pop(recovery_env.RECOVERY_STORE_ENV, None)  # one from an outer job would name a store not ours
    if environ.get(recovery_env.RECOVERY_ENV) != recovery_env.INPLACE:
        return None
    store, address = host_recovery_store(environ.get(bound_stores.STORE_HOST_ENV) or "127.0.0.1")
    environ[recovery_env.RECOVERY_STORE_ENV] = address
    return store


def main() -> None:
    global _store
    _store = prepare()
    from torch.distributed.run import main as torchrun

    sys.argv[0] = "torchrun"
    torchrun()


if __name__ == "__main__":
    main()
