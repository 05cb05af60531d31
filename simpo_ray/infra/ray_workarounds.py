"""Workarounds for Ray 2.60 (Train V2, run inside Tune trials), kept in one place to be removed.

Each is a defect or an unwanted default of this Ray version, not part of the tool's logic: the
orphan placement-group reaper, restoring the caller's SIGINT handler after `fit()`, quieting
Train's per-report log lines and Ray's console noise, turning off Train's print patch, and
keeping a private cluster's node on 127.0.0.1 (`loopback_only`); no other module touches
`ray._private`. Ending the agents a SIGKILLed driver's cluster leaves behind is
`simpo_ray.infra.guard`; PyTorch's store on loopback is `simpo_ray.infra.loopback`. Why each is
needed and how it was measured: docs/ray-runtime-notes.md; each says when it can go.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator

import psutil

from simpo_ray.errors import one_line

logger = logging.getLogger(__name__)

# Environment for the Ray processes a driver starts (set before `ray.init`): Train V2's print
# patch routes worker prints through a logger that echoes them again (every line twice).
PRINT_PATCH_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# The reaper below was written against this Ray version's GCS tables and Train V2 internals.
WRITTEN_FOR_RAY = "2.60."
FORCE_REAPER_ENV = "SIMPO_RAY_FORCE_PG_REAPER"  # "1": run the reaper on another Ray version too

_warned: set[str] = set()
_reaper_stop: threading.Event | None = None
_reaper_thread: threading.Thread | None = None
_reaper_lock = threading.Lock()


def _warn_once(kind: str, message: str, *args) -> None:
    """A logging warning, once per process for each kind of failure."""
    if kind not in _warned:
        _warned.add(kind)
        logger.warning(message, *args)


# ---------------------------------------------------------------- logs, print patch, SIGINT


def disable_print_patch() -> None:
    """Set `PRINT_PATCH_ENV` (explicit user values win) before the driver starts Ray."""
    for key, value in PRINT_PATCH_ENV.items():
        os.environ.setdefault(key, value)


def quiet_train_logs() -> None:
    """Keep Ray Train's per-report INFO lines (a full metrics dict per report) off the console."""
    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # it logs by file name


# ---------------------------------------------------------------- console noise
#
# Ray prints on the driver's console (1) every "worker died" message the raylet publishes for
# this job, as red "(raylet) A worker died or was killed ... SIGTERM" lines, also for the
# processes Tune, Train and this module end on purpose when a trial stops, and (2) with
# `log_to_driver` (the train CLI) the output of Train's PlacementGroupCleaner actors, which
# cannot work without a dashboard and die with a `ConnectionError: Found multiple active Ray
# instances` traceback when another Ray cluster runs on the machine. `quiet_ray_console` drops
# those and turns any other raylet message into one line saying what happened and where to look.
# REMOVE with the orphan reaper (the cleaner's part) and when Ray stops reporting intended
# terminations as system errors. Also dropped: the raylet's warning that many workers started at once.
_EXPECTED_EXIT = re.compile(r"process receives a SIGTERM|killed by `ray\.kill`|intended|worker processes have been", re.I)
# (3) Train's own start-up lines ("Requesting resources", "Started training worker group", the
# workers' "Setting up process group"): dropped, shown with --debug; the workers' own output stays.
_QUIET_ACTORS = ("PlacementGroupCleaner", "TrainController")
_TRAIN_WORKER_NOISE = re.compile(r"^Setting up process group for: ")


def ray_console_filter(data: dict) -> dict | None:
    """What Ray's console printer gets for one batch of lines: None to drop it, or the batch
    with Ray's own error messages made one line each."""
    quiet = data.get("actor_name") in _QUIET_ACTORS
    if quiet or data.get("actor_name") == "RayTrainWorker":
        kept = [line for line in data.get("lines", []) if not (quiet or _TRAIN_WORKER_NOISE.match(line))]
        for line in set(data.get("lines", [])) - set(kept):  # shown with --debug
            logger.debug("(%s) %s", data.get("actor_name"), line)
        return {**data, "lines": kept} if kept else None
    if data.get("pid") != "raylet":
        return data
    lines = []
    for line in data.get("lines", []):
        if _EXPECTED_EXIT.search(line):
            logger.debug("raylet (expected): %s", line)
            continue
        lines.append(_one_line_ray_error(line))
    return {**data, "lines": lines} if lines else None


def _one_line_ray_error(line: str) -> str:
    detail = re.search(r"Worker exit type: (\S+) Worker exit detail: ([^.]*)", line)
    what = line.split(". ")[0].strip()
    if detail:
        what += f" ({detail.group(1)}: {detail.group(2).strip()})"
    return (f"[simpo-ray] Ray: {what[:300]}. If a trial failed, its error is in trials.csv; Ray's "
            "logs are in the session's logs/ directory (simpo_ray.infra.cluster.ray_temp_dir()).")


def quiet_ray_console() -> None:
    """Install `ray_console_filter` in front of Ray's console printer (before `ray.init`: the
    driver binds the printer when it connects). Idempotent."""
    import ray._private.worker as ray_worker

    if not sys.stdout.isatty():  # no colour codes in a file or a pipe
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenAuthNotice) for f in auth.filters):
        auth.addFilter(_TokenAuthNotice())
    original = ray_worker.print_to_stdstream
    if getattr(original, "_simpo_ray_filter", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        kept = ray_console_filter(data)
        if kept is None:
            return
        if data.get("pid") == "raylet":  # our one line each, without Ray's "(raylet)" prefix
            for line in kept["lines"]:
                print(line, file=sys.stderr, flush=True)
            return
        original(kept, ignore_prefix)

    print_to_stdstream._simpo_ray_filter = True
    ray_worker.print_to_stdstream = print_to_stdstream


class _TokenAuthNotice(logging.Filter):
    """Drops ray.init's "Token authentication is enabled ..." notice (the README says so)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


class _TuneEndHints(logging.Filter):
    """Drops Tune's end-of-run lines that our summary replaces: "Experiment has been interrupted
    ... Resume experiment with: Tuner.restore(path=..., trainable=...)" (a Python call; the
    summary prints the command that resumes) and "Trials did not complete: [...]" (trials.csv
    has each trial's status and error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Experiment has been interrupted", "Trials did not complete"))


def quiet_tune_end_hints() -> None:
    """Install `_TuneEndHints` on Tune's run logger (idempotent). REMOVE if Tune lets the caller
    word these lines."""
    tune_logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _TuneEndHints) for f in tune_logger.filters):
        tune_logger.addFilter(_TuneEndHints())


# ---------------------------------------------------------------- Train's last report to Tune
# Ray 2.60: a trial whose Train run's last report reached Tune's one-slot actor queue after `fit()`
# returned hung forever: its main thread took the report only after the function trainable's end
# marker filled the one-slot result queue, and blocked putting it behind (docs/ray-runtime-notes.md
# section 8). REMOVE when Ray reads that queue out before the end marker.


def wait_for_tune_to_take_reports(timeout_s: float = 300.0, settle_s: float = 0.5) -> None:
    """In a Tune trial, after `fit()`: return once the trial's main thread has taken the last
    report and passed it on: the actor queue is empty and, for `settle_s`, the result queue is
    empty and no put lands in it (`unfinished_tasks` counts puts: nobody calls task_done). This
    narrows the race to a main thread that takes over `settle_s` between its get and its put."""
    import time

    from ray.train._internal.session import get_session

    session = get_session()
    queue, results = getattr(session, "_inter_actor_queue", None), getattr(session, "result_queue", None)
    deadline = time.monotonic() + timeout_s
    while queue is not None and results is not None:
        puts = results.unfinished_tasks
        if queue.empty():
            time.sleep(settle_s)
            if queue.empty() and results.empty() and results.unfinished_tasks == puts:
                return
        else:
            time.sleep(0.05)
        if time.monotonic() > deadline:
            _warn_once("reports", "[simpo-ray] warning: Tune did not take the trial's last report in %.0f s",
                       timeout_s)
            return


# ---------------------------------------------------------------- orphan placement-group reaper
#
# When Tune stops a trial early it kills the trial actor and with it the Train controller; the
# controller's worker placement group then stays reserved until the driver exits, and the
# detached PlacementGroupCleaner that Train starts for each run lives on too (one process per
# trial ever run). Train's cleaner notices a dead controller only through the State API
# (`ray.util.state.get_actor`), which needs the dashboard. This reaper reads the GCS tables
# instead, acts only on this job's placement groups and cleaners, and is switched on only
# where no dashboard runs (ray minimal, or `include_dashboard=False`).
#
# REMOVE when Ray's own cleaner no longer needs the State API (or every cluster this tool
# supports runs a dashboard). The leak is ray-project/ray issue #54305; PR #58515 added Train's
# PlacementGroupCleaner for it, checking the controller through the State API; as of Ray 2.60
# (and the open PR #65447 that shares one cleaner across runs) it still does.


def state_api_available() -> bool:
    """Whether this cluster serves the dashboard's HTTP API, which Ray's State API (and so Ray's
    own PlacementGroupCleaner) needs. The head publishes its URL as `webui:url` in the GCS store,
    empty when no HTTP server runs (ray minimal, or `include_dashboard=False`). (The `dashboard`
    key is no sign: the minimal dashboard process publishes it without serving anything.)"""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    try:
        url = internal_kv._internal_kv_get("webui:url", namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    except Exception as e:  # noqa: BLE001 - any GCS failure means "cannot tell": assume none
        _warn_once("dashboard-kv", "could not read the dashboard URL from the GCS (%s); "
                   "assuming Ray's State API is unavailable", one_line(e, with_type=True))
        return False
    return bool(url)


def reaper_needed() -> bool:
    """True where Ray's own cleaner cannot work (no dashboard) and the Ray version is the one
    the reaper was written for (or `SIMPO_RAY_FORCE_PG_REAPER=1`)."""
    import ray

    if state_api_available():
        logger.info("this Ray cluster has a dashboard: Ray Train's own PlacementGroupCleaner "
                    "frees stopped trials' workers; the orphan reaper stays off")
        return False
    if ray.__version__.startswith(WRITTEN_FOR_RAY):
        return True
    if os.environ.get(FORCE_REAPER_ENV) == "1":
        _warn_once("version-forced", "orphan placement-group reaper forced on Ray %s (written for "
                   "%sx)", ray.__version__, WRITTEN_FOR_RAY)
        return True
    _warn_once("version", "orphan placement-group reaper disabled: written for Ray %sx, this is "
               "Ray %s; early-stopped trials may keep their workers' resources (set %s=1 to force "
               "it, or run the cluster with a dashboard)", WRITTEN_FOR_RAY, ray.__version__,
               FORCE_REAPER_ENV)
    return False


def is_orphan_placement_group(pg, dead_actor_ids: set[str], job_id: str) -> bool:
    """Whether a GCS `PlacementGroupTableData` is a leaked group of job `job_id` (hex): not
    removed yet, not detached, created by an actor (not by a driver), and that actor is dead by
    the group's own flag or by the actor table (`dead_actor_ids`: hex actor ids).

    The GCS's `creator_actor_dead` flag alone is not enough: it was seen still False for groups
    whose TrainController the actor table listed as DEAD (docs/ray-runtime-notes.md §1).
    """
    import ray
    from ray.core.generated import gcs_pb2

    if pg.creator_job_id.hex() != job_id:  # another job's group: never ours to remove
        return False
    if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
        return False
    # Driver-created groups (Tune's trial groups) have a nil creator actor: they die with the job.
    if not pg.creator_actor_id or ray.ActorID(pg.creator_actor_id).is_nil():
        return False
    return bool(pg.creator_actor_dead) or pg.creator_actor_id.hex() in dead_actor_ids


def reap_orphan_placement_groups() -> int:
    """Remove this job's orphaned placement groups and end this job's orphaned
    PlacementGroupCleaner actors; return how many were removed or ended. Raises when this process
    is not connected to Ray: no call here may start a cluster (`ray.get_runtime_context` and
    `ray.util.remove_placement_group` would, docs/ray-runtime-notes.md §6)."""
    import ray
    from ray._private.state import actors, state
    from ray.core.generated import gcs_pb2

    worker = ray._private.worker.global_worker
    worker.check_connected()
    job_id = worker.current_job_id.hex()
    table = actors()
    dead = {actor_id for actor_id, a in table.items() if a.get("State") == "DEAD"}
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if not is_orphan_placement_group(pg, dead, job_id):
            continue
        try:
            _remove_placement_group(ray.PlacementGroupID(pg.placement_group_id))
            removed += 1
        except Exception as e:  # noqa: BLE001 - e.g. raced with Train's own cleanup; retried next tick
            _warn_once("remove-pg", "could not remove orphaned placement group %s: %s",
                       pg.placement_group_id.hex(), one_line(e, with_type=True))
    return removed + _end_orphan_cleaners(table, job_id, worker.current_node_id.hex())


def _remove_placement_group(pg_id) -> None:
    """Remove placement group `pg_id`; raises when not connected (not `ray.util.remove_placement_group`,
    which would start a cluster)."""
    import ray

    worker = ray._private.worker.global_worker
    worker.check_connected()
    worker.core_worker.remove_placement_group(pg_id)


def _end_orphan_cleaners(table: dict, job_id: str, here: str) -> int:
    """End this job's PlacementGroupCleaner actors whose owner (the controller) is dead.

    The cleaner is detached and unnamed: no handle can be had for `ray.kill` (the core worker's
    `kill_actor` fails without one, and `get_actor_handle` aborts the process). It runs on the
    head node (where this driver runs), so its process gets SIGTERM after checking that it
    really is that actor's Ray worker; the raylet's "worker died ... SIGTERM" message about it
    is kept off the console by `quiet_ray_console`. `here`: this node's id (hex).
    """
    alive = {(a["Address"].get("IPAddress"), a["Address"].get("Port"))
             for a in table.values() if a["State"] == "ALIVE"}
    ended = 0
    for a in table.values():
        if (a["ActorClassName"] != "PlacementGroupCleaner" or a["State"] != "ALIVE"
                or a.get("JobID") != job_id):
            continue
        owner = (a["OwnerAddress"].get("IPAddress"), a["OwnerAddress"].get("Port"))
        if owner in alive or a["Address"].get("NodeID") != here or not a.get("Pid"):
            continue
        try:
            proc = psutil.Process(int(a["Pid"]))
            if "PlacementGroupCleaner" not in " ".join(proc.cmdline()):
                continue
            proc.send_signal(signal.SIGTERM)
            ended += 1
        except psutil.NoSuchProcess:
            continue  # it ended by itself
        except (psutil.Error, OSError) as e:
            _warn_once("end-cleaner", "could not end an orphaned PlacementGroupCleaner (pid %s): %s",
                       a.get("Pid"), one_line(e, with_type=True))
    return ended


def stop_orphan_reaper(timeout_s: float = 30.0) -> None:
    """Stop this process's reaper and wait for its thread (a tick in progress finishes first):
    before `ray.shutdown()` (`cluster.shutdown_ray`; at exit, before Ray's own shutdown)."""
    global _reaper_stop, _reaper_thread
    with _reaper_lock:
        stop, thread = _reaper_stop, _reaper_thread
        _reaper_stop = _reaper_thread = None
    if stop is not None:
        stop.set()
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout_s)


def start_orphan_reaper(interval_s: float = 1.0) -> threading.Event | None:
    """Run `reap_orphan_placement_groups` every `interval_s` in a daemon thread of this driver,
    when `reaper_needed()`; returns the event that stops it (None when not started). A reaper
    started earlier in this process is stopped first."""
    global _reaper_stop, _reaper_thread
    import atexit

    import ray

    stop_orphan_reaper()
    if not reaper_needed():
        return None
    stop = threading.Event()
    # Ray shuts down at exit (an atexit handler registered at `import ray`); handlers run last
    # registered first, so this one stops the reaper before.
    atexit.unregister(stop_orphan_reaper)
    atexit.register(stop_orphan_reaper)

    def loop() -> None:
        while not stop.wait(interval_s) and ray.is_initialized():
            try:
                reap_orphan_placement_groups()
            except Exception as e:  # noqa: BLE001 - keep reaping; each kind is logged once
                _warn_once(f"reap-{type(e).__name__}", "orphan placement-group reaper: %s "
                           "(continuing)", one_line(e, with_type=True))

    thread = threading.Thread(target=loop, name="simpo-ray-pg-reaper", daemon=True)
    with _reaper_lock:
        _reaper_stop, _reaper_thread = stop, thread
    thread.start()
    return stop


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


def find_local_cluster_address() -> str:
    """What `--address auto` means to Ray: the GCS address of the cluster `ray start` left on this
    machine (or `RAY_ADDRESS`); `ConnectionError` when there is none. Ray's resolver is private.
    REMOVE when Ray exposes the resolution of "auto" (and `ray.init` fails fast on an address
    that does not answer, instead of retrying for minutes)."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die("auto")
