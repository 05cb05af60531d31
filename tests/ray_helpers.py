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
    """What a finished test left holding the shared cluster: CPUs or GPUs not given back, live
    placement groups (after waiting `timeout_s` for Ray's asynchronous clean-up). Actors that
    hold no resources (Train's session-wide coordinator) are not leaks."""
    import gc

    import ray

    gc.collect()  # actor handles held by garbage cycles keep their actors alive
    deadline = time.monotonic() + timeout_s
    while True:
        settled = resources_settled(timeout_s=max(0.0, deadline - time.monotonic()))
        pgs = [f"placement group {pg_id} ({p['state']})"
               for pg_id, p in ray.util.placement_group_table().items() if p["state"] != "REMOVED"]
        found = ([] if settled else [f"CPU {ray.available_resources().get('CPU', 0):g} of "
                                     f"{ray.cluster_resources().get('CPU', 0):g} free"]) + pgs
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)
