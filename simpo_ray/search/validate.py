"""Check what is read back from an experiment directory before trusting it: the one validator
of results, used by `analysis`, the warm start (`transfer.finished`) and anything else that
reads a finished search's tables.

`check_experiment` refuses (one-line `UserError` naming the file and, where it applies, the row)
a trials.csv or curves.csv that cannot be what `simpo_ray.tune` wrote: cut short, a row twice,
a value that is not a number, a status that is not one of `simpo_ray.search.records.STATUSES`, a
searched parameter outside the range search.json records, more trials than the search ran (or,
for a finished search, fewer), learning curves of trials the table does not hold or none for a
trial that reported. `partial_reason` says why an experiment's tables are partial (the report
prints it), or None for a finished search.

Rows are numbered as in a spreadsheet: row 1 is the header, row 2 the first trial.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from simpo_ray.errors import UserError
from simpo_ray.search.records import STATUSES, SearchRecord

NUMERIC = ("steps", "objective_value", "best_objective")  # may be empty (NaN) except steps
CURVE_TEXT_COLUMNS = ("trial_id", "status", "checkpoint_path")  # curves.csv's only text columns
TRIALS_COLUMNS = ("trial_id", "status", "is_default", "steps", "objective_value", "best_objective")
_TRUE_FALSE = {"true", "false", "1", "0", "1.0", "0.0", "yes", "no"}
_REL = 1e-9  # tolerance on a range's bounds (CSV round trips of floats)


def _row(index: int) -> int:
    return int(index) + 2  # the header is row 1


def check_file_end(path: Path) -> None:
    """A non-empty CSV that does not end with a newline was cut while being written or copied
    (simpo_ray writes whole files, each ending with one)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb") as f:
        f.seek(size - 1)
        last = f.read(1)
    if last != b"\n":
        lines = path.read_bytes().count(b"\n") + 1
        raise UserError(f"{path}: row {lines} is cut short (the file does not end with a line break); "
                        "the file is truncated: copy it again from the search's storage, or rerun the search")


def _number(path: Path, trials: pd.DataFrame, column: str, *, allow_empty: bool) -> pd.Series:
    raw = trials[column]
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & ~(raw.isna() if allow_empty else pd.Series(False, index=raw.index))
    if bad.any():
        i = bad.idxmax()
        raise UserError(f"{path}: row {_row(i)} (trial {trials.at[i, 'trial_id']}): {column} is "
                        f"{raw[i]!r}, not a number")
    return values


def check_trials(path: Path, trials: pd.DataFrame, search: SearchRecord) -> None:
    """Types, statuses, one row per trial id, parameter values inside the searched ranges, and
    the trial count against search.json."""
    ids = trials["trial_id"]
    if ids.isna().any():
        i = ids.isna().idxmax()
        raise UserError(f"{path}: row {_row(i)}: trial_id is empty")
    dup = ids.duplicated(keep=False)
    if dup.any():
        tid = ids[dup].iloc[0]
        rows = [_row(i) for i in ids.index[ids == tid]]
        raise UserError(f"{path}: rows {' and '.join(map(str, rows[:2]))}: trial {tid} appears "
                        f"{len(rows)} times; one row per trial is expected")
    status = trials["status"].astype(str).str.strip().str.lower()
    unknown = ~status.isin(STATUSES)
    if unknown.any():
        i = unknown.idxmax()
        raise UserError(f"{path}: row {_row(i)} (trial {ids[i]}): status {trials.at[i, 'status']!r} is not "
                        f"one of {', '.join(STATUSES)}")
    is_default = trials["is_default"].astype(str).str.strip().str.lower()
    if (~is_default.isin(_TRUE_FALSE)).any():
        i = (~is_default.isin(_TRUE_FALSE)).idxmax()
        raise UserError(f"{path}: row {_row(i)} (trial {ids[i]}): is_default is {trials.at[i, 'is_default']!r}, "
                        "expected True or False")
    steps = _number(path, trials, "steps", allow_empty=False)
    if (steps < 0).any() or (steps != steps.round()).any():
        i = ((steps < 0) | (steps != steps.round())).idxmax()
        raise UserError(f"{path}: row {_row(i)} (trial {ids[i]}): steps is {trials.at[i, 'steps']!r}, "
                        "expected a whole number >= 0")
    for column in NUMERIC[1:]:
        values = _number(path, trials, column, allow_empty=True)
        inf = values.map(lambda v: isinstance(v, float) and math.isinf(v))
        if inf.any() and column == "best_objective":
            i = inf.idxmax()
            if status[i] in ("completed", "stopped_early"):
                raise UserError(f"{path}: row {_row(i)} (trial {ids[i]}): best_objective is "
                                f"{trials.at[i, column]!r} for a {status[i]} trial")
    for name, spec in search.params.items():
        if name not in trials.columns:
            raise UserError(f"{path}: no column {name}, a parameter the search varied (search.json)")
        values = _number(path, trials, name, allow_empty=False)
        for i, v in values.items():
            if not _inside(float(v), spec):
                raise UserError(f"{path}: row {_row(i)} (trial {ids[i]}): {name} {float(v):g} is "
                                f"outside the searched range {_range_text(spec)} (search.json)")
    n, expected = len(trials), search.num_samples
    if n > expected:
        raise UserError(f"{path}: {n} trials, but search.json says the search ran {expected}")
    if search.state == "finished" and n < expected:
        raise UserError(f"{path}: {n} trials, but search.json says the finished search ran {expected}; "
                        "rows are missing (a truncated or edited file?)")


def _inside(value: float, spec: dict[str, Any]) -> bool:
    if not math.isfinite(value):
        return False
    if spec.get("values"):
        return any(math.isclose(value, float(v), rel_tol=_REL, abs_tol=1e-15) for v in spec["values"])
    low, high = float(spec["low"]), float(spec["high"])
    slack = _REL * max(abs(low), abs(high), 1e-300)
    return low - slack <= value <= high + slack


def _range_text(spec: dict[str, Any]) -> str:
    if spec.get("values"):
        return "{" + ", ".join(f"{float(v):g}" for v in spec["values"]) + "}"
    return f"[{float(spec['low']):g}, {float(spec['high']):g}]"


def check_curves(path: Path, curves: pd.DataFrame, trials: pd.DataFrame) -> None:
    """Learning curves only of trials in trials.csv, one row per (trial, step), numeric steps;
    every trial that reported past step 0 has some."""
    if curves.empty:
        return
    for column in ("trial_id", "step"):
        if column not in curves.columns:
            raise UserError(f"{path}: no column {column}; not a simpo_ray learning-curve table")
    steps = pd.to_numeric(curves["step"], errors="coerce")
    if steps.isna().any():
        i = steps.isna().idxmax()
        raise UserError(f"{path}: row {_row(i)}: step is {curves.at[i, 'step']!r}, not a number")
    for column in curves.columns:  # every metric is a number or empty
        if column in CURVE_TEXT_COLUMNS or column == "step":
            continue
        raw = curves[column]
        bad = pd.to_numeric(raw, errors="coerce").isna() & raw.notna()
        if bad.any():
            i = bad.idxmax()
            raise UserError(f"{path}: row {_row(i)} (trial {curves.at[i, 'trial_id']}): {column} is "
                            f"{raw[i]!r}, not a number")
    ids = curves["trial_id"].astype(str)
    known = set(trials["trial_id"].astype(str))
    stray = ~ids.isin(known)
    if stray.any():
        i = stray.idxmax()
        raise UserError(f"{path}: row {_row(i)}: trial {ids[i]} is not in trials.csv")
    dup = pd.DataFrame({"t": ids, "s": steps}).duplicated(keep="first")
    if dup.any():
        i = dup.idxmax()
        raise UserError(f"{path}: row {_row(i)}: trial {ids[i]} step {steps[i]:g} appears twice")
    with_curves = set(ids)
    reported = pd.to_numeric(trials["steps"], errors="coerce") > 0
    missing = [str(t) for t in trials.loc[reported, "trial_id"] if str(t) not in with_curves]
    if missing:
        raise UserError(f"{path}: no learning curve for trial {missing[0]}, which trials.csv says reported "
                        "(curves.csv and trials.csv are from different searches, or one was cut)")


def partial_reason(search: SearchRecord, trials: pd.DataFrame) -> str | None:
    """Why these tables do not describe a whole search, or None when they do."""
    n = len(trials)
    interrupted = int((trials["status"].astype(str).str.strip().str.lower() == "interrupted").sum())
    if search.state == "interrupted":
        return (f"the search was interrupted: {n} of {search.num_samples} trials, {interrupted} cut "
                "(partial results; `python -m simpo_ray.tune ... --resume` continues it)")
    if search.state == "running":
        return (f"the search has not finished (search.json: running; still running, or its driver "
                f"died): {n} of {search.num_samples} trials (partial results)")
    if search.state == "unrecorded":
        return ("search.json (schema version 1) does not record whether the search finished; a search "
                "of that version stopped with Ctrl-C labelled its cut trials stopped_early")
    return None


def read_csv(path: Path) -> pd.DataFrame:
    """A results CSV (trial ids kept as text); an empty file is an empty table; one line otherwise."""
    try:
        return pd.read_csv(path, dtype={"trial_id": str})
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV file ({str(e).splitlines()[0]})") from None


def read_trials(directory: Path, search: SearchRecord) -> pd.DataFrame:
    """`directory`/trials.csv, checked: present, whole, with simpo-ray's columns, one row per
    trial, numbers where numbers belong, statuses and parameters as `search` recorded them."""
    path = directory / "trials.csv"
    if not path.is_file():
        raise UserError(f"{directory}: trials.csv missing: the search has not finished or did not start")
    check_file_end(path)
    trials = read_csv(path)
    missing = [c for c in TRIALS_COLUMNS if c not in trials.columns]
    if trials.columns.size and missing:
        raise UserError(f"{path}: not a simpo_ray results table (no column {', '.join(missing)})")
    if trials.empty:
        raise UserError(f"{path}: no trials recorded")
    check_trials(path, trials, search)
    return trials


def read_curves(directory: Path, trials: pd.DataFrame) -> pd.DataFrame:
    """`directory`/curves.csv, checked against `trials` (an empty table when there is none)."""
    path = directory / "curves.csv"
    if path.is_file():
        check_file_end(path)
    curves = read_csv(path) if path.is_file() else pd.DataFrame()
    check_curves(path, curves, trials)
    return curves
