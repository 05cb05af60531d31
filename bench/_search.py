"""Helpers shared by the search benchmarks: run a bundled search through `run_search`, read its
tables, and (for the random-search arm) swap the sampler without copying tune.py."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from _common import REPO

SPACE = REPO / "search_spaces" / "cpu-tiny.yaml"


@contextlib.contextmanager
def random_sampler():
    """Make `simpo_ray.tune._searcher` build its OptunaSearch with Optuna's `RandomSampler`
    (same seed, same distributions, same points_to_evaluate) instead of the seeded TPE.

    `run_search` has no sampler option; `_searcher` constructs `optuna.samplers.TPESampler(seed=...,
    ...)` inside, so we substitute the class for the duration of that one call. Proposed change:
    a `sampler="tpe"|"random"` kwarg on `run_search` (and `search.sampler` in the space YAML).
    """
    import optuna

    import simpo_ray.tune as tune_mod

    original = tune_mod._searcher

    def patched(space):
        real_tpe = optuna.samplers.TPESampler
        optuna.samplers.TPESampler = lambda seed=None, **_: optuna.samplers.RandomSampler(seed=seed)
        try:
            return original(space)
        finally:
            optuna.samplers.TPESampler = real_tpe

    tune_mod._searcher = patched
    try:
        yield
    finally:
        tune_mod._searcher = original


def run(*, storage: str, name: str, num_samples: int, max_steps: int, scheduler: str, seed: int,
        max_concurrent: int = 2, sampler: str = "tpe", extra: dict[str, Any] | None = None,
        verbose: int = 0) -> dict[str, Any]:
    """One search on the bundled cpu-tiny space; returns its tables and wall time."""
    from simpo_ray.tune import run_search

    overrides = {"base.max_steps": max_steps, **(extra or {})}
    ctx = random_sampler() if sampler == "random" else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx:
        exp = run_search(str(SPACE), storage_path=storage, name=name, num_samples=num_samples, seed=seed,
                         scheduler=scheduler, max_concurrent=max_concurrent, overrides=overrides,
                         verbose=verbose)
    wall = time.perf_counter() - t0
    trials = pd.read_csv(Path(exp) / "trials.csv")
    curves = pd.read_csv(Path(exp) / "curves.csv")
    return {"exp": str(exp), "wall_s": wall, "trials": trials, "curves": curves}


def new_storage(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"simpo-bench-{prefix}-")
