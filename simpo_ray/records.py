"""What a search records, and the one rule that names its best trial.

`SearchRecord` is the schema of `search.json`: the search writes it (`SearchRecord.from_space`,
`.write`), `analysis` reads it (`SearchRecord.read`). `ranked` / `best_trial` / `rank_column`
order trials for the search summary, `best_config.yaml`, the `rank` column of `trials.csv` and
every analysis table. `STATUSES` are the trial statuses of `trials.csv`.
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
from simpo_ray.guide import PARAMS

STATUSES = ("completed", "stopped_early", "diverged", "errored")
RANKED_STATUSES = ("completed", "stopped_early")  # diverged and errored trials never rank
SCHEMA_VERSION = 1


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
    search: dict[str, Any]  # the space's search settings: scheduler and its ASHA settings, ...
    params: dict[str, dict[str, Any]]  # name -> {distribution, low, high[, values]}
    points_to_evaluate: list[dict[str, float]]  # the documented default first
    point_labels: list[str]
    guide: dict[str, Any]  # simpo_ray.guide.summary for the bucket, task and model type
    simpo_ray_version: str

    @classmethod
    def from_space(cls, space, space_path: str | Path, name: str) -> SearchRecord:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("simpo-ray")
        except PackageNotFoundError:
            ours = "unknown"
        s = space.search
        return cls(
            schema_version=SCHEMA_VERSION, name=name, space_file=str(space_path),
            size_bucket=space.size_bucket, task=space.task, model_type=space.model_type,
            model_name_or_path=str(space.trial_config().model_name_or_path),
            objective=s.objective, mode=s.mode, seed=s.seed, sampler=s.sampler, num_samples=s.num_samples,
            search=json.loads(json.dumps(dataclasses.asdict(s))),  # tuples as lists, as read back
            params={n: p.to_dict() for n, p in space.params.items()},
            points_to_evaluate=list(space.points_to_evaluate), point_labels=list(space.point_labels),
            guide=space.guide_summary(), simpo_ray_version=ours,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, exp_path: str) -> None:
        """Write `<exp_path>/search.json` atomically (a local path or a pyarrow URI)."""
        from simpo_ray.io import write_json_atomic

        if "://" in exp_path:
            write_remote(f"{exp_path}/search.json", json.dumps(self.to_dict(), indent=2, sort_keys=True))
        else:
            write_json_atomic(Path(exp_path) / "search.json", self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str = "search.json") -> SearchRecord:
        """Check `data` against the schema; a UserError in one line names what is wrong."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: not a simpo_ray search record (a JSON object is expected)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            what = "no schema_version" if version is None else f"schema_version {version!r}"
            raise UserError(f"{source}: {what}; this simpo_ray reads schema_version {SCHEMA_VERSION} "
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
    "guide": (dict,), "simpo_ray_version": (str,),
}


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is _NONE else t.__name__ for t in types)


def write_remote(uri: str, text: str) -> None:
    """Write `text` to a pyarrow filesystem URI (s3://, gs://, ...)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as f:  # object stores replace an object atomically
        f.write(text.encode())
