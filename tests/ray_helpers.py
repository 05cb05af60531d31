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
