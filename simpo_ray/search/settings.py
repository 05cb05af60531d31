"""The typed parts of a search space that are not the space itself: a searched parameter
(`Param`), the search settings (`SearchSettings`, with the start-point spec `PointsSpec`) and the
GPU-hour estimate's inputs (`Estimate`). Each validates itself on construction (`schema`)."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from simpo_ray import guide, schema
from simpo_ray.errors import ConfigError
from simpo_ray.schema import rng
from simpo_ray.search.objectives import OBJECTIVES, Objective, validate_multi


Distribution = Literal["loguniform", "uniform", "choice"]


Scheduler = Literal["asha", "hyperband", "median", "fifo"]


Sampler = Literal["tpe", "random"]


TimeAttr = Literal["step", "samples", "tokens", "training_iteration"]


Mode = Literal["max", "min"]


# What a warm start enqueues when search.warm_start_points is not set: on the bundled ladder the
# nearest size's best trials reached the cold search's best in the fewest trials and steps, the
# trends' point and draws around it close behind (bench/warm_start.py, 5 seeds; README
# "Transfer across sizes").
DEFAULT_WARM_START_POINTS = "top_k"


DISTRIBUTIONS = typing.get_args(Distribution)


SCHEDULERS = typing.get_args(Scheduler)


SAMPLERS = typing.get_args(Sampler)


@dataclass(frozen=True)
class Param:
    """One searched parameter. For `choice`, low/high are min/max of `values`."""

    name: str
    distribution: str
    low: float
    high: float
    values: tuple[float, ...] | None = None

    def contains(self, x: float) -> bool:
        if self.values is not None:
            return any(math.isclose(x, v, rel_tol=1e-9, abs_tol=1e-15) for v in self.values)
        return x in guide.Range(self.low, self.high)

    def clip(self, x: float) -> float:
        if self.values is not None:
            return min(self.values, key=lambda v: abs(v - x))
        return min(max(x, self.low), self.high)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"distribution": self.distribution, "low": self.low, "high": self.high}
        if self.values is not None:
            d["values"] = list(self.values)
        return d

    def __str__(self) -> str:
        if self.values is not None:
            return f"choice {{{', '.join(f'{v:g}' for v in self.values)}}}"
        return f"{self.distribution} {self.low:g} to {self.high:g}"


@dataclass(frozen=True)
class PointsSpec:
    references: bool = True
    extra: tuple[dict, ...] = ()


@dataclass(frozen=True)
class SearchSettings:
    num_samples: int = field(default=16, metadata=rng(1))
    objective: Objective = "eval/preference_accuracy"
    mode: Mode = "max"
    scheduler: Scheduler = "asha"
    sampler: Sampler = "tpe"
    # TPE only: one joint model of the parameters (true) or one per parameter (false); null keeps
    # Optuna's default (joint for one objective, independent for several). And how many trials it
    # samples at random before its model proposes (null: the start points + 2, at least 4).
    tpe_multivariate: bool | None = None
    tpe_startup_trials: int | None = field(default=None, metadata=rng(1))
    time_attr: TimeAttr = "step"
    grace_period: int = field(default=100, metadata=rng(1))
    reduction_factor: float = field(default=3.0, metadata=rng(1, low_open=True))
    max_t: int = field(default=1000, metadata=rng(1))
    max_concurrent: int | None = field(default=None, metadata=rng(1))
    seed: int = 0
    max_failures: int = field(default=1, metadata=rng(0))
    # Single-worker trials train in their Tune trial's process (Ray Train's local mode,
    # infra/local_run.py): no Train controller or worker process per trial. false: TorchTrainer
    # workers, as multi-worker trials always have.
    local_mode: bool = True
    checkpoint_keep: int = field(default=2, metadata=rng(1))
    points_to_evaluate: PointsSpec = field(default_factory=PointsSpec)
    # Finished searches to start from (simpo_ray.transfer.warm_start); absolute once loaded.
    warm_start: tuple[str, ...] = ()
    warm_start_narrow: bool = False
    # What a warm start enqueues after the documented default: trend, the point the size trends
    # predict; top_k, the warm_start_top_k best trials of the finished size nearest this one
    # (zero-shot transfer by rank); prior, warm_start_prior_samples points drawn around the
    # trends' point (transfer.prior); none, nothing. null: DEFAULT_WARM_START_POINTS.
    warm_start_points: Literal["trend", "top_k", "prior", "none"] | None = None
    warm_start_top_k: int = field(default=3, metadata=rng(1))
    warm_start_prior_samples: int = field(default=3, metadata=rng(1))
    # A multi-objective search (search.objective given as a list): all its metrics and modes;
    # `objective`/`mode` are then the first (the primary). Empty for one objective.
    objectives: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    # The Optuna study's database (simpo_ray.search.study): null keeps it in the experiment
    # directory (optuna.db); a PostgreSQL/MySQL URL shares one among a cluster's searches.
    optuna_storage: str | None = None

    def __post_init__(self) -> None:
        schema.validate(self)
        if self.warm_start_narrow and not self.warm_start:
            raise ConfigError("warm_start_narrow: true needs finished searches to narrow from "
                              "(search.warm_start or --warm-start)")
        if self.warm_start_points is not None and not self.warm_start:
            raise ConfigError(f"warm_start_points: {self.warm_start_points!r} needs finished searches to "
                              "transfer from (search.warm_start or --warm-start)")
        if self.sampler == "random" and (self.tpe_multivariate is not None or self.tpe_startup_trials is not None):
            raise ConfigError("tpe_multivariate / tpe_startup_trials: set for sampler: random, which has no "
                              "model; use sampler: tpe or drop them")
        validate_multi(self)
        if self.optuna_storage is not None:
            from simpo_ray.search.study import check_url

            check_url(self.optuna_storage)
        better = OBJECTIVES[self.objective]
        if self.mode != better:
            raise ConfigError(f"mode: {self.mode!r} is wrong for {self.objective}, which is better when "
                              f"{'higher' if better == 'max' else 'lower'}; use mode: {better}")
        if self.max_t < self.grace_period:
            raise ConfigError(f"max_t: {self.max_t} is below grace_period {self.grace_period}; "
                              "max_t must be >= grace_period")


@dataclass(frozen=True)
class Estimate:
    """Inputs of the dry run's GPU-hour estimate (`simpo_ray.search.estimate`)."""

    train_pairs: int = field(metadata=rng(1))
    params_billion: float = field(metadata=rng(0, low_open=True))
    tokens_per_pair: float = field(metadata=rng(0, low_open=True))  # prompt+chosen plus prompt+rejected
    mfu: float = field(default=0.35, metadata=rng(0, 1, low_open=True))
    peak_tflops: float = field(default=989.0, metadata=rng(0, low_open=True))  # H100 SXM bf16 dense

    def __post_init__(self) -> None:
        schema.validate(self)


POINTS_KEYS = ("references", "extra")


def parse_points_spec(raw: Any) -> PointsSpec:
    """`search.points_to_evaluate`: default | default_only | {references, extra}."""
    fld = "search.points_to_evaluate"
    if raw == "default":
        return PointsSpec(references=True)
    if raw == "default_only":
        return PointsSpec(references=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"{fld}: {raw!r} is not allowed; use 'default', 'default_only' or a mapping "
                          "{references: true|false, extra: [points]}")
    schema.check_keys(raw, POINTS_KEYS, fld + ".")
    refs = schema.coerce(f"{fld}.references", raw.get("references", True), bool)
    extra = raw.get("extra", []) or []
    if not isinstance(extra, list) or not all(isinstance(p, dict) for p in extra):
        raise ConfigError(f"{fld}.extra: expected a list of mappings (parameter: value), got {extra!r}")
    return PointsSpec(references=refs, extra=tuple(dict(p) for p in extra))
