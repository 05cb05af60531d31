"""Helpers shared by the search benchmarks: run a bundled search through `run_search`, read its
tables."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from _common import REPO

SPACE = REPO / "search_spaces" / "cpu-tiny.yaml"


def run(*, storage: str, name: str, num_samples: int, max_steps: int, scheduler: str, seed: int,
        max_concurrent: int = 2, sampler: str = "tpe", extra: dict[str, Any] | None = None,
        warm_start: list[str] | None = None, verbose: int = 0) -> dict[str, Any]:
    """One search on the bundled cpu-tiny space; returns its tables and wall time."""
    from simpo_ray.search.run import run_search

    overrides = {"base.max_steps": max_steps, **(extra or {})}
    t0 = time.perf_counter()
    exp = run_search(str(SPACE), storage_path=storage, name=name, num_samples=num_samples, seed=seed,
                     scheduler=scheduler, sampler=sampler, max_concurrent=max_concurrent,
                     overrides=overrides, warm_start=warm_start, verbose=verbose)
    wall = time.perf_counter() - t0
    trials = pd.read_csv(Path(exp) / "trials.csv")
    curves = pd.read_csv(Path(exp) / "curves.csv")
    return {"exp": str(exp), "wall_s": wall, "trials": trials, "curves": curves}


def new_storage(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"simpo-bench-{prefix}-")


def compute_to_reach(exp: str | Path, target: float, objective: str = "eval/success_rate") -> dict[str, Any]:
    """Trials started and training steps summed over them, in Tune's trial order, until the first
    report (after step 0) reaching `target`; a search that never reaches it counts all of it.
    Sequential accounting: every earlier-started trial counts whole and a trial running beside
    the one that reaches the target not at all, alike in every arm."""
    exp = Path(exp)
    trials = pd.read_csv(exp / "trials.csv")
    curves = pd.read_csv(exp / "curves.csv")
    # Tune numbers its trials in the order it starts them: simpo_trial_<id>_<number>_<params>_<time>
    number = {d.name.split("_")[2]: int(d.name.split("_")[3]) for d in exp.glob("simpo_trial_*") if d.is_dir()}
    order = sorted(trials["trial_id"], key=lambda t: number.get(t, 10**6))
    steps_used = 0
    for n, tid in enumerate(order, 1):
        c = curves[(curves["trial_id"] == tid) & (curves["step"] > 0)].sort_values("step")
        hit = c[c[objective] >= target]
        if len(hit):
            return {"trials": n, "steps": steps_used + int(hit["step"].iloc[0]), "reached": True}
        steps_used += int(c["step"].max()) if len(c) else 0
    return {"trials": len(order), "steps": steps_used, "reached": False}
