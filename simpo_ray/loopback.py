"""Keep a private local cluster on 127.0.0.1: workarounds for Ray 2.60 and PyTorch, quarantined.

A private cluster (`cluster.init_ray` without an address) has no reason to be reachable from
the network. Two things stand in the way, each worked around here with the condition for
removing it: Ray turns 127.0.0.1 into the machine's external address (`loopback_only`), and
PyTorch's c10d store, which Ray Train starts in every trial's rank-0 worker, listens on all
interfaces (`torch_store_on_loopback`). `tests/test_reliability.py` lists the listening sockets
of the driver and the cluster's processes during a search and finds only 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from simpo_ray.errors import one_line

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- Ray's node address
#
# `ray.init(_node_ip_address="127.0.0.1")` alone is not enough: Ray turns 127.0.0.1 into the
# machine's external address (`services.resolve_ip_for_localhost`) unless
# `ray_constants.ENABLE_RAY_CLUSTER` is False, which the env var below sets in every Ray process
# (read at `import ray`; the raylet, GCS, agents and workers inherit it). Then gcs_server, the
# raylet, the agents, the driver's and every worker's gRPC servers bind 127.0.0.1 (the C++
# servers bind localhost only when node_ip_address is 127.0.0.1).
# REMOVE when `ray.init` has a supported way to keep a local cluster on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within the block (the `ray.init` of a private cluster), Ray resolves this node to 127.0.0.1."""
    from ray._private import ray_constants

    saved_env = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False  # ray is already imported here: its copy of the env var
    try:
        yield
    finally:  # the processes started have it; later joins of other clusters must not
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- PyTorch's store
#
# PyTorch's c10d TCPStore (which Ray Train's process-group setup starts on rank 0 of every
# trial, even with one worker) listens on all interfaces: it takes no bind address, only an
# already-listening socket (`master_listen_fd`). `torch_store_on_loopback` is the private
# cluster's `worker_process_setup_hook`: in each worker it wraps torch's
# `rendezvous._create_c10d_store` so that a master store for a 127.0.0.1 rendezvous listens on
# a socket bound to 127.0.0.1 (gloo's own sockets: GLOO_SOCKET_IFNAME=lo, `cluster.init_ray`).
# REMOVE when TCPStore (or Ray Train's setup) binds the master address it is given.
STORE_HOOK = "simpo_ray.loopback.torch_store_on_loopback"  # for runtime_env's worker_process_setup_hook
_STORE_MODULE = "torch.distributed.rendezvous"
_LOOPBACK_NAMES = ("127.0.0.1", "localhost")
_listen_sockets: list = []  # kept open for the stores' lifetime


def _create_store_on_loopback(original):
    def create(hostname, port, rank, world_size, timeout, use_libuv=True):
        import socket

        from torch.distributed import TCPStore

        agent_store = sys.modules[_STORE_MODULE]._torchelastic_use_agent_store()
        if rank != 0 or hostname not in _LOOPBACK_NAMES or agent_store:
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(1024)
        except OSError:
            sock.close()
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        store = TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                         multi_tenant=True, master_listen_fd=sock.fileno(), use_libuv=use_libuv)
        _listen_sockets.append(sock)
        return store

    create._simpo_ray_loopback = True
    return create


def _patch_store_module(module) -> None:
    current = module._create_c10d_store
    if not getattr(current, "_simpo_ray_loopback", False):
        module._create_c10d_store = _create_store_on_loopback(current)


class _PatchStoreOnImport:
    """A `sys.meta_path` finder that patches torch's rendezvous module once it is imported (so
    that workers which never use torch do not import it)."""

    def find_spec(self, name, path, target=None):
        if name != _STORE_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch_store_module(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def torch_store_on_loopback() -> None:
    """The private cluster's `worker_process_setup_hook` (see above). Never raises: a failure
    here would stop every Ray worker from starting."""
    try:
        module = sys.modules.get(_STORE_MODULE)
        if module is not None:
            _patch_store_module(module)
        elif not any(isinstance(f, _PatchStoreOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _PatchStoreOnImport())
    except Exception as e:  # noqa: BLE001
        logger.warning("could not keep PyTorch's store on loopback: %s", one_line(e, with_type=True))
