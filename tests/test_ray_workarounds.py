"""simpo_ray.ray_workarounds: the orphan placement-group reaper acts on this job's leaks only.

- the orphan rule, on real `PlacementGroupTableData` messages (incl. the stale GCS flag seen on
  Ray 2.60, and a group of another job);
- a second Ray job (a subprocess driver joined to the session's cluster) leaves a placement
  group and a PlacementGroupCleaner-named actor whose creator died, as Train's do when Tune
  stops a trial; the reaper leaves them alone while it reaps the same leak of this job;
- the switch: on only without a dashboard, and only on the Ray version it was written for.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

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

    from simpo_ray.ray_workarounds import is_orphan_placement_group

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
    ray.init(address=sys.argv[1], namespace="simpo-ray-test-foreign", log_to_driver=False)
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


def test_reaper_reaps_this_jobs_leak_and_leaves_another_jobs_alone(ray_cluster):
    import ray

    from simpo_ray import ray_workarounds

    assert ray_workarounds._reaper_stop is not None, "init_ray (conftest) should have started the reaper"
    ours = ray.get_runtime_context().get_job_id()
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN_JOB, address], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    assert ray_workarounds.resources_settled(timeout_s=30), (ray.available_resources(), ray.cluster_resources())


# ---------------------------------------------------------------- when the reaper runs


def test_reaper_is_on_without_a_dashboard_and_off_on_another_ray_version(ray_cluster, monkeypatch, caplog):
    import ray

    from simpo_ray import ray_workarounds

    assert not ray_workarounds.state_api_available()  # the test cluster runs no dashboard
    assert ray_workarounds.reaper_needed()  # ... on Ray 2.60.x
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    monkeypatch.setattr(ray_workarounds, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="simpo_ray.ray_workarounds"):
        assert not ray_workarounds.reaper_needed()
        assert not ray_workarounds.reaper_needed()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "written for Ray 2.60.x, this is Ray 2.61.0" in messages[0], messages
    monkeypatch.setenv(ray_workarounds.FORCE_REAPER_ENV, "1")
    assert ray_workarounds.reaper_needed()
    # With a dashboard (its address published in the GCS), Ray's own cleaner works: reaper off.
    monkeypatch.setattr(ray_workarounds, "state_api_available", lambda: True)
    assert not ray_workarounds.reaper_needed()
