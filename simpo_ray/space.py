"""Search-space YAML -> a validated, typed `SearchSpace` (schema and loading; layout in docs/design.md).

A space names a size bucket of the guide, fixed training keys (`base`), the searched SimPO
parameters, one trial's resources and the search settings; every searched range must lie in the
guide's documented range unless `allow_out_of_range`. No Ray, Optuna or torch here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from simpo_ray import guide, schema
from simpo_ray.objectives import OBJECTIVES, Objective, check_objective, split_objective, validate_multi
from simpo_ray.config import FIELDS, TrainConfig, from_dict
from simpo_ray.errors import ConfigError, closest
from simpo_ray.schema import rng

Distribution = Literal["loguniform", "uniform", "choice"]
Scheduler = Literal["asha", "hyperband", "median", "fifo"]
Sampler = Literal["tpe", "random"]
TimeAttr = Literal["step", "samples", "tokens", "training_iteration"]
Mode = Literal["max", "min"]
DISTRIBUTIONS = typing.get_args(Distribution)
SCHEDULERS = typing.get_args(Scheduler)
SAMPLERS = typing.get_args(Sampler)
RANGE_SOURCES = ("documented", "recommended")

TOP_KEYS = ("name", "description", "size_bucket", "task", "model_type", "base", "params",
            "resources", "search", "estimate")
PARAM_KEYS = ("distribution", "low", "high", "values", "range")
# Keys of one trial's TrainConfig that the space's `resources` set; `base` may not set them.
RESOURCE_OWNED = {"num_workers": "resources.num_workers", "use_gpu": "resources.gpus_per_worker"}


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
class Resources:
    """Resources of ONE trial (or one training run): a Ray Train run of `num_workers` workers."""

    num_workers: int = field(default=1, metadata=rng(1))
    cpus_per_worker: float = field(default=1.0, metadata=rng(0, low_open=True))
    gpus_per_worker: float = field(default=0.0, metadata=rng(0))
    gpu_memory_gb: float | None = field(default=None, metadata=rng(0, low_open=True))  # per GPU

    def __post_init__(self) -> None:
        schema.validate(self)
        g = self.gpus_per_worker
        if g > 1 and not float(g).is_integer():
            raise ConfigError(f"gpus_per_worker: {g:g} is not allowed; above 1 it must be a whole number")

    @property
    def gpus_per_trial(self) -> float:
        return self.num_workers * self.gpus_per_worker

    @property
    def cpus_per_trial(self) -> float:
        return self.num_workers * self.cpus_per_worker

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def worker_bundle(self) -> dict[str, float]:
        """One worker's Ray resource bundle (capitalised names, zeros dropped)."""
        b = {"CPU": float(self.cpus_per_worker), "GPU": float(self.gpus_per_worker)}
        return {k: v for k, v in b.items() if v > 0}

    def describe(self) -> str:
        return f"{self.num_workers} worker(s) x {self.cpus_per_worker:g} CPU + {self.gpus_per_worker:g} GPU"


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
    checkpoint_keep: int = field(default=2, metadata=rng(1))
    points_to_evaluate: PointsSpec = field(default_factory=PointsSpec)
    # Finished searches to start from (simpo_ray.warm_start); absolute once loaded.
    warm_start: tuple[str, ...] = ()
    warm_start_narrow: bool = False
    # A multi-objective search (search.objective given as a list): all its metrics and modes;
    # `objective`/`mode` are then the first (the primary). Empty for one objective.
    objectives: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        schema.validate(self)
        if self.warm_start_narrow and not self.warm_start:
            raise ConfigError("warm_start_narrow: true needs finished searches to narrow from "
                              "(search.warm_start or --warm-start)")
        if self.sampler == "random" and (self.tpe_multivariate is not None or self.tpe_startup_trials is not None):
            raise ConfigError("tpe_multivariate / tpe_startup_trials: set for sampler: random, which has no "
                              "model; use sampler: tpe or drop them")
        validate_multi(self)
        better = OBJECTIVES[self.objective]
        if self.mode != better:
            raise ConfigError(f"mode: {self.mode!r} is wrong for {self.objective}, which is better when "
                              f"{'higher' if better == 'max' else 'lower'}; use mode: {better}")
        if self.max_t < self.grace_period:
            raise ConfigError(f"max_t: {self.max_t} is below grace_period {self.grace_period}; "
                              "max_t must be >= grace_period")


@dataclass(frozen=True)
class Estimate:
    """Inputs of the dry run's GPU-hour estimate (`simpo_ray.estimate`)."""

    train_pairs: int = field(metadata=rng(1))
    params_billion: float = field(metadata=rng(0, low_open=True))
    tokens_per_pair: float = field(metadata=rng(0, low_open=True))  # prompt+chosen plus prompt+rejected
    mfu: float = field(default=0.35, metadata=rng(0, 1, low_open=True))
    peak_tflops: float = field(default=989.0, metadata=rng(0, low_open=True))  # H100 SXM bf16 dense

    def __post_init__(self) -> None:
        schema.validate(self)


@dataclass
class SearchSpace:
    name: str
    size_bucket: str
    task: str | None
    model_type: str | None
    base: dict[str, Any]                 # the fixed keys as written (validated); see trial_config
    params: dict[str, Param]
    resources: Resources
    search: SearchSettings
    points_to_evaluate: list[dict[str, float]]   # first = the guide's documented default
    point_labels: list[str]                      # one line per point: where it comes from
    estimate: Estimate | None = None
    source: str = "<dict>"
    description: str | None = None
    allow_out_of_range: bool = False
    notes: list[str] = field(default_factory=list)   # clips, drops, batch-size remarks
    warm: Any = None  # simpo_ray.warm_start.WarmStart when search.warm_start names searches

    def fixed_params(self) -> dict[str, float]:
        """The SimPO parameters not searched: from `base`, else the documented default."""
        default = self.documented_default()
        return {p: float(self.base.get(p, default[p])) for p in guide.PARAMS if p not in self.params}

    def documented_default(self) -> dict[str, float]:
        return guide.documented_default(self.size_bucket, self.model_type, self.task)

    def documented_range(self, param: str) -> tuple[float, float]:
        return guide.documented_range(param, self.size_bucket, self.task, self.model_type)

    def recommended_range(self, param: str) -> tuple[float, float]:
        return guide.recommended_range(param, self.size_bucket, self.task, self.model_type)

    def trial_config(self, params: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
        """One trial's validated `TrainConfig`: base + fixed parameters + resources + `params`."""
        params = params or {}
        unknown = [k for k in params if k not in self.params]
        if unknown:
            k = str(unknown[0])
            raise ConfigError(f"trial params: {k!r} is not searched in space {self.name!r}"
                              f"{closest(k, self.params)}; searched: {', '.join(self.params)}")
        merged = {**self.base, **self.fixed_params(), **params, **overrides,
                  "num_workers": self.resources.num_workers, "use_gpu": self.resources.use_gpu}
        return from_dict(merged, source=f"{self.source}: trial config")

    def default_config(self) -> TrainConfig:
        """The config of the first point to evaluate (the guide's documented default)."""
        return self.trial_config(self.points_to_evaluate[0] if self.points_to_evaluate else {})

    @property
    def effective_batch(self) -> int:
        cfg = self.trial_config()
        return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.resources.num_workers

    def guide_summary(self) -> dict[str, Any]:
        return guide.summary(self.size_bucket, self.task, self.model_type)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for search.json."""
        return {
            "name": self.name, "space_file": self.source, "size_bucket": self.size_bucket,
            "task": self.task, "model_type": self.model_type,
            "params": {n: p.to_dict() for n, p in self.params.items()},
            "fixed_params": self.fixed_params(),
            "points_to_evaluate": self.points_to_evaluate, "point_labels": self.point_labels,
            "guide": self.guide_summary(),
        }


def load_space(path: str | Path | dict, *, task: str | None = None, model_type: str | None = None,
               allow_out_of_range: bool = False, overrides: dict[str, Any] | None = None,
               warm_start: tuple[str, ...] | list[str] = ()) -> SearchSpace:
    """Load and validate a search space (a YAML file or an already-parsed mapping).

    `task`/`model_type` replace the file's presets ("none" removes one). `overrides` is applied
    to the raw mapping before validation: dotted keys (`{"search.num_samples": 4}`) or nested
    mappings (`{"search": {"seed": 1}}`). `warm_start`: finished-search directories added after
    the file's `search.warm_start` (`--warm-start`).
    """
    if isinstance(path, dict):
        source, data, stem = "<dict>", copy.deepcopy(path), None
    else:
        p = Path(path)
        source, data, stem = str(p), schema.read_yaml(p), p.stem
    with schema.naming_file(source) if source != "<dict>" else contextlib.nullcontext():
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of top-level keys, got {type(data).__name__}")
        if overrides:
            data = schema.apply_overrides(data, overrides)
        if task is not None:
            data["task"] = None if task == "none" else task
        if model_type is not None:
            data["model_type"] = None if model_type == "none" else model_type
        return _build(data, source=source, stem=stem, allow_out_of_range=allow_out_of_range,
                      warm_start=tuple(warm_start))


def _build(data: dict, *, source: str, stem: str | None, allow_out_of_range: bool,
           warm_start: tuple[str, ...] = ()) -> SearchSpace:
    schema.check_keys(data, TOP_KEYS)
    for required in ("size_bucket", "params"):
        if required not in data:
            raise ConfigError(f"{required}: missing (required)")
    bucket_name = schema.coerce("size_bucket", data["size_bucket"], str)
    guide.bucket(bucket_name)
    task = schema.coerce("task", data.get("task"), str | None)
    model_type = schema.coerce("model_type", data.get("model_type"), str | None)
    guide.task_preset(task)
    guide.model_type_preset(model_type)
    name = schema.coerce("name", data.get("name", stem or "space"), str)
    description = schema.coerce("description", data.get("description"), str | None)
    ctx = _Ctx(bucket_name, task, model_type, allow_out_of_range)

    resources = schema.build(Resources, data.get("resources"), prefix="resources.")
    base = _base(data.get("base", {}), resources, ctx)
    params = _params(data["params"], base, ctx)
    search = _search(data.get("search"), warm_start)
    estimate = (schema.build(Estimate, data["estimate"], prefix="estimate.")
                if data.get("estimate") is not None else None)

    space = SearchSpace(name=name, size_bucket=bucket_name, task=task, model_type=model_type,
                        base=base, params=params, resources=resources, search=search,
                        points_to_evaluate=[], point_labels=[], estimate=estimate, source=source,
                        description=description, allow_out_of_range=allow_out_of_range)
    from simpo_ray.points import add_points

    cfg = space.trial_config()  # base + fixed params + resources together form a valid config
    space.search = check_objective(search, cfg, space.notes)
    if search.warm_start:  # narrows ranges, adds the transferred point, keeps trials for the searcher
        from simpo_ray.warm_start import apply_warm_start

        apply_warm_start(space, search.points_to_evaluate, cfg.model_name_or_path)
    else:
        add_points(space, search.points_to_evaluate, cfg.model_name_or_path)
    rec = guide.effective_batch_range(bucket_name)
    eb = space.effective_batch
    if rec and not rec[0] <= eb <= rec[1]:
        space.notes.append(f"effective batch {eb} is outside the guide's recommended "
                           f"{rec[0]} to {rec[1]} for {bucket_name}")
    if search.num_samples < len(space.points_to_evaluate):
        space.notes.append(f"search.num_samples {search.num_samples} is below the "
                           f"{len(space.points_to_evaluate)} points to evaluate; only the first "
                           f"{search.num_samples} run")
    if search.scheduler in ("asha", "hyperband") and search.time_attr == "step" \
            and search.grace_period % cfg.eval_steps:
        space.notes.append(f"search.grace_period {search.grace_period} is not a multiple of "
                           f"base.eval_steps {cfg.eval_steps}: rungs are decided at the next report")
    return space


@dataclass(frozen=True)
class _Ctx:
    bucket: str
    task: str | None
    model_type: str | None
    allow_out_of_range: bool

    def where(self, param: str) -> str:
        """Which documented range applies, for messages: 'the documented range for 7b-8b, ...'."""
        if param == "learning_rate":
            return "the documented range for " + self.bucket + (f", task {self.task}" if self.task else "")
        if param == "sft_weight" and self.model_type:
            return f"the documented range for model type {self.model_type}"
        return "the guide's documented range"

    def check(self, param: str, value: float, fld: str) -> None:
        lo, hi = guide.documented_range(param, self.bucket, self.task, self.model_type)
        if self.allow_out_of_range or value in guide.Range(lo, hi):
            return
        raise ConfigError(f"{fld}: {value:g} is outside {self.where(param)} [{lo:g}, {hi:g}]; "
                          "pass --allow-out-of-range to search it anyway")


def _base(raw: Any, resources: Resources, ctx: _Ctx) -> dict[str, Any]:
    d = schema.mapping(raw, "base")
    for key, owner in RESOURCE_OWNED.items():
        if key in d:
            raise ConfigError(f"base.{key}: {d[key]!r} is set by {owner} in a search space; "
                              "remove it from base")
    try:
        cfg = from_dict({**d, "num_workers": resources.num_workers, "use_gpu": resources.use_gpu},
                        source="base")
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("base") else f"base.{msg}") from None
    # Keep the keys as written, with the config's coerced values ('5e-7' -> 5e-07).
    typed = cfg.to_dict()
    out = {k: typed[k] for k in d if k in FIELDS}
    for p in guide.PARAMS:
        if p in out:
            ctx.check(p, out[p], f"base.{p}")
    return out


def _params(raw: Any, base: dict, ctx: _Ctx) -> dict[str, Param]:
    d = schema.mapping(raw, "params")
    out: dict[str, Param] = {}
    for name, spec in d.items():
        fld = f"params.{name}"
        if name not in guide.PARAMS:
            hint = (" (a TrainConfig key: fix it in base; only the four SimPO parameters are "
                    "searched)" if name in FIELDS else closest(str(name), guide.PARAMS))
            raise ConfigError(f"{fld}: unknown parameter {name!r}{hint}; "
                              f"choose from {', '.join(guide.PARAMS)}")
        if name in base:
            raise ConfigError(f"{fld}: also fixed in base ({name}: {base[name]:g}); a parameter is "
                              "either searched (params) or fixed (base), not both")
        s = schema.mapping(spec, fld)
        schema.check_keys(s, PARAM_KEYS, fld + ".")
        if "distribution" not in s:
            raise ConfigError(f"{fld}.distribution: missing; choose one of {', '.join(DISTRIBUTIONS)}")
        dist = schema.one_of(s["distribution"], f"{fld}.distribution", DISTRIBUTIONS)
        out[name] = _param(name, dist, s, fld, ctx)
    if not out:
        raise ConfigError("params: empty; search at least one of " + ", ".join(guide.PARAMS))
    return out


def _param(name: str, dist: str, s: dict, fld: str, ctx: _Ctx) -> Param:
    if dist == "choice":
        for k in ("low", "high", "range"):
            if k in s:
                raise ConfigError(f"{fld}.{k}: not used with distribution 'choice'; list the values")
        vals = s.get("values")
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{fld}.values: expected a non-empty list of numbers, got {vals!r}")
        values = tuple(_number(v, f"{fld}.values[{i}]") for i, v in enumerate(vals))
        for i, v in enumerate(values):
            ctx.check(name, v, f"{fld}.values[{i}]")
        return Param(name, dist, min(values), max(values), values)
    if "values" in s:
        raise ConfigError(f"{fld}.values: only used with distribution 'choice'; give low and high")
    if "range" in s:
        src = schema.one_of(s["range"], f"{fld}.range", RANGE_SOURCES, " (or give low and high)")
        if "low" in s or "high" in s:
            raise ConfigError(f"{fld}: give either range or low/high, not both")
        fn = guide.documented_range if src == "documented" else guide.recommended_range
        low, high = fn(name, ctx.bucket, ctx.task, ctx.model_type)
        if low >= high:
            raise ConfigError(f"{fld}.range: {ctx.where(name).replace('documented', src)} is the "
                              f"single value {low:g}; fix it in base instead of searching it")
    else:
        for k in ("low", "high"):
            if k not in s:
                raise ConfigError(f"{fld}.{k}: missing; give low and high (or range: documented)")
        low, high = _number(s["low"], f"{fld}.low"), _number(s["high"], f"{fld}.high")
    if low >= high:
        raise ConfigError(f"{fld}: empty range: low {low:g} >= high {high:g}; low must be below high")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{fld}.low: {low:g} must be > 0 for a loguniform distribution; "
                          "use uniform to include 0")
    ctx.check(name, low, f"{fld}.low")
    ctx.check(name, high, f"{fld}.high")
    return Param(name, dist, low, high)


def _number(raw: Any, fld: str) -> float:
    value = schema.coerce(fld, raw, float)
    schema.check_range(fld, value, None, None)  # finite
    return value


def _search(raw: Any, warm_start: tuple[str, ...] = ()) -> SearchSettings:
    """The search settings; `warm_start` (--warm-start) after the file's, every path made
    absolute from the working directory."""
    from simpo_ray.points import parse_points_spec

    d = split_objective(dict(schema.mapping(raw, "search")))
    points = parse_points_spec(d.pop("points_to_evaluate", "default"))
    if warm_start:
        d["warm_start"] = [*schema.coerce("search.warm_start", d.get("warm_start", []), tuple[str, ...]),
                           *warm_start]
    settings = schema.build(SearchSettings, d, prefix="search.")
    dirs = tuple(dict.fromkeys(os.path.abspath(os.path.expanduser(p)) for p in settings.warm_start))
    return dataclasses.replace(settings, points_to_evaluate=points, warm_start=dirs)
