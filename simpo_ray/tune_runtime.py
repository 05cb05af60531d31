"""Ray runtime for Train-inside-Tune searches (Ray 2.60, Train V2). No model knowledge here.

Each Tune trial is a *function trainable* (the "trial driver") that runs
``TorchTrainer(...).fit()``; ``TuneReportCallback`` forwards every ``ray.train.report`` to Tune.

Resource model (why the old prototype deadlocked, see docs/ray-runtime-notes.md):

* Train V2 does NOT run its workers inside the Tune trial's placement group. The Train
  controller (``num_cpus=0``) creates its *own* placement group of ``num_workers`` bundles of
  ``{CPU: cpus_per_worker, GPU: gpus_per_worker}``.
* Tune's default request for a function trainable is 1 CPU. With Train V2 that CPU is held by a
  process that only waits on ``fit()``. On a 2-CPU cluster, two such trial drivers take both CPUs
  and no worker placement group can ever be placed -> ``WorkerGroupStartupTimeoutError`` every
  60 s, retried forever (the controller's scheduling-failure budget is unlimited).

So the trial driver requests **no CPU/GPU** (only a small logical ``memory`` amount, because a
placement-group bundle cannot be empty), and the number of concurrent trials is capped by
:func:`plan_concurrency` so that every running trial's worker placement group fits at once.

Second leak: when Tune stops a trial early (ASHA, a stopper, an error) it kills the trial actor
and with it the Train controller; the controller's worker placement group then outlives it (a
non-detached group is freed only when its creator actor AND the job are dead) and Train V2's
``PlacementGroupCleaner`` cannot notice without the State API (dashboard). Those CPUs stay
reserved and later trials time out. :func:`reap_orphan_placement_groups` (run every second by
the thread :func:`init_ray` starts) frees them and ends the leaked cleaner actors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simpo_ray.errors import UserError

# Logical memory (bytes) the trial driver requests. A Tune placement-group bundle must be
# non-empty; memory is a resource every node has, so this never blocks CPU/GPU packing.
DRIVER_MEMORY_BYTES = 64 * 2**20

# Train V2 env vars (read in the process that calls fit(), propagated to controller + workers).
# The controller polls the worker group every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s);
# finishing a run waits for the next poll, so a short interval cuts the tail of every trial.
TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Don't start the preemption-watcher actor (one more process per trial; only useful on
    # clusters whose nodes get drained).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

_EPS = 1e-9


@dataclass(frozen=True)
class ClusterInfo:
    """Resources of the Ray cluster we are attached to."""

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
        import ray

        nodes = tuple(
            {k: float(v) for k, v in n["Resources"].items()}
            for n in ray.nodes()
            if n.get("Alive")
        )
        ctx = ray.get_runtime_context()
        address = getattr(ctx, "gcs_address", None)
        return cls(total={k: float(v) for k, v in ray.cluster_resources().items()},
                   nodes=nodes, address=address)


@dataclass(frozen=True)
class TrialResources:
    """What one trial's Train worker group needs."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    extra_per_worker: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise UserError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise UserError(
                "cpus_per_worker and gpus_per_worker must be >= 0, got "
                f"{self.cpus_per_worker!r} and {self.gpus_per_worker!r}"
            )
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise UserError(
                f"gpus_per_worker above 1 must be a whole number, got {self.gpus_per_worker!r}"
            )
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0 and not self.extra_per_worker:
            raise UserError("each worker must request some CPU or GPU (both are 0)")

    @property
    def worker_bundle(self) -> dict[str, float]:
        """The per-worker resource bundle (Ray capitalised names, zeros dropped)."""
        b = {"CPU": float(self.cpus_per_worker), "GPU": float(self.gpus_per_worker)}
        b.update({k: float(v) for k, v in self.extra_per_worker.items()})
        return {k: v for k, v in b.items() if v > 0}

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def describe(self) -> str:
        return (f"{self.num_workers} worker(s) x {self.cpus_per_worker:g} CPU"
                f" + {self.gpus_per_worker:g} GPU")


def _slots_on_node(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many copies of ``bundle`` fit on a node with resources ``node``."""
    slots = math.inf
    for key, need in bundle.items():
        slots = min(slots, math.floor(node.get(key, 0.0) / need + _EPS))
    return int(slots) if slots != math.inf else 0


def plan_concurrency(cluster: ClusterInfo, resources: TrialResources,
                     requested_max: int | None = None) -> int:
    """Largest number of trials whose worker groups fit in ``cluster`` at the same time.

    Per trial: ``num_workers`` bundles of ``resources.worker_bundle`` (Train V2's own placement
    group, PACK strategy, may span nodes). The trial driver (Tune function trainable) and the Train
    controller / sync actor request 0 CPU and 0 GPU, so they do not count. Identical bundles pack
    node by node, so the cluster holds ``sum(floor(node / bundle))`` worker slots and
    ``slots // num_workers`` trials.

    Raises ``UserError`` when not even one trial fits, or ``requested_max`` < 1.
    """
    if requested_max is not None and (not isinstance(requested_max, int) or requested_max < 1):
        raise UserError(f"max_concurrent must be an integer >= 1, got {requested_max!r}")
    bundle = resources.worker_bundle
    for key, need in bundle.items():
        biggest = max((n.get(key, 0.0) for n in cluster.nodes), default=0.0)
        if need > biggest + _EPS:
            total = cluster.total.get(key, 0.0)
            raise UserError(
                f"a trial worker needs {need:g} {key} but no node has that many "
                f"(largest node: {biggest:g} {key}, cluster total: {total:g} {key}); "
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
            + " but the cluster has room for only "
            f"{slots} such worker(s) (cluster: "
            + ", ".join(f"{v:g} {k}" for k, v in have.items())
            + "); lower num_workers or the per-worker resources"
        )
    return fits if requested_max is None else min(fits, requested_max)


def _preimport_hook() -> None:
    """``worker_process_setup_hook``: import the heavy libraries once per Ray worker process.

    Runs when a worker process starts. Processes that Ray pre-starts (idle pool) pay it before
    any trial asks for them; see docs/ray-runtime-notes.md for what it buys.
    """
    for mod in os.environ.get("SIMPO_RAY_PREIMPORT", "torch").split(","):
        mod = mod.strip()
        if mod:
            try:
                __import__(mod)
            except ImportError:
                pass


def init_ray(address: str | None = None, num_cpus: int | None = None,
             num_gpus: int | None = None, *, preimport: tuple[str, ...] = (),
             include_dashboard: bool = False, log_to_driver: bool = True,
             reap_orphans: bool = True,
             **kwargs: Any) -> ClusterInfo:
    """Start (or join) Ray with safe, fast defaults and describe the cluster.

    * ``address=None``: start a private local cluster (``num_cpus``/``num_gpus`` caps).
      ``address="auto"`` or ``"host:port"``: join an existing one. Token auth: the token is read
      from ``RAY_AUTH_TOKEN`` (the token itself), ``RAY_AUTH_TOKEN_PATH`` (a file) or
      ``~/.ray/auth_token`` (what ``ray start``/``ray.init`` writes).
    * The dashboard is off by default (it also needs ``ray[default]`` extras); when enabled it
      binds to 127.0.0.1 unless ``dashboard_host`` is given.
    * Train V2 speed-up env vars (:data:`TRAIN_ENV_DEFAULTS`) are put in the job runtime_env so
      every trial driver sees them (explicit user env vars win).
    * ``reap_orphans``: start :func:`start_orphan_reaper` in this (driver) process: it frees the
      worker placement groups of Train runs whose controller died with a stopped Tune trial.
    * ``preimport``: module names a ``worker_process_setup_hook`` imports in every worker
      process (off by default; measured in the notes).
    """
    import ray

    if ray.is_initialized():
        return ClusterInfo.from_ray()
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    for k, v in TRAIN_ENV_DEFAULTS.items():
        env_vars.setdefault(k, os.environ.get(k, v))
    # Ray worker processes do not inherit the driver's sys.path; make this package importable
    # (the trial driver unpickles functions that live in simpo_ray).
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    py_path = env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    if pkg_root not in py_path.split(os.pathsep):
        env_vars["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, py_path) if p)
    if preimport:
        env_vars.setdefault("SIMPO_RAY_PREIMPORT", ",".join(preimport))
        runtime_env.setdefault("worker_process_setup_hook",
                               "simpo_ray.tune_runtime._preimport_hook")
    runtime_env["env_vars"] = env_vars
    init_kwargs: dict[str, Any] = dict(runtime_env=runtime_env, log_to_driver=log_to_driver,
                                       **kwargs)
    if address is None:
        # "local": always a fresh private cluster, never one a `ray start` left on this machine.
        init_kwargs.update(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                           include_dashboard=include_dashboard)
        if include_dashboard:
            init_kwargs.setdefault("dashboard_host", "127.0.0.1")
    else:
        if num_cpus is not None or num_gpus is not None:
            raise UserError("num_cpus/num_gpus only apply when starting a local cluster "
                            "(address=None), not when joining one")
        init_kwargs["address"] = address
    try:
        ray.init(**init_kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
    if reap_orphans:
        start_orphan_reaper()
    return ClusterInfo.from_ray()


def make_trainable(train_loop_per_worker: Callable[[dict], Any], resources: TrialResources, *,
                   max_failures: int = 0, checkpoint_keep: int | None = None,
                   storage_path: str | None = None,
                   checkpoint_score_attribute: str | None = None,
                   checkpoint_score_order: str = "max") -> Callable:
    """The Tune function trainable: one TorchTrainer run per trial, metrics forwarded to Tune.

    The trial driver requests only :data:`DRIVER_MEMORY_BYTES` of logical memory (no CPU/GPU);
    the workers' resources come from Train's own placement group. Use :func:`plan_concurrency`
    for ``TuneConfig.max_concurrent_trials``.

    The Train run is named after the Tune trial id, so a trial restarted by ``Tuner.restore`` or
    by Tune's own retry finds its previous Train run in ``storage_path`` and resumes from its
    latest checkpoint (``ray.train.get_checkpoint()`` in the worker).
    """
    from ray import tune

    if max_failures < 0 and max_failures != -1:
        raise UserError(f"max_failures must be >= 0 (or -1 = unlimited), got {max_failures}")
    if checkpoint_keep is not None and checkpoint_keep < 1:
        raise UserError(f"checkpoint_keep must be >= 1 or None, got {checkpoint_keep}")
    storage = None if storage_path is None else os.path.abspath(os.path.expanduser(storage_path))

    def trial_driver(config: dict) -> None:
        for k, v in TRAIN_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        import ray.train
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        ctx = tune.get_context()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=dict(config),
            scaling_config=ray.train.ScalingConfig(
                num_workers=resources.num_workers,
                use_gpu=resources.use_gpu,
                resources_per_worker=resources.worker_bundle,
            ),
            run_config=ray.train.RunConfig(
                name=f"train-{ctx.get_trial_id()}",
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=checkpoint_keep,
                    checkpoint_score_attribute=checkpoint_score_attribute,
                    checkpoint_score_order=checkpoint_score_order,
                ),
                callbacks=[TuneReportCallback()],
            ),
        )
        trainer.fit()

    trial_driver.__name__ = getattr(train_loop_per_worker, "__name__", "trial")
    trial_driver.__qualname__ = trial_driver.__name__
    return tune.with_resources(trial_driver, tune.PlacementGroupFactory(
        [{"CPU": 0, "memory": DRIVER_MEMORY_BYTES}]))


def reap_orphan_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead; return how many were removed.

    Train V2's controller actor creates the worker placement group. A non-detached placement
    group lives until BOTH its creator actor and its creator job are dead, so when Tune stops a
    trial (ASHA, a stopper, an error) by killing the trial actor, the controller dies with it but
    its worker placement group stays reserved until the driver exits. Train V2 ships a detached
    ``PlacementGroupCleaner`` for this, but it detects the dead controller through the State API,
    which needs the dashboard (``ray[default]``); without it the cleaner only logs "Failed to query
    Ray Train Controller actor state" forever and the CPUs leak -> later trials time out.

    This reads the GCS placement-group table directly (no dashboard needed). Detached placement
    groups and ones created by a live actor or by a driver (Tune's own trial groups) are kept.
    The GCS's own ``creator_actor_dead`` flag is not enough: it was seen still False for
    groups whose creating TrainController the actor table already listed as DEAD (two such
    groups held both CPUs of a 2-CPU cluster and every later trial waited forever), so the actor
    table is consulted too.
    """
    import ray
    from ray._private.state import actors, state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    table = actors()
    dead = {actor_id for actor_id, a in table.items() if a.get("State") == "DEAD"}
    removed = 0
    accessor = state._connect_and_get_accessor()
    for raw in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if not is_orphan_placement_group(pg, dead):
            continue
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        except Exception:  # already gone / raced with Train's own cleanup
            pass
    removed += _kill_orphan_pg_cleaners(table)
    return removed


def is_orphan_placement_group(pg, dead_actor_ids: set[str]) -> bool:
    """Whether a GCS ``PlacementGroupTableData`` is a leaked group that should be removed: not
    removed yet, not detached, created by an actor (not by a driver), and that actor is dead by
    the group's own flag or by the actor table (``dead_actor_ids``: hex actor ids)."""
    import ray
    from ray.core.generated import gcs_pb2

    if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
        return False
    # Driver-created groups (Tune's trial groups) have a nil creator actor id and are recorded
    # as creator_actor_dead=True: keep them (they die with the job).
    if not pg.creator_actor_id or ray.ActorID(pg.creator_actor_id).is_nil():
        return False
    return bool(pg.creator_actor_dead) or pg.creator_actor_id.hex() in dead_actor_ids


def _kill_orphan_pg_cleaners(table: dict | None = None) -> int:
    """Kill Train V2 ``PlacementGroupCleaner`` actors whose controller (owner) is dead.

    The cleaner is a *detached* actor (one process each). Without the State API it never learns
    that its controller ended and it stays alive, polling once a second, one per trial ever run.
    """
    import ray
    from ray._private.state import actors

    table = actors() if table is None else table
    alive = {(a["Address"].get("IPAddress"), a["Address"].get("Port"))
             for a in table.values() if a["State"] == "ALIVE"}
    # A handle to an unnamed actor that another process created cannot be obtained, so
    # ray.kill() is impossible; the cleaner runs on the head node (where this driver runs), so
    # end its process by pid after checking it really is that actor's Ray worker.
    import signal

    import psutil

    here = ray.get_runtime_context().get_node_id()
    killed = 0
    for a in table.values():
        if a["ActorClassName"] != "PlacementGroupCleaner" or a["State"] != "ALIVE":
            continue
        owner = (a["OwnerAddress"].get("IPAddress"), a["OwnerAddress"].get("Port"))
        if owner in alive or a["Address"].get("NodeID") != here or not a.get("Pid"):
            continue
        try:
            proc = psutil.Process(int(a["Pid"]))
            if "PlacementGroupCleaner" not in " ".join(proc.cmdline()):
                continue
            proc.send_signal(signal.SIGTERM)
            killed += 1
        except (psutil.Error, OSError):
            pass
    return killed


def start_orphan_reaper(interval_s: float = 1.0):
    """Run :func:`reap_orphan_placement_groups` every ``interval_s`` in a daemon thread.

    Started by :func:`init_ray`; returns the ``threading.Event`` that stops it.
    """
    import threading

    import ray

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            if not ray.is_initialized():
                return
            try:
                reap_orphan_placement_groups()
            except Exception:
                pass

    threading.Thread(target=loop, name="simpo-ray-pg-reaper", daemon=True).start()
    return stop


def resources_settled(timeout_s: float = 30.0, keys: tuple[str, ...] = ("CPU", "GPU")) -> bool:
    """Wait until ``ray.available_resources()`` equals ``ray.cluster_resources()`` for ``keys``.

    Worker placement groups are removed asynchronously after a trial ends; use this after
    ``Tuner.fit()`` when a caller needs the whole cluster back.
    """
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        total, avail = ray.cluster_resources(), ray.available_resources()
        if all(abs(total.get(k, 0.0) - avail.get(k, 0.0)) < 1e-6 for k in keys):
            return True
        reap_orphan_placement_groups()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
