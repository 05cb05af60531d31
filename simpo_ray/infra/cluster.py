"""The Ray cluster a run or a search uses: start or join it, describe it, and plan what fits.

`init_ray` starts a private local cluster (or joins one) with safe defaults; `ClusterInfo`
describes its nodes (or this machine, before Ray starts); `plan_concurrency` / `check_fits`
say how many trials' worker groups fit at once, or why not even one does.

A private local cluster listens on 127.0.0.1 only and keeps its files under `ray_temp_dir()`
(not Ray's shared /tmp/ray), so that processes a killed search left behind can be found and
ended when the next one starts (`guard.end_dead_session_processes`).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simpo_ray.infra import guard, loopback, ray_workarounds
from simpo_ray.errors import UserError, one_line
from simpo_ray.io import is_uri

if TYPE_CHECKING:
    from simpo_ray.config import Resources

# Logical memory (bytes) a Tune trial driver requests. It needs no CPU or GPU (Train's own
# placement group holds the workers'), but a placement-group bundle must be non-empty; memory is
# a resource every node has, so this never blocks CPU/GPU packing.
DRIVER_MEMORY_BYTES = 64 * 2**20

# Train V2 settings, read in the process that calls fit() and propagated to the controller and
# workers: poll the worker group every 0.25 s instead of 2 s (a finished run waits for the next
# poll), and start no preemption-watcher actor (one process fewer per run).
TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # A reused trial process waits this long for the stopped trial's loop to leave (Tune's
    # default, 2 s, fails the *next* trial when a large model takes longer to let go).
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "120",
}

_EPS = 1e-9

# Where private local clusters keep their session directories; `SIMPO_RAY_RAY_TEMP_DIR` moves it.
RAY_TEMP_DIR_ENV = "SIMPO_RAY_RAY_TEMP_DIR"
LOOPBACK = "127.0.0.1"
# Starting a local cluster: attempts, and the pause before each retry (transient failures only).
INIT_ATTEMPTS = 3
INIT_RETRY_PAUSE_S = (2.0, 5.0)


@dataclass(frozen=True)
class ClusterInfo:
    """Resources of a Ray cluster: the total and each live node's."""

    total: dict[str, float]
    nodes: tuple[dict[str, float], ...]
    address: str | None = None

    @property
    def cpus(self) -> float:
        return float(self.total.get("CPU", 0.0))

    @property
    def gpus(self) -> float:
        return float(self.total.get("GPU", 0.0))

    @classmethod
    def from_ray(cls) -> ClusterInfo:
        """The cluster this process is connected to."""
        import ray

        nodes = tuple({k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive"))
        address = getattr(ray.get_runtime_context(), "gcs_address", None)
        return cls(total={k: float(v) for k, v in ray.cluster_resources().items()}, nodes=nodes, address=address)

    @classmethod
    def local(cls) -> ClusterInfo:
        """This machine's CPUs and GPUs: what a local `ray.init()` would get (starts no Ray)."""
        gpus = 0
        try:
            import torch

            gpus = torch.cuda.device_count()
        except ImportError:
            pass
        node = {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}
        return cls(total=node, nodes=(node,))


def _slots_on_node(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of `bundle` fit on a node with resources `node`."""
    slots = math.inf
    for key, need in bundle.items():
        slots = min(slots, math.floor(node.get(key, 0.0) / need + _EPS))
    return int(slots) if slots != math.inf else 0


def plan_concurrency(cluster: ClusterInfo, resources: Resources, requested_max: int | None = None) -> int:
    """Largest number of trials whose worker groups fit in `cluster` at the same time.

    Per trial: `num_workers` bundles of `resources.worker_bundle` (Train V2's own placement
    group, PACK, may span nodes); the trial driver and Train's helper actors request no CPU/GPU.
    Identical bundles pack node by node, so the cluster holds `sum(floor(node / bundle))` worker
    slots and `slots // num_workers` trials, capped at `requested_max`.

    Raises `UserError` when not even one trial fits, or `requested_max` < 1.
    """
    if requested_max is not None and (not isinstance(requested_max, int) or requested_max < 1):
        raise UserError(f"max_concurrent must be an integer >= 1, got {requested_max!r}")
    bundle = resources.worker_bundle
    for key, need in bundle.items():
        biggest = max((n.get(key, 0.0) for n in cluster.nodes), default=0.0)
        if need > biggest + _EPS:
            raise UserError(
                f"a trial worker needs {need:g} {key} but no node has that many "
                f"(largest node: {biggest:g} {key}, cluster total: {cluster.total.get(key, 0.0):g} {key}); "
                f"lower {'gpus' if key == 'GPU' else 'cpus'}_per_worker"
            )
    slots = sum(_slots_on_node(n, bundle) for n in cluster.nodes)
    fits = slots // resources.num_workers
    if fits < 1:
        need = {k: v * resources.num_workers for k, v in bundle.items()}
        have = {k: cluster.total.get(k, 0.0) for k in bundle}
        raise UserError(
            f"one trial needs {resources.describe()} = "
            + ", ".join(f"{v:g} {k}" for k, v in need.items())
            + f" but the cluster has room for only {slots} such worker(s) (cluster: "
            + ", ".join(f"{v:g} {k}" for k, v in have.items())
            + "); lower num_workers or the per-worker resources"
        )
    return fits if requested_max is None else min(fits, requested_max)


def check_fits(cluster: ClusterInfo, resources: Resources) -> None:
    """`UserError` when one run's workers can never be placed on `cluster`.

    Ray Train retries an unplaceable worker group forever, so without this a run that asks
    for a GPU on a CPU-only cluster would hang instead of failing.
    """
    plan_concurrency(cluster, resources)


def check_writable(root: str) -> None:
    """`UserError` unless `root` (a local directory; created if missing) is writable. URIs
    (`s3://...`) are left to Ray."""
    if is_uri(root):
        return
    try:
        os.makedirs(root, exist_ok=True)
        probe = Path(root) / f".simpo-ray-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--storage-path: {root} is not writable ({e.strerror or e})") from None


def ray_temp_dir() -> str:
    """The root of this user's private clusters' session directories: `$SIMPO_RAY_RAY_TEMP_DIR`,
    else `<system temp dir>/simpo_ray_ray_<uid>` (short: Ray's socket paths must fit 107 bytes)."""
    if os.environ.get(RAY_TEMP_DIR_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[RAY_TEMP_DIR_ENV]))
    return os.path.join(tempfile.gettempdir(), f"simpo_ray_ray_{os.getuid()}")


def ray_env_defaults() -> None:
    """Environment for the Ray processes this driver starts (call before `ray.init`)."""
    ray_workarounds.disable_print_patch()
    ray_workarounds.quiet_ray_console()


def _is_transient(exc: BaseException) -> bool:
    """A failure to start Ray that another attempt may not meet (a machine too busy to start
    the processes in time)."""
    import ray

    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, (TimeoutError, ray.exceptions.GetTimeoutError)) or "timed out" in text \
        or "timeout" in text


def _start_ray(init_kwargs: dict[str, Any], *, private: bool) -> None:
    """`ray.init(**init_kwargs)`; every failure is one `UserError` line, after up to
    `INIT_ATTEMPTS` tries where it is transient (a timeout)."""
    import ray

    where = "start the local Ray cluster" if private else f"connect to the Ray cluster at {init_kwargs['address']!r}"
    for attempt in range(1, INIT_ATTEMPTS + 1):
        try:
            ray.init(**init_kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises many kinds here; each becomes one line
            if ray.is_initialized():
                ray.shutdown()  # a half-started cluster: its processes go, the next try starts clean
            transient = _is_transient(exc)
            if transient and attempt < INIT_ATTEMPTS:
                pause = INIT_RETRY_PAUSE_S[min(attempt - 1, len(INIT_RETRY_PAUSE_S) - 1)]
                print(f"[simpo-ray] could not {where} ({one_line(exc, with_type=True, limit=200)}); "
                      f"retrying in {pause:g}s ({attempt + 1}/{INIT_ATTEMPTS})", file=sys.stderr, flush=True)
                time.sleep(pause)
                continue
            if private:
                advice = ("the machine may be too busy or short of memory (/dev/shm); retry when it is quieter"
                          if transient else
                          f"check free memory, /dev/shm and that {ray_temp_dir()} is writable")
            else:
                advice = ("check the address, that the cluster runs the same Ray version, and its token "
                          "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
            tries = f" after {attempt} attempts" if attempt > 1 else ""
            raise UserError(f"cannot {where}{tries}: {one_line(exc, with_type=True, limit=300)}; {advice} "
                            "(--debug shows Ray's traceback)") from exc


PROBE_TIMEOUT_S = 3.0  # a TCP connect to the GCS answers in milliseconds when the cluster is there


def check_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """The `host:port` behind `address` (`auto`, `host:port` or `ray://host:port`), once a TCP
    connection to it succeeded; else one `UserError` line within seconds. Ray itself retries an
    address that does not answer for minutes, printing its C++ client's warnings."""
    where = f"cannot connect to the Ray cluster at {address!r}"
    target = address
    if address == "auto":
        try:
            target = ray_workarounds.find_local_cluster_address()
        except ConnectionError as e:
            raise UserError(f"{where}: {one_line(e, first=True)}") from None
    host, _, port = target.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address: {address!r} is not allowed; use 'auto' or host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"{where}: nothing answers on {host}:{port} ({e.strerror or type(e).__name__}); "
                        "check the address and that the cluster is running") from None
    return target


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, *,
             include_dashboard: bool = False, log_to_driver: bool = True, reap_orphans: bool = True,
             **kwargs: Any) -> ClusterInfo:
    """Start (or join) Ray with safe defaults and describe the cluster.

    * `address=None`: a fresh private local cluster (`num_cpus`/`num_gpus` caps), never one a
      `ray start` left on this machine. `"auto"` or `"host:port"`: join that cluster (token auth:
      `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`).
    * No dashboard unless asked for; when asked for, it binds to 127.0.0.1 unless
      `dashboard_host` is given.
    * A private cluster listens on 127.0.0.1 only and lives under `ray_temp_dir()`; before it
      starts, the processes of dead sessions there are ended. Every failure to start or join
      Ray is one `UserError` line (timeouts are retried, `INIT_ATTEMPTS` in all).
    * `TRAIN_ENV_DEFAULTS` go in the job's runtime env (explicit user values win), and the
      repository root on the workers' `PYTHONPATH` (workers do not get the driver's sys.path).
    * `reap_orphans`: start the orphan placement-group reaper where it is needed
      (`ray_workarounds.start_orphan_reaper`).

    If Ray is already initialised, only describes the cluster.
    """
    import ray

    if ray.is_initialized():
        return ClusterInfo.from_ray()
    # ray.init replaces SIGTERM's handler twice (a Python sys.exit, then its core worker's C++
    # failure handler, which aborts with a stack dump); the caller's is put back below.
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    ray_env_defaults()
    # Processes that a SIGKILLed search's private cluster left behind (issue: they outlive it).
    guard.end_dead_session_processes(ray_temp_dir())
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    for k, v in TRAIN_ENV_DEFAULTS.items():
        env_vars.setdefault(k, os.environ.get(k, v))
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds simpo_ray/
    py_path = env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    if pkg_root not in py_path.split(os.pathsep):
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, py_path) if p)
    runtime_env["env_vars"] = env_vars
    init_kwargs: dict[str, Any] = dict(runtime_env=runtime_env, log_to_driver=log_to_driver, **kwargs)
    if address is None:
        # A private cluster is reachable from this machine only: every Ray process binds to
        # 127.0.0.1 (ray_workarounds.loopback_only), and so do PyTorch's store and gloo's sockets in
        # the trials' workers (loopback.torch_store_on_loopback).
        runtime_env.setdefault("worker_process_setup_hook", loopback.STORE_HOOK)
        if sys.platform.startswith("linux"):
            env_vars.setdefault("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        init_kwargs.update(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                           include_dashboard=include_dashboard, _node_ip_address=LOOPBACK,
                           _temp_dir=ray_temp_dir())
        if include_dashboard:
            init_kwargs.setdefault("dashboard_host", LOOPBACK)
        with ray_workarounds.loopback_only():
            _start_ray(init_kwargs, private=True)
        # Its agents outlive a SIGKILLed driver by a minute unless ended (infra/guard.py).
        node = getattr(ray._private.worker, "_global_node", None)
        if node is not None:
            guard.start(ray_temp_dir(), os.path.basename(node.get_session_dir_path()))
    else:
        if num_cpus is not None or num_gpus is not None:
            raise UserError("num_cpus/num_gpus only apply when starting a local cluster "
                            "(address=None), not when joining one")
        check_address(address)
        init_kwargs["address"] = address
        _start_ray(init_kwargs, private=False)
    if callable(sigterm):
        signal.signal(signal.SIGTERM, sigterm)
    if reap_orphans:
        ray_workarounds.start_orphan_reaper()
    return ClusterInfo.from_ray()


def shutdown_ray() -> None:
    """`ray.shutdown()` after this driver's own threads that talk to Ray (the orphan reaper)
    have stopped: a tick racing the shutdown must not reach a Ray API on a cluster going away."""
    import ray

    ray_workarounds.stop_orphan_reaper()
    ray.shutdown()
