"""Search-space YAML -> a validated, typed `SearchSpace`.

A space names a size bucket of the guide (`simpo_ray.guide`), fixed training keys (`base`,
any `TrainConfig` key), the searched SimPO parameters (`params`, a subset of learning_rate,
beta, gamma_beta_ratio, sft_weight), per-trial resources and the search settings. Every
searched range must lie inside the guide's documented range for the bucket and preset unless
`allow_out_of_range=True` (`--allow-out-of-range`). No Ray, Optuna or torch here: the tune
layer turns `Param`s into its own distributions.

YAML layout (every key is checked; unknown keys are errors that suggest the closest one)::

    name: 7b                  # default: the file's stem
    description: ...          # optional free text
    size_bucket: 7b-8b        # 1b-3b | 7b-8b | 8b-13b | 13b-30b | 70b+ | cpu
    task: chat                # preset: chat | code | math | creative | null
    model_type: base          # preset: base | instruct | chat | null
    base: {...}               # fixed TrainConfig keys (guide key names), validated by config.from_dict
    params:                   # searched parameters
      learning_rate: {distribution: loguniform, range: documented}   # bounds from the guide
      beta: {distribution: uniform, low: 2.0, high: 10.0}            # explicit bounds
      sft_weight: {distribution: choice, values: [0.0, 0.05]}
    resources: {num_workers: 8, cpus_per_worker: 8, gpus_per_worker: 1}   # one trial
    search:
      num_samples: 32
      objective: eval/preference_accuracy     # see OBJECTIVES
      mode: max
      scheduler: asha                         # asha | hyperband | median | fifo
      sampler: tpe                            # tpe (Optuna TPE) | random (Optuna RandomSampler)
      time_attr: step                         # step | samples | tokens | training_iteration
      grace_period: 100
      reduction_factor: 3
      max_t: 480
      max_concurrent: null                    # null = as many as the cluster fits
      seed: 0
      max_failures: 1                         # Train worker restarts from the last checkpoint
      checkpoint_keep: 2
      points_to_evaluate: default             # default | default_only | {references: bool, extra: [...]}
    estimate: {train_pairs: 61135, params_billion: 7.2, tokens_per_pair: 800}  # + mfu, peak_tflops

A param's bounds are either explicit (`low`/`high`, or `values` for `choice`) or derived from
the guide under the effective preset: `range: documented` (the validation envelope) or
`range: recommended` (the guide's optimal row). A parameter not in `params` is fixed: at its
`base` value if given there, else at the guide's documented default for the bucket/preset.

Preset rules (the guide's "By task type" and "By model type" tables; see `guide.py`):

- `task` moves the learning rate: the bucket's ranges and default are multiplied by the task's
  rate over the general-chat rate (chat x1, code/math x0.6 -> 3e-7 at 7B, creative x2 -> 1e-6
  at 7B) and kept inside the bucket's envelope. 7b-8b documented: chat [1e-7, 1e-6],
  code/math [1e-7, 6e-7], creative [2e-7, 1e-6]. Tasks do not move beta or gamma_beta_ratio:
  the guide ties those to the data's preference strength, not the task; code and math add the
  guide's reasoning example (beta 5.0, gamma_beta_ratio 0.7) as an extra starting point.
- `model_type` sets sft_weight: base [0, 0.05] default 0.0, instruct [0.05, 0.1] default 0.1,
  chat [0.1, 0.2] default 0.2 (70b+: the guide's 0.05 for base/instruct, 0.1 for chat).
  Without a model type: [0, 1], default 0.0 (70b+: 0.05).
- `task=`/`model_type=` arguments (the command line) replace the YAML's preset; the string
  "none" removes it. Params with `range: documented|recommended` follow the new preset;
  explicit bounds are validated against it.

Points to evaluate: always the guide's documented default for this bucket/preset first, then
(with `references: true`, the `default` setting) the SimPO reference implementation's published
settings whose model family matches `base.model_name_or_path`, the reasoning example for
code/math, then the `extra` points. Guide and reference points are CLIPPED into the searched
range, each clip recorded in `SearchSpace.notes` (a reference setting keeps its character, e.g.
beta 10 and lr 1e-6, even when sft_weight 0 is raised to an instruct range's 0.05); duplicates
after clipping are dropped, also with a note. User `extra` points outside the space are errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simpo_ray import guide
from simpo_ray.config import FIELDS, from_dict, read_yaml
from simpo_ray.errors import ConfigError, closest

DISTRIBUTIONS = ("loguniform", "uniform", "choice")
SCHEDULERS = ("asha", "hyperband", "median", "fifo")
SAMPLERS = ("tpe", "random")
TIME_ATTRS = ("step", "samples", "tokens", "training_iteration")
MODES = ("max", "min")
# Metrics the training loop reports under eval/, with the direction that is better.
OBJECTIVES = {
    "eval/preference_accuracy": "max",
    "eval/success_rate": "max",        # bundled task only
    "eval/rewards/accuracies": "max",
    "eval/rewards/margins": "max",
    "eval/loss": "min",
    "eval/sft_loss": "min",
}
RANGE_SOURCES = ("documented", "recommended")

TOP_KEYS = ("name", "description", "size_bucket", "task", "model_type", "base", "params",
            "resources", "search", "estimate")
PARAM_KEYS = ("distribution", "low", "high", "values", "range")
RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "gpus_per_worker")
SEARCH_KEYS = ("num_samples", "objective", "mode", "scheduler", "sampler", "time_attr", "grace_period",
               "reduction_factor", "max_t", "max_concurrent", "seed", "max_failures",
               "checkpoint_keep", "points_to_evaluate")
POINTS_KEYS = ("references", "extra")
ESTIMATE_KEYS = ("train_pairs", "params_billion", "tokens_per_pair", "mfu", "peak_tflops")
# Keys of one trial's TrainConfig that the space's `resources` set; `base` may not set them.
RESOURCE_OWNED = {"num_workers": "resources.num_workers", "use_gpu": "resources.gpus_per_worker"}

# Assumptions of `estimate_gpu_hours` (overridable per space under `estimate:`).
H100_BF16_DENSE_TFLOPS = 989.0   # H100 SXM, dense bf16 tensor-core peak
DEFAULT_MFU = 0.35               # model FLOPs utilisation of a full fine-tune with FSDP/ZeRO-3,
#                                  gradient checkpointing and padded pairs; recompute is not
#                                  counted in model FLOPs, so it shows up as a lower MFU.


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
    """Resources of ONE trial: a Ray Train run of `num_workers` workers."""

    num_workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0

    @property
    def gpus_per_trial(self) -> float:
        return self.num_workers * self.gpus_per_worker

    @property
    def cpus_per_trial(self) -> float:
        return self.num_workers * self.cpus_per_worker


@dataclass(frozen=True)
class PointsSpec:
    references: bool = True
    extra: tuple[dict, ...] = ()


@dataclass(frozen=True)
class SearchSettings:
    num_samples: int = 16
    objective: str = "eval/preference_accuracy"
    mode: str = "max"
    scheduler: str = "asha"
    sampler: str = "tpe"
    time_attr: str = "step"
    grace_period: int = 100
    reduction_factor: float = 3
    max_t: int = 1000
    max_concurrent: int | None = None
    seed: int = 0
    max_failures: int = 1
    checkpoint_keep: int = 2
    points_to_evaluate: PointsSpec = field(default_factory=PointsSpec)


@dataclass(frozen=True)
class Estimate:
    """Inputs of the dry run's GPU-hour estimate."""

    train_pairs: int
    params_billion: float
    tokens_per_pair: float       # prompt+chosen plus prompt+rejected: the concatenated forward
    mfu: float = DEFAULT_MFU
    peak_tflops: float = H100_BF16_DENSE_TFLOPS


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

    # -- derived --------------------------------------------------------------------------

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

    def trial_config(self, params: dict[str, Any]) -> dict[str, Any]:
        """base + fixed parameters + resources + `params` -> a full, validated TrainConfig dict."""
        unknown = [k for k in params if k not in self.params]
        if unknown:
            k = str(unknown[0])
            raise ConfigError(f"trial params: {k!r} is not searched in space {self.name!r}"
                              f"{closest(k, self.params)}; searched: {', '.join(self.params)}")
        merged = {**self.base, **self.fixed_params(), **params,
                  "num_workers": self.resources.num_workers,
                  "use_gpu": self.resources.gpus_per_worker > 0}
        return from_dict(merged, source=f"{self.source}: trial config").to_dict()

    @property
    def effective_batch(self) -> int:
        cfg = self.trial_config({})
        return (cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"]
                * self.resources.num_workers)

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

    def describe(self) -> str:
        """The space as a table beside the guide's documented range, recommendation and default."""
        b = guide.bucket(self.size_bucket)
        default = self.documented_default()
        preset = f"task {self.task or '-'}, model type {self.model_type or '-'}"
        cfg = self.trial_config({})
        lines = [f"Search space {self.name!r} ({self.source})",
                 f"size bucket {self.size_bucket} (guide: {b.label}), {preset}",
                 f"model {cfg['model_name_or_path']}; data "
                 + ", ".join(f"{k} ({v:g})" for k, v in cfg["dataset_mixer"].items()), ""]
        rows = []
        for p in guide.PARAMS:
            if p in self.params:
                searched = str(self.params[p])
            else:
                src = "base" if p in self.base else "guide default"
                searched = f"fixed {self.fixed_params()[p]:g} ({src})"
            rows.append([p, searched, guide.format_range(self.documented_range(p)),
                         guide.format_range(self.recommended_range(p)), f"{default[p]:g}"])
        lines.append(guide.text_table(["parameter", "searched", "documented range", "guide recommends",
                                   "guide default"], rows))
        lines.append("")
        eb, rec = self.effective_batch, guide.effective_batch_range(self.size_bucket)
        lines.append(f"effective batch: {cfg['per_device_train_batch_size']} per device x "
                     f"{self.resources.num_workers} worker(s) x {cfg['gradient_accumulation_steps']} "
                     f"accumulation = {eb}"
                     + (f" (guide recommends {rec[0]} to {rec[1]})" if rec else ""))
        r = self.resources
        lines.append(f"resources per trial: {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU, "
                     f"{r.gpus_per_worker:g} GPU) = {r.gpus_per_trial:g} GPUs")
        s = self.search
        sched = s.scheduler if s.scheduler in ("fifo", "median") else (
            f"{s.scheduler} (time_attr {s.time_attr}, grace_period {s.grace_period}, "
            f"reduction_factor {s.reduction_factor:g}, max_t {s.max_t})")
        lines.append(f"search: {s.num_samples} samples, objective {s.objective} ({s.mode}), "
                     f"scheduler {sched}, sampler {s.sampler}, seed {s.seed}, max_concurrent "
                     f"{s.max_concurrent if s.max_concurrent is not None else 'auto'}")
        lines.append("points to evaluate (the first is the guide's documented default):")
        for i, (pt, label) in enumerate(zip(self.points_to_evaluate, self.point_labels), 1):
            lines.append(f"  {i}. {' '.join(f'{k}={v:g}' for k, v in pt.items())}  <- {label}")
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {n}" for n in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_space(path: str | Path | dict, *, task: str | None = None, model_type: str | None = None,
               allow_out_of_range: bool = False, overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Load and validate a search space (a YAML file or an already-parsed mapping).

    `task`/`model_type` replace the file's presets ("none" removes one). `overrides` is applied
    to the raw mapping before validation: dotted keys (`{"search.num_samples": 4,
    "params.beta.high": 5.0}`) or nested mappings (`{"search": {"seed": 1}}`).
    """
    if isinstance(path, dict):
        source, data, stem = "<dict>", _deepcopy(path), None
    else:
        p = Path(path)
        source, data, stem = str(p), read_yaml(p), p.stem
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of top-level keys, got {type(data).__name__}")
        if overrides:
            data = _apply_overrides(data, overrides)
        if task is not None:
            data["task"] = None if task == "none" else task
        if model_type is not None:
            data["model_type"] = None if model_type == "none" else model_type
        return _build(data, source=source, stem=stem, allow_out_of_range=allow_out_of_range)
    except ConfigError as e:
        if source != "<dict>" and not str(e).startswith(source):
            raise ConfigError(f"{source}: {e}") from None
        raise


def _build(data: dict, *, source: str, stem: str | None, allow_out_of_range: bool) -> SearchSpace:
    _check_keys(data, TOP_KEYS, "")
    for required in ("size_bucket", "params"):
        if required not in data:
            raise ConfigError(f"{required}: missing (required)")
    bucket_name = _str(data["size_bucket"], "size_bucket")
    guide.bucket(bucket_name)
    task = _opt_str(data.get("task"), "task")
    model_type = _opt_str(data.get("model_type"), "model_type")
    guide.task_preset(task)
    guide.model_type_preset(model_type)
    name = _str(data.get("name", stem or "space"), "name")
    description = _opt_str(data.get("description"), "description")
    ctx = _Ctx(bucket_name, task, model_type, allow_out_of_range)

    resources = _resources(data.get("resources", {}))
    base = _base(data.get("base", {}), resources, ctx)
    params = _params(data["params"], base, ctx)
    search = _search(data.get("search", {}), base)
    estimate = _estimate(data["estimate"]) if data.get("estimate") is not None else None

    space = SearchSpace(name=name, size_bucket=bucket_name, task=task, model_type=model_type,
                        base=base, params=params, resources=resources, search=search,
                        points_to_evaluate=[], point_labels=[], estimate=estimate, source=source,
                        description=description, allow_out_of_range=allow_out_of_range)
    cfg = space.trial_config({})  # base + fixed params + resources together form a valid config
    _check_objective(search, cfg)
    _points(space, search.points_to_evaluate, cfg["model_name_or_path"])
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
            and search.grace_period % cfg["eval_steps"]:
        space.notes.append(f"search.grace_period {search.grace_period} is not a multiple of "
                           f"base.eval_steps {cfg['eval_steps']}: rungs are decided at the next report")
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


def _resources(raw: Any) -> Resources:
    d = _mapping(raw, "resources")
    _check_keys(d, RESOURCE_KEYS, "resources.")
    return Resources(
        num_workers=_num(d.get("num_workers", 1), "resources.num_workers", integer=True, low=1),
        cpus_per_worker=_num(d.get("cpus_per_worker", 1), "resources.cpus_per_worker", low=0, low_open=True),
        gpus_per_worker=_num(d.get("gpus_per_worker", 0), "resources.gpus_per_worker", low=0),
    )


def _base(raw: Any, resources: Resources, ctx: _Ctx) -> dict[str, Any]:
    d = _mapping(raw, "base")
    for key, owner in RESOURCE_OWNED.items():
        if key in d:
            raise ConfigError(f"base.{key}: {d[key]!r} is set by {owner} in a search space; "
                              "remove it from base")
    try:
        cfg = from_dict({**d, "num_workers": resources.num_workers,
                         "use_gpu": resources.gpus_per_worker > 0}, source="base")
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
    d = _mapping(raw, "params")
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
        s = _mapping(spec, fld)
        _check_keys(s, PARAM_KEYS, fld + ".")
        if "distribution" not in s:
            raise ConfigError(f"{fld}.distribution: missing; choose one of {', '.join(DISTRIBUTIONS)}")
        dist = _choice(s["distribution"], f"{fld}.distribution", DISTRIBUTIONS)
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
        values = tuple(_num(v, f"{fld}.values[{i}]") for i, v in enumerate(vals))
        for i, v in enumerate(values):
            ctx.check(name, v, f"{fld}.values[{i}]")
        return Param(name, dist, min(values), max(values), values)
    if "values" in s:
        raise ConfigError(f"{fld}.values: only used with distribution 'choice'; give low and high")
    if "range" in s:
        src = _choice(s["range"], f"{fld}.range", RANGE_SOURCES, " (or give low and high)")
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
        low, high = _num(s["low"], f"{fld}.low"), _num(s["high"], f"{fld}.high")
    if low >= high:
        raise ConfigError(f"{fld}: empty range: low {low:g} >= high {high:g}; low must be below high")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{fld}.low: {low:g} must be > 0 for a loguniform distribution; "
                          "use uniform to include 0")
    ctx.check(name, low, f"{fld}.low")
    ctx.check(name, high, f"{fld}.high")
    return Param(name, dist, low, high)


def _search(raw: Any, base: dict) -> SearchSettings:
    d = _mapping(raw, "search")
    _check_keys(d, SEARCH_KEYS, "search.")
    df = SearchSettings()
    g = lambda k: d.get(k, getattr(df, k))  # noqa: E731
    objective = _choice(g("objective"), "search.objective", tuple(OBJECTIVES))
    mode = _choice(g("mode"), "search.mode", MODES)
    better = OBJECTIVES[objective]
    if mode != better:
        raise ConfigError(f"search.mode: {mode!r} is wrong for {objective}, which is better when "
                          f"{'higher' if better == 'max' else 'lower'}; use mode: {better}")
    scheduler = _choice(g("scheduler"), "search.scheduler", SCHEDULERS)
    sampler = _choice(g("sampler"), "search.sampler", SAMPLERS)
    time_attr = _choice(g("time_attr"), "search.time_attr", TIME_ATTRS)
    grace = _num(g("grace_period"), "search.grace_period", integer=True, low=1)
    max_t = _num(g("max_t"), "search.max_t", integer=True, low=1)
    if max_t < grace:
        raise ConfigError(f"search.max_t: {max_t} is below search.grace_period {grace}; "
                          "max_t must be >= grace_period")
    max_conc = g("max_concurrent")
    if max_conc is not None:
        max_conc = _num(max_conc, "search.max_concurrent", integer=True, low=1)
    return SearchSettings(
        num_samples=_num(g("num_samples"), "search.num_samples", integer=True, low=1),
        objective=objective, mode=mode, scheduler=scheduler, sampler=sampler, time_attr=time_attr,
        grace_period=grace,
        reduction_factor=_num(g("reduction_factor"), "search.reduction_factor", low=1, low_open=True),
        max_t=max_t,
        max_concurrent=max_conc,
        seed=_num(g("seed"), "search.seed", integer=True),
        max_failures=_num(g("max_failures"), "search.max_failures", integer=True, low=0),
        checkpoint_keep=_num(g("checkpoint_keep"), "search.checkpoint_keep", integer=True, low=1),
        points_to_evaluate=_points_spec(d.get("points_to_evaluate", "default")),
    )


def _points_spec(raw: Any) -> PointsSpec:
    fld = "search.points_to_evaluate"
    if raw == "default":
        return PointsSpec(references=True)
    if raw == "default_only":
        return PointsSpec(references=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"{fld}: {raw!r} is not allowed; use 'default', 'default_only' or a mapping "
                          "{references: true|false, extra: [points]}")
    _check_keys(raw, POINTS_KEYS, fld + ".")
    refs = raw.get("references", True)
    if not isinstance(refs, bool):
        raise ConfigError(f"{fld}.references: expected true or false, got {refs!r}")
    extra = raw.get("extra", []) or []
    if not isinstance(extra, list) or not all(isinstance(p, dict) for p in extra):
        raise ConfigError(f"{fld}.extra: expected a list of mappings (parameter: value), got {extra!r}")
    return PointsSpec(references=refs, extra=tuple(dict(p) for p in extra))


def _estimate(raw: Any) -> Estimate:
    d = _mapping(raw, "estimate")
    _check_keys(d, ESTIMATE_KEYS, "estimate.")
    for k in ("train_pairs", "params_billion", "tokens_per_pair"):
        if k not in d:
            raise ConfigError(f"estimate.{k}: missing (needed for the GPU-hour estimate)")
    return Estimate(
        train_pairs=_num(d["train_pairs"], "estimate.train_pairs", integer=True, low=1),
        params_billion=_num(d["params_billion"], "estimate.params_billion", low=0, low_open=True),
        tokens_per_pair=_num(d["tokens_per_pair"], "estimate.tokens_per_pair", low=0, low_open=True),
        mfu=_num(d.get("mfu", DEFAULT_MFU), "estimate.mfu", low=0, low_open=True, high=1),
        peak_tflops=_num(d.get("peak_tflops", H100_BF16_DENSE_TFLOPS), "estimate.peak_tflops",
                         low=0, low_open=True),
    )


def _check_objective(search: SearchSettings, cfg: dict) -> None:
    if search.objective != "eval/success_rate":
        return
    other = [k for k in cfg["dataset_mixer"] if not k.startswith("bundled:")]
    if other:
        raise ConfigError(f"search.objective: eval/success_rate is reported only for the bundled "
                          f"task (dataset bundled:sort), but base.dataset_mixer has {other[0]!r}; "
                          "use eval/preference_accuracy")
    if cfg["generation_eval_samples"] == 0:
        raise ConfigError("search.objective: eval/success_rate needs base.generation_eval_samples > 0 "
                          "(0 turns the success-rate evaluation off)")


def _points(space: SearchSpace, spec: PointsSpec, model_name: str) -> None:
    """Fill points_to_evaluate: guide default first, then references, reasoning example, extra."""
    searched = space.params
    fixed = space.fixed_params()
    default = space.documented_default()
    candidates: list[tuple[str, dict[str, float]]] = [
        (f"guide default ({space.size_bucket}, task {space.task or '-'}, "
         f"model type {space.model_type or '-'})", default)]
    if spec.references:
        for ref in guide.reference_settings(model_name):
            candidates.append((f"SimPO reference {ref.name} ({ref.source.rsplit('/', 1)[-1]})", ref.params()))
        if space.task in guide.REASONING_TASKS:
            candidates.append(("guide example 'Llama 3 8B Instruct (Reasoning)': beta 5.0, "
                               "gamma_beta_ratio 0.7; lr and sft_weight from this space's default",
                               {**default, "beta": guide.REASONING_EXAMPLE["beta"],
                                "gamma_beta_ratio": guide.REASONING_EXAMPLE["gamma_beta_ratio"]}))
    for label, full in candidates:
        point = {}
        for p, param in searched.items():
            x = float(full[p])
            if not param.contains(x):
                c = param.clip(x)
                space.notes.append(f"{label}: {p} {x:g} is outside the searched {param}; clipped to {c:g}")
                x = c
            point[p] = x
        ignored = [f"{p} {full[p]:g}" for p in fixed if not math.isclose(full[p], fixed[p])]
        if ignored and label != candidates[0][0]:
            space.notes.append(f"{label}: {', '.join(ignored)} not used (fixed in this space)")
        _add_point(space, point, label)
    for i, raw in enumerate(spec.extra):
        fld = f"search.points_to_evaluate.extra[{i}]"
        _check_keys(raw, tuple(searched), fld + ".")
        point = {}
        for p, param in searched.items():
            # A parameter the point leaves out takes the first point's (the guide default's) value.
            x = _num(raw[p], f"{fld}.{p}") if p in raw else space.points_to_evaluate[0][p]
            if not param.contains(x):
                raise ConfigError(f"{fld}.{p}: {x:g} is outside the searched {param}")
            point[p] = x
        _add_point(space, point, f"extra point {i + 1} (search.points_to_evaluate)")


def _add_point(space: SearchSpace, point: dict[str, float], label: str) -> None:
    for j, existing in enumerate(space.points_to_evaluate):
        if all(math.isclose(point[k], existing[k], rel_tol=1e-9) for k in point):
            space.notes.append(f"{label}: same as point {j + 1} after clipping; dropped")
            return
    space.points_to_evaluate.append(point)
    space.point_labels.append(label)


# ---------------------------------------------------------------------------------------------
# GPU-hour estimate (dry run)
# ---------------------------------------------------------------------------------------------


def estimate_gpu_hours(space: SearchSpace) -> dict[str, Any]:
    """GPU hours of one trial and of the whole search, from the space's `estimate` block.

    steps = max_steps, or ceil(epochs * ceil(train_pairs / effective_batch)), capped at the
    scheduler's max_t; tokens = steps * effective_batch * tokens_per_pair; model FLOPs =
    6 * N * tokens (forward + backward of the one concatenated chosen+rejected pass; SimPO
    has no reference model); GPU seconds = FLOPs / (peak_tflops * 1e12 * mfu). Assumes H100
    bf16 dense peak 989 TFLOP/s and MFU 0.35 unless the space says otherwise; evaluation,
    data preparation and start-up are not counted.

    Whole search: `gpu_hours_upper_bound` = num_samples full trials. `gpu_hours_asha_estimate`
    (asha only) assumes each rung keeps 1/reduction_factor of the trials that reach it, as in
    synchronous successive halving; asynchronous promotion lets somewhat more trials through
    early, so read it as a lower estimate and the upper bound as the budget.
    """
    if space.estimate is None:
        raise ConfigError(f"{space.source}: estimate: missing; add estimate: {{train_pairs, "
                          "params_billion, tokens_per_pair}} for the GPU-hour estimate")
    e, s = space.estimate, space.search
    cfg = space.trial_config({})
    eb = space.effective_batch
    steps_per_epoch = math.ceil(e.train_pairs / eb)
    steps = cfg["max_steps"] if cfg["max_steps"] > 0 else math.ceil(cfg["num_train_epochs"] * steps_per_epoch)
    steps_per_report = {"step": 1.0, "samples": 1 / eb, "tokens": 1 / (eb * e.tokens_per_pair),
                        "training_iteration": float(cfg["eval_steps"])}[s.time_attr]
    if s.scheduler != "fifo":
        steps = min(steps, math.ceil(s.max_t * steps_per_report))
    tokens = steps * eb * e.tokens_per_pair
    flops_per_step = 6 * e.params_billion * 1e9 * eb * e.tokens_per_pair
    gpu_hours_per_step = flops_per_step / (e.peak_tflops * 1e12 * e.mfu) / 3600
    per_trial = steps * gpu_hours_per_step
    out: dict[str, Any] = {
        "effective_batch": eb,
        "steps_per_epoch": steps_per_epoch,
        "steps_per_trial": steps,
        "tokens_per_trial": tokens,
        "flops_per_trial": steps * flops_per_step,
        "gpus_per_trial": space.resources.gpus_per_trial,
        "gpu_hours_per_trial": per_trial,
        "wall_hours_per_trial": (per_trial / space.resources.gpus_per_trial
                                 if space.resources.gpus_per_trial else None),
        "num_samples": s.num_samples,
        "gpu_hours_upper_bound": per_trial * s.num_samples,
        "asha_expected_steps_per_trial": None,
        "gpu_hours_asha_estimate": None,
        "assumptions": {"flops_per_token": "6 * params (model FLOPs, no recompute)",
                        "peak_tflops": e.peak_tflops, "mfu": e.mfu,
                        "device": "H100 SXM bf16 dense" if e.peak_tflops == H100_BF16_DENSE_TFLOPS
                        else "custom peak"},
    }
    if s.scheduler == "asha":
        grace = s.grace_period * steps_per_report
        expected = _asha_expected_steps(steps, grace, s.reduction_factor)
        out["asha_expected_steps_per_trial"] = expected
        out["gpu_hours_asha_estimate"] = expected * gpu_hours_per_step * s.num_samples
    return out


def _asha_expected_steps(total: float, grace: float, eta: float) -> float:
    """Mean steps per trial if a 1/eta share of the trials passes each rung (grace * eta^k)."""
    expected, prev, survive = 0.0, 0.0, 1.0
    rung = grace
    while rung < total:
        expected += survive * (rung - prev)
        prev, survive, rung = rung, survive / eta, rung * eta
    return expected + survive * (total - prev)


# ---------------------------------------------------------------------------------------------
# Small validators
# ---------------------------------------------------------------------------------------------


def _check_keys(d: dict, allowed: tuple[str, ...], prefix: str) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{prefix}{k}: unknown key{closest(str(k), allowed)}; "
                              f"allowed: {', '.join(allowed)}")


def _choice(raw: Any, fld: str, choices: tuple[str, ...], extra: str = "") -> str:
    if raw not in choices:
        raise ConfigError(f"{fld}: {raw!r} is not allowed{closest(str(raw), choices)}; "
                          f"choose one of {', '.join(choices)}{extra}")
    return raw


def _mapping(raw: Any, fld: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{fld}: expected a mapping, got {raw!r} ({type(raw).__name__})")
    return raw


def _str(raw: Any, fld: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{fld}: expected a non-empty string, got {raw!r} ({type(raw).__name__})")
    return raw


def _opt_str(raw: Any, fld: str) -> str | None:
    return None if raw is None else _str(raw, fld)


def _num(raw: Any, fld: str, *, integer: bool = False, low: float | None = None,
         low_open: bool = False, high: float | None = None) -> Any:
    kind = "an integer" if integer else "a number"
    value = raw
    if isinstance(raw, str) and not integer:  # PyYAML reads '5e-7' (no dot) as a string
        try:
            value = float(raw)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{fld}: expected {kind}, got {raw!r} ({type(raw).__name__})")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{fld}: expected {kind}, got {raw!r}")
        value = int(value)
    elif not math.isfinite(value):
        raise ConfigError(f"{fld}: {raw!r} is not a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "(" if low_open else "["
        hi = f"{high:g}]" if high is not None else "inf)"
        raise ConfigError(f"{fld}: {value:g} is out of range; allowed {lo}{low:g}, {hi}"
                          if low is not None else f"{fld}: {value:g} is out of range; allowed <= {high:g}")
    return value


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    data = _deepcopy(data)
    for key, value in overrides.items():
        parts = str(key).split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a mapping")
            node = nxt
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = _merge(node[last], value)
        else:
            node[last] = _deepcopy(value)
    return data


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else _deepcopy(v)
    return out
