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
        verbose: int = 0) -> dict[str, Any]:
    """One search on the bundled cpu-tiny space; returns its tables and wall time."""
    from simpo_ray.tune import run_search

    overrides = {"base.max_steps": max_steps, **(extra or {})}
    t0 = time.perf_counter()
    exp = run_search(str(SPACE), storage_path=storage, name=name, num_samples=num_samples, seed=seed,
                     scheduler=scheduler, sampler=sampler, max_concurrent=max_concurrent,
                     overrides=overrides, verbose=verbose)
    wall = time.perf_counter() - t0
    trials = pd.read_csv(Path(exp) / "trials.csv")
    curves = pd.read_csv(Path(exp) / "curves.csv")
    return {"exp": str(exp), "wall_s": wall, "trials": trials, "curves": curves}


def new_storage(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"simpo-bench-{prefix}-")
