"""Search-space YAML -> a validated, typed `SearchSpace` (schema and loading; layout in docs/design.md).

A space names a size bucket of the guide, fixed training keys (`base`), the searched SimPO
parameters, one trial's resources and the search settings; every searched range must lie in the
guide's documented range unless `allow_out_of_range`. No Ray, Optuna or torch here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpo_ray import guide, schema
from simpo_ray.search.objectives import (check_objective, split_objective)
from simpo_ray.config import ACCEPTED_REFERENCE_KEYS, FIELDS, Resources, TrainConfig, from_dict
from simpo_ray.errors import ConfigError, closest
from simpo_ray.io import check_name
from simpo_ray.search.settings import (DISTRIBUTIONS, Estimate, Param, SearchSettings,
                                       parse_points_spec)

RANGE_SOURCES = ("documented", "recommended")

TOP_KEYS = ("name", "description", "size_bucket", "task", "model_type", "base", "params",
            "resources", "search", "estimate")
PARAM_KEYS = ("distribution", "low", "high", "values", "range")
# Keys of one trial's TrainConfig that the space's `resources` set; `base` may not set them.
RESOURCE_OWNED = {"num_workers": "resources.num_workers", "use_gpu": "resources.gpus_per_worker"}
# Keys a search cannot apply to its trials (each trial's model is its checkpoints, in its own
# trial directory); `base` may not set them rather than have them dropped.
TRIAL_OUTPUT = ("a search keeps each trial's model as its checkpoints in the trial's directory and exports the "
                "best one to <experiment>/best_model (python -m simpo_ray.export exports any other); remove it "
                "from base")
SEARCH_OWNED = {"output_dir": TRIAL_OUTPUT, "overwrite_output_dir": TRIAL_OUTPUT}


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
    warm: Any = None  # simpo_ray.transfer.warm_start.WarmStart when search.warm_start names searches
    resolved: bool = False  # start points / warm start applied (`search.plan.resolve`)

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
    name = check_name(schema.coerce("name", data.get("name", stem or "space"), str), "name")
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
    cfg = space.trial_config()  # base + fixed params + resources together form a valid config
    ignored = sorted(k for k in schema.mapping(data.get("base"), "base") if k in ACCEPTED_REFERENCE_KEYS)
    if ignored:
        space.notes.append(f"base: ignored (the reference trainer's own settings, no meaning here): "
                           f"{', '.join(ignored)}")
    space.search = check_objective(search, cfg, space.notes)
    rec = guide.effective_batch_range(bucket_name)
    eb = space.effective_batch
    if rec and not rec[0] <= eb <= rec[1]:
        space.notes.append(f"effective batch {eb} is outside the guide's recommended "
                           f"{rec[0]} to {rec[1]} for {bucket_name}")
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
    for key, why in SEARCH_OWNED.items():
        if d.get(key) not in (None, False):
            raise ConfigError(f"base.{key}: {d[key]!r} cannot apply in a search: {why}")
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
    d = split_objective(dict(schema.mapping(raw, "search")))
    points = parse_points_spec(d.pop("points_to_evaluate", "default"))
    if warm_start:
        d["warm_start"] = [*schema.coerce("search.warm_start", d.get("warm_start", []), tuple[str, ...]),
                           *warm_start]
    settings = schema.build(SearchSettings, d, prefix="search.")
    dirs = tuple(dict.fromkeys(os.path.abspath(os.path.expanduser(p)) for p in settings.warm_start))
    return dataclasses.replace(settings, points_to_evaluate=points, warm_start=dirs)
