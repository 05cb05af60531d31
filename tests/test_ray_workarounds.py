"""simpo_ray.infra.ray_workarounds: the orphan placement-group reaper acts on this job's leaks only.

- the orphan rule, on real `PlacementGroupTableData` messages (incl. the stale GCS flag seen on
  Ray 2.60, and a group of another job);
- a second Ray job (a subprocess driver joined to the session's cluster) leaves a placement
  group and a PlacementGroupCleaner-named actor whose creator died, as Train's do when Tune
  stops a trial; the reaper leaves them alone while it reaps the same leak of this job;
- the switch: on only without a dashboard, and only on the Ray version it was written for.
"""

from __future__ import annotations

import json
import os
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ray_helpers import resources_settled

ROOT = Path(__file__).resolve().parents[1]


def _pg(state="CREATED", creator: bytes = b"", detached=False, creator_dead=False, job: bytes = b"\x01\x00\x00\x00"):
    from ray.core.generated import gcs_pb2

    return gcs_pb2.PlacementGroupTableData(
        placement_group_id=bytes(18), state=getattr(gcs_pb2.PlacementGroupTableData, state),
        creator_actor_id=creator, is_detached=detached, creator_actor_dead=creator_dead, creator_job_id=job)


def test_orphan_placement_group_rule_trusts_the_actor_table_over_a_stale_flag():
    """Seen on Ray 2.60: the worker group of a TrainController that the actor table lists as DEAD,
    with the GCS's creator_actor_dead still False. Both CPUs stayed reserved and the next trials
    waited forever; the reaper must treat such a group as orphaned."""
    import ray

    from simpo_ray.infra.ray_workarounds import is_orphan_placement_group

    controller = bytes.fromhex("985f6b76" + "ab" * 12)  # an ActorID is 16 bytes
    nil = ray.ActorID.nil().binary()
    dead = {controller.hex()}
    job = "01000000"  # this job, as ray.get_runtime_context().get_job_id() spells it
    assert is_orphan_placement_group(_pg(creator=controller), dead, job)                      # stale flag
    assert is_orphan_placement_group(_pg(creator=controller, creator_dead=True), set(), job)  # the flag alone
    assert not is_orphan_placement_group(_pg(creator=controller), set(), job)                 # creator alive
    assert not is_orphan_placement_group(_pg(creator=controller, detached=True), dead, job)   # detached
    assert not is_orphan_placement_group(_pg(state="REMOVED", creator=controller), dead, job)
    assert not is_orphan_placement_group(_pg(state="PENDING", creator=controller), set(), job)
    # Tune's trial groups: created by the driver (nil creator), flagged creator_actor_dead=True.
    assert not is_orphan_placement_group(_pg(creator=nil, creator_dead=True), {nil.hex()}, job)
    assert not is_orphan_placement_group(_pg(creator=b"", creator_dead=True), set(), job)
    # Another job's leak is never ours to remove, however dead its creator.
    other = b"\x02\x00\x00\x00"
    assert not is_orphan_placement_group(_pg(creator=controller, creator_dead=True, job=other), dead, job)


# ---------------------------------------------------------------- two jobs on one cluster

# What Train leaves behind when Tune kills a trial: a placement group whose creating actor is
# dead (the job still alive), and a detached PlacementGroupCleaner whose owner is dead.
LEAK_MAKER = """
import ray
from ray.util.placement_group import placement_group


@ray.remote(num_cpus=0)
class PlacementGroupCleaner:
    def ping(self):
        return True


@ray.remote(num_cpus=0)
class Maker:
    def make(self, cleaner_name=None):
        pg = placement_group([{"CPU": 0.01}])
        ray.get(pg.ready())
        opts = {"lifetime": "detached", **({"name": cleaner_name} if cleaner_name else {})}
        cleaner = PlacementGroupCleaner.options(**opts).remote()
        ray.get(cleaner.ping.remote())
        return pg.id.hex(), cleaner


def leak(cleaner_name=None):
    maker = Maker.remote()
    pg_id, cleaner = ray.get(maker.make.remote(cleaner_name))
    ray.kill(maker)
    return pg_id, cleaner
"""

FOREIGN_JOB = LEAK_MAKER + textwrap.dedent("""
    import json, sys
    # The session cluster listens on 127.0.0.1 only: join it from there (and before `import ray`,
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment, see cluster.init_ray).
    ray.init(address=sys.argv[1], namespace="simpo-ray-test-foreign", log_to_driver=False,
             _node_ip_address="127.0.0.1")
    pg_id, _ = leak(cleaner_name="foreign-cleaner")
    print("READY " + json.dumps({"pg": pg_id, "job": ray.get_runtime_context().get_job_id()}), flush=True)
    sys.stdin.readline()  # hold the job open until the test has looked
    ray.kill(ray.get_actor("foreign-cleaner"))
    ray.shutdown()
""")


def _pg_state(pg_id: str) -> str:
    import ray

    return ray.util.placement_group_table().get(pg_id, {}).get("state", "GONE")


def _cleaners(job_id: str) -> list[str]:
    from ray._private.state import actors

    return [a["State"] for a in actors().values()
            if a["ActorClassName"] == "PlacementGroupCleaner" and a["JobID"] == job_id]


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return predicate()


@pytest.mark.slow
def test_reaper_reaps_this_jobs_leak_and_leaves_another_jobs_alone(ray_cluster):
    import ray

    from simpo_ray.infra import ray_workarounds

    assert ray_workarounds._reaper_stop is not None, "init_ray (conftest) should have started the reaper"
    ours = ray.get_runtime_context().get_job_id()
    address = ray.get_runtime_context().gcs_address
    from simpo_ray.infra.ray_workarounds import LOOPBACK_ENV

    proc = subprocess.Popen([sys.executable, "-c", FOREIGN_JOB, address], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **LOOPBACK_ENV})
    try:
        line = ""
        deadline = time.monotonic() + 180
        while not line.startswith("READY ") and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"the second job failed:\n{proc.stderr.read()[-3000:]}")
        foreign = json.loads(line.removeprefix("READY "))
        assert foreign["job"] != ours
        assert _pg_state(foreign["pg"]) == "CREATED" and _cleaners(foreign["job"]) == ["ALIVE"]

        # The same leak in this job: the reaper thread frees it within a few ticks.
        namespace: dict = {"__name__": "simpo_ray_test_leak"}  # not importable: pickled by value
        exec(LEAK_MAKER, namespace)
        our_pg, our_cleaner = namespace["leak"]()
        try:
            assert _wait(lambda: _pg_state(our_pg) == "REMOVED", 30), _pg_state(our_pg)
            assert _wait(lambda: "ALIVE" not in _cleaners(ours), 30), _cleaners(ours)
        finally:
            ray.kill(our_cleaner)

        # Meanwhile it has looked at the other job's leak many times; reap once more by hand too.
        ray_workarounds.reap_orphan_placement_groups()
        time.sleep(2)
        assert _pg_state(foreign["pg"]) == "CREATED"
        assert _cleaners(foreign["job"]) == ["ALIVE"]
    finally:
        proc.communicate("\n", timeout=60)
    # The other job cleaned up after itself (its group went with the job): the cluster is whole.
    assert resources_settled(timeout_s=30), (ray.available_resources(), ray.cluster_resources())


# ---------------------------------------------------------------- the reaper and shutdown


def test_a_reaper_tick_after_shutdown_fails_instead_of_starting_ray(monkeypatch):
    """CI once saw a reaper tick race the fixture's `ray.shutdown()`: the tick's
    `ray.get_runtime_context()` or `ray.util.remove_placement_group` (both start Ray when none is
    connected) began a second cluster from the reaper thread, and the main thread's `ray.init`
    failed. With no Ray connected, a whole tick and the removal raise Ray's own "not connected"
    error and start nothing (the fast tier's guard turns any `ray.init` into an error naming
    the test)."""
    import ray

    from simpo_ray.infra import ray_workarounds

    # This process as after `ray.shutdown()`, even where the session's cluster is up.
    monkeypatch.setattr(ray._private.worker, "global_worker", ray._private.worker.Worker())
    assert not ray.is_initialized()
    with pytest.raises(ray.exceptions.RaySystemError, match="ray.init"):
        ray_workarounds.reap_orphan_placement_groups()
    with pytest.raises(ray.exceptions.RaySystemError, match="ray.init"):
        ray_workarounds._remove_placement_group(ray.PlacementGroupID.from_random())
    assert not ray.is_initialized()


def test_stopping_the_reaper_waits_for_a_tick_in_progress(monkeypatch):
    """`stop_orphan_reaper` (called by `cluster.shutdown_ray` before `ray.shutdown()`) returns
    only after the thread has ended, a tick in progress included, and no tick starts after it."""
    import threading

    import ray

    from simpo_ray.infra import ray_workarounds

    ticks: list[tuple[float, float]] = []
    in_tick = threading.Event()

    def slow_tick():
        start = time.monotonic()
        in_tick.set()
        time.sleep(0.5)
        ticks.append((start, time.monotonic()))
        return 0

    monkeypatch.setattr(ray_workarounds, "reaper_needed", lambda: True)
    monkeypatch.setattr(ray_workarounds, "reap_orphan_placement_groups", slow_tick)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert ray_workarounds.start_orphan_reaper(interval_s=0.01) is not None
    thread = ray_workarounds._reaper_thread
    assert in_tick.wait(10)
    ray_workarounds.stop_orphan_reaper()
    stopped = time.monotonic()
    assert not thread.is_alive()
    assert ticks and ticks[-1][1] <= stopped  # the tick in progress finished before the return
    n = len(ticks)
    time.sleep(0.2)
    assert len(ticks) == n and ray_workarounds._reaper_thread is None


# ---------------------------------------------------------------- when the reaper runs


@pytest.mark.slow
def test_reaper_is_on_without_a_dashboard_and_off_on_another_ray_version(ray_cluster, monkeypatch, caplog):
    import ray

    from simpo_ray.infra import ray_workarounds

    assert not ray_workarounds.state_api_available()  # the test cluster runs no dashboard
    assert ray_workarounds.reaper_needed()  # ... on Ray 2.60.x
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    monkeypatch.setattr(ray_workarounds, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="simpo_ray.infra.ray_workarounds"):
        assert not ray_workarounds.reaper_needed()
        assert not ray_workarounds.reaper_needed()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "written for Ray 2.60.x, this is Ray 2.61.0" in messages[0], messages
    monkeypatch.setenv(ray_workarounds.FORCE_REAPER_ENV, "1")
    assert ray_workarounds.reaper_needed()
    # With a dashboard (its address published in the GCS), Ray's own cleaner works: reaper off.
    monkeypatch.setattr(ray_workarounds, "state_api_available", lambda: True)
    assert not ray_workarounds.reaper_needed()


# ---------------------------------------------------------------- console noise (issue 12, item 13)


WORKER_DIED = ("A worker died or was killed while executing a task by an unexpected system error. To "
               "troubleshoot the problem, check the logs for the dead worker. Lease ID: 07 Worker ID: 5d "
               "Node ID: 97 Worker IP address: 127.0.0.1 Worker port: 37439 Worker PID: 19964 Worker exit "
               "type: SYSTEM_ERROR Worker exit detail: Worker exits unexpectedly by a signal. SystemExit is "
               "raised (sys.exit is called). Exit code: 1. The process receives a SIGTERM.")
OOM = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot "
       "the problem, check the logs for the dead worker. Worker PID: 7 Worker exit type: NODE_OUT_OF_MEMORY "
       "Worker exit detail: Task was killed due to the node running low on memory.")


STARTUP_BURST = ("WARNING: 8 PYTHON worker processes have been started on node: e516d7aad0aad7a4aa78f8b3615d060155"
                 "8ed9955206a232c5213614 with address: 127.0.0.1, which is 4x the maximum expected startup "
                 "concurrency (2).")


def test_ray_console_filter_drops_expected_noise_and_makes_real_errors_one_line():
    """What a normal run printed (a red line per ended trial, the PlacementGroupCleaner's
    traceback) is dropped; a real failure reported by the raylet stays, as one line saying what
    and where to look."""
    from simpo_ray.infra.ray_workarounds import ray_console_filter

    raylet = {"pid": "raylet", "is_err": False, "ip": "127.0.0.1"}
    assert ray_console_filter({**raylet, "lines": [WORKER_DIED]}) is None
    assert ray_console_filter({**raylet, "lines": [STARTUP_BURST]}) is None  # printed by a real search
    cleaner = {"pid": 9, "actor_name": "PlacementGroupCleaner", "is_err": True,
               "lines": ["Traceback (most recent call last):", "ConnectionError: Found multiple active Ray "
                         "instances: {'192.0.2.2:37253', '192.0.2.2:40895'}."]}
    assert ray_console_filter(cleaner) is None
    kept = ray_console_filter({**raylet, "lines": [WORKER_DIED, OOM]})
    [line] = kept["lines"]
    assert line.startswith("[simpo-ray] Ray: A worker died or was killed while executing a task by an "
                           "unexpected system error (NODE_OUT_OF_MEMORY: Task was killed due to the node "
                           "running low on memory)")
    assert "trials.csv" in line and "\n" not in line
    # A trial worker's own output (the train CLI shows it) passes untouched.
    worker = {"pid": 11, "actor_name": "RayTrainWorker", "is_err": False, "lines": ["[step 10] loss 0.6"]}
    assert ray_console_filter(worker) == worker


@pytest.mark.slow
def test_the_console_filter_is_in_front_of_rays_printer(ray_cluster):
    """init_ray installs it before ray.init: the error listener and the log printer use it."""
    import ray._private.worker as ray_worker

    assert getattr(ray_worker.print_to_stdstream, "_simpo_ray_filter", False)


# ---------------------------------------------------------------- leftovers of a killed driver (issue 15, item 12)

KILLED_DRIVER = """
import os, sys, time
os.environ["SIMPO_RAY_RAY_TEMP_DIR"] = sys.argv[1]
from simpo_ray.infra.cluster import init_ray
init_ray(num_cpus=1, log_to_driver=False, reap_orphans=False)
import ray
print(ray._private.worker.global_worker.node.get_session_dir_path(), flush=True)
time.sleep(300)
"""


def _session_processes(root: str, session: str) -> dict[int, str]:
    """{pid: kind} of the live Ray processes of `session` (a name) under `root`."""
    import psutil

    from simpo_ray.infra.guard import _ray_process_info

    out = {}
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        info = _ray_process_info(proc, root)
        if info and info[0] == session:
            out[proc.pid] = info[1]
    return out


def test_agents_of_a_killed_driver_are_ended_when_the_next_cluster_starts():
    """SIGKILL a driver that started a private cluster, and its guard (infra/guard.py, which
    would end the leftovers itself): its raylet and gcs_server exit, but its agents live on
    (about a minute; removal condition of the workaround: they no longer do). The start of the
    next cluster (`end_dead_session_processes`, which init_ray runs) ends them, and it never
    touches a live session."""
    import os
    import signal
    import tempfile

    import psutil

    from simpo_ray.infra.guard import end_dead_session_processes

    root = tempfile.mkdtemp(prefix="srr", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    driver = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, root], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    try:
        session = Path(driver.stdout.readline().strip()).name
        assert session.startswith("session_"), session
        assert _wait(lambda: sum("Agent" in k for k in _session_processes(root, session).values()) >= 2, 60)
        before = _session_processes(root, session)
        assert {"raylet", "gcs_server"} <= set(before.values()), before
        assert end_dead_session_processes(root) == []  # a live session: untouched
        assert _session_processes(root, session).keys() == before.keys()
    finally:
        for child in psutil.Process(driver.pid).children():
            if "simpo_ray.infra.guard" in " ".join(child.cmdline()):
                child.kill()
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    left = {}
    assert _wait(lambda: not {"raylet", "gcs_server"} & set(_session_processes(root, session).values()), 30)
    left = _session_processes(root, session)
    print(f"\n[leftovers] alive after the driver's SIGKILL: {sorted(left.values())}")
    # Not one of Ray's processes, though it names the session: never touched.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{root}/{session}/logs"])
    try:
        ended = end_dead_session_processes(root)
        assert _wait(lambda: not _session_processes(root, session), 10), _session_processes(root, session)
        assert len(ended) >= len(left)
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in left)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
