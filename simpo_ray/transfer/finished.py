"""Finished searches, read for what they teach a new one: `load_finished(dirs)` reads them (with
their model's parameter count, `model_size.param_count`); `same_size_trials` gives the new
search's searcher the finished trials of its size bucket and model, when they were measured
alike. No Ray, no tensors."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from simpo_ray.errors import UserError
from simpo_ray.config import FIELDS
from simpo_ray.search.records import LATER_BASE_KEYS
from simpo_ray.guide import PARAMS
from simpo_ray.search import records, validate
from simpo_ray.search.records import SearchRecord
from simpo_ray.transfer.model_size import param_count, short_name

if TYPE_CHECKING:
    from simpo_ray.search.space import SearchSpace

TRIAL_COLUMNS = ("trial_id", "status", "steps", "objective_value", "best_objective")


@dataclass(frozen=True)
class FinishedSearch:
    """One finished search: what it searched, its model's parameter count and its trials table
    (trial_id, status, the searched parameters, steps, objective_value, best_objective)."""

    path: Path
    name: str
    size_bucket: str
    model: str             # model_name_or_path
    n_params: float | None
    params_source: str     # where n_params comes from, or why it is unknown
    objective: str
    mode: str              # max | min
    trials: pd.DataFrame
    record: SearchRecord   # the whole search.json

    @property
    def label(self) -> str:
        """The size key, as analysis names it: `cpu/tiny`, `7b-8b/Mistral-7B-v0.1`."""
        return f"{self.size_bucket}/{short_name(self.model)}"

    @property
    def searched(self) -> tuple[str, ...]:
        return tuple(self.record.params)

    def fixed_value(self, param: str) -> float | None:
        """The value a parameter the search did not vary was fixed at (None: not recorded, a
        version-1 search.json)."""
        v = self.record.space.get("base", {}).get(param)
        return None if v is None else float(v)

    def value(self, trial, param: str) -> float | None:
        """A trial's (a trials.csv row's) value of `param`: its own where this search varied it,
        else the value the search fixed it at (None: not recorded)."""
        return float(trial[param]) if param in self.searched else self.fixed_value(param)

    def ranked(self) -> pd.DataFrame:
        return records.ranked(self.trials, self.mode)


def _recorded_estimate(record: SearchRecord) -> float | None:
    """estimate.params_billion of the search's space file, when the file is still the one the
    search ran (its SHA-256 matches search.json)."""
    import yaml

    path = Path(record.space_file)
    if not record.space_sha256 or records.space_sha256(path) != record.space_sha256:
        return None
    try:
        value = (yaml.safe_load(path.read_text()) or {}).get("estimate", {}).get("params_billion")
        return float(value) if value else None
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None


def from_record(path: str | Path, record: SearchRecord, trials: pd.DataFrame) -> FinishedSearch:
    """A `FinishedSearch` of an already-read record and trials table (analysis reuses its own)."""
    path = Path(path)
    src = path / "trials.csv"
    missing = [c for c in (*TRIAL_COLUMNS, *record.params) if c not in trials.columns]
    if missing:
        raise UserError(f"{src}: not a simpo_ray trials table (no column {', '.join(missing)})")
    t = trials[[c for c in trials.columns if c in (*TRIAL_COLUMNS, *PARAMS)]].copy()
    t["trial_id"] = t["trial_id"].astype(str)
    t["status"] = t["status"].astype(str).str.strip().str.lower()
    for c in t.columns.drop(["trial_id", "status"]):
        t[c] = pd.to_numeric(t[c], errors="coerce")
    if records.ranked(t, record.mode).empty:
        counts = ", ".join(f"{n} {s}" for s, n in t["status"].value_counts().items())
        raise UserError(f"{path}: no finished trial with a value of {record.objective} ({counts})")
    n, source = param_count(record.model_name_or_path, _recorded_estimate(record))
    return FinishedSearch(path, record.name, record.size_bucket, record.model_name_or_path, n, source,
                          record.objective, record.mode, t.reset_index(drop=True), record)


def _search_dirs(dirs: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for raw in dirs:
        d = Path(raw).expanduser()
        if not d.is_dir():
            raise UserError(f"{d}: no such directory (give a finished search's directory)")
        found = [d] if (d / "search.json").is_file() else sorted(
            p for p in d.iterdir() if p.is_dir() and (p / "search.json").is_file())
        if not found:
            raise UserError(f"{d}: not a finished search (no search.json in it or its subdirectories)")
        out += [p for p in found if p.resolve() not in {q.resolve() for q in out}]
    return out


def load_finished(dirs: Iterable[str | Path]) -> list[FinishedSearch]:
    """Read finished searches: each directory holds one (search.json, trials.csv) or several.

    One-line `UserError` for a directory that is not a finished search (no search.json, state
    running or interrupted, no trials.csv, no ranked trial) and for mixed objectives."""
    out = []
    for d in _search_dirs(dirs):
        record = SearchRecord.read(d / "search.json")
        if record.state in ("running", "interrupted"):
            raise UserError(f"{d}: not a finished search (search.json: state {record.state}); resume it "
                            "with --resume first, or leave it out")
        trials = validate.read_trials(d, record)  # analysis' checks: a damaged table is refused
        out.append(from_record(d, record, trials))
    kinds = {(s.objective, s.mode) for s in out}
    if len(kinds) > 1:
        listed = "; ".join(f"{s.name}: {s.objective} ({s.mode})" for s in out)
        raise UserError(f"mixed objectives across searches ({listed}); give searches of one objective")
    return out


def same_size_trials(searches: Iterable[FinishedSearch], space: SearchSpace,
                     notes: list[str] | None = None) -> list[tuple[dict[str, float], float]]:
    """(params, value) of the ranked trials of searches with the space's size bucket and model,
    best first, for the searcher as completed trials.

    `value` is the trial's final `objective_value` (what the searcher of its own search was
    told; `best_objective` where that is missing). A trial is left out, with a line in `notes`,
    when a searched value lies outside the space's range, when it ran with another value of a
    parameter the space fixes, or when it repeats an earlier point (the better one is kept).
    A search of another objective is refused."""
    notes = notes if notes is not None else []
    model = str(space.trial_config().model_name_or_path)
    fixed = space.fixed_params()
    out: list[tuple[dict[str, float], float]] = []
    skipped = {"outside": 0, "fixed": 0, "duplicate": 0}
    for s in searches:
        if (s.size_bucket, s.model) != (space.size_bucket, model):
            continue
        if (s.objective, s.mode) != (space.search.objective, space.search.mode):
            raise UserError(f"{s.path}: optimised {s.objective} ({s.mode}), this search "
                            f"{space.search.objective} ({space.search.mode}); its values cannot warm-start it")
        _check_measured_alike(s, space)
        for _, t in s.ranked().iterrows():
            point = {p: s.value(t, p) for p in space.params}
            if any(v is None or not space.params[p].contains(v) for p, v in point.items()):
                skipped["outside"] += 1
            elif any(s.value(t, p) is not None and not math.isclose(s.value(t, p), v, rel_tol=1e-9, abs_tol=1e-15)
                     for p, v in fixed.items()):
                skipped["fixed"] += 1
            elif any(all(math.isclose(point[p], q[p], rel_tol=1e-9, abs_tol=1e-15) for p in point)
                     for q, _ in out):
                skipped["duplicate"] += 1
            else:
                final = float(t["objective_value"])
                out.append((point, final if math.isfinite(final) else float(t["best_objective"])))
    why = {"outside": "outside this space's searched ranges", "fixed": "ran with another value of a "
           "parameter this space fixes", "duplicate": "repeated an earlier point"}
    notes += [f"warm start: {n} trial(s) left out: {why[k]}" for k, n in skipped.items() if n]
    return out


# Keys of a run that decide what its objective value measures: searches that differ in one of
# them produced values the new searcher must not be told as its own.
MEASUREMENT_KEYS = ("dataset_mixer", "dataset_splits", "max_eval_samples", "max_steps", "num_train_epochs",
                    "generation_eval_samples", "max_new_tokens", "generation_do_sample",
                    "reward_model_name_or_path", "reward_baseline")


def _check_measured_alike(search: FinishedSearch, space: SearchSpace) -> None:
    """`UserError` naming the first key in which a same-size search measured its objective
    otherwise than `space` does (a search recorded without its base config passes)."""
    theirs = search.record.space.get("base") or {}
    ours = space.trial_config().to_dict()
    for key in MEASUREMENT_KEYS if theirs else ():
        if key not in theirs and key not in LATER_BASE_KEYS:
            continue  # searched there, or not recorded
        value = theirs.get(key, FIELDS[key].default)  # a later key at its default is left out of records
        if value != ours.get(key):
            raise UserError(f"{search.path}: ran with {key}: {value!r}, this search with {ours.get(key)!r}; "
                            "its objective values are not comparable and cannot warm-start it")
