"""Keep a private local cluster's PyTorch store on 127.0.0.1: a PyTorch workaround, quarantined.

A private cluster (`cluster.init_ray` without an address) has no reason to be reachable from
the network. Two things stand in the way, each worked around with the condition for removing
it: Ray turns 127.0.0.1 into the machine's external address (`ray_workarounds.loopback_only`,
with Ray's other workarounds), and PyTorch's c10d store, which Ray Train starts in every
trial's rank-0 worker, listens on all interfaces (`torch_store_on_loopback`, here). `tests/test_reliability.py` lists the listening sockets
of the driver and the cluster's processes during a search and finds only 127.0.0.1.
"""

from __future__ import annotations

import logging
import sys

from simpo_ray.errors import one_line

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- PyTorch's store
#
# PyTorch's c10d TCPStore (which Ray Train's process-group setup starts on rank 0 of every
# trial, even with one worker) listens on all interfaces: it takes no bind address, only an
# already-listening socket (`master_listen_fd`). `torch_store_on_loopback` is the private
# cluster's `worker_process_setup_hook`: in each worker it wraps torch's
# `rendezvous._create_c10d_store` so that a master store for a 127.0.0.1 rendezvous listens on
# a socket bound to 127.0.0.1 (gloo's own sockets: GLOO_SOCKET_IFNAME=lo, `cluster.init_ray`).
# REMOVE when TCPStore (or Ray Train's setup) binds the master address it is given.
STORE_HOOK = "simpo_ray.infra.loopback.torch_store_on_loopback"  # for runtime_env's worker_process_setup_hook
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
