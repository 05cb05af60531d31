"""Helpers for the tests that run Ray (importable from every test module: pytest puts tests/ on
the path)."""

from __future__ import annotations

import time


def resources_settled(timeout_s: float = 30.0, keys: tuple[str, ...] = ("CPU", "GPU")) -> bool:
    """Wait until `ray.available_resources()` equals `ray.cluster_resources()` for `keys`
    (worker placement groups are removed asynchronously after a trial ends)."""
    import ray

    from simpo_ray.infra import ray_workarounds

    deadline = time.monotonic() + timeout_s
    while True:
        total, avail = ray.cluster_resources(), ray.available_resources()
        if all(abs(total.get(k, 0.0) - avail.get(k, 0.0)) < 1e-6 for k in keys):
            return True
        if ray_workarounds._reaper_stop is not None:
            ray_workarounds.reap_orphan_placement_groups()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def live_train_worker_pids() -> list[int]:
    """PIDs of the RayTrainWorker actors that are ALIVE now in this session's cluster (Ray's own
    state, so a worker process of an earlier run that is still exiting is never picked)."""
    from ray._private.state import actors

    return sorted(a["Pid"] for a in actors().values()
                  if a["State"] == "ALIVE" and a["ActorClassName"] == "RayTrainWorker" and a.get("Pid"))


def leftovers(timeout_s: float = 60.0) -> list[str]:
    """What a finished test left holding the shared cluster: CPUs not given back, live actors,
    live placement groups (after waiting `timeout_s` for Ray's asynchronous clean-up)."""
    import gc

    import ray
    from ray._private.state import actors

    gc.collect()  # actor handles held by garbage cycles keep their actors alive
    found: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        settled = resources_settled(timeout_s=max(0.0, deadline - time.monotonic()))
        alive = sorted(f"actor {a['ActorClassName']} (pid {a.get('Pid')})" for a in actors().values()
                       if a["State"] == "ALIVE")
        pgs = [f"placement group {p['placement_group_id']} ({p['state']})"
               for p in ray.util.placement_group_table().values() if p["state"] != "REMOVED"]
        found = ([] if settled else [f"CPUs {ray.available_resources().get('CPU', 0)} of "
                                     f"{ray.cluster_resources().get('CPU', 0)} free"]) + alive + pgs
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def clear_cluster() -> None:
    """SIGKILL every live actor process and remove every placement group of the shared test
    cluster, so one test's leak cannot starve the next (a search would wait for CPUs forever)."""
    import os
    import signal

    import ray
    from ray._private.state import actors
    from ray.util.placement_group import PlacementGroup

    for a in actors().values():
        if a["State"] == "ALIVE" and a.get("Pid"):
            try:
                os.kill(a["Pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    for pg_id, p in ray.util.placement_group_table().items():
        if p["state"] != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
