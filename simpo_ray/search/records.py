"""What a search records, and the one rule that names its best trial.

`SearchRecord` is the schema of `search.json`: the search writes it (`SearchRecord.from_space`,
`.write`), `analysis` reads it (`SearchRecord.read`). `ranked` / `best_trial` / `rank_column`
order trials for the search summary, `best_config.yaml`, the `rank` column of `trials.csv` and
every analysis table. `STATUSES` are the trial statuses of `trials.csv`; `STATES` the states
of a whole search (`SearchRecord.state`). `resolved_space` / `space_differences` say what a
space resolves to and how two differ (a `--resume` with another space is refused).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simpo_ray.errors import UserError
from simpo_ray.config import TrainConfig
from simpo_ray.guide import PARAMS
from simpo_ray.io import Storage
from simpo_ray.search.settings import DEFAULT_WARM_START_POINTS

# interrupted: the search was stopped (Ctrl-C, SIGTERM of the driver) while the trial was
# running or waiting; `--resume` reruns it. It never ranks.
STATUSES = ("completed", "stopped_early", "diverged", "errored", "interrupted")
RANKED_STATUSES = ("completed", "stopped_early")  # diverged, errored, interrupted never rank
# running: started, tables not written yet; finished: every trial finished; interrupted: the
# tables hold what was done when it stopped (partial); unrecorded: a version-1 record.
STATES = ("running", "finished", "interrupted", "unrecorded")
SCHEMA_VERSION = 2
# Search settings that only set the budget or the pace: a --resume may differ in them.
BUDGET_KEYS = ("search.num_samples", "search.max_concurrent")


# ---------------------------------------------------------------- the best trial

def ranked(trials: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Trials that rank, best first.

    A trial ranks when its status is completed or stopped_early and its `best_objective` (best
    value over the run, step 0 excluded: what the kept checkpoint matches) is finite. Order:
    `best_objective`, then the final value `objective_value` (a NaN one last), then the longer
    run (`steps`), then `trial_id`, so ties always resolve the same way.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode {mode!r}: expected 'max' or 'min'")
    if trials.empty:
        return trials

    def number(column: str) -> pd.Series | float:  # a missing column: NaN, i.e. no tie-break
        return pd.to_numeric(trials[column], errors="coerce") if column in trials else math.nan

    keys = pd.DataFrame({"best": number("best_objective"), "final": number("objective_value"),
                         "steps": number("steps"), "trial_id": trials["trial_id"].astype(str)},
                        index=trials.index)
    keys = keys[trials["status"].isin(RANKED_STATUSES) & np.isfinite(keys["best"])]
    if mode == "max":  # best first: negate "higher is better" keys, sort all ascending
        keys[["best", "final"]] = -keys[["best", "final"]]
    keys["steps"] = -keys["steps"].fillna(0)
    order = keys.sort_values(["best", "final", "steps", "trial_id"], kind="stable", na_position="last").index
    return trials.loc[order]


def best_trial(trials: pd.DataFrame, mode: str) -> pd.Series | None:
    """The first trial of `ranked`, or None when no trial ranks."""
    order = ranked(trials, mode)
    return order.iloc[0] if len(order) else None


def rank_column(trials: pd.DataFrame, mode: str) -> pd.Series:
    """1 for the best trial, 2 for the next, ...; <NA> for trials that do not rank."""
    rank = pd.Series(pd.NA, index=trials.index, dtype="Int64")
    order = ranked(trials, mode).index
    rank[order] = range(1, len(order) + 1)
    return rank


# ---------------------------------------------------------------- search.json

@dataclass(frozen=True)
class SearchRecord:
    """search.json: what was searched, how, and the guide's numbers for it."""

    schema_version: int
    name: str
    space_file: str
    size_bucket: str
    task: str | None
    model_type: str | None
    model_name_or_path: str
    objective: str
    mode: str  # "max" or "min"
    seed: int
    sampler: str
    num_samples: int
    # The space's search settings: scheduler and its ASHA settings, ..., warm_start (absolute
    # directories) and, for a warm-started search, warm_started_from: [{name, path, size,
    # n_params, same_size, in_trend}] (simpo_ray.transfer.warm_start; absent in older records).
    search: dict[str, Any]
    params: dict[str, dict[str, Any]]  # name -> {distribution, low, high[, values]}
    points_to_evaluate: list[dict[str, float]]  # the documented default first
    point_labels: list[str]
    guide: dict[str, Any]  # simpo_ray.guide.summary for the bucket, task and model type
    simpo_ray_version: str
    # Schema version 2:
    space_sha256: str  # of the space file's bytes ("" when built from a mapping, or a version-1 record)
    space: dict[str, Any]  # `resolved_space`: what every trial ran with ({} in a version-1 record)
    state: str  # one of STATES

    @classmethod
    def from_space(cls, space, space_path: str | Path, name: str) -> SearchRecord:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("simpo-ray")
        except PackageNotFoundError:
            ours = "unknown"
        s = space.search
        search = json.loads(json.dumps(dataclasses.asdict(s)))  # tuples as lists, as read back
        if search.get("optuna_storage"):  # no database password in search.json
            from simpo_ray.search.study import shown

            search["optuna_storage"] = shown(search["optuna_storage"])
        if getattr(space, "warm", None) is not None:  # which finished searches warm-started this one
            search["warm_started_from"] = json.loads(json.dumps(space.warm.sources))
        return cls(
            schema_version=SCHEMA_VERSION, name=name, space_file=str(space_path),
            size_bucket=space.size_bucket, task=space.task, model_type=space.model_type,
            model_name_or_path=str(space.trial_config().model_name_or_path),
            objective=s.objective, mode=s.mode, seed=s.seed, sampler=s.sampler, num_samples=s.num_samples,
            search=search,
            params={n: p.to_dict() for n, p in space.params.items()},
            points_to_evaluate=list(space.points_to_evaluate), point_labels=list(space.point_labels),
            guide=space.guide_summary(), simpo_ray_version=ours,
            space_sha256=space_sha256(space_path), space=resolved_space(space), state="running",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, exp_path: str | Path) -> None:
        """Write `<exp_path>/search.json` atomically (a local path or a pyarrow URI)."""
        Storage(exp_path).write_text("search.json", json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, exp_path: str) -> SearchRecord:
        """`<exp_path>/search.json` of a local directory or a pyarrow URI."""
        storage = Storage(exp_path)
        if not storage.is_remote:
            return cls.read(Path(exp_path) / "search.json")
        source = storage.path("search.json")
        text = storage.read_text("search.json")
        if text is None:
            raise UserError(f"{source}: missing; not a simpo_ray result directory")
        try:
            return cls.from_dict(json.loads(text), source=source)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: not valid JSON ({str(e).splitlines()[0]})") from None

    @classmethod
    def from_dict(cls, data: Any, source: str = "search.json") -> SearchRecord:
        """Check `data` against the schema; a UserError in one line names what is wrong."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: not a simpo_ray search record (a JSON object is expected)")
        version = data.get("schema_version")
        if version == 1:
            data = _from_version_1(data)
        elif version != SCHEMA_VERSION:
            what = "no schema_version" if version is None else f"schema_version {version!r}"
            raise UserError(f"{source}: {what}; this simpo_ray reads schema_version 1 and {SCHEMA_VERSION} "
                            "(written by another simpo_ray version?)")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise UserError(f"{source}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UserError(f"{source}: unknown field(s) {', '.join(unknown)}")
        for n in names:
            if not _has_type(data[n], _TYPES[n]):
                raise UserError(f"{source}: field {n} is {data[n]!r}, expected {_type_name(_TYPES[n])}")
        if data["mode"] not in ("max", "min"):
            raise UserError(f"{source}: field mode is {data['mode']!r}, expected 'max' or 'min'")
        if data["state"] not in STATES:
            raise UserError(f"{source}: field state is {data['state']!r}, expected one of {', '.join(STATES)}")
        guide = data["guide"]
        for key in ("defaults", "recommended_ranges", "documented_ranges"):
            table = guide.get(key)
            if not (isinstance(table, dict) and set(PARAMS) <= set(table)):
                raise UserError(f"{source}: guide.{key} is {table!r}, expected a value for each of "
                                f"{', '.join(PARAMS)}")
        for p, spec in data["params"].items():
            if not (isinstance(spec, dict) and isinstance(spec.get("distribution"), str)
                    and all(_has_type(spec.get(k), (int, float)) for k in ("low", "high"))):
                raise UserError(f"{source}: params.{p} is {spec!r}, expected {{distribution, low, high}}")
        return cls(**data)

    @classmethod
    def read(cls, path: str | Path) -> SearchRecord:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path}: missing; not a simpo_ray result directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
        return cls.from_dict(data, source=str(path))


_NONE = type(None)
_TYPES: dict[str, tuple[type, ...]] = {
    "schema_version": (int,), "name": (str,), "space_file": (str,), "size_bucket": (str,),
    "task": (str, _NONE), "model_type": (str, _NONE), "model_name_or_path": (str,),
    "objective": (str,), "mode": (str,), "seed": (int,), "sampler": (str,), "num_samples": (int,),
    "search": (dict,), "params": (dict,), "points_to_evaluate": (list,), "point_labels": (list,),
    "guide": (dict,), "simpo_ray_version": (str,), "space_sha256": (str,), "space": (dict,),
    "state": (str,),
}


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record read as version 2 (the migration rule, also in the README).

    Version 1 (before interruptions and spaces were recorded) has no `space_sha256`, `space` or
    `state`: it reads with `space_sha256` "", `space` {} (a `--resume` cannot compare spaces and
    says so) and `state` "unrecorded" (its tables may come from a Ctrl-C'ed search, whose cut
    trials version 1 labelled stopped_early; analysis says so).
    """
    if not isinstance(data, dict):
        return data
    out = {k: v for k, v in data.items() if k != "schema_version"}
    out.update(schema_version=SCHEMA_VERSION, space_sha256="", space={}, state="unrecorded")
    return out


# ---------------------------------------------------------------- the space a search ran with

def space_sha256(path: str | Path) -> str:
    """The SHA-256 of a space file's bytes ("" when the space was not read from a file)."""
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except (OSError, TypeError, ValueError):
        return ""


# Training keys added after search.json schema 2 (generation quality): left out of a resolved space
# at their defaults, so a search started before them still resumes.
LATER_BASE_KEYS = ("reward_model_name_or_path", "reward_baseline", "max_new_tokens", "generation_do_sample",
                   "generation_temperature", "generation_top_p", "generation_eval_steps", "generation_batch_size",
                   "torch_compile",
                   # the reference's keys honoured since 2026-12-04
                   "model_revision", "torch_dtype", "use_liger_kernel", "warmup_steps", "optim", "adam_beta1",
                   "adam_beta2", "adam_epsilon", "report_to", "overwrite_output_dir")


def resolved_space(space) -> dict[str, Any]:
    """What a space resolves to, after presets, ranges from the guide and overrides: the fixed
    training config of every trial (searched keys left out), the searched parameters, one
    trial's resources, the search settings and the start points. Its name, description, dry-run
    estimate and file path are left out: they do not change what a trial trains."""
    base = space.trial_config().to_dict()
    for p in space.params:
        base.pop(p, None)
    search = dataclasses.asdict(space.search)
    if search.get("optuna_storage"):  # a database URL's password is not written to search.json
        from simpo_ray.search.study import shown

        search["optuna_storage"] = shown(search["optuna_storage"])
    return _trimmed(json.loads(json.dumps({
        "size_bucket": space.size_bucket, "task": space.task, "model_type": space.model_type,
        "base": base, "params": {n: p.to_dict() for n, p in space.params.items()},
        "resources": dataclasses.asdict(space.resources), "search": search,
        "points_to_evaluate": list(space.points_to_evaluate),
    }, default=str)))


# Search keys added after search.json schema 2, with the value that means "not used".
_LATER_SEARCH_KEYS = (("warm_start", []), ("warm_start_narrow", False), ("objectives", []), ("modes", []),
                      ("tpe_multivariate", None), ("tpe_startup_trials", None), ("optuna_storage", None),
                      ("local_mode", True), ("warm_start_points", None), ("warm_start_top_k", 3),
                      ("warm_start_prior_samples", 3))


def _trimmed(resolved: dict[str, Any]) -> dict[str, Any]:
    """`resolved` (JSON form) without the later keys at their defaults, as a record from before
    them has them: absent. Applied to both sides of a comparison, so a record written before or
    after a key was added compares equal to the same space."""
    search, base = resolved.get("search") or {}, resolved.get("base") or {}
    for key, unset in _LATER_SEARCH_KEYS:
        if key in search and search[key] == unset:
            search.pop(key)
    how = search.get("warm_start_points") or DEFAULT_WARM_START_POINTS
    for key, reader in (("warm_start_top_k", "top_k"), ("warm_start_prior_samples", "prior")):
        if how != reader or not search.get("warm_start"):
            search.pop(key, None)  # read only by that kind of start point: no difference otherwise
    default = TrainConfig.__dataclass_fields__
    for key in LATER_BASE_KEYS:
        if key in base and base[key] == default[key].default:
            base.pop(key)
    return resolved


def space_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: stored -> current` for each dotted key where two `resolved_space` dicts differ (later
    keys at their defaults count as absent on both sides)."""
    import copy

    out: list[str] = []
    stored, current = _trimmed(copy.deepcopy(stored)), _trimmed(copy.deepcopy(current))

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{key}.{k}" if key else str(k))
        elif a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")

    walk(stored, current, "")
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _NONE else t.__name__ for t in types)
